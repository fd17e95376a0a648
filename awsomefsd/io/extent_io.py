"""File data on the device: runs of whole blocks read with their checksums verified, and written
with their checksums computed, through a pool of aligned buffers.

How a request travels (measured in docs/design-notes.md, "Limits of the pyfuse3 binding" and
note 37): a read of any size goes through the device's native AIO (`BlockDevice.read_into_async`:
other tasks run while the device works); only without AIO does a read of more than
`INLINE_IO_MAX_BYTES` go to a worker thread. A write up to `INLINE_IO_MAX_BYTES` is made inline on
the trio thread, because a thread hop per 4 KiB costs more than the I/O; larger writes go to at
most `IO_THREADS` worker threads. Everything here is in device blocks; what the blocks mean
(files, extents) is the filesystem layer's business (awsomefsd/fs/).
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import trio

from awsomefsd.io.checksum import block_checksums, first_bad_block
from awsomefsd.io.device import BlockDevice, BufferPool
from awsomefsd.io.errors import DeviceError
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.io.write_behind import WriteBehind, overlay

INLINE_IO_MAX_BYTES = 64 * 1024  # larger writes (and reads without AIO) go to a worker thread
IO_THREADS = 8
POOL_BUFFERS = 32

BlockRun = tuple[int, memoryview]
"""(first device block, the bytes of whole blocks to write there)."""


class ChecksumMismatch(DeviceError):
    """A block read back does not match its checksum: the device returned other bytes than were
    written (bit rot, a torn or misdirected write). Never returned as data."""

    def __init__(self, dev_block: int) -> None:
        super().__init__(f"checksum mismatch at device block {dev_block}")
        self.dev_block = dev_block


class ExtentIO:
    """Block runs of at most `max_run_bytes` (one pool buffer) to and from one device."""

    def __init__(self, device: BlockDevice, *, max_run_bytes: int) -> None:
        assert max_run_bytes > 0 and max_run_bytes % BLOCK_SIZE == 0
        self.device = device
        self.pool = BufferPool(max_run_bytes, POOL_BUFFERS)
        self.limiter = trio.CapacityLimiter(IO_THREADS)
        self.behind = WriteBehind()
        """Runs whose write waits for the proposal that maps them (io/write_behind.py)."""
        self._settling = trio.Lock()

    async def read(self, dev_block: int, checksums: bytes, start: int, end: int) -> bytes:
        """Bytes [start, end) of the run of blocks at `dev_block` that `checksums` (one CRC32C per
        block) cover, every block verified; ChecksumMismatch names the first bad one.

        `read` and `read_into` spell the same steps out rather than await a shared helper: one
        coroutine more per read cost random 4 KiB reads 10 % (docs/design-notes.md, note 37)."""
        held = self.behind.runs.copy() if self.behind else None  # before the read: see io/write_behind.py
        buf = self.pool.acquire()
        try:
            view = self._run_view(buf, checksums, start, end)
            if len(view) > INLINE_IO_MAX_BYTES and not self.device.reads_asynchronously:
                await trio.to_thread.run_sync(self.device.read_into, view, dev_block * BLOCK_SIZE, limiter=self.limiter)
            else:
                await self.device.read_into_async(view, dev_block * BLOCK_SIZE)
            if held:
                overlay(held, view, dev_block)
            _verify(view, dev_block, checksums)
            return bytes(view[start:end])
        finally:
            self.pool.release(buf)

    async def read_into(self, dev_block: int, checksums: bytes, start: int, end: int, dest: memoryview) -> None:
        """`read`, into `dest` (end - start bytes) rather than a bytes of its own."""
        held = self.behind.runs.copy() if self.behind else None
        buf = self.pool.acquire()
        try:
            view = self._run_view(buf, checksums, start, end)
            if len(view) > INLINE_IO_MAX_BYTES and not self.device.reads_asynchronously:
                await trio.to_thread.run_sync(self.device.read_into, view, dev_block * BLOCK_SIZE, limiter=self.limiter)
            else:
                await self.device.read_into_async(view, dev_block * BLOCK_SIZE)
            if held:
                overlay(held, view, dev_block)
            _verify(view, dev_block, checksums)
            dest[:] = view[start:end]
        finally:
            self.pool.release(buf)

    def read_blocking(self, dev_block: int, checksums: bytes, start: int, end: int) -> bytes:
        """`read` for a process without an event loop (a read worker): the calling thread waits."""
        held = self.behind.runs.copy() if self.behind else None
        buf = self.pool.acquire()
        try:
            view = self._run_view(buf, checksums, start, end)
            self.device.read_into(view, dev_block * BLOCK_SIZE)
            if held:
                overlay(held, view, dev_block)
            _verify(view, dev_block, checksums)
            return bytes(view[start:end])
        finally:
            self.pool.release(buf)

    def read_runs(self, runs: Sequence[tuple[int, bytes]]) -> list[bytes]:
        """The whole blocks of each run (first device block, one checksum per block), every block
        verified (ChecksumMismatch names the first bad one); runs that follow each other on the
        device come in one read of up to a pool buffer, as `write` sends them. Blocking: the
        caller picks the thread (the shipper's small files, fs/reader.py `read_files`)."""
        out: list[bytes] = [b""] * len(runs)
        held = self.behind.runs.copy() if self.behind else None  # atomic under the GIL
        buf = self.pool.acquire()
        try:
            view = memoryview(buf)
            group: list[int] = []  # indexes of the runs in the read being gathered
            used = 0

            def read_group() -> None:
                first_dev = runs[group[0]][0]
                self.device.read_into(view[:used], first_dev * BLOCK_SIZE)
                if held:
                    overlay(held, view[:used], first_dev)
                for i in group:
                    dev, checksums = runs[i]
                    at = (dev - first_dev) * BLOCK_SIZE
                    run = view[at : at + len(checksums) // 4 * BLOCK_SIZE]
                    _verify(run, dev, checksums)
                    out[i] = bytes(run)

            for i in sorted(range(len(runs)), key=lambda i: runs[i][0]):
                dev, checksums = runs[i]
                length = len(checksums) // 4 * BLOCK_SIZE
                assert 0 < length <= len(buf), length
                if group and (runs[group[0]][0] + used // BLOCK_SIZE != dev or used + length > len(buf)):
                    read_group()
                    group, used = [], 0
                group.append(i)
                used += length
            if group:
                read_group()
        finally:
            self.pool.release(buf)
        return out

    def _run_view(self, buf: mmap.mmap, checksums: bytes, start: int, end: int) -> memoryview:
        """The part of pool buffer `buf` the run that `checksums` cover fills."""
        n = len(checksums) // 4 * BLOCK_SIZE
        assert 0 <= start < end <= n <= len(buf), (start, end, n, len(buf))
        return memoryview(buf)[:n]

    def write(self, runs: Sequence[BlockRun]) -> list[bytes]:
        """Write each run and return its checksums; runs that follow each other on the device go
        out in one write of up to a pool buffer. Blocking: `write_async` picks the thread."""
        out = []
        buf = self.pool.acquire()
        try:
            view = memoryview(buf)
            group_dev, used = -1, 0
            for dev, data in runs:
                length = len(data)
                assert length and length % BLOCK_SIZE == 0 and length <= len(buf), length
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

    async def write_async(self, runs: Sequence[BlockRun]) -> list[bytes]:
        """`write`, in a worker thread when the runs are large."""
        if sum(len(data) for _, data in runs) > INLINE_IO_MAX_BYTES:
            return await trio.to_thread.run_sync(self.write, runs, limiter=self.limiter)
        return self.write(runs)

    def write_behind(self, runs: Sequence[BlockRun], epoch: int) -> list[bytes] | None:
        """The checksums `write` would return, with the runs held to be written by the next
        `settle` (io/write_behind.py); None, with nothing held, when they would pass BEHIND_MAX_BYTES
        (the caller then writes them). Each run must be of blocks freshly allocated under `epoch`."""
        if not self.behind.fits(sum(len(data) for _, data in runs)):
            return None
        out = []
        for dev, data in runs:
            copy = bytes(data)
            out.append(block_checksums(copy))
            self.behind.add(dev, copy, epoch)
        return out

    async def settle(self, epoch: int | None) -> None:
        """Write every run held under `epoch` (the lease's now) and drop the others unwritten
        (their mappings are refused: io/write_behind.py); a failed write leaves its runs held and
        raises (OSError, WriteFencedError). Called before each proposal that may map them."""
        if not self.behind:
            return  # nothing held, and no settle under way (its runs stay held until written)
        async with self._settling:
            runs = self.behind.take_all()
            if not runs:
                return
            self.behind.drop(run for run in runs if run[2] != epoch)
            current = [(dev, memoryview(data)) for dev, data, keep in runs if keep == epoch]
            if current:
                await self.write_async(current)
            self.behind.written(runs)  # (the stale ones are gone already)

    def drop_behind(self) -> None:
        """Drop every held run unwritten: the lease they were allocated under ended."""
        self.behind.drop(self.behind.runs.values())

    def discard_behind(self, extents: Sequence[tuple[int, int]]) -> None:
        """Extents given back unmapped: their held runs are not written (io/write_behind.py)."""
        if self.behind:
            self.behind.discard(extents)


def _verify(run: memoryview, dev_block: int, checksums: bytes) -> None:
    bad = first_bad_block(run, checksums)
    if bad >= 0:
        raise ChecksumMismatch(dev_block + bad)
