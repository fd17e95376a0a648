"""The metadata state machine on a real LMDB store: POSIX namespace rules, data mapping, space,
volumes and snapshots, and determinism (the same commands give byte-identical state)."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import lmdb
import pytest

from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.filemap import all_extents
from awsomefsd.meta.records import MAX_XATTR_LIST_BYTES, ROOT_INO, Extent
from awsomefsd.meta.rename import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT
from awsomefsd.meta.state_machine import FIRST_USER_INO, StateMachine
from awsomefsd.meta.store import TABLES, MetaStore

DATA_START, DATA_BLOCKS = 256, 10_000
GRACE_NS = 1000


class Harness:
    """A state machine over a real LMDB store, applying each command in its own transaction."""

    def __init__(self, path: Path) -> None:
        self.store = MetaStore(path)
        self.sm = StateMachine(self.store, delayed_free_ns=GRACE_NS)
        self.freed: list[tuple[int, int]] = []
        self.sm.freed_listeners.append(self.freed.extend)
        with self.store.env.begin(write=True) as txn:
            self.sm.bootstrap(txn, cluster_id="c", device_id="d", data_extent=(DATA_START, DATA_BLOCKS), now_ns=1)
        self.ino, self.ino_end = self.apply(c.ReserveInodes(100_000))
        assert self.ino == FIRST_USER_INO
        self.now = 10

    def apply(self, cmd: object) -> object:
        with self.store.env.begin(write=True) as txn:
            return self.sm.apply(txn, cmd)

    def error(self, cmd: object) -> int:
        with pytest.raises(FsError) as info:
            self.apply(cmd)
        return info.value.errno

    def tick(self) -> int:
        self.now += 1
        return self.now

    def new_ino(self) -> int:
        ino = self.ino
        self.ino += 1
        assert ino < self.ino_end
        return ino

    def mk(self, parent: int, name: bytes, mode: int = stat.S_IFREG | 0o644, target: bytes = b"") -> int:
        ino = self.new_ino()
        self.apply(c.Mknod(parent, name, ino, mode, 1000, 1000, self.tick(), 0, target))
        return ino

    def inode(self, ino: int):
        with self.store.env.begin() as txn:
            return self.sm.ns.get_inode(txn, ino)

    def lookup(self, parent: int, name: bytes) -> int | None:
        with self.store.env.begin() as txn:
            return self.sm.ns.lookup(txn, parent, name)

    def names(self, parent: int) -> list[bytes]:
        with self.store.env.begin() as txn:
            return [name for _, name, _ in self.sm.ns.entries(txn, parent)]

    def extents(self, ino: int) -> list[Extent]:
        with self.store.env.begin() as txn:
            return list(all_extents(txn, self.store.db["fmap"], ino))

    def free_blocks(self) -> int:
        return self.sm.space.mirror.free_blocks

    def dump(self) -> dict[str, list[tuple[bytes, bytes]]]:
        out = {}
        with self.store.env.begin() as txn:
            for name in TABLES:
                out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(self.store.db[name])]
        return out


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "meta")


def ext(file_block: int, dev_block: int, count: int) -> Extent:
    return Extent(file_block, dev_block, count, b"\0\0\0\0" * count)


def test_create_lookup_and_errors(h: Harness) -> None:
    d = h.mk(ROOT_INO, b"dir", stat.S_IFDIR | 0o755)
    f = h.mk(d, b"file")
    assert h.lookup(d, b"file") == f
    assert h.inode(d).nlink == 2 and h.inode(ROOT_INO).nlink == 5  # . .. .volumes .snapshots dir
    assert h.error(c.Mknod(d, b"file", 999, stat.S_IFREG, 0, 0, 1)) == errno.EEXIST
    assert h.error(c.Mknod(d, b"x" * 256, 999, stat.S_IFREG, 0, 0, 1)) == errno.ENAMETOOLONG
    assert h.error(c.Mknod(f, b"y", 999, stat.S_IFREG, 0, 0, 1)) == errno.ENOTDIR
    assert h.error(c.Mknod(424242, b"y", 999, stat.S_IFREG, 0, 0, 1)) == errno.ENOENT
    assert h.error(c.Unlink(ROOT_INO, b"dir", True, 5)) == errno.ENOTEMPTY
    assert h.error(c.Unlink(ROOT_INO, b"dir", False, 5)) == errno.EISDIR
    assert h.error(c.Unlink(d, b"file", True, 5)) == errno.ENOTDIR
    assert h.error(c.Unlink(d, b"nope", False, 5)) == errno.ENOENT


def test_setgid_directory_is_inherited(h: Harness) -> None:
    d = h.mk(ROOT_INO, b"shared", stat.S_IFDIR | 0o2775)
    h.apply(c.SetAttr(d, h.tick(), gid=4242))
    f = h.mk(d, b"f")
    sub = h.mk(d, b"sub", stat.S_IFDIR | 0o755)
    assert h.inode(f).gid == 4242 and not h.inode(f).mode & stat.S_ISGID
    assert h.inode(sub).gid == 4242 and h.inode(sub).mode & stat.S_ISGID


def test_unlink_last_link_makes_orphan_until_purge(h: Harness) -> None:
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.Link(f, ROOT_INO, b"g", h.tick()))
    assert h.inode(f).nlink == 2
    h.apply(c.Unlink(ROOT_INO, b"f", False, h.tick()))
    assert h.inode(f).nlink == 1
    h.apply(c.WriteData(f, (ext(0, DATA_START, 4),), 4 * 4096, h.tick()))
    h.apply(c.Unlink(ROOT_INO, b"g", False, h.tick()))
    assert h.inode(f).nlink == 0, "still there while open"
    assert h.apply(c.Purge(f, h.tick())) is True
    assert h.inode(f) is None
    assert h.extents(f) == []


def test_rename_cases(h: Harness) -> None:
    a = h.mk(ROOT_INO, b"a", stat.S_IFDIR | 0o755)
    b = h.mk(ROOT_INO, b"b", stat.S_IFDIR | 0o755)
    f = h.mk(a, b"f")
    g = h.mk(b, b"g")
    h.apply(c.Rename(a, b"f", b, b"g", 0, h.tick()))  # replace g
    assert h.lookup(b, b"g") == f and h.lookup(a, b"f") is None
    assert h.inode(g).nlink == 0
    f2 = h.mk(a, b"f2")
    assert h.error(c.Rename(a, b"f2", b, b"g", RENAME_NOREPLACE, h.tick())) == errno.EEXIST
    h.apply(c.Rename(a, b"f2", b, b"g", RENAME_EXCHANGE, h.tick()))
    assert h.lookup(b, b"g") == f2 and h.lookup(a, b"f2") == f
    sub = h.mk(a, b"sub", stat.S_IFDIR | 0o755)
    assert h.error(c.Rename(ROOT_INO, b"a", sub, b"x", 0, h.tick())) == errno.EINVAL
    assert h.error(c.Rename(a, b"f2", ROOT_INO, b"b", 0, h.tick())) == errno.EISDIR
    assert h.error(c.Rename(a, b"sub", b, b"g", 0, h.tick())) == errno.ENOTDIR
    h.apply(c.Rename(a, b"sub", b, b"sub", 0, h.tick()))
    assert h.inode(sub).parent == b and h.inode(a).nlink == 2 and h.inode(b).nlink == 3
    assert sorted(h.names(b)) == [b"g", b"sub"]


def test_readdir_cookies_are_stable(h: Harness) -> None:
    d = h.mk(ROOT_INO, b"d", stat.S_IFDIR | 0o755)
    for i in range(20):
        h.mk(d, b"f%02d" % i)
    with h.store.env.begin() as txn:
        first = list(h.sm.ns.entries(txn, d))[:10]
    h.apply(c.Unlink(d, b"f03", False, h.tick()))
    h.mk(d, b"new")
    with h.store.env.begin() as txn:
        rest = [name for _, name, _ in h.sm.ns.entries(txn, d, first[-1][0])]
    assert rest == [b"f%02d" % i for i in range(10, 20)] + [b"new"]


def test_write_replaces_copy_on_write_and_frees_after_grace(h: Harness) -> None:
    f = h.mk(ROOT_INO, b"f")
    free0 = h.free_blocks()
    h.apply(c.WriteData(f, (ext(0, DATA_START, 8),), 8 * 4096, h.tick()))
    assert h.free_blocks() == free0 - 8 and h.inode(f).blocks == 8
    h.apply(c.WriteData(f, (ext(2, DATA_START + 100, 2),), 8 * 4096, h.tick()))
    assert [(e.file_block, e.dev_block, e.count) for e in h.extents(f)] == [
        (0, DATA_START, 2), (2, DATA_START + 100, 2), (4, DATA_START + 4, 4)]
    assert h.inode(f).blocks == 8 and h.free_blocks() == free0 - 10, "old blocks wait out the grace"
    assert h.error(c.WriteData(f, (ext(0, DATA_START + 100, 1),), 4096, h.tick())) == errno.EIO
    h.apply(c.ReclaimFrees(h.now))
    assert h.free_blocks() == free0 - 10, "grace not over"
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == free0 - 8
    assert h.freed == [(DATA_START + 2, 2)]


def test_one_write_maps_scattered_runs(h: Harness) -> None:
    """A flush of scattered writes is one WriteData with extents in file order and gaps between."""
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.WriteData(f, (ext(0, DATA_START, 10),), 10 * 4096, h.tick()))
    free0 = h.free_blocks()
    h.apply(c.WriteData(f, (ext(1, DATA_START + 20, 1), ext(2, DATA_START + 21, 1), ext(5, DATA_START + 22, 1),
                            ext(12, DATA_START + 23, 2)), 14 * 4096, h.tick()))
    assert [(e.file_block, e.dev_block, e.count) for e in h.extents(f)] == [
        (0, DATA_START, 1), (1, DATA_START + 20, 2), (3, DATA_START + 3, 2), (5, DATA_START + 22, 1),
        (6, DATA_START + 6, 4), (12, DATA_START + 23, 2)]
    assert h.inode(f).blocks == 12 and h.inode(f).size == 14 * 4096
    assert h.free_blocks() == free0 - 5, "3 blocks superseded wait out the grace, 2 new"
    # the new blocks lie side by side on the device and are taken as one range (filemap.joined):
    # the free table and its in-memory mirror must still agree, block for block
    with h.store.env.begin() as txn:
        assert list(h.sm.space.free_extents(txn)) == [tuple(e) for e in h.sm.space.mirror]
    assert not h.sm.space.mirror.contains_free(DATA_START + 20, 1) and h.sm.space.mirror.contains_free(DATA_START + 25, 1)
    h.apply(c.WriteData(f, (ext(20, DATA_START + 50, 1), ext(22, DATA_START + 52, 1)), 23 * 4096, h.tick()))
    with h.store.env.begin() as txn:  # not side by side: block 51 between them stays free
        assert list(h.sm.space.free_extents(txn)) == [tuple(e) for e in h.sm.space.mirror]
    assert [h.sm.space.mirror.contains_free(DATA_START + b, 1) for b in (50, 51, 52)] == [False, True, False]
    assert h.error(c.WriteData(f, (ext(3, DATA_START + 30, 2), ext(4, DATA_START + 40, 1)), 4096, h.tick())) == errno.EINVAL
    assert h.error(c.WriteData(f, (ext(6, DATA_START + 30, 1), ext(4, DATA_START + 40, 1)), 4096, h.tick())) == errno.EINVAL


def test_appends_merge_into_one_extent(h: Harness) -> None:
    f = h.mk(ROOT_INO, b"f")
    for i in range(4):
        h.apply(c.WriteData(f, (ext(i, DATA_START + i, 1),), (i + 1) * 4096, h.tick()))
    assert [(e.file_block, e.dev_block, e.count) for e in h.extents(f)] == [(0, DATA_START, 4)]


def test_truncate_shrinks_and_keeps_tail_block(h: Harness) -> None:
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.WriteData(f, (ext(0, DATA_START, 10),), 10 * 4096, h.tick()))
    h.apply(c.SetAttr(f, h.tick(), size=3 * 4096 + 10, tail=ext(3, DATA_START + 50, 1)))
    assert [(e.file_block, e.dev_block, e.count) for e in h.extents(f)] == [(0, DATA_START, 3), (3, DATA_START + 50, 1)]
    assert h.inode(f).size == 3 * 4096 + 10 and h.inode(f).blocks == 4
    h.apply(c.SetAttr(f, h.tick(), size=0))
    assert h.extents(f) == [] and h.inode(f).blocks == 0


def test_xattrs(h: Harness) -> None:
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.SetXattr(f, b"user.a", b"1", 0, h.tick()))
    assert h.error(c.SetXattr(f, b"user.a", b"2", 1, h.tick())) == errno.EEXIST
    assert h.error(c.SetXattr(f, b"user.b", b"2", 2, h.tick())) == errno.ENODATA
    assert h.error(c.RemoveXattr(f, b"user.b", h.tick())) == errno.ENODATA
    assert h.error(c.SetXattr(f, b"user.big", b"x" * 70000, 0, h.tick())) == errno.E2BIG


def test_xattr_usage_is_kept_per_inode_and_bounds_the_name_list(h: Harness) -> None:
    """A set reads one usage record instead of every attribute of the inode (it used to slow down
    as the inode gained attributes); the record always equals a fresh count, and the names must fit
    the kernel's listxattr buffer."""
    f = h.mk(ROOT_INO, b"f")

    def counted() -> tuple[int, int]:
        with h.store.env.begin() as txn:
            pairs = list(h.sm.ns.xattrs(txn, f))
            return sum(len(k) + len(v) for k, v in pairs), sum(len(k) - 8 + 1 for k, _ in pairs)

    def recorded() -> tuple[int, int]:
        with h.store.env.begin() as txn:
            return h.sm.ns.xattr_usage(txn, f)

    for i in range(50):
        h.apply(c.SetXattr(f, b"user.n%03d" % i, b"v" * i, 0, h.tick()))
    h.apply(c.SetXattr(f, b"user.n007", b"longer value", 0, h.tick()))  # replace
    h.apply(c.RemoveXattr(f, b"user.n010", h.tick()))
    assert recorded() == counted()
    with h.store.env.begin() as txn:
        assert b"" not in [k[8:] for k, _ in h.sm.ns.xattrs(txn, f)], "the usage record is no attribute"
    name = b"user." + b"x" * 250
    i = 0
    while True:
        i += 1
        err = None
        try:
            h.apply(c.SetXattr(f, name[:-8] + b"%08d" % i, b"", 0, h.tick()))
        except FsError as exc:
            err = exc.errno
        if err is not None:
            break
    assert err == errno.ENOSPC and counted()[1] <= MAX_XATTR_LIST_BYTES < counted()[1] + len(name) + 1
    assert recorded() == counted()
    h.apply(c.Unlink(ROOT_INO, b"f", False, h.tick()))
    h.apply(c.Purge(f, h.tick()))
    with h.store.env.begin() as txn:
        assert not [k for k, _ in txn.cursor(h.store.db["xattrs"]) if k[:8] == f.to_bytes(8, "big")]


def test_rename_whiteout_leaves_a_whiteout_at_the_old_name(h: Harness) -> None:
    d = h.mk(ROOT_INO, b"d", stat.S_IFDIR | 0o755)
    f = h.mk(d, b"f")
    wh = h.new_ino()
    h.apply(c.Rename(d, b"f", d, b"g", RENAME_WHITEOUT, h.tick(), wh, 7, 8))
    assert h.lookup(d, b"g") == f and h.lookup(d, b"f") == wh
    whiteout = h.inode(wh)
    assert stat.S_ISCHR(whiteout.mode) and whiteout.rdev == 0 and (whiteout.uid, whiteout.gid) == (7, 8)
    assert h.error(c.Rename(d, b"g", d, b"f", RENAME_WHITEOUT | RENAME_EXCHANGE, h.tick(), h.new_ino())) == errno.EINVAL
    assert h.error(c.Rename(d, b"g", d, b"h", RENAME_WHITEOUT, h.tick())) == errno.EINVAL


def test_write_data_stamps_the_time_of_the_write(h: Harness) -> None:
    """A flush commits later than the write(2) it carries: the write's time is the mtime; a chmod
    between write and flush keeps its later ctime."""
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.SetAttr(f, 500, mode=0o600))
    h.apply(c.WriteData(f, (ext(0, DATA_START, 1),), 4096, 900, mtime_ns=400))
    assert (h.inode(f).mtime_ns, h.inode(f).ctime_ns) == (400, 500)
    h.apply(c.WriteData(f, (ext(1, DATA_START + 1, 1),), 8192, 1000, mtime_ns=950))
    assert (h.inode(f).mtime_ns, h.inode(f).ctime_ns) == (950, 950)
    h.apply(c.WriteData(f, (ext(1, DATA_START + 2, 1),), 8192, 1100))
    assert h.inode(f).mtime_ns == 1100, "no write time given: the commit's"


def test_volume_quota_snapshot_and_clone(h: Harness) -> None:
    v1 = h.new_ino()
    vol = h.apply(c.CreateVolume(v1, "pvc-1", v1, 16 * 4096, 0, h.tick()))
    root = vol["root"]
    f = h.mk(root, b"data")
    h.apply(c.WriteData(f, (ext(0, DATA_START, 16),), 16 * 4096, h.tick()))
    assert h.error(c.WriteData(f, (ext(16, DATA_START + 16, 1),), 17 * 4096, h.tick())) == errno.EDQUOT
    assert h.apply(c.CreateVolume(v1 + 10**6, "pvc-1", v1 + 10**6, 1, 0, h.tick()))["id"] == v1, "same name"
    s1 = h.new_ino()
    snap = h.apply(c.CreateSnapshot(s1, "snap-1", v1, h.tick()))
    assert snap["used_blocks"] == 16
    free_before = h.free_blocks()
    v2 = h.new_ino()
    clone = h.apply(c.CreateVolume(v2, "pvc-2", v2, 32 * 4096, 0, h.tick(), source_kind="snapshot", source_id=s1))
    assert clone["used_blocks"] == 16 and h.free_blocks() == free_before, "clone shares extents"
    snap_file = h.lookup(snap["root"], b"data")
    assert h.error(c.Unlink(snap["root"], b"data", False, h.tick())) == errno.EROFS
    assert h.error(c.SetAttr(snap_file, h.tick(), mode=0o600)) == errno.EROFS
    h.apply(c.DeleteVolume(v1, h.tick()))
    h.apply(c.DeleteSnapshot(s1, h.tick()))
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == free_before, "the clone still references the extents"
    h.apply(c.DeleteVolume(v2, h.tick()))
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == free_before + 16


def test_same_commands_same_state(tmp_path: Path) -> None:
    dumps = []
    for name in ("one", "two"):
        hh = Harness(tmp_path / name)
        d = hh.mk(ROOT_INO, b"d", stat.S_IFDIR | 0o755)
        f = hh.mk(d, b"f")
        hh.apply(c.WriteData(f, (ext(0, DATA_START, 3),), 3 * 4096, hh.tick()))
        hh.apply(c.Rename(d, b"f", ROOT_INO, b"g", 0, hh.tick()))
        hh.apply(c.SetXattr(f, b"user.k", b"v", 0, hh.tick()))
        try:
            hh.apply(c.Unlink(ROOT_INO, b"missing", False, hh.tick()))
        except FsError:
            pass
        dumps.append(hh.dump())
    assert dumps[0] == dumps[1]


def test_failed_command_leaves_no_trace(h: Harness) -> None:
    d = h.mk(ROOT_INO, b"d", stat.S_IFDIR | 0o755)
    h.mk(d, b"f")
    before = h.dump()
    with h.store.env.begin(write=True) as txn:
        for bad in (c.Rename(d, b"f", d, b"f", RENAME_EXCHANGE | RENAME_NOREPLACE, 99),
                    c.Mknod(d, b"f", 5000, stat.S_IFREG, 0, 0, 99),
                    c.Unlink(ROOT_INO, b"d", True, 99)):
            with pytest.raises(FsError):
                h.sm.apply(txn, bad)
    assert h.dump() == before


def test_values_out_of_range_are_refused_before_anything_is_written(h: Harness) -> None:
    """Values no inode or key can hold get the errno Linux gives, never an exception from packing
    them (issue 41: a time past 2262 raised inside the apply and cost the whole batch)."""
    f = h.mk(ROOT_INO, b"f")
    before = h.dump()
    with h.store.env.begin(write=True) as txn:
        for bad, err in ((c.SetAttr(f, 99, atime_ns=1 << 70), errno.EINVAL),
                         (c.SetAttr(f, 99, mtime_ns=-(1 << 70)), errno.EINVAL),
                         (c.SetAttr(f, 99, uid=1 << 32), errno.EINVAL),
                         (c.SetAttr(f, 99, gid=-5), errno.EINVAL),
                         (c.SetAttr(f, 99, size=-1), errno.EINVAL),
                         (c.SetAttr(f, 1 << 64), errno.EINVAL),
                         (c.Mknod(ROOT_INO, b"g", 5000, 0o170644, 0, 0, 99), errno.EINVAL),
                         (c.Mknod(ROOT_INO, b"g", 5000, stat.S_IFCHR, 0, 0, 99, 1 << 64), errno.EINVAL),
                         (c.Mknod(ROOT_INO, b"g", 5000, stat.S_IFREG, 1 << 40, 0, 99), errno.EINVAL),
                         (c.Mknod(ROOT_INO, b"g", 5000, stat.S_IFLNK, 0, 0, 99, 0, b"t" * 4096), errno.ENAMETOOLONG),
                         (c.Mknod(ROOT_INO, b"g" * 256, 5000, stat.S_IFREG, 0, 0, 99), errno.ENAMETOOLONG),
                         (c.SetXattr(f, b"user.a", b"v", 8, 99), errno.EINVAL),
                         (c.SetXattr(f, b"", b"v", 0, 99), errno.ERANGE),
                         (c.RemoveXattr(f, b"user." + b"x" * 600, 99), errno.ERANGE),
                         (c.WriteData(f, (ext(0, DATA_START, 1),), 4096, 99, mtime_ns=1 << 64), errno.EINVAL)):
            with pytest.raises(FsError) as info:
                h.sm.apply(txn, bad)
            assert info.value.errno == err, (bad, info.value)
    assert h.dump() == before


def test_map_growth_is_transparent(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "m", map_size_bytes=1 << 20)
    with pytest.raises(lmdb.MapFullError), store.env.begin(write=True) as txn:
        for i in range(10_000):
            txn.put(b"%d" % i, b"x" * 500, db=store.db["meta"])
    assert store.grow_if_needed(8 << 20)
    with store.env.begin(write=True) as txn:
        for i in range(10_000):
            txn.put(b"%d" % i, b"x" * 500, db=store.db["meta"])


def test_pending_frees_exclude_shared_blocks(h: Harness) -> None:
    v = h.new_ino()
    root = h.apply(c.CreateVolume(v, "p", v, 0, 0, h.tick()))["root"]
    f = h.mk(root, b"f")
    h.apply(c.WriteData(f, (ext(0, DATA_START, 10),), 10 * 4096, h.tick()))
    s = h.new_ino()
    h.apply(c.CreateSnapshot(s, "s", v, h.tick()))
    h.apply(c.DeleteVolume(v, h.tick()))
    with h.store.env.begin() as txn:
        assert h.sm.space.pending_free_blocks(txn) == 0, "the snapshot still holds all ten blocks"
    h.apply(c.DeleteSnapshot(s, h.tick()))
    with h.store.env.begin() as txn:
        assert h.sm.space.pending_free_blocks(txn) == 0, "conservative: shared until a release is processed"
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    with h.store.env.begin() as txn:
        assert h.sm.space.pending_free_blocks(txn) == 0
    assert h.free_blocks() == DATA_BLOCKS


def test_punch_hole_unmaps_whole_blocks_and_frees_them_after_grace(h: Harness) -> None:
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.WriteData(f, (ext(0, DATA_START, 8),), 8 * 4096 - 100, h.tick()))
    free0 = h.free_blocks()
    now = h.tick()
    inode = h.apply(c.PunchHole(f, 2, 5, now))
    assert [(e.file_block, e.dev_block, e.count) for e in h.extents(f)] == [(0, DATA_START, 2), (5, DATA_START + 5, 3)]
    assert inode.size == 8 * 4096 - 100, "the size stays"
    assert inode.blocks == 5 and inode.mtime_ns == inode.ctime_ns == now
    h.apply(c.PunchHole(f, 2, 5, h.tick()))  # again: nothing left to unmap
    assert h.inode(f).blocks == 5
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == free0 + 3 and h.freed == [(DATA_START + 2, 3)]
    assert h.error(c.PunchHole(f, 3, 3, h.tick())) == errno.EINVAL
    assert h.error(c.PunchHole(ROOT_INO, 0, 1, h.tick())) == errno.EISDIR


def test_clone_range_shares_blocks_until_both_files_let_go(h: Harness) -> None:
    src, dst = h.mk(ROOT_INO, b"src"), h.mk(ROOT_INO, b"dst")
    h.apply(c.WriteData(src, (ext(0, DATA_START, 4), ext(6, DATA_START + 10, 2)), 8 * 4096, h.tick()))
    h.apply(c.WriteData(dst, (ext(0, DATA_START + 20, 3),), 3 * 4096, h.tick()))
    free0 = h.free_blocks()
    now = h.tick()
    inode = h.apply(c.CloneRange(src, 2, dst, 1, 6, 7 * 4096 + 5, now))
    # src blocks 2-3 land at 1-2 (replacing two of dst's), 4-5 are holes, 6-7 land at 5-6
    assert [(e.file_block, e.dev_block, e.count) for e in h.extents(dst)] == [
        (0, DATA_START + 20, 1), (1, DATA_START + 2, 2), (5, DATA_START + 10, 2)]
    assert inode.size == 7 * 4096 + 5 and inode.blocks == 5 and inode.mtime_ns == inode.ctime_ns == now
    assert h.free_blocks() == free0, "nothing allocated; the two replaced blocks wait out the grace"
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == free0 + 2
    h.apply(c.Unlink(ROOT_INO, b"src", False, h.tick()))
    h.apply(c.Purge(src, h.tick()))
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == free0 + 2 + 2, "of src's six blocks only the two not cloned are free"
    h.apply(c.Unlink(ROOT_INO, b"dst", False, h.tick()))
    h.apply(c.Purge(dst, h.tick()))
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == DATA_BLOCKS


def test_clone_range_is_checked(h: Harness) -> None:
    v = h.new_ino()
    root = h.apply(c.CreateVolume(v, "p", v, 4 * 4096, 0, h.tick()))["root"]
    src, dst = h.mk(ROOT_INO, b"src"), h.mk(root, b"dst")
    h.apply(c.WriteData(src, (ext(0, DATA_START, 8),), 8 * 4096, h.tick()))
    assert h.error(c.CloneRange(src, 0, dst, 0, 8, 8 * 4096, h.tick())) == errno.EDQUOT, "the quota counts clones"
    assert h.error(c.CloneRange(src, 0, src, 2, 4, 8 * 4096, h.tick())) == errno.EINVAL, "overlapping itself"
    assert h.error(c.CloneRange(src, 0, ROOT_INO, 0, 1, 4096, h.tick())) == errno.EISDIR
    h.apply(c.CloneRange(src, 0, src, 4, 4, 8 * 4096, h.tick()))
    assert [(e.file_block, e.dev_block, e.count) for e in h.extents(src)] == [(0, DATA_START, 4), (4, DATA_START, 4)]


def unwritten(file_block: int, dev_block: int, count: int) -> Extent:
    return Extent(file_block, dev_block, count, b"")


def test_preallocate_reserves_holes_that_a_write_in_place_turns_into_data(h: Harness) -> None:
    """fallocate's reservation: unwritten extents take their blocks from free space and count in
    the file's blocks and its volume's quota; a WriteData on exactly those blocks (same file
    blocks, same device blocks) takes nothing more and frees nothing; one anywhere else is
    copy-on-write as always and frees the reservation it replaces."""
    v = h.new_ino()
    root = h.apply(c.CreateVolume(v, "p", v, 8 * 4096, 0, h.tick()))["root"]
    f = h.mk(root, b"f")
    free0 = h.free_blocks()
    inode = h.apply(c.Preallocate(f, (unwritten(0, DATA_START, 4), unwritten(6, DATA_START + 10, 2)), h.tick()))
    assert inode.blocks == 6 and inode.size == 0 and h.free_blocks() == free0 - 6
    assert all(e.unwritten for e in h.extents(f))
    assert h.error(c.Preallocate(f, (unwritten(10, DATA_START + 20, 3),), h.tick())) == errno.EDQUOT
    # blocks 1-2 written in place, block 4 (a hole) and 5 get fresh space
    h.apply(c.WriteData(f, (ext(1, DATA_START + 1, 2), ext(4, DATA_START + 30, 2)), 6 * 4096, h.tick()))
    assert [(e.file_block, e.dev_block, e.count, e.unwritten) for e in h.extents(f)] == [
        (0, DATA_START, 1, True), (1, DATA_START + 1, 2, False), (3, DATA_START + 3, 1, True),
        (4, DATA_START + 30, 2, False), (6, DATA_START + 10, 2, True)]
    assert h.inode(f).blocks == 8 and h.free_blocks() == free0 - 8
    # block 6 rewritten elsewhere: its reservation is superseded and freed after the grace period
    h.apply(c.WriteData(f, (ext(6, DATA_START + 40, 1),), 7 * 4096, h.tick()))
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.freed[-1] == (DATA_START + 10, 1) and h.inode(f).blocks == 8 and h.free_blocks() == free0 - 8
    # the blocks written in place are ordinary now: writing them "in place" again is refused
    assert h.error(c.WriteData(f, (ext(1, DATA_START + 1, 1),), 7 * 4096, h.tick())) == errno.EIO
    h.apply(c.SetAttr(f, h.tick(), size=0))
    h.apply(c.ReclaimFrees(h.now + GRACE_NS))
    assert h.free_blocks() == free0 and h.inode(f).blocks == 0


def test_preallocate_is_checked(h: Harness) -> None:
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.WriteData(f, (ext(2, DATA_START, 1),), 3 * 4096, h.tick()))
    assert h.error(c.Preallocate(f, (unwritten(0, DATA_START + 5, 3),), h.tick())) == errno.EIO, "over data"
    assert h.error(c.Preallocate(f, (ext(0, DATA_START + 5, 1),), h.tick())) == errno.EINVAL, "with checksums"
    assert h.error(c.Preallocate(f, (unwritten(0, DATA_START, 1),), h.tick())) == errno.EIO, "space not free"
    assert h.error(c.Preallocate(f, (unwritten(1, DATA_START + 5, 1), unwritten(0, DATA_START + 6, 1)),
                                 h.tick())) == errno.EINVAL, "out of order"
    assert h.error(c.Preallocate(ROOT_INO, (unwritten(0, DATA_START + 5, 1),), h.tick())) == errno.EISDIR
    assert h.error(c.WriteData(f, (unwritten(0, DATA_START + 5, 1),), 4096, h.tick())) == errno.EINVAL
    assert h.error(c.SetAttr(f, h.tick(), size=4096 + 5, tail=unwritten(1, DATA_START + 5, 1))) == errno.EINVAL


def test_snapshots_and_clones_do_not_share_unwritten_blocks(h: Harness) -> None:
    """A write in place is safe only on blocks one file maps: a snapshot or a clone of reserved
    blocks gets a hole there (it reads the same zeros), never a share of them."""
    v = h.new_ino()
    root = h.apply(c.CreateVolume(v, "p", v, 0, 0, h.tick()))["root"]
    f, g = h.mk(root, b"f"), h.mk(root, b"g")
    h.apply(c.WriteData(f, (ext(0, DATA_START, 2),), 2 * 4096, h.tick()))
    h.apply(c.Preallocate(f, (unwritten(2, DATA_START + 2, 3),), h.tick()))
    s = h.new_ino()
    snap = h.apply(c.CreateSnapshot(s, "s", v, h.tick()))
    copy = h.lookup(snap["root"], b"f")
    assert copy is not None
    assert [(e.file_block, e.count, e.unwritten) for e in h.extents(copy)] == [(0, 2, False)]
    assert h.inode(copy).blocks == 2 and snap["used_blocks"] == 2
    h.apply(c.CloneRange(f, 0, g, 0, 5, 5 * 4096, h.tick()))
    assert [(e.file_block, e.count, e.unwritten) for e in h.extents(g)] == [(0, 2, False)]
    assert h.inode(g).blocks == 2
    h.apply(c.WriteData(f, (ext(2, DATA_START + 2, 3),), 5 * 4096, h.tick()))  # in place: nobody else maps them
    assert h.inode(f).blocks == 5
