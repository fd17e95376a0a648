"""SETATTRs and OPENs a transport serves without a task of their own (`Operations.setattr_is_immediate`,
`KernelHandlers.quick`): the reader itself serves them, so one it is told will not wait must not
wait for another task; one that must (a flush of the file first, or a flush holding its lock; an
open that truncates) gets a task. What it sets is what a later stat shows, buffered writes or not."""

from __future__ import annotations

import os
import stat

import trio

from awsomefsd.daemon.node import Core
from awsomefsd.meta.records import ROOT_INO

HOUR_NS = 3600 * 1_000_000_000


async def _immediately(core: Core, ino: int, **change: int) -> None:
    """`setattr` said to be immediate, run while nothing else may take the file's lock: were it
    to wait for another task, the lock held around it would make it wait for ever (fail_after)."""
    assert core.ops.setattr_is_immediate(ino, change.get("mtime_ns"))
    with trio.fail_after(5):
        await core.ops.setattr(ino, **change)


async def test_a_time_set_over_buffered_writes_is_immediate_unless_a_flush_holds_the_file(core: Core) -> None:
    fh, inode = await core.ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    ino = inode.ino
    assert core.ops.setattr_is_immediate(ino, None) and core.ops.setattr_is_immediate(ino, 1)  # nothing buffered
    await core.ops.write(fh, 0, b"x" * 5000)
    assert core.data.has_buffered(ino)
    past = core.ops._now() - HOUR_NS
    assert core.ops.setattr_is_immediate(ino, past)
    assert not core.ops.setattr_is_immediate(ino, core.ops._now() + HOUR_NS), "a future time flushes first"
    assert not core.ops.setattr_is_immediate(ino, 0), "so does a time at or before 1970"

    flushing = trio.Event()
    done = trio.Event()

    async def hold_as_a_flush_does() -> None:
        async with core.data.buffer.locked(ino):
            flushing.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold_as_a_flush_does)
        await flushing.wait()
        assert not core.ops.setattr_is_immediate(ino, past), "it would wait for the flush's lock"
        assert core.ops.setattr_is_immediate(ino, None), "a chmod waits for no flush"
        await _immediately(core, ino, mode=0o600)
        done.set()
    await _immediately(core, ino, mtime_ns=past, atime_ns=past)
    await core.ops.flush(fh)
    await core.ops.release(fh)
    after = core.ops.inode(ino)
    assert (after.mtime_ns, after.atime_ns, stat.S_IMODE(after.mode), after.size) == (past, past, 0o600, 5000)


async def test_a_cluster_member_serves_a_setattr_inline_only_under_the_files_lease(core: Core) -> None:
    """A member's change may wait for a lease: immediate only while this node holds the file's
    write lease with no hand-over begun (`holds_now`), and then not for a time set over buffered
    bytes (they are flushed first). tests/unit/test_member_inline.py runs it with a real
    coherence."""
    fh, inode = await core.ops.create(ROOT_INO, b"g", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)

    class Holding:
        held = False

        def holds_now(self, inodes: object) -> bool:
            return self.held

    coherence = Holding()
    core.ops.coherence = coherence  # type: ignore[assignment]
    try:
        assert not core.ops.setattr_is_immediate(inode.ino, None), "not held: it may wait for the lease"
        coherence.held = True
        assert core.ops.setattr_is_immediate(inode.ino, None)
        assert core.ops.setattr_is_immediate(inode.ino, 1_000_000_000)
        core.ops.coherence = None
        await core.ops.write(fh, 0, b"buffered")
        core.ops.coherence = coherence  # type: ignore[assignment]
        assert not core.ops.setattr_is_immediate(inode.ino, 1_000_000_000), "a time over buffered bytes"
        assert core.ops.setattr_is_immediate(inode.ino, None)
    finally:
        core.ops.coherence = None
    await core.ops.flush(fh)
    await core.ops.release(fh)


async def test_the_reader_tells_a_quick_setattr_from_its_bytes(core: Core) -> None:
    """KernelHandlers.quick: a truncate never (it may write the tail block), a time or mode
    change when `setattr_is_immediate` says so, under the kernel's writeback cache as without it
    (the kernel sends each file's times that way at its close, and rsync's rename one more)."""
    from awsomefsd.fuse.kernel import abi
    from awsomefsd.fuse.kernel.abi import Fattr, Op
    from awsomefsd.fuse.kernel.handlers import KernelHandlers

    _, inode = await core.ops.create(ROOT_INO, b"h", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    handlers = KernelHandlers(core.ops, cache_dirs=True)
    quick = handlers.quick[Op.SETATTR]

    def request(valid: int, size: int = 0, mtime_s: int = 0) -> bytes:
        body = abi.SETATTR_IN.pack(valid, 0, 0, size, 0, mtime_s, mtime_s, 0, 0, 0, 0, 0o600, 0, 0, 0, 0)
        return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), Op.SETATTR, 1, inode.ino, 0, 0, 1, 0, 0) + body

    assert quick(request(Fattr.MODE))
    assert quick(request(Fattr.ATIME | Fattr.MTIME, mtime_s=1_000_000))
    assert quick(request(Fattr.MTIME_NOW | Fattr.ATIME_NOW))
    assert not quick(request(Fattr.SIZE, size=10))
    assert not quick(request(Fattr.MODE)[:-8]), "a short request is the task's to refuse"
    handlers.writeback_cache = lambda: True
    assert quick(request(Fattr.MODE))
    assert quick(request(Fattr.MTIME | Fattr.CTIME | Fattr.FH | Fattr.LOCKOWNER, mtime_s=1_000_000))
    assert not quick(request(Fattr.SIZE, size=10))


async def test_an_open_that_truncates_nothing_is_quick(core: Core) -> None:
    from awsomefsd.fuse.kernel import abi
    from awsomefsd.fuse.kernel.abi import Op
    from awsomefsd.fuse.kernel.handlers import KernelHandlers

    _, inode = await core.ops.create(ROOT_INO, b"o", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    quick = KernelHandlers(core.ops, cache_dirs=True).quick[Op.OPEN]

    def request(flags: int) -> bytes:
        body = abi.OPEN_IN.pack(flags, 0)
        return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), Op.OPEN, 1, inode.ino, 0, 0, 1, 0, 0) + body

    assert quick(request(os.O_RDONLY)) and quick(request(os.O_RDWR | os.O_APPEND))
    assert not quick(request(os.O_WRONLY | os.O_TRUNC)), "a truncate may write the device"
