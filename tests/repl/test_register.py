"""The multi-value register (awsomefsd/crdt/register.py): cases first, then three sites writing one
register at random and exchanging versions in random order, checked against a model of which
writes each site had seen; planted bugs that the simulation must catch."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from awsomefsd.crdt import register as r
from awsomefsd.crdt.hlc import HybridClock, Stamp
from awsomefsd.crdt.register import MAX_VERSIONS, MultiValueRegister, TooManyVersions, Version
from tests.support import seeds

A, B, C = (bytes(15) + bytes([n]) for n in (0xA, 0xB, 0xC))


def stamp(wall: int, site: bytes = A) -> Stamp:
    return Stamp(wall, 0, site)


def test_a_write_that_saw_the_other_replaces_it_without_conflict() -> None:
    reg: MultiValueRegister[str] = MultiValueRegister()
    first = Version(stamp(1, A), "one")
    assert reg.apply(first).shown
    second = Version(stamp(2, B), "two", seen={A: stamp(1, A)})
    outcome = reg.apply(second)
    assert outcome.shown and not outcome.lost
    assert reg.versions == (second,)


def test_concurrent_writes_keep_both_and_the_later_stamp_shows() -> None:
    older, newer = Version(stamp(5, A), "from a"), Version(stamp(6, B), "from b")
    for order in ((older, newer), (newer, older)):
        reg: MultiValueRegister[str] = MultiValueRegister()
        outcomes = [reg.apply(v) for v in order]
        assert reg.winner == newer and reg.losers == (older,)
        assert [v for o in outcomes for v in o.lost] == [older]


def test_a_later_write_that_saw_every_version_settles_the_conflict() -> None:
    reg = MultiValueRegister((Version(stamp(5, A), "a"), Version(stamp(6, B), "b")))
    fix = Version(stamp(9, A), "merged", seen={B: stamp(6, B)})
    outcome = reg.apply(fix)
    assert reg.versions == (fix,)
    assert [v.value for v in outcome.settled] == ["a"] and not outcome.lost


def test_an_old_version_arriving_after_its_successor_changes_nothing() -> None:
    reg: MultiValueRegister[str] = MultiValueRegister()
    reg.apply(Version(stamp(2, A), "new"))
    assert reg.apply(Version(stamp(1, A), "old")) == r.Outcome(shown=False)
    assert [v.value for v in reg.versions] == ["new"]


def test_a_version_applied_twice_changes_nothing_and_a_forged_one_is_refused() -> None:
    reg: MultiValueRegister[str] = MultiValueRegister()
    v = Version(stamp(1), "x")
    reg.apply(v)
    assert reg.apply(v) == r.Outcome(shown=False)
    with pytest.raises(ValueError, match="two different versions"):
        reg.apply(Version(stamp(1), "y"))


def test_a_flood_of_concurrent_versions_is_refused() -> None:
    reg: MultiValueRegister[int] = MultiValueRegister()
    with pytest.raises(TooManyVersions):  # each from a site of its own that saw none of the others
        for n in range(MAX_VERSIONS + 1):
            reg.apply(Version(Stamp(1 + n, 0, bytes(15) + bytes([n + 1])), n))


def test_a_version_seen_by_one_that_was_overwritten_in_turn_is_dropped_whatever_the_order() -> None:
    """c's write saw b's, a's saw c's and not b's (a never applied b's): b's was overwritten knowingly,
    so no site keeps it, in whatever order the three arrive (three-site seed 261001052, shrunk)."""
    b_first = Version(Stamp(1000, 0, B), "b")
    c_saw_b = Version(Stamp(1000, 1, C), "c", seen={B: b_first.stamp})
    a_saw_c = Version(Stamp(1000, 2, A), "a", seen={C: c_saw_b.stamp})
    for order in itertools.permutations((b_first, c_saw_b, a_saw_c)):
        reg: MultiValueRegister[str] = MultiValueRegister()
        outcomes = [reg.apply(v) for v in order]
        assert reg.versions == (a_saw_c,), [v.value for v in order]
        lost = [v for o in outcomes for v in o.lost]
        assert lost == [v for o in outcomes for v in o.settled], [v.value for v in order]


# -- three sites ---------------------------------------------------------------------------------

@dataclass
class Site:
    id: bytes
    clock: HybridClock
    reg: MultiValueRegister[int] = field(default_factory=MultiValueRegister)
    outbox: list[Version[int]] = field(default_factory=list)
    applied_from: dict[bytes, Stamp] = field(default_factory=dict)
    knows: set[Stamp] = field(default_factory=set)
    open_conflicts: set[Stamp] = field(default_factory=set)
    """Versions reported lost and not yet settled, by the outcomes of `apply`."""


def simulate(seed: int, steps: int = 300) -> tuple[list[str], int]:
    """Problems found, and how many writes were concurrent with a later one (lost, to keep)."""
    rng = random.Random(seed)
    wall = [1000]
    sites = {s: Site(s, HybridClock(s, physical_ns=lambda: wall[0])) for s in (A, B, C)}
    cursors = {(a, b): 0 for a in sites for b in sites if a != b}
    knowledge: dict[Stamp, frozenset[Stamp]] = {}
    writes: list[Version[int]] = []

    def apply(site: Site, version: Version[int]) -> None:
        outcome = site.reg.apply(version)
        site.open_conflicts |= {v.stamp for v in outcome.lost}
        site.open_conflicts -= {v.stamp for v in outcome.settled}
        site.knows.add(version.stamp)

    for step in range(steps):
        wall[0] += rng.choice((0, 1, 3))
        if rng.random() < 0.4:
            site = sites[rng.choice((A, B, C))]
            version = Version(site.clock.now(), step, seen=dict(site.applied_from))
            knowledge[version.stamp] = frozenset(site.knows)
            writes.append(version)
            apply(site, version)
            site.outbox.append(version)
        else:
            src, dst = rng.choice(list(cursors))
            for version in sites[src].outbox[cursors[(src, dst)]:cursors[(src, dst)] + rng.randint(1, 3)]:
                sites[dst].clock.observe(version.stamp)
                apply(sites[dst], version)
                sites[dst].applied_from[src] = version.stamp
                cursors[(src, dst)] += 1
    for src, dst in cursors:
        for version in sites[src].outbox[cursors[(src, dst)]:]:
            apply(sites[dst], version)
            sites[dst].applied_from[src] = version.stamp

    problems = []
    maximal = sorted((w for w in writes if not any(w.stamp in knowledge[o.stamp] for o in writes)),
                     key=lambda v: v.stamp, reverse=True)
    for site in sites.values():
        if list(site.reg.versions) != maximal:
            problems.append(f"site {site.id.hex()[-1]} holds {[str(v.stamp) for v in site.reg.versions]}, "
                            f"the model {[str(v.stamp) for v in maximal]}")
    # the outcomes said what became a loser and what was settled: what stays open is the losers
    for site in sites.values():
        if site.open_conflicts != {v.stamp for v in maximal[1:]}:
            problems.append(f"site {site.id.hex()[-1]} has {len(site.open_conflicts)} open conflicts by its outcomes, "
                            f"the model {len(maximal) - 1}")
    ever_lost = {w.stamp for w in writes
                 if any(o.stamp > w.stamp and w.stamp not in knowledge[o.stamp] and o.stamp not in knowledge[w.stamp]
                        for o in writes)}
    return problems, len(ever_lost)


@pytest.mark.parametrize("seed", seeds.params("register", 30, fixed=(261001052, 38991381, 869333694, 1091209899)))
def test_sites_agree_on_the_winner_and_keep_exactly_the_writes_nobody_saw(seed: int) -> None:
    problems, conflicted = simulate(seed)
    assert problems == [], f"seed {seed}"
    assert conflicted > 0, "the run made no concurrent writes: it checks nothing"


def fails(seed: int) -> bool:
    try:
        return bool(simulate(seed)[0])
    except TooManyVersions:
        return True


def test_planted_bug_plain_last_writer_wins_loses_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Version, "saw", lambda self, other: other.stamp < self.stamp)
    assert any(fails(seed) for seed in range(10))


def test_planted_bug_forgetting_the_dominance_check_keeps_overwritten_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Version, "saw", lambda self, other: False)
    assert any(fails(seed) for seed in range(10))


def test_planted_bug_settled_conflicts_not_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real_apply = MultiValueRegister.apply

    def forgets_settled(self: MultiValueRegister[int], version: Version[int]) -> r.Outcome[int]:
        outcome = real_apply(self, version)
        return r.Outcome(outcome.shown, outcome.lost)
    monkeypatch.setattr(MultiValueRegister, "apply", forgets_settled)
    assert any(fails(seed) for seed in range(10))


def test_planted_bug_forgetting_what_dropped_versions_saw_keeps_overwritten_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(r, "_seen_by", lambda stamp, past, latest: False)
    assert any(fails(seed) for seed in (261001052, 38991381, 869333694, 1091209899))
