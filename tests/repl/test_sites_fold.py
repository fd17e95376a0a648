"""Captured later, folded in batches (issue 47, meta/sites/pending.py): a linked site that
records what its creates, attribute changes, extended attributes and writes did, and folds
that into the replicated tree, the registers and the outbox later (FoldCapture, or first thing
in any command that reads the site tables), ends with the same tables, every one of them, as a
site that captures in each command: the same stamps, the same `seen`, the same conflicts kept.

A differential over seeded random two-site workloads (tests/repl/test_sites_sm.py's `run`),
with folds at random moments; and two planted bugs it must catch: a batch of the other site's
operations applied before what waits is folded, and records folded newest first. Two more
differentials for what makes the write path and the fold cheap: a create's tree rows written
without the general move's reads (`_place_new`) against the general move, and commands sharing
write transactions as a group commit batches them (what `record` keeps per transaction) against
one transaction each, compared table by table after every command.
"""

from __future__ import annotations

import hashlib
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.crdt.hlc import Stamp
from awsomefsd.meta import commands as c
from awsomefsd.meta import levels, state_machine
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.sites import capture
from awsomefsd.meta.sites.capture import SiteCapture
from awsomefsd.meta.sites.pending import PENDING
from awsomefsd.meta.sites.tree import TableTree
from tests.repl import test_sites_sm
from tests.repl.test_sites_sm import Site, linked_pair, random_command, random_step, run, ship
from tests.support import seeds

SEEDS = seeds.params("sites-fold", 6, replay_var="AWSOMEFS_SITES_FOLD_SEED")


def make(rng: random.Random, site: Site, roll: float) -> object | None:
    """The random workload, with a fold of a few records now and then (the link's FoldCapture)."""
    if roll > 0.92:
        return c.FoldCapture(rng.randint(1, 4))
    return random_command(rng, site)


def tables(site: Site) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every row of every table of the site's store."""
    return site.read(lambda txn: {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
                                  for name, db in sorted(site.store.db.items())})


def tables_that_differ(one: tuple[Site, Site], other: tuple[Site, Site]) -> list[str]:
    """The tables of two runs' site pairs (a, b) whose rows differ."""
    differ = []
    for name, left_site, right_site in zip("ab", one, other, strict=True):
        left, right = tables(left_site), tables(right_site)
        differ += [f"site {name}, table {table}" for table in left if left[table] != right[table]]
    return differ


def folded_head(site: Site) -> Stamp | None:
    """The head capture at once acknowledges with. One that leaves out what waits for a fold is
    as safe (those records saw everything acknowledged, and are stamped after it: the link's
    receiver acknowledges so), but lets the other site forget sooner, and tables differ."""
    site.apply(c.FoldCapture(1 << 20))
    return site.read(site.sm.sites.head)


def both_ways(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tables that differ between the run capturing later and the one capturing at once."""
    monkeypatch.setattr(test_sites_sm, "acknowledged_head", folded_head)
    later = run(tmp_path / "later", seed, make=make)
    with monkeypatch.context() as patched:
        patched.setattr(SiteCapture, "folds_later", lambda self, txn: False)
        at_once = run(tmp_path / "at-once", seed, make=make)
    return tables_that_differ(later, at_once)


@pytest.mark.parametrize("seed", SEEDS)
def test_capture_folded_later_makes_the_tables_capture_at_once_makes(tmp_path: Path, seed: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    differ = both_ways(tmp_path, seed, monkeypatch)
    assert not differ, f"seed {seed}: capture folded later differs from capture at once in {differ}"


def test_a_linked_create_waits_for_its_fold_and_a_remote_batch_folds_it_first(tmp_path: Path) -> None:
    """The create itself writes one record and nothing of the tree; the fold makes its two
    operations; an ApplyRemote from the other site folds first, so the create's `seen` is what
    it was when it was made (it did not see the batch)."""
    a, b = linked_pair(tmp_path)
    a.apply(c.Mknod(ROOT_INO, b"mine", a.new_ino(), stat.S_IFREG | 0o644, 0, 0, a.tick()))
    assert a.read(lambda txn: a.sm.sites.newest_unfolded(txn)) == 0, "one record waits, numbered 0"
    assert a.read(lambda txn: a.sm.sites.outbox(txn, None, 10)) == []
    assert a.read(lambda txn: a.sm.sites.pending_after(txn, None)) == 1, "status counts what waits"
    b.apply(c.Mknod(ROOT_INO, b"theirs", b.new_ino(), stat.S_IFREG | 0o644, 0, 0, b.tick()))
    ship(b, a)  # a applies b's batch: its own create is folded first
    assert a.read(lambda txn: a.sm.sites.newest_unfolded(txn)) is None
    ops = [raw for _, raw in a.outbox_after(None)]
    assert len(ops) == 2 and all(b'"seen":{}' in raw for raw in ops), ops


def any_seed_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int = 6) -> bool:
    return any(both_ways(tmp_path / str(seed), seed, monkeypatch) for seed in range(count))


def test_planted_bug_a_remote_batch_applied_before_the_fold_is_caught(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_machine, "UNFOLDED", (*capture.UNFOLDED, c.ApplyRemote))
    assert any_seed_differs(tmp_path, monkeypatch)


def test_planted_bug_folding_newest_first_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = capture.scan

    def newest_first(txn: Any, db: Any, prefix: bytes) -> Any:
        found = list(scan(txn, db, prefix))
        return reversed(found) if prefix == PENDING else iter(found)
    monkeypatch.setattr(capture, "scan", newest_first)
    assert any_seed_differs(tmp_path, monkeypatch)


@pytest.mark.parametrize("level", [levels.FOLD_LEVEL - 1, levels.FOLD_LEVEL])
def test_a_cluster_records_for_a_fold_only_once_every_member_does(tmp_path: Path, level: int) -> None:
    """A member on an older build captures in the command and cannot decode FoldCapture: until
    every member runs this build (the cluster's log level, FOLD_LEVEL), every replica captures
    at once, and the operations are in the outbox when the create commits."""
    a, _b = linked_pair(tmp_path)
    a.as_cluster_at(level)  # a is a cluster at `level`
    a.apply(c.Mknod(ROOT_INO, b"f", a.new_ino(), stat.S_IFREG | 0o644, 0, 0, a.tick()))
    waiting = int(a.read(lambda txn: a.sm.sites.newest_unfolded(txn)) is not None)
    shipped = a.read(lambda txn: a.sm.sites.outbox(txn, None, 10))
    assert (waiting, len(shipped)) == ((1, 0) if level >= levels.FOLD_LEVEL else (0, 2))


# -- a create's rows written at once, and what the write path keeps per transaction -----------
def general_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every create's tree rows by the general local move (`_local_move`), as before `_place_new`."""
    monkeypatch.setattr(SiteCapture, "_place_new", lambda self, txn, node, parent, name, obj, now_ns:
                        self._local_move(txn, node, parent, name, obj, now_ns))


def placed_both_ways(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(test_sites_sm, "acknowledged_head", folded_head)
    fast = run(tmp_path / "fast", seed, make=make)
    with monkeypatch.context() as patched:
        general_move(patched)
        general = run(tmp_path / "general", seed, make=make)
    return [f"site {name}, table {table}" for name, one, other in zip("ab", fast, general, strict=True)
            for table, rows in tables(one).items() if rows != tables(other)[table]]


@pytest.mark.parametrize("seed", SEEDS)
def test_a_create_placed_at_once_makes_the_rows_the_general_move_makes(tmp_path: Path, seed: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    differ = placed_both_ways(tmp_path, seed, monkeypatch)
    assert not differ, f"seed {seed}: a create's rows written at once differ from the general move's in {differ}"


def test_planted_bug_a_create_without_its_moves_row_is_caught(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    place_new = TableTree.place_new

    def no_moves_row(self: TableTree, move: Any) -> None:
        place_new(self, move)
        self.txn.delete(move.node + move.stamp.pack(), db=self.t.db["smoves"])
    monkeypatch.setattr(TableTree, "place_new", no_moves_row)
    assert any(placed_both_ways(tmp_path / str(seed), seed, monkeypatch) for seed in range(6))


def digest(site: Site, txn: Any) -> bytes:
    """Every row of every table, hashed."""
    h = hashlib.blake2b(digest_size=16)
    for name, db in sorted(site.store.db.items()):
        h.update(name.encode())
        for key, value in txn.cursor(db=db):
            h.update(len(key).to_bytes(4, "big") + bytes(key) + len(value).to_bytes(4, "big") + bytes(value))
    return h.digest()


class Traced(Site):
    """A site that keeps a digest of its tables after every command (`trace`). With `commits`
    its commands share write transactions as LocalLog's group commit makes them (meta/log.py):
    one stays open across commands, a refused one included, and commits at random points; what
    the workload reads, it reads through that transaction. Without, each has its own."""

    def __init__(self, path: Path, cluster_id: str, clock_start: int, commits: random.Random | None = None) -> None:
        self.commits, self.txn, self.trace = commits, None, []
        super().__init__(path, cluster_id, clock_start)

    def apply(self, cmd: object) -> Any:
        """Without `commits`, each command in a transaction of its own, committed even when the
        command is refused, as both logs keep what a refusal did (the fold before it)."""
        if self.txn is None:
            self.txn = self.store.env.begin(write=True)
        txn = self.txn
        try:
            return self.sm.apply(txn, cmd)
        finally:
            self.trace.append(digest(self, txn))
            if self.commits is None or self.commits.random() < 0.3:
                txn.commit()
                self.txn = None

    def commit(self) -> None:
        if self.txn is not None:
            self.txn.commit()
            self.txn = None

    def read(self, fn: Any) -> Any:
        return super().read(fn) if self.txn is None else fn(self.txn)

    def folded(self, fn: Any) -> Any:
        if self.txn is None:
            return super().folded(fn)
        child = self.store.env.begin(write=True, parent=self.txn)
        try:
            self.sm.sites.fold(child)
            return fn(child)
        finally:
            child.abort()
            self.sm.load(self.txn)


def make_switching(rng: random.Random, site: Site, roll: float) -> object | None:
    """`make`'s workload, capture paused and resumed now and then (bound.py), and a site that is a
    cluster below `levels.FOLD_LEVEL` raised to this build's level: what `record` keeps per
    transaction changes in the middle of one."""
    if roll > 0.97:
        return c.PauseCapture(site.tick()) if rng.random() < 0.5 else c.ResumeCapture(site.tick())
    if roll > 0.96:
        return c.SetLogLevel(levels.LOG_LEVEL, ())
    return make(rng, site, roll)


def traced_run(tmp_path: Path, seed: int, batched: bool) -> tuple[Traced, Traced]:
    commits = random.Random(-seed) if batched else None
    rng = random.Random(seed)
    a = Traced(tmp_path / "a", "a" * 32, 10**12, commits)
    b = Traced(tmp_path / "b", "b" * 32, 10**12 + 500, commits)
    a.apply(c.LinkSite(b.id, a.tick()))
    b.apply(c.LinkSite(a.id, b.tick()))
    a.commit()
    a.as_cluster_at(levels.FOLD_LEVEL - 1)  # a is a cluster whose members ran an older build
    for _ in range(150):
        random_step(rng, a, b, make=make_switching)
    while ship(a, b) + ship(b, a):
        pass
    return a, b


def batched_both_ways(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Where the run whose commands share transactions first differs from the one that gives
    each its own: None if nowhere."""
    monkeypatch.setattr(test_sites_sm, "acknowledged_head", folded_head)
    alone = traced_run(tmp_path / "alone", seed, batched=False)
    shared = traced_run(tmp_path / "shared", seed, batched=True)
    for name, one, other in zip("ab", alone, shared, strict=True):
        for step, (left, right) in enumerate(zip(one.trace, other.trace, strict=True)):
            if left != right:
                return f"site {name}, command {step}"
    return None


@pytest.mark.parametrize("seed", SEEDS)
def test_commands_sharing_a_transaction_make_the_tables_each_in_its_own_makes(tmp_path: Path, seed: int,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    differ = batched_both_ways(tmp_path, seed, monkeypatch)
    assert differ is None, f"seed {seed}: commands sharing a transaction differ from one each at {differ}"


@pytest.mark.parametrize("bug", ["kept across a pause", "numbered on after a fold"])
def test_planted_bug_what_record_keeps_per_transaction_going_stale_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: str) -> None:
    if bug == "kept across a pause":
        monkeypatch.setattr(SiteCapture, "before_command", lambda self, txn: self.fold(txn))
    else:
        fold = SiteCapture.fold

        def numbered_on(self: SiteCapture, txn: Any, limit: int | None = None) -> int:
            kept = self._deferring
            number = None if kept is None else kept.next_pending
            folded = fold(self, txn, limit)
            if kept is not None:
                kept.next_pending = number
            return folded
        monkeypatch.setattr(SiteCapture, "fold", numbered_on)
    assert any(batched_both_ways(tmp_path / str(seed), seed, monkeypatch) for seed in range(6))
