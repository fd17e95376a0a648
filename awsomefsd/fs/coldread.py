"""A read worker's reads (docs/multicore.md, step 1): the bytes of a cold file from the metadata as
committed in LMDB and from the device, or None, which means "forward this request to the proposer".

The steps are R2's (fs/hotmap.py): the slot is looked at (hot: None), one read transaction takes
the inode and its block map, the device is read and every block's checksum verified, and the slot
is looked at again (hot meanwhile, or hot and cleared again: None). Everything unusual is the
proposer's, which has the code and the state to handle it: an inode the committed state does not
hold (created and not committed yet, or purged), anything but a regular file, blocks in the object
store (the recall policy counts those reads), a checksum mismatch (repair and the EIO report), a
device error, and a read that took more than half the grace period before superseded blocks are
reused (R4: the blocks its map pointed to may have been given to another file since).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from awsomefsd.fs.hotmap import HotView
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.extent_io import ExtentIO
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.client import CommittedReader
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, TIER_BASE_BLOCK

log = logging.getLogger(__name__)


class ColdReader:
    """Reads of cold files for one worker. `grace_s`: how long superseded blocks stay unused."""

    def __init__(self, meta_path: Path, device_path: str, *, direct: bool, grace_s: float, hot: HotView) -> None:
        self.meta = CommittedReader(meta_path)
        self.device = BlockDevice.open(device_path, direct=direct, readonly=True)
        self.io = ExtentIO(self.device, max_run_bytes=MAX_EXTENT_BLOCKS * BLOCK_SIZE)
        self.deadline_s = grace_s / 2
        self.hot = hot
        self.served = 0
        self.forwarded = 0

    def sibling(self) -> ColdReader:
        """A reader for another thread of the worker: the same metadata environment (LMDB wants one
        per process), device and buffer pool (both thread-safe), counters of its own."""
        twin = copy.copy(self)
        twin.served = twin.forwarded = 0
        return twin

    def read(self, ino: int, offset: int, size: int) -> bytes | bytearray | None:
        """Up to `size` bytes of `ino` at `offset`, or None: forward the request."""
        seen = self.hot.look(ino)
        if seen is None:
            self.forwarded += 1
            return None
        started = time.monotonic()
        try:
            out = self._read(ino, offset, size)
        except Exception as exc:  # a checksum mismatch, a device or LMDB error: the proposer's to handle
            log.debug("read worker: forwarding a read of inode %d: %s", ino, exc)
            out = None
        if out is None or time.monotonic() - started > self.deadline_s or not self.hot.still(ino, seen):
            self.forwarded += 1
            return None
        self.served += 1
        return out

    def _read(self, ino: int, offset: int, size: int) -> bytes | bytearray | None:
        if size <= 0 or offset < 0:
            return None
        first = offset // BLOCK_SIZE
        end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
        inode, extents = self.meta.file_map(ino, first, end)
        if inode is None or not inode.is_reg:
            return None
        if offset >= inode.size:
            return b""
        size = min(size, inode.size - offset)
        end = (offset + size + BLOCK_SIZE - 1) // BLOCK_SIZE
        if any(e.dev_block >= TIER_BASE_BLOCK for e in extents):
            return None
        if len(extents) == 1 and not extents[0].unwritten and extents[0].file_block <= first \
                and extents[0].end_block >= end:
            piece, base = extents[0].slice(first, end), first * BLOCK_SIZE
            return self.io.read_blocking(piece.dev_block, piece.checksums, offset - base, offset + size - base)
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

    def close(self) -> None:
        self.meta.close()
        self.device.close()
