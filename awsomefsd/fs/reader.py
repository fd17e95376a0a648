"""Reads of file contents: the committed blocks from the device, verified, with the buffered
bytes laid over them.

The rule that makes a read safe against a flush committing meanwhile (docs/design-notes.md,
"Concurrency"): the block map and the copies of the buffered (in-flight, then dirty) bytes of
the range are taken in one step, with no await between, so the buffered bytes it overlays are
exactly those the map it read does not hold yet. Then the device is read (awaits) and the copies
laid over. Superseded extents are freed only after a grace period, so the blocks an old map
points to are intact for that long.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

from awsomefsd.fs.buffer import WriteBuffer
from awsomefsd.fs.tiered import TieredBlocks
from awsomefsd.io.checksum import first_bad_block
from awsomefsd.io.extent_io import ChecksumMismatch, ExtentIO
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.io.write_behind import overlaps
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import TIER_BASE_BLOCK, Extent, Inode, is_tiered

log = logging.getLogger(__name__)


class Reader:
    def __init__(self, meta: MetaClient, buffer: WriteBuffer, io: ExtentIO, *,
                 on_checksum_error: Callable[[int], None] | None = None, tier: TieredBlocks | None = None,
                 on_tiered_read: Callable[[int], None] | None = None) -> None:
        """`tier` reads blocks in objects of the object store (None: no [tier] configured, such a
        read is EIO); `on_tiered_read(ino)` is told of every read that reached tiered data (the
        recall policy)."""
        self.meta = meta
        self.buffer = buffer
        self.io = io
        self.on_checksum_error = on_checksum_error
        self._running: set[int] = set()
        """Reads in flight, from their look at the block map to the end of their device reads."""
        self._tokens = itertools.count()
        self._read_ended: trio.Event | None = None  # set at the end of a read while `drained` waits
        self.tier = tier
        self.on_tiered_read = on_tiered_read

    @contextmanager
    def holding_map(self) -> Iterator[None]:
        """Around a look at a file's block map and the device reads it leads to (`drained` waits
        for it). Must not wrap a wait for free space: that waits for `drained`."""
        token = self._begin()
        try:
            yield
        finally:
            self._end(token)

    def _begin(self) -> int:
        token = next(self._tokens)
        self._running.add(token)
        return token

    def _end(self, token: int) -> None:
        self._running.discard(token)
        if self._read_ended is not None:
            self._read_ended.set()

    async def drained(self) -> None:
        """Return once every read running now has ended. Reads that start later look up the
        block map as it is then: after this, blocks the map no longer holds are read by no one
        in this process (reads that start meanwhile are not waited for)."""
        waiting = set(self._running)
        while waiting:
            if self._read_ended is None or self._read_ended.is_set():
                self._read_ended = trio.Event()
            await self._read_ended.wait()
            waiting &= self._running

    async def read(self, inode: Inode, offset: int, size: int) -> bytes | bytearray:
        """Up to `size` bytes of the file at `offset` (fewer at its end), in a buffer of their own:
        each byte is copied once from the device's run (the reply goes out from it as it is).
        `holding_map` spelt out: its generator cost every read 2.5-5 us more here (load ~12)."""
        token = self._begin()
        try:
            return await self._read(inode, offset, size)
        finally:
            self._end(token)

    async def _read(self, inode: Inode, offset: int, size: int) -> bytes | bytearray:
        st = self.buffer.files.get(inode.ino)
        file_size = inode.size if st is None else max(inode.size, st.end_offset())
        if offset >= file_size or size <= 0:
            return b""
        size = min(size, file_size - offset)
        if st is not None and not st.inflight and st.dirty.covers(offset, size):
            out = bytearray(size)
            st.dirty.overlay(offset, out)
            return out
        first = offset // BLOCK_SIZE
        end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
        # One step, no await: the map and the buffered bytes are taken at the same instant.
        extents = self.meta.extents(inode.ino, first, end)
        buffered = [] if st is None else st.buffered_copies(offset, size)
        if not buffered and len(extents) == 1 and extents[0].file_block <= first and extents[0].end_block >= end:
            # the common case, with the fewest objects made per read (their count drives the
            # garbage collector, which cost random 4 KiB reads 10-12 % when this path made more)
            if extents[0].dev_block >= TIER_BASE_BLOCK and self.on_tiered_read is not None:
                self.on_tiered_read(inode.ino)
            return await self.read_extent(extents[0], first, end, offset, offset + size)
        out = bytearray(size)
        view = memoryview(out)
        for ext in extents:
            if ext.unwritten:
                continue  # reads as zeros, as `out` starts
            lo, hi = max(ext.file_block, first), min(ext.end_block, end)
            a, b = max(lo * BLOCK_SIZE, offset), min(hi * BLOCK_SIZE, offset + size)
            piece = ext.slice(lo, hi)
            base = lo * BLOCK_SIZE
            if is_tiered(piece.dev_block):
                if self.on_tiered_read is not None:
                    self.on_tiered_read(inode.ino)
                view[a - offset : b - offset] = await self._tiered(piece, a - base, b - base)
                continue
            try:
                await self.io.read_into(piece.dev_block, piece.checksums, a - base, b - base,
                                        view[a - offset : b - offset])
            except ChecksumMismatch as exc:
                raise self._checksum_error(exc) from None
        for start, data in buffered:
            out[start - offset : start - offset + len(data)] = data
        return out

    async def read_files(self, files: list[tuple[Inode, int]]) -> list[bytes | bytearray]:
        """The first `size` bytes of each file (fewer at its end): the shipper's small contents,
        a push's worth at once. The files `start_read` would serve (nothing buffered, one written
        extent on the device holding the bytes) have their maps taken in one step and are read
        together in one worker thread, those that lie together on the device in one read
        (`ExtentIO.read_runs`): one by one on the event loop, each small file's synchronous read
        held up every request (~6 % of a linked untar's time on the sending site). Any other
        file is read as `read` reads it."""
        token = self._begin()
        try:
            out: list[bytes | bytearray | None] = [None] * len(files)
            runs: list[tuple[int, bytes]] = []
            together: list[tuple[int, int]] = []  # (index in files, its size)
            for i, (inode, size) in enumerate(files):
                if inode.ino in self.buffer.files:
                    continue  # its buffered bytes too: read below, as `read` reads it
                size = min(size, inode.size)
                if size <= 0:
                    out[i] = b""
                    continue
                end = -(-size // BLOCK_SIZE)
                run = self.meta.written_run(inode.ino, 0, end)
                if run is not None:
                    runs.append(run)
                    together.append((i, size))
            if len(runs) > 1:
                try:
                    read = await trio.to_thread.run_sync(self.io.read_runs, runs, limiter=self.io.limiter)
                except ChecksumMismatch as exc:
                    raise self._checksum_error(exc) from None
                for (i, size), blocks in zip(together, read, strict=True):
                    out[i] = blocks[:size]
            for i, (inode, size) in enumerate(files):
                if out[i] is None:
                    out[i] = await self._read(inode, 0, size)
            return [b"" if data is None else data for data in out]
        finally:
            self._end(token)

    def start_read(self, inode: Inode, offset: int, size: int, send: Callable[[memoryview], None],
                   fail: Callable[[], None]) -> bool:
        """The common read, served without a task (the session's reader calls it; design note in
        docs/multicore.md, "The daemon's own reads"): a file with nothing buffered, bytes inside
        its size, one written extent on the device holding them. The device read is submitted
        (AIO) and this returns True; on its completion `send(the bytes)` is called, or `fail()`
        when the read failed or a checksum did not match (the caller then serves the request the
        usual way, which reads again and reports). False, with nothing started, for every other
        read. The rules of `read` hold: the map is taken with no await between it and the look
        at the buffer, and the read counts as running (`drained`) until its completion."""
        if inode.ino in self.buffer.files or size <= 0 or offset >= inode.size:
            return False
        size = min(size, inode.size - offset)
        first = offset // BLOCK_SIZE
        end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
        found = self.meta.written_run(inode.ino, first, end)
        if found is None:
            return False
        dev_block, sums = found
        if self.io.behind and overlaps(self.io.behind.runs, dev_block, end - first):
            return False  # blocks not written yet (io/write_behind.py): `read` sees them
        pool = self.io.pool
        buf = pool.acquire()
        run = memoryview(buf)[: (end - first) * BLOCK_SIZE]
        start = offset - first * BLOCK_SIZE
        token = self._begin()

        def done(result: int) -> None:
            good = False
            try:
                good = result == len(run) and first_bad_block(run, sums) < 0
                if good:
                    send(run[start : start + size])
            finally:
                self._end(token)
                pool.release(buf)
                if not good:  # exactly one of send and fail, whatever happened
                    fail()

        if self.io.device.submit_read(run, dev_block * BLOCK_SIZE, done):
            return True
        self._end(token)
        pool.release(buf)
        return False

    def data_ranges(self, inode: Inode, offset: int) -> list[tuple[int, int]]:
        """The file's data from `offset` on, as merged (start, end) byte ranges in whole blocks
        (a block with any byte written is data; a block with none is a hole, reserved or not, as
        on ext4): its committed extents and its buffered writes, up to the size in `inode`
        (buffered writes included). What SEEK_DATA and SEEK_HOLE look for."""
        first = offset // BLOCK_SIZE
        end = -(-inode.size // BLOCK_SIZE)
        spans = [(max(e.file_block, first), min(e.end_block, end))
                 for e in self.meta.extents(inode.ino, first, end) if not e.unwritten]
        st = self.buffer.files.get(inode.ino)
        if st is not None:
            spans += [(lo // BLOCK_SIZE, -(-hi // BLOCK_SIZE)) for lo, hi in st.buffered_ranges() if hi > offset]
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(s for s in spans if s[0] < s[1]):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return [(lo * BLOCK_SIZE, min(hi * BLOCK_SIZE, inode.size)) for lo, hi in merged]

    async def read_extent(self, ext: Extent, lo: int, hi: int, a: int, b: int) -> bytes:
        """Bytes [a, b) of the file from blocks [lo, hi) of `ext`, checksums verified (EIO, cause
        "checksum", when one does not match: never garbage); zeros from an unwritten extent."""
        if ext.unwritten:
            return bytes(b - a)
        piece = ext.slice(lo, hi)
        base = lo * BLOCK_SIZE
        if piece.dev_block >= TIER_BASE_BLOCK:
            return await self._tiered(piece, a - base, b - base)
        try:
            return await self.io.read(piece.dev_block, piece.checksums, a - base, b - base)
        except ChecksumMismatch as exc:
            raise self._checksum_error(exc) from None

    async def _tiered(self, piece: Extent, start: int, end: int) -> bytes:
        """Bytes [start, end) of a run of tiered blocks: EIO on a node without the object store."""
        if self.tier is None:  # the EIO reporter logs it, once a while per file (fuse/eio.py)
            raise FsError(errno.EIO, "the file's data is in the object store, and this node has no [tier] "
                          "configured to read it", cause="store")
        return await self.tier.read(piece.dev_block, piece.checksums, start, end)

    def _checksum_error(self, exc: ChecksumMismatch) -> FsError:
        """A block that failed its checksum: logged, reported, and EIO (cause "checksum")."""
        log.error("checksum mismatch at device block %d (%s): returning EIO", exc.dev_block, self.io.device.path)
        if self.on_checksum_error is not None:
            self.on_checksum_error(exc.dev_block)
        return FsError(errno.EIO, f"checksum mismatch at device block {exc.dev_block}", cause="checksum")

    async def read_block(self, ino: int, file_block: int) -> bytes:
        """One whole committed block (zeros for a hole): the old data around a partial write."""
        with self.holding_map():
            ext = self.meta.extent_at(ino, file_block)
            if ext is None:
                return bytes(BLOCK_SIZE)
            start = file_block * BLOCK_SIZE
            return await self.read_extent(ext, file_block, file_block + 1, start, start + BLOCK_SIZE)
