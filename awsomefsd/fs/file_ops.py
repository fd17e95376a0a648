"""The POSIX operations on open files' data: read, write, seek for data and holes, flush and
fsync (reporting lost writes once per descriptor), release, fallocate and copy_file_range. Part of
`Operations` (fs/operations.py), over the state and helpers of fs/ops_base.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from awsomefsd.fs.handles import CRASH_UNREPORTED, Handle
from awsomefsd.fs.ops_base import SETID_BITS, InGroup, OperationsBase
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import MAX_FILE_SIZE_BYTES, MAX_RANGE_BLOCKS

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
UPGRADING = "not every member's build decodes it yet (a rolling upgrade is under way; meta/levels.py LOG_LEVEL)"
ZEROS_PER_WRITE = 1 << 20


class FileOperations(OperationsBase):
    """Reads, writes and the other operations on an open file's data."""

    async def read(self, fh: int, offset: int, size: int) -> bytes | bytearray:
        h = self.handle(fh)
        inode = self.meta.require_inode(h.ino)
        return await self.data.read(inode, offset, size)

    def start_read(self, fh: int, offset: int, size: int, send: Callable[[memoryview], None],
                   fail: Callable[[], None]) -> bool:
        """`read` without a task where it is the common one (Reader.start_read): True when
        started (`send` or `fail` follows); False: call `read`."""
        h = self.handles.open.get(fh)
        inode = None if h is None else self.meta.inode(h.ino)
        return inode is not None and self.data.reader.start_read(inode, offset, size, send, fail)

    async def write(self, fh: int, offset: int, buf: bytes | memoryview, *, drop_setid: InGroup | None = None,
                    kernel_times: bool = False) -> int:
        """`drop_setid`: the writer lacks CAP_FSETID and the kernel left clearing set-user-ID and
        set-group-ID to us (HANDLE_KILLPRIV_V2). `kernel_times`: the kernel writing back pages it
        cached under the writeback cache; it keeps the file's mtime itself and sends it in a
        SETATTR, before or after these bytes (their commit must not stamp the time they arrived
        over it). Without the writeback cache the kernel sends no times, and mmap's written pages
        arrive flagged the same way: those are stamped."""
        h = self.handle(fh)
        async with self._writing(h.ino):
            inode = self.meta.require_inode(h.ino)
            if drop_setid is not None and inode.mode & SETID_BITS:  # rare: no second read otherwise
                await self._drop_setid(inode, drop_setid)
                inode = self.meta.require_inode(h.ino)
            append = self.appends_at_own_end(h, kernel_times=kernel_times)
            if append:
                offset = self.data.effective_size(inode.ino, inode.size)
            if inode.volume:
                self.meta.check_writable(inode.volume)
            written = await self.data.write(inode, offset, buf, stamp=not kernel_times)
        if append and self.coherence is not None:
            self.coherence.appended(h.ino)
        return written

    def appends_at_own_end(self, h: Handle, *, kernel_times: bool = False) -> bool:
        """Does a write through `h` go to the end of the file as this daemon knows it, whatever
        offset the kernel sent? For O_APPEND, the kernel sends its cached size as the offset, and
        that can be wrong here. On a cluster member, other nodes' appends made it stale (with the
        lease held, the end of file here is the real one). On a descriptor opened before the
        daemon crashed, it counts the writes the crash lost: at that offset the file would get a
        run of zeros where they were. Not for pages the kernel writes back under the writeback
        cache (`kernel_times`): those are the file's bytes where the kernel put them. The kernel
        caches the appended bytes at its own offset meanwhile; it drops those pages when it next
        fetches the file's attributes (it marks them stale after every write) and finds a size
        other than its own."""
        if not h.flags & os.O_APPEND:
            return False
        return self.coherence is not None or (h.rebuilt and not kernel_times)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE (the kernel answers the other kinds itself), block by block
        as ext4 does: ENXIO at or past the end; the end of the file is a hole."""
        h = self.handle(fh)
        inode = self.inode(h.ino)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FsError(errno.EINVAL)
        if offset < 0 or offset >= inode.size:
            raise FsError(errno.ENXIO)
        ranges = self.data.data_ranges(inode, offset)
        if whence == os.SEEK_DATA:
            for start, end in ranges:
                if end > offset:
                    return max(start, offset)
            raise FsError(errno.ENXIO)
        position = offset
        for start, end in ranges:
            if start > position:
                break
            position = max(position, end)
        return min(position, inode.size)

    def flush_is_immediate(self, fh: int) -> bool:
        """Would `flush(fh)` return without waiting: a known handle of a file with nothing
        buffered, on a single node one whose close the batch of closed files takes, on a cluster
        member a small fresh file whose blocks are held for the pipeline (`flushes_at_once`; a
        transport may answer it without a task of its own)."""
        h = self.handles.find(fh)
        if h is None:
            return False
        if self.coherence is None:
            return not self.data.has_buffered(h.ino) or self.data.close_is_deferred(h.ino)
        return not self.data.has_buffered(h.ino) or self.data.flushes_at_once(h.ino)

    def write_is_immediate(self, fh: int, size: int) -> bool:
        """Would `write(fh, ..., size bytes)` return without waiting: a known handle, a buffer
        that takes the bytes without a flush, room on the device for them, and on a cluster
        member the file's write lease held here with no hand-over begun (clearing set-user-ID
        first runs ahead under it). A transport may then answer it without a task of its own.
        An error it raises (EDQUOT, EFBIG) comes at once too."""
        h = self.handles.find(fh)
        return (h is not None and self.data.buffers_at_once(h.ino, size)
                and (self.coherence is None or self.change_is_immediate(h.ino)))

    async def flush(self, fh: int) -> None:
        """close(2): the file's data reaches the device and its mapping the metadata (close-to-open)
        before anything proposed after the close commits: on a single node a small file's data
        may wait for the next batch of closed files, written before the log's next commit
        (fs/batch.py); everywhere else now."""
        h = self.handle(fh)
        if self.coherence is None and self.data.defer_close(h.ino):
            self._report_loss(h)
            return
        await self._flush_reporting(h)

    async def _flush_reporting(self, h: Handle) -> None:
        """Flush the file; a write error or a loss is reported to this descriptor once."""
        try:
            if self.data.has_buffered(h.ino):  # else nothing to write (most closes of files just read)
                await self.data.flush(h.ino)
        except FsError:
            h.seen_loss = self.data.losses  # this error is the report of the loss it recorded
            raise
        self._report_loss(h)

    def _report_loss(self, h: Handle) -> None:
        """Writes this descriptor may have made were dropped (the node's lease expired, a flush
        failed, or the daemon crashed and this one rebuilt the handle): EIO, or the failed
        flush's own error (ENOSPC on a full device), once."""
        if h.seen_loss == CRASH_UNREPORTED:
            h.seen_loss = self.data.losses
            raise FsError(errno.EIO, "writes through this descriptor that were not yet synced may be lost: "
                          "the daemon serving the mount crashed", cause="lost-writes")
        if self.data.unreported_loss(h.ino, h.seen_loss):
            h.seen_loss = self.data.losses
            raise FsError(self.data.loss_errno(h.ino),
                          "buffered writes were lost (a flush of them failed, or this node's lease "
                          "expired before they were flushed)", cause="lost-writes")

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if h is not None:
            if not self.handles.open_for_writing(h.ino):
                self.data.closed(h.ino)  # the last writer: not while others still write (fio's jobs)
            await self._purge_if_orphan(h.ino, evicted=self.handles.evicted_unheld(h.ino))

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        """fallocate(2): the default mode and KEEP_SIZE reserve the range's holes (unwritten
        extents: a later write there needs no free space; they read as zeros and count in
        st_blocks) and, without KEEP_SIZE, extend the file over it. ZERO_RANGE also makes the
        bytes in it read as zeros first, and PUNCH_HOLE (with KEEP_SIZE, as Linux requires)
        deallocates them (`_zero`). The other modes: EOPNOTSUPP. During a rolling upgrade that
        has not reached Preallocate, the space is checked, not reserved."""
        h = self.handle(fh)
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        end = offset + length
        if end > MAX_FILE_SIZE_BYTES:
            raise FsError(errno.EFBIG)
        inode = self.inode(h.ino)
        if not inode.is_reg:
            raise FsError(errno.ENODEV)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                raise FsError(errno.EOPNOTSUPP, "PUNCH_HOLE goes with KEEP_SIZE only")
            if not self.meta.may_propose(c.PunchHole):
                raise FsError(errno.EOPNOTSUPP, UPGRADING)
            async with self._writing(h.ino):
                await self._zero(h.ino, offset, end)
        elif mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE):
            raise FsError(errno.EOPNOTSUPP, "only the default mode, KEEP_SIZE, ZERO_RANGE and PUNCH_HOLE")
        else:
            await self._allocate(h.ino, offset, end, mode)
        # Every mode changes mtime and ctime, even where it changed nothing else, as on ext4.
        await self.setattr(h.ino, mtime_ns=self._now())

    async def _allocate(self, ino: int, offset: int, end: int, mode: int) -> None:
        """fallocate's default mode, KEEP_SIZE and ZERO_RANGE (see `fallocate`)."""
        volume = self.inode(ino).volume
        if volume:
            self.meta.check_writable(volume)
        first, last = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        reserve = self.meta.may_propose(c.Preallocate)
        async with self._writing(ino):
            if mode & FALLOC_FL_ZERO_RANGE:
                await self.data.preallocate(ino, first, last, reserve=False)  # fits, or nothing changes
                await self._zero(ino, offset, end)
            await self.data.preallocate(ino, first, last, reserve=reserve)
        if not mode & FALLOC_FL_KEEP_SIZE and end > self.inode(ino).size:
            await self.setattr(ino, size=end)

    async def _zero(self, ino: int, start: int, end: int) -> None:
        """Make bytes [start, end) of the file read as zeros, up to its end (past it there is
        nothing to zero: an extended file reads zeros there). Whole blocks are unmapped, one
        PunchHole per MAX_RANGE_BLOCKS; the partial blocks at the edges are written with zeros
        (at most a block each, copy-on-write like any write). The caller holds the write lease."""
        inode = self.meta.require_inode(ino)
        if inode.volume:
            self.meta.check_writable(inode.volume)
        end = min(end, self.data.effective_size(ino, inode.size))
        if start >= end:
            return
        first_whole, end_whole = -(-start // BLOCK_SIZE), end // BLOCK_SIZE
        if not self.meta.may_propose(c.PunchHole):  # ZERO_RANGE during a rolling upgrade: write the zeros
            first_whole = end_whole = end // BLOCK_SIZE
        if first_whole >= end_whole:
            edges = [(start, end)]
        else:
            edges = [(start, first_whole * BLOCK_SIZE), (end_whole * BLOCK_SIZE, end)]
        for a, b in edges:
            for chunk in range(a, b, ZEROS_PER_WRITE):
                await self.data.write(self.meta.require_inode(ino), chunk, bytes(min(b, chunk + ZEROS_PER_WRITE) - chunk))
        for block in range(first_whole, end_whole, MAX_RANGE_BLOCKS):
            await self.data.punch_hole(ino, block, min(end_whole, block + MAX_RANGE_BLOCKS))

    async def copy_file_range(self, fh_in: int, offset_in: int, fh_out: int, offset_out: int, length: int) -> int:
        """copy_file_range(2) within this filesystem: how many bytes were copied, which may be
        fewer than asked (callers loop, as the call allows). Whole blocks are cloned
        (CloneRange: shared copy-on-write, one metadata command for up to MAX_RANGE_BLOCKS, no
        byte read or written); a partial block at either edge is copied through this daemon in
        a call of its own. Offsets at different places within a block cannot share blocks:
        EOPNOTSUPP makes the kernel copy those through reads and writes itself."""
        src_h, dst_h = self.handle(fh_in), self.handle(fh_out)
        if offset_in < 0 or offset_out < 0 or length < 0:
            raise FsError(errno.EINVAL)
        src, dst = self.inode(src_h.ino), self.inode(dst_h.ino)
        if not src.is_reg or not dst.is_reg:
            raise FsError(errno.EINVAL)
        if dst.volume:
            self.meta.check_writable(dst.volume)
        length = min(length, self.data.effective_size(src.ino, src.size) - offset_in)
        if length <= 0:
            return 0
        if offset_out + length > MAX_FILE_SIZE_BYTES:
            raise FsError(errno.EFBIG)
        if (offset_in - offset_out) % BLOCK_SIZE:
            raise FsError(errno.EOPNOTSUPP, "the offsets are at different places within a block")
        if not self.meta.may_propose(c.CloneRange):
            raise FsError(errno.EOPNOTSUPP, UPGRADING)
        head = -offset_in % BLOCK_SIZE
        blocks = 0 if head else min(length // BLOCK_SIZE, MAX_RANGE_BLOCKS)
        async with self._writing(dst_h.ino):
            if not blocks:
                data = await self.data.read(self.meta.require_inode(src.ino), offset_in, min(length, head or length))
                if data:
                    await self.data.write(self.meta.require_inode(dst_h.ino), offset_out, bytes(data))
                return len(data)
            await self.data.clone(src.ino, offset_in // BLOCK_SIZE, dst_h.ino, offset_out // BLOCK_SIZE, blocks,
                                  offset_out + blocks * BLOCK_SIZE)
        return blocks * BLOCK_SIZE

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handle(fh)
        await self._flush_reporting(h)
        await self.meta.barrier(h.ino)

    async def sync_all(self) -> None:
        await self.data.flush_all()
        await self.meta.barrier()

    async def fsyncdir(self, ino: int) -> None:
        """fsync of a directory: everything is made durable (the log commits the whole namespace).
        The first one of each directory after a crash of the daemon before reports EIO: the crash
        may have taken changes to its entries acknowledged before (`CrashReports`)."""
        await self.sync_all()
        self.handles.crash.report_directory(ino)

    async def syncfs(self) -> None:
        """syncfs(2), where the kernel sends it (not to a /dev/fuse server: docs/fuse-transport.md):
        `sync_all`; the first one after a crash of the daemon before reports it (EIO)."""
        await self.sync_all()
        self.handles.crash.report_whole()
