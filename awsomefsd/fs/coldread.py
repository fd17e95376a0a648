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

**One buffer per reader thread.** The fast path (one written extent covering the read) reads into
the thread's own aligned buffer and hands back a view of it, which the worker loop writes to the
kernel as it is: no pool, no lock, no copy. The view is valid until that thread's next read.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from bisect import bisect_right
from pathlib import Path

from awsomefsd.fs.hotmap import HotView
from awsomefsd.io.checksum import verify_blocks
from awsomefsd.io.device import BlockDevice, aligned_buffer
from awsomefsd.io.extent_io import ExtentIO
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.client import CommittedReader
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, TIER_BASE_BLOCK, Extent

log = logging.getLogger(__name__)

MAX_READ_BYTES = 128 << 10
"""The largest READ a worker serves (fuse/kernel/workers.py, WORKER_READ_MAX, says why larger
ones are forwarded)."""
RUN_BYTES = MAX_READ_BYTES + BLOCK_SIZE
"""A reader thread's buffer: the blocks of the largest READ at an unaligned offset."""
CACHED_EXTENTS = 16384
"""The map cache's bound, over all inodes (emptied when reached): 16 GiB of files in 1 MiB
extents, at most ~18 MiB of records (a 1 MiB extent carries 1 KiB of checksums)."""


class _Map:
    """What the cache holds of one inode: its size and the extents looked up so far, sorted by
    file block (`runs`: their first blocks, and them), all read under the slot generations
    `seen`. `runs` is replaced whole, never changed in place: a reader thread looking while
    another adds sees the lists before or after, never half of each."""

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
    """A worker's map cache (the module's docstring), shared by its reader threads. Lookups take
    no lock (an entry's `runs` is replaced whole); `remember`, after a lookup in LMDB, takes one."""

    def __init__(self) -> None:
        self.maps: dict[int, _Map] = {}
        self.extents = 0
        self._lock = threading.Lock()

    def get(self, ino: int) -> _Map | None:
        return self.maps.get(ino)

    def remember(self, ino: int, seen: tuple[int, int], size: int, extents: list[Extent]) -> None:
        """Add what a lookup found to the inode's entry (a new entry if the generations moved).
        Made before the second look: `read` then forwards the request, and the entry, made under
        generations the slot no longer shows, is never used."""
        with self._lock:
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


class ColdReader:
    """Reads of cold files for one reader thread of a worker (`sibling` makes the others').
    `grace_s`: how long superseded blocks stay unused."""

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
        self._own_buffer()

    def _own_buffer(self) -> None:
        self._buffer = aligned_buffer(RUN_BYTES)
        self._view = memoryview(self._buffer)

    def sibling(self) -> ColdReader:
        """A reader for another thread of the worker: the same metadata environment (LMDB wants one
        per process), device, map cache (`MapCache` says how threads share it) and extent pool;
        a buffer and counters of its own."""
        twin = copy.copy(self)
        twin.served = twin.forwarded = 0
        twin._own_buffer()
        return twin

    def read(self, ino: int, offset: int, size: int) -> bytes | bytearray | memoryview | None:
        """Up to `size` bytes of `ino` at `offset`, or None: forward the request. A memoryview is
        of this reader's buffer: valid until its next read."""
        seen = self.hot.look(ino)
        if seen is None:
            self.forwarded += 1
            return None
        started = time.monotonic()
        try:
            out = self._read(ino, offset, size, seen)
        except Exception as exc:  # a checksum mismatch, a device or LMDB error: the proposer's to handle
            log.debug("read worker: forwarding a read of inode %d: %s", ino, exc)
            out = None
        if out is None or time.monotonic() - started > self.deadline_s or not self.hot.still(ino, seen):
            self.forwarded += 1
            return None
        self.served += 1
        return out

    def _read(self, ino: int, offset: int, size: int, seen: tuple[int, int]) -> bytes | bytearray | memoryview | None:
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
                return self._read_run(ext, first, end, offset, size)
        return self._look_up_and_read(ino, offset, size, seen)

    def _look_up_and_read(self, ino: int, offset: int, size: int,
                          seen: tuple[int, int]) -> bytes | bytearray | memoryview | None:
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
            return self._read_run(extents[0], first, end, offset, size)
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

    def _read_run(self, ext: Extent, first: int, end: int, offset: int, size: int) -> memoryview:
        """Bytes [offset, offset + size) of the file from blocks [first, end) of written extent
        `ext`, read into this reader's buffer and verified (ChecksumMismatch)."""
        skip = first - ext.file_block
        length = (end - first) * BLOCK_SIZE
        run = self._view[:length]
        if os.preadv(self.fd, [run], (ext.dev_block + skip) * BLOCK_SIZE) != length:
            raise OSError("short read from the device")
        verify_blocks(run, ext.checksums[4 * skip : 4 * (end - ext.file_block)], first_device_block=ext.dev_block + skip)
        start = offset - first * BLOCK_SIZE
        return run[start : start + size]

    def close(self) -> None:
        self._view.release()
        self.meta.close()
        self.device.close()
