"""A read worker's reads (docs/multicore.md, step 1): the bytes of a cold file from the metadata as
committed in LMDB and from the device, or None, which means "forward this request to the proposer".

The steps are R2's (fs/hotmap.py): the slot is looked at (hot: None), the inode's size and block
map are taken, the device is read and every block's checksum verified, and the slot is looked at
again (hot meanwhile, or hot and cleared again: None). Everything unusual is the proposer's, which
has the code and the state to handle it: an inode the committed state does not hold (created and
not committed yet, or purged), anything but a regular file, blocks in the object store (the
recall policy counts those reads), a checksum mismatch (repair and the EIO report), a device
error, and a read that took more than half the grace period before superseded blocks are reused
(R4: the blocks its map pointed to may have been given to another file since).

**The map cache.** A worker keeps, per inode, its size and the extents it has looked up, with the
slot generations (`HotView.look`) they were read under. An entry is used only while the slot shows
the same generations and a zero count: every change to a file's size or block map raises its
slot's count before the change is visible and bumps the generation on that rise (R2), so a change
committed after the entry was made has moved the generation, and a change in flight shows as a
count. An entry is made from a lookup under the generations the first look saw: if the slot
moved meanwhile, the entry carries generations it no longer shows and is never used (the read
itself then fails its second look and is forwarded). Measured: the lookup it saves (a read transaction, the
inode and extent records decoded into objects) was ~10 us of a worker's ~55 us of user CPU per
4 KiB read. No read transaction outlives its lookup, so no LMDB snapshot is pinned.

**Reads in two halves.** The fast path (one written extent covering the read) is `prepare`'s
`RunRead`: where on the device the bytes lie and their checksums. The worker loop reads it (AIO,
with the other requests' reads: io/aio_batch.py) into a buffer of its own and gives the buffer to
`finish`, which verifies it, looks at the slot again and hands back a view of it to write to the
kernel as it is: no copy. `read` does both halves with a blocking read, into the reader's own
buffer (valid until its next read).
"""

from __future__ import annotations

import logging
import os
import time
from bisect import bisect_right
from pathlib import Path
from typing import NamedTuple

from awsomefsd.fs.hotmap import HotView
from awsomefsd.io.aio_abi import AioUnavailableError
from awsomefsd.io.aio_batch import ReadBatch
from awsomefsd.io.checksum import verify_blocks
from awsomefsd.io.device import BlockDevice, aligned_buffer
from awsomefsd.io.extent_io import ExtentIO
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.client import CommittedReader
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, TIER_BASE_BLOCK, Extent

log = logging.getLogger(__name__)

MAX_READ_BYTES = 128 << 10
"""The largest READ a worker serves (fuse/kernel/workers.py, WORKER_READ_MAX, says why larger
ones are not handed to workers)."""
RUN_BYTES = MAX_READ_BYTES + BLOCK_SIZE
"""A read's buffer: the blocks of the largest READ at an unaligned offset."""
READS_IN_FLIGHT = 32
"""Device reads a worker has in flight at most (`ColdReader.batch`: each with a RUN_BYTES buffer)."""
CACHED_EXTENTS = 16384
"""The map cache's bound, over all inodes (emptied when reached): 16 GiB of files in 1 MiB
extents, at most ~18 MiB of records (a 1 MiB extent carries 1 KiB of checksums)."""


class _Map:
    """What the cache holds of one inode: its size and the extents looked up so far, sorted by
    file block (`runs`: their first blocks, and them), all read under the slot generations
    `seen`."""

    __slots__ = ("runs", "seen", "size")

    def __init__(self, seen: tuple[int, int], size: int) -> None:
        self.seen = seen
        self.size = size
        self.runs: tuple[list[int], list[Extent]] = ([], [])

    def covering(self, first: int, end: int) -> Extent | None:
        """The cached extent holding every block of [first, end), if one does."""
        starts, extents = self.runs
        i = bisect_right(starts, first) - 1
        if i < 0:
            return None
        ext = extents[i]
        return ext if ext.file_block <= first and ext.file_block + ext.count >= end else None

    def add(self, found: list[Extent]) -> int:
        """Remember the extents not known yet; how many that was."""
        starts, extents = list(self.runs[0]), list(self.runs[1])
        for ext in found:
            i = bisect_right(starts, ext.file_block)
            if i and starts[i - 1] == ext.file_block:
                continue
            starts.insert(i, ext.file_block)
            extents.insert(i, ext)
        added = len(extents) - len(self.runs[1])
        self.runs = (starts, extents)
        return added


class MapCache:
    """A worker's map cache (the module's docstring); the worker's one thread uses it."""

    def __init__(self) -> None:
        self.maps: dict[int, _Map] = {}
        self.extents = 0

    def get(self, ino: int) -> _Map | None:
        return self.maps.get(ino)

    def remember(self, ino: int, seen: tuple[int, int], size: int, extents: list[Extent]) -> None:
        """Add what a lookup found to the inode's entry (a new entry if the generations moved).
        Made before the second look: `read` then forwards the request, and the entry, made under
        generations the slot no longer shows, is never used."""
        if self.extents + len(extents) > CACHED_EXTENTS:
            self.maps.clear()
            self.extents = 0
        cached = self.maps.get(ino)
        if cached is None or cached.seen != seen:
            if cached is not None:
                self.extents -= len(cached.runs[1])
            cached = _Map(seen, size)
            self.extents += cached.add(extents)
            self.maps[ino] = cached
        else:
            self.extents += cached.add(extents)


class RunRead(NamedTuple):
    """`prepare`'s fast path: `length` bytes at byte `position` of the device, blocks whose
    checksums are `sums`, the first at device block `first_device_block`; the answer is `size`
    bytes from `start` of them. `ino`, `seen` and `started` are for `finish`'s checks."""

    ino: int
    seen: tuple[int, int]
    started: float
    position: int
    length: int
    sums: bytes
    first_device_block: int
    start: int
    size: int


Answer = bytes | bytearray | memoryview


class ColdReader:
    """Reads of cold files for a worker. `grace_s`: how long superseded blocks stay unused."""

    def __init__(self, meta_path: Path, device_path: str, *, direct: bool, grace_s: float, hot: HotView) -> None:
        self.meta = CommittedReader(meta_path)
        self.device = BlockDevice.open(device_path, direct=direct, readonly=True)
        self.io = ExtentIO(self.device, max_run_bytes=MAX_EXTENT_BLOCKS * BLOCK_SIZE)
        self.deadline_s = grace_s / 2
        self.hot = hot
        self.fd = self.device.fd
        self.maps = MapCache()
        self.served = 0
        self.forwarded = 0
        self._view = memoryview(aligned_buffer(RUN_BYTES))
        self.batch: ReadBatch | None = None
        """Where the caller starts `prepare`'s reads together (native AIO); None without it: `read`."""
        try:
            self.batch = ReadBatch(READS_IN_FLIGHT, RUN_BYTES)
        except AioUnavailableError as exc:
            log.warning("read worker: native AIO unavailable (%s): reads one at a time", exc.strerror)

    def read(self, ino: int, offset: int, size: int) -> Answer | None:
        """Up to `size` bytes of `ino` at `offset`, or None: forward the request. Both halves
        (`prepare`, `finish`) with a blocking read; a memoryview is of this reader's buffer, valid
        until its next read."""
        planned = self.prepare(ino, offset, size)
        if not isinstance(planned, RunRead):
            return planned
        try:
            got = os.preadv(self.fd, [self._view[: planned.length]], planned.position)
        except OSError:
            got = -1
        return self.finish(planned, self._view, got)

    def prepare(self, ino: int, offset: int, size: int) -> RunRead | Answer | None:
        """The first half of a read: R2's first look and the map. A `RunRead` when the bytes are
        one run of one written extent (the caller reads it, then calls `finish`); otherwise the
        answer, read here, or None: forward the request."""
        seen = self.hot.look(ino)
        if seen is None:
            self.forwarded += 1
            return None
        started = time.monotonic()
        try:
            out = self._read(ino, offset, size, seen, started)
        except Exception as exc:  # a checksum mismatch, a device or LMDB error: the proposer's to handle
            log.debug("read worker: forwarding a read of inode %d: %s", ino, exc)
            out = None
        if isinstance(out, RunRead):
            return out
        return self._checked(out, ino, seen, started)

    def finish(self, planned: RunRead, buffer: memoryview, got: int) -> Answer | None:
        """The second half: `got` (the device's byte count, or -errno) bytes of `planned` read into
        `buffer`; the answer (a view of `buffer`), or None: forward the request."""
        out = None
        if got == planned.length:
            run = buffer[: planned.length]
            try:
                verify_blocks(run, planned.sums, first_device_block=planned.first_device_block)
                out = run[planned.start : planned.start + planned.size]
            except Exception as exc:
                log.debug("read worker: forwarding a read of inode %d: %s", planned.ino, exc)
        return self._checked(out, planned.ino, planned.seen, planned.started)

    def _checked(self, out: Answer | None, ino: int, seen: tuple[int, int], started: float) -> Answer | None:
        """`out` if the read took less than half the grace period and the slot still shows `seen`."""
        if out is None or time.monotonic() - started > self.deadline_s or not self.hot.still(ino, seen):
            self.forwarded += 1
            return None
        self.served += 1
        return out

    def _read(self, ino: int, offset: int, size: int, seen: tuple[int, int], started: float) -> RunRead | Answer | None:
        if size <= 0 or offset < 0:
            return None
        first = offset // BLOCK_SIZE
        end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
        cached = self.maps.get(ino)
        if cached is not None and cached.seen == seen:
            if offset >= cached.size:
                return b""
            size = min(size, cached.size - offset)
            end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
            ext = cached.covering(first, end)
            if ext is not None and ext.checksums and ext.dev_block < TIER_BASE_BLOCK:
                return self._run(ext, first, end, offset, size, ino, seen, started)
        return self._look_up_and_read(ino, offset, size, seen, started)

    def _look_up_and_read(self, ino: int, offset: int, size: int, seen: tuple[int, int],
                          started: float) -> RunRead | Answer | None:
        """The map from LMDB (one read transaction), remembered if the read passes its second look."""
        first = offset // BLOCK_SIZE
        end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
        inode, extents = self.meta.file_map(ino, first, end)
        if inode is None or not inode.is_reg:
            return None
        self.maps.remember(ino, seen, inode.size, extents)
        if offset >= inode.size:
            return b""
        size = min(size, inode.size - offset)
        end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
        if any(e.dev_block >= TIER_BASE_BLOCK for e in extents):
            return None
        if len(extents) == 1 and not extents[0].unwritten and extents[0].file_block <= first \
                and extents[0].end_block >= end:
            return self._run(extents[0], first, end, offset, size, ino, seen, started)
        out = bytearray(size)  # holes and unwritten extents read as zeros
        for ext in extents:
            if ext.unwritten:
                continue
            lo, hi = max(ext.file_block, first), min(ext.end_block, end)
            if lo >= hi:
                continue
            a, b = max(lo * BLOCK_SIZE, offset), min(hi * BLOCK_SIZE, offset + size)
            piece, base = ext.slice(lo, hi), lo * BLOCK_SIZE
            out[a - offset : b - offset] = self.io.read_blocking(piece.dev_block, piece.checksums, a - base, b - base)
        return out

    @staticmethod
    def _run(ext: Extent, first: int, end: int, offset: int, size: int, ino: int, seen: tuple[int, int],
             started: float) -> RunRead:
        """Bytes [offset, offset + size) of the file, in blocks [first, end) of written extent `ext`."""
        skip = first - ext.file_block
        return RunRead(ino, seen, started, (ext.dev_block + skip) * BLOCK_SIZE, (end - first) * BLOCK_SIZE,
                       ext.checksums[4 * skip : 4 * (end - ext.file_block)], ext.dev_block + skip,
                       offset - first * BLOCK_SIZE, size)

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
        self._view.release()
        self.meta.close()
        self.device.close()
