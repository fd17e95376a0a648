"""Deleting an inode removes every record it owns and only those (issue 40: `delete_inode` looks
for block map and xattr records with one seek each before scanning, and drops a symlink target
only for a symlink). Neighbouring inode numbers hold records on purpose: a look that reads the
wrong table, or that takes a neighbour's record for the inode's, shows here."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from awsomefsd.meta import commands as c
from awsomefsd.meta.records import ROOT_INO, read_u64
from tests.unit.test_state_machine import DATA_START, GRACE_NS, Harness, ext


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "meta")


def owned(h: Harness, ino: int) -> dict[str, int]:
    """How many records of each table are keyed by `ino` (its first 8 bytes)."""
    tables = ("inodes", "fmap", "xattrs", "symlinks", "orphans")
    return {name: sum(1 for key, _ in h.dump()[name] if read_u64(key) == ino) for name in tables}


def test_a_purge_removes_exactly_the_inodes_records(h: Harness) -> None:
    empty = h.mk(ROOT_INO, b"empty")
    data = h.mk(ROOT_INO, b"data")  # blocks, no xattrs
    attrs = h.mk(ROOT_INO, b"attrs")  # xattrs, no blocks
    link = h.mk(ROOT_INO, b"link", stat.S_IFLNK | 0o777, target=b"somewhere")
    both = h.mk(ROOT_INO, b"both")
    assert [data, attrs, link, both] == [empty + 1, empty + 2, empty + 3, empty + 4]
    free0 = h.free_blocks()
    h.apply(c.WriteData(data, (ext(0, DATA_START, 3), ext(5, DATA_START + 10, 2)), 7 * 4096, h.tick()))
    h.apply(c.SetXattr(attrs, b"user.a", b"1", 0, h.tick()))
    h.apply(c.SetXattr(attrs, b"user.b", b"2", 0, h.tick()))
    h.apply(c.WriteData(both, (ext(0, DATA_START + 20, 1),), 4096, h.tick()))
    h.apply(c.SetXattr(both, b"user.c", b"3", 0, h.tick()))
    assert h.free_blocks() == free0 - 6
    kept = {ino: owned(h, ino) for ino in (data, attrs, link, both)}
    assert kept[data]["fmap"] == 2 and kept[attrs]["xattrs"] == 3 and kept[link]["symlinks"] == 1

    for name, ino in ((b"empty", empty), (b"data", data), (b"attrs", attrs), (b"link", link)):
        h.apply(c.Unlink(ROOT_INO, name, False, h.tick()))
        assert owned(h, ino)["orphans"] == 1
        assert h.apply(c.Purge(ino, h.tick())) is True
        assert owned(h, ino) == dict.fromkeys(owned(h, ino), 0), name
        kept.pop(ino, None)
        for other, records in kept.items():  # the neighbours keep theirs
            assert owned(h, other) == records, (name, other)
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == free0 - 1, "the data file's 5 blocks are free again, both's 1 is not"
    assert sorted(h.freed) == [(DATA_START, 3), (DATA_START + 10, 2)]
    h.apply(c.Unlink(ROOT_INO, b"both", False, h.tick()))
    h.apply(c.Purge(both, h.tick()))
    assert owned(h, both) == dict.fromkeys(owned(h, both), 0)
    assert all(read_u64(key) < empty for key, _ in h.dump()["xattrs"] + h.dump()["fmap"])


def test_unlink_writes_the_inode_as_it_leaves_it(h: Harness) -> None:
    """An unlink writes the inode once (by `orphan` for its last name): with other names left its
    link count falls by one and its ctime moves; with none, the orphan mark and the record agree."""
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.Link(f, ROOT_INO, b"g", h.tick()))
    now = h.tick()
    h.apply(c.Unlink(ROOT_INO, b"f", False, now))
    assert (h.inode(f).nlink, h.inode(f).ctime_ns) == (1, now) and owned(h, f)["orphans"] == 0
    now = h.tick()
    h.apply(c.Unlink(ROOT_INO, b"g", False, now))
    assert (h.inode(f).nlink, h.inode(f).ctime_ns) == (0, now) and owned(h, f)["orphans"] == 1


def unlink_both_ways(tmp_path: Path, setup, name: bytes, purge: bool, *, holders: list[int] | None = None
                     ) -> tuple[Harness, Harness]:
    """The same store made twice by `setup(h) -> ino`; then one gets UnlinkClosed(name, ino), the
    other Unlink and (`purge`) the Purge of the inode it returned."""
    pair = []
    for side in ("closed", "two"):
        h = Harness(tmp_path / side)
        if holders is not None:
            h.sm.cluster.active_members = lambda txn: holders  # type: ignore[method-assign]
        ino = setup(h)
        now = h.tick()
        if side == "closed":
            assert h.apply(c.UnlinkClosed(ROOT_INO, name, False, now, ino=ino)) == h.lookup_was
        else:
            removed = h.apply(c.Unlink(ROOT_INO, name, False, now))
            if purge:
                h.apply(c.Purge(removed, now))
        pair.append(h)
    return pair[0], pair[1]


def with_data(h: Harness, names: tuple[bytes, ...] = (b"f",)) -> int:
    f = h.mk(ROOT_INO, names[0])
    for extra in names[1:]:
        h.apply(c.Link(f, ROOT_INO, extra, h.tick()))
    h.apply(c.WriteData(f, (ext(0, DATA_START, 3),), 3 * 4096, h.tick()))
    h.apply(c.SetXattr(f, b"user.a", b"1", 0, h.tick()))
    h.mk(ROOT_INO, b"neighbour")
    h.lookup_was = f  # type: ignore[attr-defined]
    return f


def test_unlink_closed_leaves_what_unlink_then_purge_left(tmp_path: Path) -> None:
    closed, two = unlink_both_ways(tmp_path / "last", with_data, b"f", purge=True)
    assert closed.dump() == two.dump()
    f = closed.lookup_was  # type: ignore[attr-defined]
    assert closed.inode(f) is None and owned(closed, f) == dict.fromkeys(owned(closed, f), 0)
    closed.apply(c.ReclaimFrees(closed.now + GRACE_NS))
    assert closed.freed == [(DATA_START, 3)]


def test_unlink_closed_of_a_file_with_names_left_only_unlinks(tmp_path: Path) -> None:
    closed, two = unlink_both_ways(tmp_path, lambda h: with_data(h, (b"f", b"g")), b"f", purge=False)
    assert closed.dump() == two.dump()
    assert closed.inode(closed.lookup_was).nlink == 1  # type: ignore[attr-defined]


def test_unlink_closed_deletes_only_the_inode_it_names(tmp_path: Path) -> None:
    """The name now holds another inode than the proposer saw (it may be open): only unlinked."""
    def other(h: Harness) -> int:
        h.lookup_was = with_data(h)  # type: ignore[attr-defined]
        return h.lookup_was + 1000
    closed, two = unlink_both_ways(tmp_path, other, b"f", purge=False)
    assert closed.dump() == two.dump()
    assert owned(closed, closed.lookup_was)["orphans"] == 1  # type: ignore[attr-defined]


def test_unlink_closed_keeps_an_orphan_that_cluster_members_hold(tmp_path: Path) -> None:
    """A cluster's orphan mark lists its active members: each releases it (ReleaseOrphans)."""
    closed, two = unlink_both_ways(tmp_path, with_data, b"f", purge=False, holders=[1, 2])
    assert closed.dump() == two.dump()
    f = closed.lookup_was  # type: ignore[attr-defined]
    assert closed.inode(f).nlink == 0 and owned(closed, f)["orphans"] == 1
