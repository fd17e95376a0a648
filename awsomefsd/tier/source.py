"""Tiered blocks as the file system reads them: a block address in an object (meta/tiered.py)
turned into a checked byte range of that object, read through the caches (reader.py).

The reads of the file system (fs/reader.py) hand a run of tiered blocks here exactly as they hand
a run of device blocks to the device (io/extent_io.py): the first address, the blocks' CRC32C,
and the bytes wanted. Failures are EIO with a reason, never other bytes. `TierSource` is the port
the file system defines for tiered blocks (fs/tiered.py TieredBlocks), which is given it when built.
"""

from __future__ import annotations

import errno

from awsomefsd.io.checksum import CHECKSUM_BYTES
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError, StoreUnavailable
from awsomefsd.meta.records import object_of
from awsomefsd.tier.reader import TieredRange, TieredReader, TierReadError


def object_key(cluster_id: str, object_id: int) -> str:
    """The store key of an object (under the configured prefix, which the store adds): one
    directory per cluster, so two clusters may share a bucket and prefix."""
    return f"{cluster_id}/{object_id:016x}"


def device_fill(meta: MetaClient, total_blocks: int) -> float:
    """The fraction of the device's data blocks in use (delayed frees count as free): above the
    fill watermark the engine tiers sooner, and no file the recall policy finds hot comes back."""
    free = meta.free_blocks() + meta.pending_free_blocks()
    return 1.0 - free / total_blocks if total_blocks else 0.0


class TierSource:
    def __init__(self, meta: MetaClient, reader: TieredReader, *, cluster_id: str, total_blocks: int,
                 fill_watermark: float) -> None:
        self.meta = meta
        self.reader = reader
        self.cluster_id = cluster_id
        self.total_blocks = total_blocks
        self.fill_watermark = fill_watermark

    def key(self, object_id: int) -> str:
        return object_key(self.cluster_id, object_id)

    async def read(self, block: int, checksums: bytes, start: int, end: int) -> bytes:
        """Bytes [start, end) of the run of tiered blocks at `block` that `checksums` cover."""
        object_id, offset = object_of(block)
        obj = self.meta.tier_object(object_id)
        if obj is None or not obj.blocks:
            raise FsError(errno.EIO, f"tiered data refers to object {object_id}, which the metadata does not know")
        first, last = start // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        wanted = TieredRange(self.key(object_id), obj.bytes, (offset + first) * BLOCK_SIZE,
                             checksums[first * CHECKSUM_BYTES : last * CHECKSUM_BYTES])
        try:
            data = await self.reader.read(wanted)
        except TierReadError as exc:
            raise StoreUnavailable(exc.strerror or "cannot read tiered data") from None
        skip = start - first * BLOCK_SIZE
        return data[skip : skip + end - start]

    def may_recall(self) -> bool:
        """Not while the device is past the fill watermark: the engine would only tier it again."""
        return device_fill(self.meta, self.total_blocks) < self.fill_watermark
