"""Another site's file bytes, written to fresh extents of this device before the command that maps
them (cross-site replication, design note 48): the copy-on-write rule of local writes, for data
that arrives over the link instead of through write(2).

All-zero blocks are not written: they stay holes, as they were (or read as) on the other site.
"""

from __future__ import annotations

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
        view = memoryview(bytes(data) + bytes(-len(data) % BLOCK_SIZE))
        runs: list[tuple[int, memoryview]] = []  # (file block, whole blocks), holes left out
        start = None
        blocks = len(view) // BLOCK_SIZE
        for i in range(blocks + 1):
            zero = i == blocks or view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] == _ZERO_BLOCK
            if start is not None and (zero or i - start == MAX_EXTENT_BLOCKS):
                runs.append((first_block + start, view[start * BLOCK_SIZE:i * BLOCK_SIZE]))
                start = None
            if not zero and start is None:
                start = i
        out: list[Extent] = []
        for file_block, run in runs:
            count = len(run) // BLOCK_SIZE
            reserved = await self.space.allocate(count, None)
            try:
                at, pieces = 0, []
                for dev, n in reserved:
                    pieces.append((file_block + at, dev, n, run[at * BLOCK_SIZE:(at + n) * BLOCK_SIZE]))
                    at += n
                checksums = await self.io.write_async([(dev, piece) for _, dev, _, piece in pieces])
            except BaseException:
                self.space.release(reserved)
                self.release(out, None)
                raise
            out += [Extent(fb, dev, n, cs) for (fb, dev, n, _), cs in zip(pieces, checksums)]
        return out

    def release(self, extents: list[Extent], failure: BaseException | None) -> None:
        """Give back staged extents no command mapped (`failure`: the proposal that may still have)."""
        ranges = [(e.dev_block, e.count) for e in extents]
        if failure is None:
            self.space.release(ranges)
        else:
            self.space.release_after_failure(ranges, failure)
