"""The read workers' hot map (fs/hotmap.py): what makes an inode hot, when it is cold again, and the
worker's two looks (R1, R2 of docs/multicore.md). The proposer's side and a worker's view share
one memfd here, as they do across processes."""

from __future__ import annotations

import os

from awsomefsd.fs.hotmap import HotMap, HotView, inodes_of, slot_of
from awsomefsd.meta import commands as c
from awsomefsd.meta.records import Extent


class Log:
    def __init__(self) -> None:
        self.applied = 0
        self.committed = 0
        self.buffered: set[int] = set()

    def apply(self) -> None:
        self.applied += 1

    def commit(self) -> None:
        self.committed = self.applied


def rig() -> tuple[Log, HotMap, HotView]:
    log = Log()
    hot = HotMap(lambda: log.applied, lambda: log.committed, lambda ino: ino in log.buffered)
    return log, hot, HotView(hot.fd)


def test_a_file_open_for_writing_is_hot_until_its_release_is_committed() -> None:
    log, hot, view = rig()
    assert view.look(7) is not None
    hot.hold(7)  # OPEN for writing, before it is answered
    assert view.look(7) is None
    log.apply()  # a flush of its writes
    hot.release(7)  # RELEASE
    hot.settle()
    assert view.look(7) is None, "its last write is not committed yet"
    log.commit()
    hot.settle()
    assert view.look(7) is not None


def test_buffered_bytes_keep_a_released_file_hot() -> None:
    log, hot, view = rig()
    hot.hold(9)
    log.buffered.add(9)
    hot.release(9)
    log.commit()
    hot.settle()
    assert view.look(9) is None
    log.buffered.clear()
    hot.settle()
    assert view.look(9) is not None


def test_a_command_makes_its_inodes_hot_until_committed_and_unknown_ones_make_every_inode_hot() -> None:
    log, hot, view = rig()
    log.apply()
    hot.changed(c.SetAttr(5, 0, size=0))
    assert view.look(5) is None and view.look(6) is not None
    log.apply()
    hot.changed(c.DeleteVolume(3, 0))  # which files it removes is not known here
    assert view.look(6) is None
    log.commit()
    hot.settle()
    assert view.look(5) is not None and view.look(6) is not None


def test_a_worker_drops_a_read_that_overlapped_a_change_even_one_already_cleared() -> None:
    log, hot, view = rig()
    seen = view.look(4)
    assert seen is not None and view.still(4, seen)
    log.apply()
    hot.changed(c.WriteData(4, (), 4096, 0))  # while the worker reads
    log.commit()
    hot.settle()
    assert view.look(4) is not None, "cold again"
    assert not view.still(4, seen), "but the generation moved: the worker's bytes may be the old ones"


def test_which_commands_name_which_inodes() -> None:
    ext = Extent(0, 100, 1, b"\0" * 4)
    assert list(inodes_of(c.WriteData(3, (ext,), 4096, 0)) or []) == [3]
    assert list(inodes_of(c.CloneRange(3, 0, 4, 0, 1, 4096, 0)) or []) == [3, 4]
    assert inodes_of(c.Rename(1, b"a", 1, b"b", 0, 0)) == ()
    assert list(inodes_of(c.SetAttr(3, 0, size=100)) or []) == [3], "a truncate changes what reads return"
    assert inodes_of(c.SetAttr(3, 0, mode=0o600, mtime_ns=5)) == (), "chmod and utimensat change no byte"
    assert list(inodes_of(c.Batch((c.WriteData(3, (ext,), 4096, 0), c.Purge(8, 0)))) or []) == [3, 8]
    assert list(inodes_of(c.UnlinkClosed(1, b"f", False, 0, ino=8)) or []) == [8], "it may purge, as Purge does"
    assert inodes_of(c.Batch((c.WriteData(3, (ext,), 4096, 0), c.DeleteVolume(1, 0)))) is None
    assert all(slot_of(ino) != 0 for ino in range(1, 100_000))


def test_the_view_is_read_only() -> None:
    _, hot, view = rig()
    try:
        view._words[0] = 1  # type: ignore[index]
    except TypeError:
        pass
    else:
        raise AssertionError("a worker could write the hot map")
    finally:
        hot.close()
    assert not os.path.exists(f"/proc/self/fd/{hot.fd}")
