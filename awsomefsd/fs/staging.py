"""Another site's file bytes, written to fresh extents of this device before the command that maps
them (cross-site replication, design note 48): the copy-on-write rule of local writes, for data
that arrives over the link instead of through write(2).

All-zero blocks are not written: they stay holes, as they were (or read as) on the other site.
"""

from __future__ import annotations

from collections.abc import Sequence

from awsomefsd.fs.space import SpaceGuard
from awsomefsd.io.extent_io import ExtentIO
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, Extent

_ZERO_BLOCK = bytes(BLOCK_SIZE)


class BlockStager:
    def __init__(self, space: SpaceGuard, io: ExtentIO) -> None:
        self.space = space
        self.io = io

    async def stage(self, first_block: int, data: bytes | memoryview) -> list[Extent]:
        """Write `data` (file bytes from block `first_block` on; the last block is padded with
        zeros) to fresh space; returns the extents a command maps, with their checksums. The
        caller gives them back with `release` if that command fails."""
        return (await self.stage_many([(first_block, data)]))[0]

    async def stage_many(self, items: Sequence[tuple[int, bytes | memoryview]]) -> list[list[Extent]]:
        """`stage` of several files' bytes at once, in one device write where their space is
        contiguous (and in a worker thread when it is large): a push of many small files wrote
        each with a synchronous write of its own on the event loop. Either all are staged, or
        none (what was reserved goes back)."""
        pieces: list[tuple[int, int, int, int, memoryview]] = []  # (item, file block, device block, blocks, bytes)
        reserved: list[tuple[int, int]] = []
        try:
            for item, (first_block, data) in enumerate(items):
                for file_block, run in _nonzero_runs(first_block, data):
                    got = await self.space.allocate(len(run) // BLOCK_SIZE, None)
                    reserved += got
                    at = 0
                    for dev, n in got:
                        pieces.append((item, file_block + at, dev, n, run[at * BLOCK_SIZE:(at + n) * BLOCK_SIZE]))
                        at += n
            checksums = await self.io.write_async([(dev, piece) for _, _, dev, _, piece in pieces]) if pieces else []
        except BaseException:
            self.space.release(reserved)
            raise
        out: list[list[Extent]] = [[] for _ in items]
        for (item, file_block, dev, n, _), checksum in zip(pieces, checksums):
            out[item].append(Extent(file_block, dev, n, checksum))
        return out

    def release(self, extents: list[Extent], failure: BaseException | None) -> None:
        """Give back staged extents no command mapped (`failure`: the proposal that may still have)."""
        ranges = [(e.dev_block, e.count) for e in extents]
        if failure is None:
            self.space.release(ranges)
        else:
            self.space.release_after_failure(ranges, failure)


def _nonzero_runs(first_block: int, data: bytes | memoryview) -> list[tuple[int, memoryview]]:
    """`data`'s blocks (the last padded with zeros) as (file block, bytes) runs of at most
    MAX_EXTENT_BLOCKS, all-zero blocks left out."""
    view = memoryview(bytes(data) + bytes(-len(data) % BLOCK_SIZE))
    runs: list[tuple[int, memoryview]] = []
    start = None
    blocks = len(view) // BLOCK_SIZE
    for i in range(blocks + 1):
        zero = i == blocks or view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] == _ZERO_BLOCK
        if start is not None and (zero or i - start == MAX_EXTENT_BLOCKS):
            runs.append((first_block + start, view[start * BLOCK_SIZE:i * BLOCK_SIZE]))
            start = None
        if not zero and start is None:
            start = i
    return runs
