"""File contents on this node: what the POSIX operations (fs/operations.py), a cluster's
coherence and the volume service call for data, built from one part per job:

    buffer.py     the write buffer: per-file state, dirty runs, limits, pinning and the file lock
    reader.py     reads: block map and buffered bytes in one step, device blocks verified
    space.py      room for a write: the node's groups, quotas, claims, waiting for delayed frees
    writer.py     copy-on-write of byte runs: allocate, write with checksums, one WriteData
    flusher.py    flushing buffered runs, in the foreground and in the background
    batch.py      closed small files written together, before the log commits
    compactor.py  rewriting files fragmented by small writes
    truncate.py   size changes, settled with the buffered data under the file's lock
    ranges.py     punched holes, reserved blocks and cloned ranges, settled the same way
    losses.py     buffered writes a fenced node dropped, reported once per descriptor

The write path itself lives here, because it ties the parts together: check the room, buffer,
and push back on a writer whose buffer is full. docs/design-notes.md ("Concurrency") states the
protocol the parts share.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import trio

from awsomefsd.fs.allocator import NodeAllocator
from awsomefsd.fs.batch import ClosedBatch
from awsomefsd.fs.buffer import FileState, WriteBuffer
from awsomefsd.fs.clock import file_time_ns
from awsomefsd.fs.compactor import Compactor
from awsomefsd.fs.dirty import MAX_RUNS
from awsomefsd.fs.flusher import FLUSH_BATCH_RUNS, Flusher
from awsomefsd.fs.losses import LossLedger
from awsomefsd.fs.ranges import RangeEditor
from awsomefsd.fs.reader import Reader
from awsomefsd.fs.recall import RecallPolicy
from awsomefsd.fs.space import ClaimSpace, SpaceGuard
from awsomefsd.fs.staging import BlockStager
from awsomefsd.fs.tiered import TieredBlocks
from awsomefsd.fs.truncate import Truncator
from awsomefsd.fs.writer import RunWriter
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.extent_io import ExtentIO
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, MAX_FILE_SIZE_BYTES, Inode


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
        clock_ns: Callable[[], int] = file_time_ns,
        on_checksum_error: Callable[[int], None] | None = None,
        claim_space: ClaimSpace | None = None,
        single_node: bool = False,
        tiered: TieredBlocks | None = None,
        recall_reads: int = 0,
    ) -> None:
        """`single_node`: no other node reads this device, so a write short of space may take back
        space freed a moment ago as soon as this node's reads from before have ended
        (SpaceGuard.wait_for_frees). `tiered`: the object store's blocks, when [tier] is configured
        (fs/tiered.py); a file whose tiered data is read in `recall_reads` different minutes then
        comes back to the device (fs/recall.py)."""
        self.device = device
        self.meta = meta
        io = ExtentIO(device, max_run_bytes=MAX_EXTENT_BLOCKS * BLOCK_SIZE)
        self.buffer = WriteBuffer(file_buffer_bytes=file_buffer_bytes, write_buffer_bytes=write_buffer_bytes,
                                  clock_ns=clock_ns)
        self.tiered = tiered
        self.recall_policy = RecallPolicy(self._recall, recall_reads=recall_reads)
        self.reader = Reader(meta, self.buffer, io, on_checksum_error=on_checksum_error, tier=tiered,
                             on_tiered_read=None if tiered is None else self.recall_policy.noted)
        self.space = SpaceGuard(meta, allocator, self.buffer, device, clock_ns=clock_ns, claim_space=claim_space,
                                reads_drained=self.reader.drained if single_node else None)
        self.writer = writer = RunWriter(meta, self.reader, self.space, io, clock_ns=clock_ns)
        self.compactor = Compactor(meta, self.buffer, self.reader, writer)
        self.lost_writes = LossLedger(self.buffer)
        self.flusher = Flusher(self.buffer, writer, self.compactor, device, self.lost_writes,
                               flush_interval_ms=flush_interval_ms)
        self.batch = ClosedBatch(self.buffer, writer, self.flusher, self.compactor, self.lost_writes,
                                 self.space.buffered_fit, self._lease_left)
        self.truncator = Truncator(meta, self.buffer, self.flusher, self.reader, allocator, io, clock_ns=clock_ns)
        self.ranges = RangeEditor(meta, self.buffer, self.flusher, self.space, clock_ns=clock_ns)
        self.stager = BlockStager(self.space, io)
        self.kernel_writeback: Callable[[], Awaitable[None]] | None = None
        """Under the writeback cache: make the kernel send the written pages it keeps (set once
        the mount serves)."""

    def _lease_left(self) -> float:
        """Seconds until the device's write fence closes (the fence may be replaced: read it now)."""
        fence = self.device.fence
        return fence.remaining_s() - fence.margin_s

    def _recall(self, ino: int) -> None:
        """A file the recall policy found hot comes back, unless the device is past the tiering
        watermark (the engine would only tier it again)."""
        if self.tiered is not None and self.tiered.may_recall():
            self.compactor.request_recall(ino)

    # -- the write buffer, as callers and tests see it --------------------------------------------
    @property
    def files(self) -> dict[int, FileState]:
        return self.buffer.files

    @property
    def total_dirty_bytes(self) -> int:
        return self.buffer.total_dirty_bytes

    @property
    def write_buffer_bytes(self) -> int:
        return self.buffer.write_buffer_bytes

    @write_buffer_bytes.setter
    def write_buffer_bytes(self, value: int) -> None:
        self.buffer.write_buffer_bytes = value

    def effective_size(self, ino: int, size: int) -> int:
        return self.buffer.effective_size(ino, size)

    def with_buffered(self, inode: Inode) -> Inode:
        """`inode` (as committed: not one this returned, whose blocks would count twice) as this
        node's applications see it: buffered writes count in its size, times and blocks
        (`delayed_blocks`)."""
        st = self.buffer.files.get(inode.ino)
        if st is None:
            return inode
        inode = self.buffer.with_buffered(inode)
        if inode.is_reg:
            inode.blocks += self._delayed(st, inode)
        return inode

    def delayed_blocks(self, volume: int | None = None) -> int:
        """Blocks this node's buffered writes (into files of `volume`; None: all) will take from free
        space when committed: as ext4 counts delayed allocation, `df` and `du` see a file's data
        once written, not once a flush or the batch of closed files (fs/batch.py) put it on the
        device; and a write that is lost gives them back, since they are counted from the buffer."""
        total = 0
        for st in list(self.buffer.files.values()):
            if volume is not None and st.volume != volume:
                continue
            inode = self.meta.inode(st.ino)
            if inode is not None and inode.is_reg:
                total += self._delayed(st, inode)
        return total

    def _delayed(self, st: FileState, inode: Inode) -> int:
        """Blocks under the file's buffered runs (in flight or dirty) that its map does not hold
        yet (`inode` as committed): a run over mapped blocks replaces them (copy-on-write: the
        old ones are freed), one over a hole or past the end adds its blocks."""
        spans: list[list[int]] = []
        for start, end in sorted(st.buffered_ranges()):
            first, last = start // BLOCK_SIZE, -(-end // BLOCK_SIZE)
            if spans and first <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], last)
            elif first < last:
                spans.append([first, last])
        total = sum(last - first for first, last in spans)
        if inode.blocks and total:  # a file with nothing mapped has nothing to look up
            for first, last in spans:
                for ext in self.meta.extents(inode.ino, first, last):
                    total -= max(0, min(last, ext.end_block) - max(first, ext.file_block))
        return total

    def dirty_blocks(self) -> int:
        return self.buffer.dirty_blocks()

    def forget(self, ino: int) -> None:
        """Drop buffers of an inode that no longer exists (purged): nothing will read them."""
        self.compactor.forget(ino)
        self.buffer.forget(ino)

    def forget_volume(self, volume: int) -> None:
        """Drop the buffers of every file of a deleted volume: they would only fail to flush."""
        for ino in [ino for ino, st in self.buffer.files.items() if st.volume == volume]:
            self.forget(ino)

    # -- reads and writes -------------------------------------------------------------------------
    async def read(self, inode: Inode, offset: int, size: int) -> bytes | bytearray:
        return await self.reader.read(inode, offset, size)

    def data_ranges(self, inode: Inode, offset: int) -> list[tuple[int, int]]:
        return self.reader.data_ranges(inode, offset)

    async def write(self, inode: Inode, offset: int, data: bytes | memoryview, *, stamp: bool = True) -> int:
        """Buffer a write; `stamp`: its time becomes the file's mtime when committed."""
        if offset + len(data) > MAX_FILE_SIZE_BYTES:
            raise FsError(errno.EFBIG)
        buffer = self.buffer
        if buffer.total_dirty_bytes + len(data) > buffer.write_buffer_bytes and not self.device.fence.is_open():
            # the buffers cannot drain while fenced: keep memory bounded
            raise FsError(errno.EIO, "device writes fenced (node lease lapsed) and the write buffer is full",
                          cause="fence")
        st = buffer.state(inode.ino, inode.volume)
        st.users += 1  # pinned, as WriteBuffer.pinned does (inline: this is the hottest path)
        try:
            end = offset + len(data)
            grow_blocks = max(0, -(-end // BLOCK_SIZE) - -(-max(inode.size, st.end_offset()) // BLOCK_SIZE))
            await self._check_room(inode, offset, end, grow_blocks)
            if buffer.files.get(inode.ino) is not st:
                raise FsError(errno.ESTALE, "the file was deleted during the write")
            buffer.put(st, offset, data, stamp=stamp)
            if buffer.must_flush(st):
                await self.flusher.flush_pinned(st)  # the background flusher is behind: push back on the writer
            elif buffer.should_flush(st) and not self.flusher.request(inode.ino):
                await self.flusher.flush_pinned(st)
        finally:
            st.users -= 1
            buffer.drop_if_idle(st)
        return len(data)

    def buffers_at_once(self, ino: int, size: int) -> bool:
        """Would `write` of `size` bytes to the file return without awaiting anything: the file's
        buffer and the whole buffer stay below what asks for a flush, the file is not in so many
        pieces that its writer must flush it, and the device has room without waiting for frees.
        Errors (quota, size limit) are raised without awaiting either."""
        buffer = self.buffer
        st = buffer.files.get(ino)
        if st is not None and (st.dirty.dirty_bytes + size >= buffer.file_buffer_bytes
                               or st.dirty.run_count >= MAX_RUNS // 2):
            return False
        return (buffer.total_dirty_bytes + size < buffer.write_buffer_bytes
                and self.space.fits(size // BLOCK_SIZE + 2))

    async def _check_room(self, inode: Inode, start: int, end: int, grow_blocks: int) -> None:
        """Refuse a write of bytes [start, end) up front when the device or the volume's quota
        cannot take it: an error at write() is one the application sees, one at a later flush may
        go unnoticed. A write onto blocks fallocate reserved for it always fits."""
        need_blocks = (end - start) // BLOCK_SIZE + 2
        if inode.volume and grow_blocks:
            try:
                self.space.check_quota(inode, grow_blocks)
            except FsError:
                if not self.writer.on_reserved(inode.ino, start, end):
                    raise
        if (self.space.fits(need_blocks) or self.writer.on_reserved(inode.ino, start, end)
                or await self.space.claim(need_blocks)):
            return
        await self.flusher.flush_all()
        await self.space.wait_for_frees(need_blocks)
        # What came back may be free space in groups another node owns: claim again (in a cluster
        # its owner gives spare groups), so that ENOSPC means the file system is full.
        if not (self.space.fits(need_blocks) or await self.space.claim(need_blocks)):
            raise FsError(errno.ENOSPC)

    def check_quota(self, inode: Inode, grow_blocks: int) -> None:
        """EDQUOT/EROFS as a write growing the file by `grow_blocks` would get."""
        self.space.check_quota(inode, grow_blocks)

    # -- flushing, truncating, compacting ---------------------------------------------------------
    def has_buffered(self, ino: int) -> bool:
        """Does this node hold any state for the file's data (dirty, in flight, a deferred error)?"""
        return ino in self.buffer.files

    def buffer_busy(self, ino: int) -> bool:
        """Is the file's buffer locked now (a flush, truncate or compaction of it is running)?"""
        st = self.buffer.files.get(ino)
        return st is not None and st.lock.locked()

    def stamp_buffered(self, ino: int, mtime_ns: int) -> bool:
        """Let the file's buffered writes commit `mtime_ns` as their mtime (a time set for them: the
        kernel's, under writeback caching); False when nothing is buffered to carry it."""
        st = self.buffer.files.get(ino)
        if st is None or not st.dirty:
            return False
        st.written_ns = mtime_ns
        return True

    def times_committed(self, ino: int) -> None:
        """The file's times were just committed over its buffered writes (a futimens): their flush
        keeps them, and names the time of the writes only as that of the content change."""
        st = self.buffer.files.get(ino)
        if st is not None:
            st.written_ns = 0

    async def flush(self, ino: int) -> None:
        """Write the file's dirty bytes and commit their mapping; raise a deferred write error."""
        await self.flusher.flush(ino)

    def flushes_at_once(self, ino: int) -> bool:
        """Would `flush(ino)` await nothing: on a cluster member, a small fresh file's whose blocks
        are held for the pipeline (io/write_behind.py) and whose mapping runs ahead at once
        (`RunWriter.writes_behind_at_once`), no flush or error of the file in the way. A
        transport may then serve the close or futimens that flushes it without a task."""
        st = self.buffer.files.get(ino)
        return (st is not None and not st.lock.locked() and st.error is None and not st.inflight
                and st.dirty.run_count <= FLUSH_BATCH_RUNS
                and self.writer.writes_behind_at_once(ino, st.dirty.dirty_bytes))

    async def commit_before_peer(self, st: FileState) -> None:
        """Commit the file's buffered writes (a file still open, a close left to the batch), its
        state locked by the caller, before another site's version of its content is applied here:
        flushed after it, they would land on top of it as a change that saw it, and the other
        site's write would be neither shown nor kept as a conflict. An error is kept for the file's
        next fsync or close, as the background flusher keeps it: no application waits for this."""
        if st.dirty:
            await self.flusher.flush_held_keeping_error(st)

    async def flush_all(self) -> None:
        await self.batch.write_pending()
        await self.flusher.flush_all()

    def defer_close(self, ino: int) -> bool:
        """A close of the file: True when its data is left for the next batch of closed files
        (fs/batch.py), nothing awaited; False: flush it now."""
        return self.batch.defer(ino)

    def close_is_deferred(self, ino: int) -> bool:
        """Would `defer_close` take the file (without taking it)?"""
        return self.batch.may_defer(ino)

    async def flush_volume(self, volume: int) -> None:
        """Push this node's buffered writes into `volume` into the metadata, so a snapshot or clone
        taken now contains every write that returned before it (as `sync` would).

        A write error found on the way is handed back to the file (the application's next close
        or fsync still reports it) and raised: a snapshot would silently miss data."""
        if self.kernel_writeback is not None:
            await self.kernel_writeback()
        for ino, st in list(self.buffer.files.items()):
            if st.volume != volume or not (st.dirty or st.inflight):
                continue
            try:
                await self.flusher.flush(ino)
            except FsError as exc:
                again = self.buffer.files.get(ino)
                if again is not None and again.error is None:
                    again.error = exc
                raise FsError(exc.errno, f"flushing inode {ino} of volume {volume} failed") from exc

    async def truncate(self, ino: int, size: int, setattr: c.SetAttr) -> Inode:
        return await self.truncator.truncate(ino, size, setattr)

    async def punch_hole(self, ino: int, first_block: int, end_block: int) -> Inode:
        return await self.ranges.punch_hole(ino, first_block, end_block)

    async def preallocate(self, ino: int, first_block: int, end_block: int, *, reserve: bool = True) -> int:
        return await self.ranges.preallocate(ino, first_block, end_block, reserve=reserve)

    async def clone(self, src: int, src_block: int, dst: int, dst_block: int, count: int, size: int) -> Inode:
        return await self.ranges.clone(src, src_block, dst, dst_block, count, size)

    async def recall(self, ino: int) -> int:
        """Bring the file's tiered data back to the device now; returns the blocks moved."""
        return await self.compactor.recall(ino)

    async def compact(self, ino: int) -> int:
        return await self.compactor.compact(ino)

    def closed(self, ino: int) -> None:
        """The last handle open for writing was released: a file left fragmented by its last
        writes is checked now."""
        self.compactor.closed(ino)

    # -- lost writes ------------------------------------------------------------------------------
    def lose_buffers(self, reason: str) -> int:
        """The node's lease expired: drop every buffered write, and every block held for the
        pipeline (io/write_behind.py): their mappings carry the lost epoch and will be refused,
        and their blocks may belong to another node by now."""
        self.writer.io.drop_behind()
        return self.lost_writes.lose_buffers(reason)

    def lose_file(self, ino: int, reason: str) -> None:
        self.lost_writes.lose_file(ino, reason)

    def unreported_loss(self, ino: int, seen: int) -> bool:
        return self.lost_writes.unreported_loss(ino, seen)

    def loss_errno(self, ino: int) -> int:
        return self.lost_writes.loss_errno(ino)

    @property
    def losses(self) -> int:
        """Buffered writes dropped so far: a descriptor remembers it to know what it was told."""
        return self.lost_writes.losses

    # -- background -------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush files whose buffers are full or older than the flush interval, compact fragmented
        files; serve small device reads with AIO meanwhile (they are inline while this is not
        running)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.device.serve_async_reads)
            await nursery.start(self.flusher.run)
            task_status.started()
            nursery.start_soon(self.compactor.run)
            nursery.start_soon(self.batch.run)
