"""The interfaces between the filesystem layer and the object-store tier (awsomefsd/tier/).

Blocks of a file may live in objects of an object store (meta/tiered.py gives them addresses past
TIER_BASE_BLOCK). The filesystem layer reads them, decides when a file read again comes back to
the device (fs/recall.py), and moves a file's data out when asked (`trusted.awsomefs.tier`), but it
never knows a store, a cache or the tiering engine: it is handed the port below and the evict
callable at construction by the composition root, which builds the tier's side first (the port
takes nothing from the file system). The tier imports this module and implements it; nothing here
imports the tier.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

EvictFile = Callable[[int], Awaitable[int]]
"""`await evict(ino)`: move the file's (flushed) data to the object store now; the bytes that moved."""


class TieredBlocks(Protocol):
    """What the file system needs of the tier to read tiered blocks (tier/source.py TierSource)."""

    async def read(self, block: int, checksums: bytes, start: int, end: int) -> bytes:
        """Bytes [start, end) of the run of tiered blocks at `block` whose CRC32C `checksums`
        holds, as a run of device blocks is read (io/extent_io.py); EIO with a reason on a failure,
        never other bytes."""
        ...

    def may_recall(self) -> bool:
        """May a file the recall policy found hot come back to the device now? Not while the device
        is past the tiering watermark: the engine would only move it out again."""
        ...
