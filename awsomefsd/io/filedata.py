"""File contents: buffered copy-on-write writes and checksum-verified reads on the shared device.

Concurrency (everything here runs on the trio thread unless it says otherwise); the section
"Concurrency" of docs/design-notes.md states the protocol and why each step is safe:
- A write only copies bytes into the file's DirtyRanges and notes the time it happened: no await,
  so it is atomic under trio.
- A flush takes the file's dirty runs (they become `inflight`, still visible to reads), allocates
  fresh extents for a batch of them at once, writes them side by side with their checksums (in a
  worker thread for large batches), then proposes one WriteData per batch, stamped with the time
  of the last write it carries. A per-file lock serialises flushes, truncates and compactions of
  the same file.
- A file's state lives while anything uses it: every holder of its lock pins it, so two tasks never
  hold the locks of two different states of one file (a state dropped and made anew meanwhile).
- A read looks up the file map and copies the in-flight and dirty bytes of its range in one step
  (no await between): the buffered bytes it will overlay are exactly those the map it read does
  not hold yet. Then it reads the device with native AIO for small requests while `run` serves it
  (a thread hop per 4 KiB costs more than the read), inline when AIO is unavailable, or in a worker
  thread for large ones; it verifies every block's CRC32C and overlays the copies. A flush that
  commits meanwhile cannot make it return older bytes.
- Superseded extents are freed only after a grace period (state machine), so a read that looked up
  an old mapping just before a flush replaced it still reads intact blocks.
- A flush refused by the device's write fence (this node's lease lapsed) fails with EIO but keeps
  the runs it could not write buffered, under any bytes written meanwhile: a flush after the lease
  is renewed writes them. While fenced, new writes are refused once the write buffer is full, and
  the timer does not retry.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import itertools
import logging
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from awsomefsd.io.allocator import NodeAllocator
from awsomefsd.io.checksum import block_checksums, first_bad_block
from awsomefsd.io.device import BlockDevice, BufferPool
from awsomefsd.io.dirty import MAX_RUNS, DirtyRanges
from awsomefsd.io.errors import NoSpaceError
from awsomefsd.io.fence import WriteFencedError
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, Extent, Inode

log = logging.getLogger(__name__)

INLINE_IO_MAX_BYTES = 64 * 1024  # larger device requests go to a worker thread, smaller ones to AIO
IO_THREADS = 8
FLUSH_CONCURRENCY = 4
FLUSHER_TICK_S = 0.1
SMALL_RUN_BYTES = 64 * 1024  # a flushed run smaller than this may fragment its file
COMPACT_AFTER_SMALL_RUNS = 32  # check a file for fragmentation after this many small runs
COMPACT_MIN_EXTENTS = 4  # file-contiguous extents in a row worth merging into one
FLUSH_BATCH_BYTES = 8 << 20  # runs written and committed together by one WriteData
FLUSH_BATCH_RUNS = 1024
Piece = tuple[int, int, int, memoryview]  # (file block, device block, blocks, their bytes)


class FileState:
    """Per-inode buffered state on this node."""

    __slots__ = ("dirty", "dirty_since", "error", "inflight", "inflight_end", "ino", "lock", "users", "volume",
                 "written_ns")

    def __init__(self, ino: int, volume: int) -> None:
        self.ino = ino
        self.volume = volume
        self.dirty = DirtyRanges()
        self.inflight: list[tuple[int, bytearray]] = []
        self.inflight_end = 0  # one past the last in-flight byte (runs are in offset order)
        self.lock = trio.Lock()
        self.users = 0  # tasks that pinned this state (FileData._pinned): it stays registered
        self.dirty_since = 0.0
        self.error = 0  # a deferred write error, reported by the next flush/fsync
        self.written_ns = 0  # when the last write not yet committed happened: the file's mtime

    def end_offset(self) -> int:
        return max(self.dirty.end_offset, self.inflight_end)

    def set_inflight(self, runs: list[tuple[int, bytearray]]) -> None:
        self.inflight = runs
        self.inflight_end = runs[-1][0] + len(runs[-1][1]) if runs else 0

    def idle(self) -> bool:
        """Nothing buffered, pending or in use: the state may be dropped."""
        return not (self.users or self.dirty or self.inflight or self.error or self.written_ns)

    def buffered_copies(self, offset: int, size: int) -> list[tuple[int, bytes]]:
        """Copies of the buffered bytes in [offset, offset+size), oldest first (in-flight, then
        dirty): what a read overlays on the committed bytes it reads from the device. Copies, so
        writes and flushes after this call cannot change what the read returns."""
        end = offset + size
        out = []
        runs = self.inflight
        i = max(bisect.bisect_right(runs, offset, key=_run_start) - 1, 0)  # disjoint, in offset order
        while i < len(runs) and runs[i][0] < end:
            start, data = runs[i]
            lo, hi = max(offset, start), min(end, start + len(data))
            if lo < hi:
                out.append((lo, bytes(data[lo - start : hi - start])))
            i += 1
        out.extend(self.dirty.copies(offset, end))
        return out


class FileData:
    def __init__(
        self,
        device: BlockDevice,
        allocator: NodeAllocator,
        meta: MetaClient,
        *,
        file_buffer_bytes: int = 8 << 20,
        write_buffer_bytes: int = 64 << 20,
        flush_interval_ms: int = 1000,
        clock_ns: Callable[[], int] = time.time_ns,
        on_checksum_error: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self.allocator = allocator
        self.meta = meta
        self.file_buffer_bytes = file_buffer_bytes
        self.write_buffer_bytes = write_buffer_bytes
        self.flush_interval_s = flush_interval_ms / 1000
        self.clock_ns = clock_ns
        self.on_checksum_error = on_checksum_error
        self.pool = BufferPool(MAX_EXTENT_BLOCKS * BLOCK_SIZE, 32)
        self.io_limiter = trio.CapacityLimiter(IO_THREADS)
        self.files: dict[int, FileState] = {}
        self.total_dirty_bytes = 0
        self.written_since_sync = False
        self._flush_send, self._flush_recv = trio.open_memory_channel[int](1024)
        self._compact_send, self._compact_recv = trio.open_memory_channel[int](256)
        self.small_runs: dict[int, int] = {}  # inode -> small runs flushed since its last check
        self.losses = 0  # buffered writes dropped (lose_buffers), counted per file
        self.lost_at: dict[int, int] = {}  # inode -> `losses` when its buffers were last dropped
        self.claim_space: Callable[[int], Awaitable[bool]] | None = None
        """Set by a cluster member: get more allocation groups for this node (True if it got any)."""
        self.compactions = 0

    # -- bookkeeping ----------------------------------------------------------------------------
    def state(self, ino: int, volume: int = 0) -> FileState:
        st = self.files.get(ino)
        if st is None:
            st = self.files[ino] = FileState(ino, volume)
        return st

    @asynccontextmanager
    async def _pinned(self, ino: int, volume: int = 0) -> AsyncIterator[FileState]:
        """The file's state, kept registered until the block is left (then dropped if idle)."""
        st = self.state(ino, volume)
        st.users += 1
        try:
            yield st
        finally:
            st.users -= 1
            self._drop_if_idle(st)

    @asynccontextmanager
    async def _locked(self, ino: int, volume: int = 0) -> AsyncIterator[FileState]:
        """The file's state, pinned and locked: no flush, truncate or compaction of it meanwhile."""
        async with self._pinned(ino, volume) as st, st.lock:
            yield st

    def _drop_if_idle(self, st: FileState) -> None:
        if st.idle() and self.files.get(st.ino) is st:
            del self.files[st.ino]

    def effective_size(self, ino: int, size: int) -> int:
        """The size a reader sees: the committed size or the end of buffered data, if further."""
        st = self.files.get(ino)
        return size if st is None else max(size, st.end_offset())

    def with_buffered(self, inode: Inode) -> Inode:
        """`inode` as this node's applications see it: buffered writes count in its size and times
        (a write changes mtime and ctime when it happens, not when its data is committed)."""
        st = self.files.get(inode.ino)
        if st is not None and inode.is_reg:
            inode.size = max(inode.size, st.end_offset())
            if st.written_ns:
                inode.mtime_ns = st.written_ns
                inode.ctime_ns = max(inode.ctime_ns, st.written_ns)
        return inode

    def dirty_blocks(self) -> int:
        return self.total_dirty_bytes // BLOCK_SIZE + 2 * len(self.files)

    def forget(self, ino: int) -> None:
        """Drop buffers of an inode that no longer exists (purged): nothing will read them."""
        self.small_runs.pop(ino, None)
        st = self.files.pop(ino, None)
        if st is not None:
            self.total_dirty_bytes -= st.dirty.dirty_bytes

    def pending_bytes(self, volume: int) -> int:
        """Bytes written into files of `volume` but still buffered here (not yet in its usage)."""
        return sum(st.dirty.dirty_bytes + sum(len(data) for _, data in st.inflight)
                   for st in self.files.values() if st.volume == volume)

    async def flush_volume(self, volume: int) -> None:
        """Push this node's buffered writes into `volume` into the metadata, so a snapshot or clone
        taken now contains every write that returned before it (as `sync` would).

        A write error found on the way is handed back to the file (the application's next close
        or fsync still reports it) and raised: a snapshot would silently miss data."""
        for ino, st in list(self.files.items()):
            if st.volume != volume or not (st.dirty or st.inflight):
                continue
            try:
                await self.flush(ino)
            except FsError as exc:
                again = self.files.get(ino)
                if again is not None and not again.error:
                    again.error = exc.errno
                raise FsError(exc.errno, f"flushing inode {ino} of volume {volume} failed") from exc

    def forget_volume(self, volume: int) -> None:
        """Drop the buffers of every file of a deleted volume: they would only fail to flush."""
        for ino in [ino for ino, st in self.files.items() if st.volume == volume]:
            self.forget(ino)

    def lose_buffers(self, reason: str) -> int:
        """This node lost its right to write (its liveness lease expired and the cluster took back
        its groups and write leases): buffered writes must never reach the device now, since others
        may have written the same files since. Drop them; every descriptor that was open on such a
        file when this happened reports EIO once, at its next flush, fsync or close
        (`unreported_loss`), so the application learns its writes were lost and descriptors opened
        later are not blamed. Returns the files hit."""
        hit = 0
        for st in self.files.values():
            if st.dirty:
                self.total_dirty_bytes -= st.dirty.dirty_bytes
                st.dirty = DirtyRanges()
                st.written_ns = 0
                self.losses += 1
                self.lost_at[st.ino] = self.losses
                hit += 1
        if hit:
            log.error("dropped the buffered writes of %d files: %s", hit, reason)
        return hit

    def unreported_loss(self, ino: int, seen: int) -> bool:
        """Did `ino` lose buffered writes after the loss count `seen` (taken when a descriptor
        opened, or when it last reported one)?"""
        return self.lost_at.get(ino, 0) > seen

    def sync_device(self) -> None:
        """Before-commit hook of the metadata log: data reaches the device before metadata does."""
        if self.written_since_sync:
            self.device.sync()
            self.written_since_sync = False

    # -- reads ----------------------------------------------------------------------------------
    async def read(self, inode: Inode, offset: int, size: int) -> bytes:
        st = self.files.get(inode.ino)
        file_size = inode.size if st is None else max(inode.size, st.end_offset())
        if offset >= file_size or size <= 0:
            return b""
        size = min(size, file_size - offset)
        if st is not None and not st.inflight and st.dirty.covers(offset, size):
            out = bytearray(size)
            st.dirty.overlay(offset, out)
            return bytes(out)
        first = offset // BLOCK_SIZE
        end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
        # One step, no await: the map and the buffered bytes are taken at the same instant.
        extents = self.meta.extents(inode.ino, first, end)
        buffered = [] if st is None else st.buffered_copies(offset, size)
        if not buffered and len(extents) == 1 and extents[0].file_block <= first and extents[0].end_block >= end:
            return await self._read_piece(extents[0], first, end, offset, offset + size)
        out = bytearray(size)
        for ext in extents:
            lo, hi = max(ext.file_block, first), min(ext.end_block, end)
            a, b = max(lo * BLOCK_SIZE, offset), min(hi * BLOCK_SIZE, offset + size)
            out[a - offset : b - offset] = await self._read_piece(ext, lo, hi, a, b)
        for start, data in buffered:
            out[start - offset : start - offset + len(data)] = data
        return bytes(out)

    async def _read_piece(self, ext: Extent, lo: int, hi: int, a: int, b: int) -> bytes:
        """Bytes [a, b) of the file from blocks [lo, hi) of `ext`, checksums verified."""
        piece = ext.slice(lo, hi)
        n = piece.count * BLOCK_SIZE
        buf = self.pool.acquire()
        try:
            view = memoryview(buf)[:n]
            if n > INLINE_IO_MAX_BYTES:
                await trio.to_thread.run_sync(self.device.read_into, view, piece.dev_block * BLOCK_SIZE,
                                              limiter=self.io_limiter)
            else:
                await self.device.read_into_async(view, piece.dev_block * BLOCK_SIZE)
            bad = first_bad_block(view, piece.checksums)
            if bad >= 0:
                self._checksum_failure(piece.dev_block + bad)
            base = lo * BLOCK_SIZE
            return bytes(view[a - base : b - base])
        finally:
            self.pool.release(buf)

    def _checksum_failure(self, dev_block: int) -> None:
        log.error("checksum mismatch at device block %d (%s): returning EIO", dev_block, self.device.path)
        if self.on_checksum_error is not None:
            self.on_checksum_error(dev_block)
        raise FsError(errno.EIO, f"checksum mismatch at device block {dev_block}", cause="checksum")

    async def read_block(self, ino: int, file_block: int) -> bytes:
        """One whole committed block (zeros for a hole): the old data around a partial write."""
        ext = self.meta.extent_at(ino, file_block)
        if ext is None:
            return bytes(BLOCK_SIZE)
        start = file_block * BLOCK_SIZE
        return await self._read_piece(ext, file_block, file_block + 1, start, start + BLOCK_SIZE)

    # -- writes ---------------------------------------------------------------------------------
    async def write(self, inode: Inode, offset: int, data: bytes) -> int:
        if offset + len(data) > (1 << 60):
            raise FsError(errno.EFBIG)
        if self.total_dirty_bytes + len(data) > self.write_buffer_bytes and not self.device.fence.is_open():
            # the buffers cannot drain while fenced: keep memory bounded
            raise FsError(errno.EIO, "device writes fenced (node lease lapsed) and the write buffer is full",
                          cause="fence")
        st = self.state(inode.ino, inode.volume)
        st.users += 1  # pinned, as _pinned does (inline: this is the hottest path)
        try:
            end = offset + len(data)
            grow_blocks = max(0, -(-end // BLOCK_SIZE) - -(-max(inode.size, st.end_offset()) // BLOCK_SIZE))
            await self._check_room(inode, st, len(data) // BLOCK_SIZE + 2, grow_blocks)
            if self.files.get(inode.ino) is not st:
                raise FsError(errno.ESTALE, "the file was deleted during the write")
            before = st.dirty.dirty_bytes
            if not st.dirty:
                st.dirty_since = time.monotonic()
            st.dirty.write(offset, data)
            st.written_ns = self.clock_ns()
            self.total_dirty_bytes += st.dirty.dirty_bytes - before
            if st.dirty.dirty_bytes >= 2 * self.file_buffer_bytes or st.dirty.run_count >= MAX_RUNS:
                await self._flush_pinned(st)  # the background flusher is behind: push back on the writer
            elif st.dirty.dirty_bytes >= self.file_buffer_bytes or self.total_dirty_bytes >= self.write_buffer_bytes:
                try:
                    self._flush_send.send_nowait(inode.ino)
                except trio.WouldBlock:
                    await self._flush_pinned(st)
        finally:
            st.users -= 1
            self._drop_if_idle(st)
        return len(data)

    async def _check_room(self, inode: Inode, st: FileState, need_blocks: int, grow_blocks: int) -> None:
        """Refuse a write up front when the device or the volume's quota cannot take it: an error
        at write() is one the application sees, one at a later flush may go unnoticed."""
        if inode.volume and grow_blocks:
            self._check_quota(inode, st, grow_blocks)
        if self.allocator.free_blocks - self.dirty_blocks() >= need_blocks:
            return
        if (self.claim_space is not None and await self.claim_space(need_blocks + self.dirty_blocks())
                and self.allocator.free_blocks - self.dirty_blocks() >= need_blocks):
            return
        await self.flush_all()
        await self.wait_for_frees(need_blocks)
        if self.allocator.free_blocks - self.dirty_blocks() < need_blocks:
            raise FsError(errno.ENOSPC)

    def _check_quota(self, inode: Inode, st: FileState, grow_blocks: int) -> None:
        volume = self.meta.volume(inode.volume)
        if volume is None:
            return
        if volume.kind == "snapshot":
            raise FsError(errno.EROFS)
        if not volume.capacity_bytes:
            return
        pending = sum(f.dirty.dirty_bytes for f in self.files.values() if f.volume == inode.volume)
        if (volume.used_blocks + grow_blocks) * BLOCK_SIZE + pending > volume.capacity_bytes:
            raise FsError(errno.EDQUOT)

    async def wait_for_frees(self, need_blocks: int) -> None:
        """Space superseded or deleted a moment ago comes back after its grace period: wait for it
        (bounded by that period) rather than fail a write that would fit a few seconds later."""
        due = [(free.not_before_ns, free.blocks) for free in self.meta.deferred_frees()]
        if not due:
            return
        got = 0
        deadline_ns = due[0][0]
        for not_before, count in due:
            got += count
            deadline_ns = not_before
            if self.allocator.free_blocks + got - self.dirty_blocks() >= need_blocks:
                break
        await trio.sleep(max(0.0, (deadline_ns - self.clock_ns()) / 1e9) + 0.001)
        await self.meta.propose(c.ReclaimFrees(now_ns=self.clock_ns()))

    async def flush(self, ino: int) -> None:
        """Write the file's dirty bytes and commit their mapping; raise a deferred write error."""
        if ino not in self.files:
            return
        async with self._locked(ino) as st:
            await self._flush_held(st)

    async def _flush_pinned(self, st: FileState) -> None:
        async with st.lock:
            await self._flush_held(st)

    async def _flush_held(self, st: FileState) -> None:
        """`flush` with the file's state pinned and its lock held."""
        if st.dirty:
            runs = st.dirty.take()
            written_ns = st.written_ns
            taken = sum(len(d) for _, d in runs)
            self.total_dirty_bytes -= taken
            st.set_inflight(runs)
            small = sum(1 for _, data in runs if len(data) < SMALL_RUN_BYTES)
            if small:
                self._note_small_runs(st.ino, small)
            written = 0
            try:
                for batch in _flush_batches(runs):
                    await self._write_runs(st, batch, mtime_ns=written_ns)
                    written += len(batch)
            except FsError as exc:
                st.error = exc.errno
            except WriteFencedError as exc:
                self._keep_unwritten(st, runs[written:])
                raise FsError(errno.EIO, exc.strerror or "", cause="fence") from exc
            finally:
                st.set_inflight([])
            if st.written_ns == written_ns and not st.dirty:
                st.written_ns = 0  # committed (or failed for good): the inode holds the time now
        if st.error:
            err, st.error = st.error, 0
            raise FsError(err)

    def _keep_unwritten(self, st: FileState, runs: list[tuple[int, bytearray]]) -> None:
        """Buffer again the runs a fenced flush could not write (their extents were released and no
        mapping was proposed), under the bytes written since the flush took them: those are newer."""
        if self.files.get(st.ino) is not st:
            return  # forgotten meanwhile: the inode is gone
        newer = st.dirty.take()
        newer_bytes = sum(len(data) for _, data in newer)
        for start, data in itertools.chain(runs, newer):
            st.dirty.write(start, memoryview(data))
        self.total_dirty_bytes += st.dirty.dirty_bytes - newer_bytes

    def _note_small_runs(self, ino: int, count: int) -> None:
        total = self.small_runs.get(ino, 0) + count
        if total < COMPACT_AFTER_SMALL_RUNS:
            self.small_runs[ino] = total
            return
        self._request_compaction(ino)

    def closed(self, ino: int) -> None:
        """A handle was released: a file left fragmented by its last writes is checked now."""
        if self.small_runs.get(ino, 0) >= COMPACT_MIN_EXTENTS:
            self._request_compaction(ino)

    def _request_compaction(self, ino: int) -> None:
        self.small_runs.pop(ino, None)
        try:
            self._compact_send.send_nowait(ino)
        except trio.WouldBlock:
            pass  # the compactor is busy; the file gets another chance after more small writes

    async def compact(self, ino: int) -> int:
        """Rewrite runs of small, file-contiguous extents as large ones; returns extents removed.

        Copy-on-write like any write: the merged data goes to fresh extents and one WriteData per
        MiB replaces the fragments, which are freed after the grace period. Holes stay holes. Runs
        only while the file has no buffered data, under its lock: no flush or truncate interleaves.
        """
        removed = 0
        async with self._locked(ino) as st:
            if st.dirty or st.inflight:
                return 0
            inode = self.meta.inode(ino)
            if inode is None or not inode.is_reg:
                return 0
            extents = self.meta.all_extents(ino)
            for run in _fragmented_runs(extents):
                first, end = run[0].file_block, run[-1].end_block
                for lo in range(first, end, MAX_EXTENT_BLOCKS):
                    hi = min(lo + MAX_EXTENT_BLOCKS, end)
                    pieces = [e for e in run if e.end_block > lo and e.file_block < hi]
                    if len(pieces) < 2:
                        continue
                    data = bytearray()
                    for ext in pieces:
                        a, b = max(ext.file_block, lo), min(ext.end_block, hi)
                        data += await self._read_piece(ext, a, b, a * BLOCK_SIZE, b * BLOCK_SIZE)
                    current = self.meta.inode(ino)
                    if current is None:
                        return removed
                    await self._write_runs(st, [(lo * BLOCK_SIZE, data)], size=current.size, keep_mtime=True)
                    removed += len(pieces) - 1
        if removed:
            self.compactions += 1
            log.debug("compacted inode %d: %d fewer extents", ino, removed)
        return removed

    async def flush_all(self) -> None:
        errors = []
        for ino in list(self.files):
            try:
                await self.flush(ino)
            except FsError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def _write_runs(self, st: FileState, runs: list[tuple[int, bytearray]], *, size: int | None = None,
                          keep_mtime: bool = False, mtime_ns: int = 0) -> None:
        """Write byte runs of one file (in offset order, disjoint) to fresh extents and commit them
        with one WriteData: scattered small writes cost one allocation, a few device writes (the
        runs lie side by side on the device) and one command, not one of each per run."""
        inode = self.meta.inode(st.ino)
        if inode is None:
            return  # deleted meanwhile: nothing to write
        end = max(start + len(data) for start, data in runs)
        if size is not None:
            end = min(size, end)
        block_runs = await self._block_runs(st.ino, inode.size, runs)
        nblocks = sum(len(data) for _, data in block_runs) // BLOCK_SIZE
        extents = await self._allocate(nblocks, self._hint(st.ino, block_runs[0][0]))
        pieces = _lay_out(block_runs, extents)
        try:
            if nblocks * BLOCK_SIZE > INLINE_IO_MAX_BYTES:
                checksums = await trio.to_thread.run_sync(self._write_pieces, pieces, limiter=self.io_limiter)
            else:
                checksums = self._write_pieces(pieces)
            self.written_since_sync = True
            records = tuple(Extent(fb, dev, n, cs) for (fb, dev, n, _), cs in zip(pieces, checksums))
            await self.meta.propose(c.WriteData(st.ino, records, end, self.clock_ns(), touch=not keep_mtime,
                                               mtime_ns=mtime_ns))
        except BaseException:
            self.allocator.release(extents)
            raise

    async def _block_runs(self, ino: int, size: int, runs: list[tuple[int, bytearray]]) -> list[tuple[int, bytearray]]:
        """The runs as (first block, whole blocks): partial blocks are completed with the committed
        bytes around them, and runs that share a block become one. Copies: the runs stay visible
        to readers as in-flight bytes at their own offsets."""
        out: list[tuple[int, bytearray]] = []
        for start, data in runs:
            first, end = start // BLOCK_SIZE, start + len(data)
            end_block = -(-end // BLOCK_SIZE)
            if out and out[-1][0] + len(out[-1][1]) // BLOCK_SIZE > first:
                base, buf = out[-1]  # its last block is this run's first: extend it
                grown_from = base + len(buf) // BLOCK_SIZE
            else:
                base, buf = first, bytearray()
                out.append((base, buf))
                grown_from = first
                if start % BLOCK_SIZE:
                    buf += (await self.read_block(ino, first))[: start % BLOCK_SIZE]
            if end_block > grown_from:
                buf += bytes((end_block - base) * BLOCK_SIZE - len(buf))
                last = end_block - 1
                if end % BLOCK_SIZE and last * BLOCK_SIZE < size:
                    old = await self.read_block(ino, last)
                    buf[end - base * BLOCK_SIZE :] = old[end % BLOCK_SIZE :]
            buf[start - base * BLOCK_SIZE : end - base * BLOCK_SIZE] = data
        return out

    async def _allocate(self, nblocks: int, hint: int | None) -> list[tuple[int, int]]:
        try:
            return self.allocator.allocate(nblocks, hint=hint)
        except NoSpaceError:
            # A fenced node has lost its groups (or is about to): that is why there is no space
            # here, so say so (EIO, the data stays buffered), not ENOSPC.
            self.device.fence.check(nblocks * BLOCK_SIZE)
            await self.wait_for_frees(nblocks)
            try:
                return self.allocator.allocate(nblocks, hint=hint)
            except NoSpaceError:
                raise FsError(errno.ENOSPC) from None

    def _write_pieces(self, pieces: list[Piece]) -> list[bytes]:
        """Checksum every piece and write it; pieces that follow each other on the device go out
        in one write of up to a pool buffer. Runs in a worker thread for big flushes."""
        out = []
        buf = self.pool.acquire()
        try:
            view = memoryview(buf)
            group_dev, used = -1, 0
            for _, dev, n, data in pieces:
                length = n * BLOCK_SIZE
                if used and (group_dev + used // BLOCK_SIZE != dev or used + length > len(buf)):
                    self.device.write_from(view[:used], group_dev * BLOCK_SIZE)
                    used = 0
                if not used:
                    group_dev = dev
                target = view[used : used + length]
                target[:] = data
                out.append(block_checksums(target))
                used += length
            if used:
                self.device.write_from(view[:used], group_dev * BLOCK_SIZE)
        finally:
            self.pool.release(buf)
        return out

    def _hint(self, ino: int, first_block: int) -> int | None:
        """Where the previous block of the file lives: allocating right after keeps files contiguous."""
        if first_block == 0:
            return None
        ext = self.meta.extent_at(ino, first_block - 1)
        return None if ext is None else ext.dev_block + (first_block - ext.file_block)

    # -- truncate -------------------------------------------------------------------------------
    async def truncate(self, ino: int, size: int, setattr: c.SetAttr) -> Inode:
        """Apply a SetAttr that changes the size, after settling buffered data of the file.

        Flush, tail rewrite and commit under one hold of the file's lock: a compaction or a
        background flush that read the file before the truncate cannot commit after it."""
        async with self._locked(ino) as st:
            await self._flush_held(st)
            inode = self.meta.require_inode(ino)
            tail_ext = None
            extents: list[tuple[int, int]] = []
            if size < inode.size and size % BLOCK_SIZE:
                block = size // BLOCK_SIZE
                mapped = self.meta.extents(ino, block, block + 1)
                if mapped:
                    old = bytearray(await self.read_block(ino, block))
                    old[size % BLOCK_SIZE :] = bytes(BLOCK_SIZE - size % BLOCK_SIZE)
                    extents = self.allocator.allocate(1, hint=mapped[0].dev_block + 1)
                    (dev, _), = extents
                    try:
                        checksums = self._write_pieces([(block, dev, 1, memoryview(old))])
                    except WriteFencedError as exc:
                        self.allocator.release(extents)
                        raise FsError(errno.EIO, exc.strerror or "", cause="fence") from exc
                    self.written_since_sync = True
                    tail_ext = Extent(block, dev, 1, checksums[0])
            # now_ns starts the grace period of the extents it cuts off: the commit's time, not the request's
            cmd = dataclasses.replace(setattr, size=size, tail=tail_ext, now_ns=self.clock_ns())
            try:
                result: Inode = await self.meta.propose(cmd)
            except BaseException:
                self.allocator.release(extents)
                raise
        return result

    # -- background flushing --------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush files whose buffers are full or older than the flush interval; serve small device
        reads with AIO meanwhile (they are inline while this is not running)."""
        limiter = trio.CapacityLimiter(FLUSH_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.device.serve_async_reads)
            task_status.started()
            nursery.start_soon(self._timer, nursery, limiter)
            nursery.start_soon(self._compactor)
            async for ino in self._flush_recv:
                nursery.start_soon(self._flush_quietly, ino, limiter)

    async def _timer(self, nursery: trio.Nursery, limiter: trio.CapacityLimiter) -> None:
        while True:
            await trio.sleep(FLUSHER_TICK_S)
            if not self.device.fence.is_open():
                continue  # flushes would only fail; the data stays buffered until the lease is renewed
            now = time.monotonic()
            for ino, st in list(self.files.items()):
                if st.dirty and now - st.dirty_since >= self.flush_interval_s:
                    nursery.start_soon(self._flush_quietly, ino, limiter)

    async def _compactor(self) -> None:
        async for ino in self._compact_recv:
            try:
                await self.compact(ino)
            except FsError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE):
                    log.debug("inode %d was deleted before its compaction", ino)
                else:
                    log.warning("compaction of inode %d failed: %s", ino, exc)
            except WriteFencedError as exc:  # fenced: the committed fragments stay as they are
                log.warning("compaction of inode %d failed: %s", ino, exc)

    async def _flush_quietly(self, ino: int, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            try:
                await self.flush(ino)
            except FsError as exc:
                if isinstance(exc.__cause__, WriteFencedError):
                    # the data is still buffered and the next flush retries it: no deferred error
                    log.debug("background flush of inode %d deferred: %s", ino, exc)
                    return
                st = self.files.get(ino)
                if st is not None:
                    st.error = exc.errno  # reported to the application by its next fsync/close
                log.warning("background flush of inode %d failed: %s", ino, exc)


def _run_start(run: tuple[int, bytearray]) -> int:
    return run[0]


def _flush_batches(runs: list[tuple[int, bytearray]]) -> list[list[tuple[int, bytearray]]]:
    """Runs grouped for one WriteData each: bounded in bytes and in extents per command."""
    batches: list[list[tuple[int, bytearray]]] = []
    size = 0
    for run in runs:
        if not batches or size + len(run[1]) > FLUSH_BATCH_BYTES or len(batches[-1]) >= FLUSH_BATCH_RUNS:
            batches.append([])
            size = 0
        batches[-1].append(run)
        size += len(run[1])
    return batches


def _lay_out(block_runs: list[tuple[int, bytearray]], extents: list[tuple[int, int]]) -> list[Piece]:
    """Place whole-block runs, in order, into the allocated device extents: pieces of at most one
    file-map record, each within one run and one extent."""
    pieces: list[Piece] = []
    free = iter(extents)
    dev, left = 0, 0
    for first, data in block_runs:
        view = memoryview(data)
        total, pos = len(data) // BLOCK_SIZE, 0
        while pos < total:
            if not left:
                dev, left = next(free)
            n = min(total - pos, left, MAX_EXTENT_BLOCKS)
            pieces.append((first + pos, dev, n, view[pos * BLOCK_SIZE : (pos + n) * BLOCK_SIZE]))
            pos, dev, left = pos + n, dev + n, left - n
    assert next(free, None) is None and not left, "allocation and runs differ in size"
    return pieces


def _fragmented_runs(extents: list[Extent]) -> list[list[Extent]]:
    """Maximal runs of file-contiguous extents that hold at least COMPACT_MIN_EXTENTS pieces and
    are not already device-contiguous (those are as good as one extent)."""
    runs: list[list[Extent]] = []
    current: list[Extent] = []
    for ext in extents:
        if current and current[-1].end_block == ext.file_block:
            current.append(ext)
        else:
            current = [ext]
            runs.append(current)
    return [r for r in runs if len(r) >= COMPACT_MIN_EXTENTS
            and any(a.dev_block + a.count != b.dev_block for a, b in itertools.pairwise(r))]


def is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)
