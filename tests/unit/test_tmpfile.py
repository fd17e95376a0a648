"""O_TMPFILE's two commands in the state machine (meta/tmpfile.py), and their log-level gate."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from awsomefsd.daemon.node import Core
from awsomefsd.fs.tmpfile import tmpfile as open_tmpfile
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.check import check_namespace
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, u64
from awsomefsd.meta.tmpfile import TMPFILES
from tests.repl.test_sites_sm import linked_pair, ship, write
from tests.unit.test_state_machine import DATA_START, Harness, ext

REG = stat.S_IFREG | 0o600


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "meta")


def orphans(h: Harness) -> dict[int, bytes]:
    with h.store.env.begin() as txn:
        return {int.from_bytes(k, "big"): bytes(v) for k, v in txn.cursor(h.store.db["orphans"])}


def marked(h: Harness, ino: int) -> bool:
    with h.store.env.begin() as txn:
        return txn.get(u64(ino), db=h.store.db[TMPFILES]) is not None


def tmpfile(h: Harness, *, linkable: bool = True, parent: int = ROOT_INO, node: int = 0) -> int:
    ino = h.new_ino()
    inode = h.apply(c.MakeTmpfile(parent, ino, REG, 1000, 1000, h.tick(), linkable, node))
    assert inode.nlink == 0 and inode.size == 0 and inode.mode == REG  # type: ignore[attr-defined]
    return ino


def test_a_tmpfile_is_an_orphan_from_birth_and_linkat_names_it(h: Harness) -> None:
    before = h.names(ROOT_INO)
    f = tmpfile(h)
    assert h.names(ROOT_INO) == before and orphans(h) == {f: b""} and marked(h, f)
    h.apply(c.WriteData(f, (ext(0, DATA_START, 2),), 8000, h.tick()))
    assert h.error(c.Link(f, ROOT_INO, b"plain", h.tick())) == errno.ENOENT, "Link takes no orphan"
    linked = h.apply(c.LinkTmpfile(f, ROOT_INO, b"named", h.tick()))
    assert linked.nlink == 1 and h.lookup(ROOT_INO, b"named") == f  # type: ignore[attr-defined]
    assert orphans(h) == {} and not marked(h, f), "an ordinary file now"
    assert h.apply(c.Purge(f, h.tick())) is False, "a crash's purge leaves it alone"
    assert h.extents(f) == [ext(0, DATA_START, 2)]
    assert h.error(c.LinkTmpfile(f, ROOT_INO, b"again", h.tick())) == errno.ENOENT, "its first name only"
    h.apply(c.Unlink(ROOT_INO, b"named", False, h.tick()))
    assert h.error(c.LinkTmpfile(f, ROOT_INO, b"back", h.tick())) == errno.ENOENT, "unlinked: as any file"


def test_only_a_tmpfile_opened_without_o_excl_may_be_named(h: Harness) -> None:
    excl = tmpfile(h, linkable=False)
    assert not marked(h, excl)
    assert h.error(c.LinkTmpfile(excl, ROOT_INO, b"x", h.tick())) == errno.ENOENT
    gone = h.mk(ROOT_INO, b"gone")
    h.apply(c.Unlink(ROOT_INO, b"gone", False, h.tick()))
    assert h.error(c.LinkTmpfile(gone, ROOT_INO, b"x", h.tick())) == errno.ENOENT, "unlinked while open"
    f = tmpfile(h)
    h.mk(ROOT_INO, b"taken")
    assert h.error(c.LinkTmpfile(f, ROOT_INO, b"taken", h.tick())) == errno.EEXIST
    assert marked(h, f) and f in orphans(h), "a refused link changes nothing"


def test_the_last_close_or_a_crash_s_purge_deletes_it_with_its_data_and_mark(h: Harness) -> None:
    f = tmpfile(h)
    h.apply(c.WriteData(f, (ext(0, DATA_START, 4),), 4 * 4096, h.tick()))
    assert h.apply(c.Purge(f, h.tick())) is True
    assert h.inode(f) is None and h.extents(f) == [] and orphans(h) == {} and not marked(h, f)


def test_a_tmpfile_in_a_cluster_is_held_by_its_creator_alone(h: Harness) -> None:
    h.apply(cc.InitCluster(b"cert", b"key", b"v" * 48, 3, DATA_START, 1000, 10, 1, "n1", "a:1", "a:2", 5))
    assert h.apply(cc.AddMember("n2", "b:1", "b:2", 6)) == 2
    f = tmpfile(h, node=2)
    assert orphans(h) == {f: b"[2]"}
    assert h.apply(cc.ReleaseOrphans(1, (f,), h.tick())) == 0, "node 1 never held it"
    assert h.apply(cc.ReleaseOrphans(2, (f,), h.tick())) == 1 and h.inode(f) is None


def test_where_a_tmpfile_may_be_made(h: Harness) -> None:
    d = h.mk(ROOT_INO, b"d", stat.S_IFDIR | 0o2775)
    with h.store.env.begin(write=True) as txn:
        inode = h.sm.ns.require_inode(txn, d)
        inode.gid = 4242
        h.sm.ns.put_inode(txn, inode)
    assert h.inode(tmpfile(h, parent=d)).gid == 4242, "set-group-ID directory"
    file = h.mk(ROOT_INO, b"file")
    assert h.error(c.MakeTmpfile(file, h.new_ino(), REG, 0, 0, h.tick(), True)) == errno.ENOTDIR
    assert h.error(c.MakeTmpfile(d, h.new_ino(), stat.S_IFDIR | 0o700, 0, 0, h.tick(), True)) == errno.EINVAL


def test_fsck_finds_a_mark_on_a_file_that_is_no_orphan(h: Harness) -> None:
    f = h.mk(ROOT_INO, b"f")
    with h.store.env.begin(write=True) as txn:
        txn.put(u64(f), b"", db=h.store.db[TMPFILES])
    problems: list[str] = []

    class Report:
        def problem(self, text: str) -> None:
            problems.append(text)

        def fixed(self, text: str) -> None:
            problems.append("fixed: " + text)

    with h.store.env.begin(write=True) as txn:
        class Log:  # what check_namespace asks of the log: one transaction, open for repairs
            @staticmethod
            def read_txn() -> object:
                return txn

        check_namespace(Log(), h.sm, Report(), repair=True)  # type: ignore[arg-type]
    assert problems == [f"O_TMPFILE mark on inode {f}, which is no orphan", f"fixed: dropped the O_TMPFILE mark of inode {f}"]
    assert not marked(h, f)


async def test_o_tmpfile_waits_for_the_cluster_log_level(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rolling upgrade: while a member's build could not decode MakeTmpfile (log level 13),
    O_TMPFILE answers EOPNOTSUPP, what callers take for "make a named temporary file"."""
    monkeypatch.setattr(core.meta, "log_level", lambda: 12)
    with pytest.raises(FsError) as err:
        await open_tmpfile(core.ops, ROOT_INO, 0o600, os.O_RDWR, 0, 0)
    assert err.value.errno == errno.EOPNOTSUPP
    monkeypatch.undo()
    fh, inode = await open_tmpfile(core.ops, ROOT_INO, 0o600, os.O_RDWR, 0, 0)
    assert inode.nlink == 0 and core.meta.orphan(inode.ino) is not None
    await core.ops.release(fh)
    assert core.meta.inode(inode.ino) is None, "its last close deleted it"


def test_a_linked_tmpfile_reaches_a_linked_site_whole(tmp_path: Path) -> None:
    """Written and given an xattr while unnamed (nothing ships: no site knows the inode), then
    linked: the other site gets the file with its content, mode, owner and xattr."""
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.MakeTmpfile(ROOT_INO, f, REG, 7, 8, a.tick(), True))
    write(a, f, 0, 3, seed=1)
    a.apply(c.SetXattr(f, b"user.k", b"v", 0, a.tick()))
    assert ship(a, b) == 0, "nothing to ship before it has a name"
    a.apply(c.LinkTmpfile(f, ROOT_INO, b"kept", a.tick()))
    assert ship(a, b) > 0
    assert b.snapshot()[b"/kept"] == a.snapshot()[b"/kept"]
    assert b.snapshot()[b"/kept"][:5] == (stat.S_IFREG, 0o600, 7, 8, 1)
