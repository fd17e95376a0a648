"""The receiver's short paths (issue 47, meta/sites/apply.py) against the full path: a new
entry's first placement put in place without the replicated tree's walks (`first_placement`),
and the clock and `seen` moved once per batch rather than per operation (`observes_once`), leave
every row of every table on both sites as the full path does: the same tree, log, registers,
entries, conflicts and kept copies.

A differential over seeded random two-site workloads (tests/repl/test_sites_sm.py's `run`: every
kind of command, shipping at random moments), and over a two-sided catch-up of creates and
renames (where this site's later moves must send a first placement down the full path); planted
bugs in each short path must make the tables differ.
"""

from __future__ import annotations

import random
import stat
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.crdt.tree import LogEntry, Move, Placement
from awsomefsd.meta import commands as c
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.sites import apply
from awsomefsd.meta.sites.apply import SiteApply
from awsomefsd.meta.sites.tree import TableTree
from tests.repl.test_sites_fold import tables
from tests.repl.test_sites_sm import Site, apply_refusable, linked_pair, run, ship
from tests.support import seeds

SEEDS = seeds.params("sites-short-path", 2, replay_var="AWSOMEFS_SITES_SHORT_SEED")


def catch_up(tmp_path: Path, seed: int) -> tuple[Site, Site]:
    """Both sites make directories, files in them and renames while cut off, each ships part of
    what it made now and then, then everything is exchanged: a catch-up's pushes, where most
    moves are first placements and some arrive older than moves made here."""
    rng = random.Random(seed)
    a, b = linked_pair(tmp_path)
    made: dict[str, list[tuple[int, bytes]]] = {"a": [], "b": []}
    for step in range(120):
        site, tag = (a, "a") if rng.random() < 0.5 else (b, "b")
        names = made[tag]
        roll = rng.random()
        if roll < 0.1:
            ship(a, b) if rng.random() < 0.5 else ship(b, a)
        elif roll < 0.25 or not names:
            ino = site.new_ino()
            site.apply(c.Mknod(ROOT_INO, f"{tag}-d{step}".encode(), ino, stat.S_IFDIR | 0o755, 0, 0, site.tick()))
            names.append((ino, f"{tag}-d{step}".encode()))
        elif roll < 0.85:
            parent = rng.choice([ino for ino, _ in names] + [ROOT_INO])
            name = rng.choice([b"x", b"y", f"{tag}-f{step}".encode()])
            apply_refusable(site, c.Mknod(parent, name, site.new_ino(), stat.S_IFREG | 0o644, 0, 0, site.tick()))
        else:
            ino, name = rng.choice(names)
            new = f"{tag}-r{step}".encode()
            site.apply(c.Rename(ROOT_INO, name, ROOT_INO, new, 0, site.tick()))
            names[names.index((ino, name))] = (ino, new)
    while ship(a, b) + ship(b, a):
        pass
    return a, b


def differing(tmp_path: Path, workload: Any, seed: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], int]:
    """The tables that differ between the short paths and the full path, and how many first
    placements took the short path."""
    taken = 0
    first_placement = SiteApply.first_placement

    def counted(self: SiteApply, txn: Any, tree: TableTree, move: Move) -> bool:
        nonlocal taken
        done = first_placement(self, txn, tree, move)
        taken += done
        return done

    with monkeypatch.context() as patched:
        patched.setattr(SiteApply, "first_placement", counted)
        short = workload(tmp_path / "short", seed)
    with monkeypatch.context() as patched:
        patched.setattr(SiteApply, "first_placement", lambda self, txn, tree, move: False)
        patched.setattr(SiteApply, "observes_once", lambda self, txn: False)
        full = workload(tmp_path / "full", seed)
    differ = []
    for name, one, other in zip("ab", short, full, strict=True):
        left, right = tables(one), tables(other)
        differ += [f"site {name}, table {table}" for table in left if left[table] != right[table]]
    return differ, taken


def check_seed(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Both workloads of one seed; returns how many first placements of the random one took the
    short path. The catch-up is made to have some that must; a random workload may have none (seed
    651534700: 25 asked, each with a later move here or a placement already), so its coverage is
    asserted over many seeds, not per seed."""
    taken_in_random = 0
    for name, workload in (("random", run), ("catch-up", catch_up)):
        differ, taken = differing(tmp_path / name, workload, seed, monkeypatch)
        assert not differ, f"seed {seed}, {name} workload: the short paths differ from the full path in {differ}"
        if name == "random":
            taken_in_random = taken
        else:
            assert taken, f"seed {seed}, {name} workload: no first placement took the short path"
    return taken_in_random


@pytest.mark.parametrize("seed", SEEDS)
def test_the_short_paths_leave_the_tables_the_full_path_leaves(tmp_path: Path, seed: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    check_seed(tmp_path, seed, monkeypatch)


@pytest.mark.slow
def test_the_short_paths_leave_the_tables_the_full_path_leaves_under_many_more_seeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = seeds.fresh_range("sites-short-path-sweep", 40)
    taken = sum(check_seed(tmp_path / str(seed), seed, monkeypatch) for seed in chosen)
    assert taken, f"seeds {chosen[0]}..: no first placement of any random workload took the short path"


def any_seed_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int = 6) -> bool:
    return any(differing(tmp_path / f"{name}-{seed}", workload, seed, monkeypatch)[0]
               for seed in range(count) for name, workload in (("catch-up", catch_up), ("random", run)))


def planted_first_placement(*, adds_the_move: bool = True, logs_before: bool = False) -> Any:
    """`SiteApply.first_placement` with a write left out or wrong."""
    def first_placement(self: SiteApply, txn: Any, tree: TableTree, move: Move) -> bool:
        if move.node == move.parent or tree.placement(move.node) is not None \
                or any(True for _ in apply.scan(txn, self.db["skids"], move.node)) \
                or any(True for _ in apply.scan(txn, self.db["smoves"], move.node)) \
                or any(True for _ in apply.scan_from(txn, self.db["slog"], move.stamp.pack())):
            return False
        tree.place(move.node, Placement(move.parent, move.name, move.stamp))
        placed = Placement(move.parent, move.name, move.stamp)
        tree.insert(LogEntry(move, placed if logs_before else None, done=True))
        if adds_the_move:
            tree.add_move_of(move)
        return True
    return first_placement


def test_planted_bug_a_first_placement_logged_as_a_move_of_a_placed_node_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SiteApply, "first_placement", planted_first_placement(logs_before=True))
    assert any_seed_differs(tmp_path, monkeypatch, count=1)


def test_planted_bug_a_first_placement_missing_from_the_nodes_moves_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SiteApply, "first_placement", planted_first_placement(adds_the_move=False))
    assert any_seed_differs(tmp_path, monkeypatch, count=1)


def test_planted_bug_the_clock_left_behind_at_a_batch_end_is_caught(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    observe = SiteApply._observe

    def not_at_the_end(self: SiteApply, txn: Any, remote: Any) -> None:
        if not self.clock_later:
            observe(self, txn, remote)
    monkeypatch.setattr(SiteApply, "_observe", not_at_the_end)
    assert any_seed_differs(tmp_path, monkeypatch, count=1)
