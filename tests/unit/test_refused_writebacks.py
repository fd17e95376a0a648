"""A write-back the daemon refuses under the kernel's writeback cache reaches the writer's next
write() (fuse/kernel/refusals.py): the refusal makes the kernel's attributes stale, and the next
GETATTR that names a handle open for writing on the file answers the refusal's errno, once. A
stat() (no handle), a reader's handle and another file's handle answer attributes as always.
(The mounted test_writeback.py fills a device through the real kernel.)"""

from __future__ import annotations

import errno
import os
import stat

import trio

from awsomefsd.daemon.node import Core
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.refusals import GETATTR_FH, RefusedWriteBacks
from awsomefsd.meta.records import ROOT_INO


def _getattr_body(fh: int | None) -> abi.Body:
    body = abi.GETATTR_IN.pack(0 if fh is None else GETATTR_FH, 0, fh or 0)
    return abi.Body(abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), abi.Op.GETATTR, 1, 0, 0, 0, 1, 0, 0) + body)


async def test_the_next_writer_getattr_answers_the_refusal_once(core: Core) -> None:
    writer, inode = await core.ops.create(ROOT_INO, b"w", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    other, _ = await core.ops.create(ROOT_INO, b"o", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    reader = await core.ops.open(inode.ino, os.O_RDONLY)
    stale: list[int] = []
    refusals = RefusedWriteBacks(core.ops.handles, stale.append)
    assert refusals.answer(inode.ino, _getattr_body(writer)) == 0, "nothing refused yet"
    refusals.refuse(inode.ino, errno.ENOSPC)
    refusals.refuse(inode.ino, errno.EIO)  # the first refusal stands until it is heard
    with trio.fail_after(5):
        while not stale:  # a worker thread tells the kernel
            await trio.sleep(0.001)
    await trio.sleep(0.01)
    assert stale == [inode.ino], "the kernel is told once, after the refused request"
    assert refusals.answer(inode.ino, _getattr_body(None)) == 0, "a stat names no handle"
    assert refusals.answer(inode.ino, _getattr_body(reader)) == 0, "a reader's handle"
    assert refusals.answer(inode.ino, _getattr_body(other)) == 0, "another file's handle"
    assert refusals.answer(inode.ino, _getattr_body(writer + 1000)) == 0, "an unknown handle"
    assert refusals.answer(inode.ino, _getattr_body(writer)) == errno.ENOSPC
    assert refusals.answer(inode.ino, _getattr_body(writer)) == 0, "heard once"
    assert refusals.reported == 1


async def test_a_refusal_the_kernel_cannot_hold_is_forgotten(core: Core) -> None:
    """The kernel answers ENOENT when it caches no such inode: nobody will ask, nothing is kept."""
    writer, inode = await core.ops.create(ROOT_INO, b"gone", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)

    def make_stale(ino: int) -> None:
        raise OSError(errno.ENOENT, "not cached")

    refusals = RefusedWriteBacks(core.ops.handles, make_stale)
    refusals.refuse(inode.ino, errno.ENOSPC)
    with trio.fail_after(5):
        while refusals.refused:
            await trio.sleep(0.001)
    assert refusals.answer(inode.ino, _getattr_body(writer)) == 0


async def test_near_a_full_device_every_writer_hears_enospc_until_room_returns(core: Core) -> None:
    """`set_full` (fuse/dirty_bound.py says when): each file open for writing is made stale once,
    and a writer's GETATTR answers ENOSPC for as long as the room is short, not once; answered
    as always, the file is made stale again by its next cached WRITE."""
    writer, inode = await core.ops.create(ROOT_INO, b"full", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    reader = await core.ops.open(inode.ino, os.O_RDONLY)
    stale: list[int] = []
    short = [True]
    refusals = RefusedWriteBacks(core.ops.handles, stale.append)
    refusals.full_now = lambda: short[0]
    assert not refusals.asking()
    refusals.set_full(True, core.ops.handles.writing())
    with trio.fail_after(5):
        while not stale:
            await trio.sleep(0.001)
    assert stale == [inode.ino] and refusals.asking()
    assert refusals.answer(inode.ino, _getattr_body(writer)) == errno.ENOSPC
    assert refusals.answer(inode.ino, _getattr_body(writer)) == errno.ENOSPC, "every write() while short"
    assert refusals.answer(inode.ino, _getattr_body(reader)) == 0
    refusals.reserved = lambda ino: True  # fallocated blocks: its write may go there, and fit
    assert refusals.answer(inode.ino, _getattr_body(writer)) == 0
    refusals.reserved = lambda ino: False
    short[0] = False  # a flush ended, a file was deleted: room again before the bound looked
    assert refusals.answer(inode.ino, _getattr_body(writer)) == 0
    refusals.written(inode.ino)  # its next cached WRITE, still near full by the bound's last look
    with trio.fail_after(5):
        while len(stale) < 2:
            await trio.sleep(0.001)
    refusals.set_full(False, [])
    assert not refusals.asking() and refusals.answer(inode.ino, _getattr_body(writer)) == 0
