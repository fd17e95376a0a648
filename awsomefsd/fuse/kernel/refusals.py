"""Under the kernel's writeback cache, a write-back we refuse reaches the writer's next write().

With FUSE_WRITEBACK_CACHE an application's write() returns once its bytes are in the kernel's
page cache, and the kernel sends them later (WRITE with FUSE_WRITE_CACHE). When we refuse such a
WRITE (ENOSPC on a full device, EDQUOT over a volume's quota, EIO while fenced), the kernel keeps
the error for the file's next fsync and close and drops the pages. A writer that loops on write()
until it fails (`dd if=/dev/zero of=f`, `cat /dev/zero > f` to fill a disk) would then write into
the page cache for ever, each page thrown away when the kernel writes it back.

The one request a cached write() may send is a GETATTR carrying the writer's handle
(FUSE_GETATTR_FH): `fuse_cache_write_iter` first refreshes the size and mode, from us when the
kernel holds them stale, and returns that GETATTR's error from write(). So a refusal marks the
inode here and makes the kernel's attributes of it stale (FUSE_NOTIFY_INVAL_INODE, attributes
only: no page is touched, so the notification waits for no request); the next GETATTR with a
handle open for writing on that inode is answered with the refused write's errno, once. A read()
or lseek() through a handle open for reading and writing may ask the same way and then hears it
instead; a stat() carries no handle and never does.

Near a full device (`set_full`, from fuse/dirty_bound.py) the same path refuses before anything
is lost: every file open for writing, and each file whose cached pages arrive meanwhile, has its
attributes made stale once, and while the device stays near full a GETATTR naming a handle open
for writing answers ENOSPC, every time. The kernel then holds at most the little the dirty bound
lets it, which the room held back still takes: write() fails with ENOSPC while a few MiB remain,
rather than succeeding for bytes that are then dropped.

Kept in memory only: after a restart the kernel's own report at fsync and close remains.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable

import trio

from awsomefsd.fs.handles import Handles
from awsomefsd.fuse.kernel import abi

log = logging.getLogger(__name__)

GETATTR_FH = 1
"""FUSE_GETATTR_FH: the GETATTR names a handle (the kernel asks on behalf of a read, write or seek)."""

MAX_REFUSED_INODES = 4096
"""Inodes remembered at once. Past it a refusal is not remembered: its writer still hears it at
fsync and close, only not at its next write()."""


class RefusedWriteBacks:
    """Inodes whose cached pages we refused, and the errno their next writer's GETATTR answers."""

    def __init__(self, handles: Handles, make_stale: Callable[[int], None]) -> None:
        """`make_stale(ino)`: tell the kernel its attributes of `ino` are stale (blocking; called
        on a worker thread after the refused WRITE is answered)."""
        self.handles = handles
        self.make_stale = make_stale
        self.refused: dict[int, int] = {}
        self.reported = 0
        self.full = False
        """The device came near full (`set_full`): writers hear ENOSPC at their next write()."""
        self.full_now: Callable[[], bool] = lambda: self.full
        """Is it near full at this moment (asked before a GETATTR answers ENOSPC for it)?"""
        self.reserved: Callable[[int], bool] = lambda ino: False
        """Has the file blocks reserved for it (fallocate)? Its writes there fit on a full device,
        and a GETATTR does not say where the write goes: such a writer is not told ENOSPC."""
        self.warned: set[int] = set()
        """Inodes whose attributes were made stale since the device came near full."""

    def asking(self) -> bool:
        """May a GETATTR be answered with an error now (cheap; asked per GETATTR)?"""
        return self.full or bool(self.refused)

    def set_full(self, full: bool, writing: Iterable[int]) -> None:
        """The device came near full (`writing`: the inodes open for writing, each made stale
        once), or has room again (writers see their attributes as before)."""
        self.full = full
        if not full:
            self.warned.clear()
            return
        for ino in writing:
            self.written(ino)

    def written(self, ino: int) -> None:
        """Cached pages of `ino` arrived: near a full device, its writer's next write() must ask."""
        if self.full and ino not in self.warned:
            self.warned.add(ino)
            trio.lowlevel.spawn_system_task(self._notify, ino, name=f"near full: inode {ino}")

    def refuse(self, ino: int, err: int) -> None:
        """A WRITE of cached pages of `ino` was refused with `err`: its writer's next GETATTR says so.
        The notification runs after this request's answer (a system task hands it to a thread)."""
        if ino in self.refused or len(self.refused) >= MAX_REFUSED_INODES:
            return
        self.refused[ino] = err
        trio.lowlevel.spawn_system_task(self._notify, ino, name=f"refused write-back of inode {ino}")

    async def _notify(self, ino: int) -> None:
        try:
            await trio.to_thread.run_sync(self.make_stale, ino)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds no such inode any more
                log.warning("could not mark inode %d stale after a refused write-back: %s", ino, exc)
            self.refused.pop(ino, None)
        except Exception:  # a system task's error would end the whole daemon's loop
            log.exception("could not mark inode %d stale after a refused write-back", ino)
            self.refused.pop(ino, None)

    def answer(self, ino: int, body: abi.Body) -> int:
        """The errno a GETATTR of `ino` answers instead of its attributes (0: none). Only a GETATTR
        that names a handle of `ino` open for writing: once per refusal, and ENOSPC while the
        device is near full."""
        if ino not in self.refused and not self.full:
            return 0
        try:
            flags, _, fh = body.take(abi.GETATTR_IN)
        except abi.Malformed:
            return 0
        h = self.handles.find(fh) if flags & GETATTR_FH else None
        if h is None or h.ino != ino or h.flags & os.O_ACCMODE == os.O_RDONLY:
            return 0
        if ino in self.refused:
            self.reported += 1
            return self.refused.pop(ino)
        if self.full_now() and not self.reserved(ino):
            self.reported += 1
            return errno.ENOSPC
        self.warned.discard(ino)  # answered as always: its next cached WRITE makes it stale again
        return 0
