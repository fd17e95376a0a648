"""A catch-up applied in many small slices (issue 47, repl/receiver.py): each slice is an
`ApplyRemote` of its own, and the index of the tree's log a batch needs (`ReorderingIndex`: the
nodes named a parent since the batch's first stamp) is carried from one slice to the next
(`SiteTree.resume_index`) instead of read again from the whole log since the partition at every
slice. These check that the log is read once for a catch-up, not once per slice; that the index
carried over sees the moves made here between two slices (a planted bug, an index that skips
them, makes the sites list different conflicts); and that carrying it leaves every table as a
fresh index per batch does, over seeded two-site workloads.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.meta import commands as c
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.sites import tree
from awsomefsd.meta.sites.tree import ReorderingIndex, SiteTree
from tests.repl.test_apply_short_path import catch_up
from tests.repl.test_sites_fold import tables_that_differ
from tests.repl.test_sites_sm import Site, linked_pair, run, ship
from tests.support import seeds

SEEDS = seeds.params("sites-slices", 2, replay_var="AWSOMEFS_SITES_SLICES_SEED")


def create(site: Site, name: bytes, parent: int = ROOT_INO, mode: int = stat.S_IFREG | 0o644) -> int:
    ino = site.new_ino()
    site.apply(c.Mknod(parent, name, ino, mode, 0, 0, site.tick()))
    return ino


def test_a_catch_up_in_small_slices_reads_the_log_once_not_once_per_slice(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """b made 1,500 entries while cut off; a's 400 operations, older than all of them, apply in
    slices of 8 with a local create between two: the log since the partition is read about
    once (it was read whole at every slice: 50 slices of 1,500 entries), and the sites agree."""
    a, b = linked_pair(tmp_path)
    for i in range(200):
        create(a, b"a%d" % i)
    for i in range(1500):
        create(b, b"b%d" % i)
    for site in (a, b):
        site.apply(c.FoldCapture(1 << 20))
    read = 0
    parents_from = tree._parents_from

    def counting(*args: Any, **kwargs: Any) -> int:
        nonlocal read
        entries = parents_from(*args, **kwargs)
        read += entries
        return entries
    monkeypatch.setattr(tree, "_parents_from", counting)
    slices = 0
    while ship(a, b, count=8):
        slices += 1
        create(b, b"local%d" % slices)  # a local request between two slices
    assert slices >= 50
    assert read < 2 * 1500 + 4 * slices, f"the log was read {read} entries for {slices} slices"
    while ship(b, a) + ship(a, b):
        pass
    assert a.snapshot() == b.snapshot()


def test_a_catch_up_of_directory_moves_in_small_slices_reads_the_log_once(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory's move undoes the later moves of nodes that had a child, which it finds in the
    index's list of the log entries that reorder: read from the log once, then carried from
    slice to slice with b's moves appended, not read again from the partition on at every
    slice that moves a directory."""
    a, b = linked_pair(tmp_path)
    top = create(a, b"top", mode=stat.S_IFDIR | 0o755)
    create(a, b"inside", parent=top)
    ship(a, b)
    name = b"top"
    for i in range(80):  # every one a directory's move (it has a child)
        a.apply(c.Rename(ROOT_INO, name, ROOT_INO, b"top%d" % i, 0, a.tick()))
        name = b"top%d" % i
    b.now += 10**9
    for i in range(1500):
        create(b, b"b%d" % i)
        if i % 10 == 0:  # renames: entries that reorder
            b.apply(c.Rename(ROOT_INO, b"b%d" % i, ROOT_INO, b"r%d" % i, 0, b.tick()))
    for site in (a, b):
        site.apply(c.FoldCapture(1 << 20))
    read = 0
    scan_from = tree.scan_from

    def counting(*args: Any) -> Any:
        nonlocal read
        for row in scan_from(*args):
            read += 1
            yield row
    monkeypatch.setattr(tree, "scan_from", counting)
    slices = 0
    while ship(a, b, count=2):
        slices += 1
        create(b, b"local%d" % slices)
    assert slices >= 40
    assert read < 3 * 1650, f"the log was read {read} entries for {slices} slices"
    while ship(b, a) + ship(a, b):
        pass
    assert a.snapshot() == b.snapshot()


def test_moves_made_here_between_two_slices_count_in_the_index_carried_over(tmp_path: Path) -> None:
    """a moves directory d into e; b, after a slice of a's applied and before the next, moves e
    into d and back out. In stamp order a's move came first, so b's move of e into d would have
    made a cycle: both sites skip it and list it. b finds that only if the index carried from
    the first slice counts b's moves made since (they name d a parent); without them d looks
    childless and b keeps its own move as done, listing nothing."""
    a, b = linked_pair(tmp_path)
    create(a, b"d", mode=stat.S_IFDIR | 0o755)
    create(a, b"e", mode=stat.S_IFDIR | 0o755)
    h = create(a, b"h", mode=stat.S_IFDIR | 0o755)
    create(a, b"x", parent=h)
    ship(a, b)
    create(a, b"f")  # older than all b does below: its placement reads b's log (the index)
    # a directory's move: the first slice reads the entries it would undo (the index's stamps)
    a.apply(c.Rename(ROOT_INO, b"h", ROOT_INO, b"h2", 0, a.tick()))
    d = a.read(lambda txn: a.sm.ns.lookup(txn, ROOT_INO, b"d"))
    e = a.read(lambda txn: a.sm.ns.lookup(txn, ROOT_INO, b"e"))
    assert d is not None and e is not None
    a.apply(c.Rename(ROOT_INO, b"d", e, b"d", 0, a.tick()))
    a.apply(c.FoldCapture(1 << 20))
    b.now += 10**9  # b's clock ahead of a's: what b does next is later than all a did
    create(b, b"g")  # a log entry here later than a's create of f
    b.apply(c.FoldCapture(1 << 20))
    first = len(a.outbox_after(b.applied_from_peer())) - 1  # all but a's move of d
    assert ship(a, b, count=first) == first
    bd = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"d"))
    assert bd is not None
    b.apply(c.Rename(ROOT_INO, b"e", bd, b"e", 0, b.tick()))
    b.apply(c.Rename(bd, b"e", ROOT_INO, b"e", 0, b.tick()))
    assert ship(a, b) == 1  # the next slice: a's move of d into e
    while ship(b, a) + ship(a, b):
        pass
    assert a.snapshot() == b.snapshot()
    assert set(a.snapshot()) >= {b"/e", b"/e/d", b"/f", b"/g", b"/h2/x"}
    kinds = [conflict["kind"] for conflict in a.conflicts()]
    assert kinds == ["skipped-move"], kinds
    assert b.conflicts() == a.conflicts(), "both sites list the skipped move alike"


def differing(tmp_path: Path, workload: Any, seed: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tables that differ between carrying the index from batch to batch and reading it
    afresh in every batch."""
    carried = workload(tmp_path / "carried", seed)
    with monkeypatch.context() as patched:
        patched.setattr(SiteTree, "resume_index", lambda self, txn: ReorderingIndex())
        fresh = workload(tmp_path / "fresh", seed)
    return tables_that_differ(carried, fresh)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_index_carried_over_leaves_the_tables_a_fresh_one_leaves(tmp_path: Path, seed: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name, workload in (("random", run), ("catch-up", catch_up)):
        differ = differing(tmp_path / name, workload, seed, monkeypatch)
        assert not differ, f"seed {seed}, {name} workload: carrying the index changed {differ}"
