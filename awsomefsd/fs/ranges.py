"""Punching holes and cloning block ranges: metadata commands, settled with the buffered data.

Like a truncate (truncate.py), each runs under the file's lock after flushing what is buffered:
a buffered write older than the command must reach the block map before it, or its later flush
would put the old bytes back over the hole or the clone; a flush or compaction that read the
map before the command cannot commit after it. The commit's own time starts the grace period of
the blocks it unmaps.
"""

from __future__ import annotations

from collections.abc import Callable

from awsomefsd.fs.buffer import WriteBuffer
from awsomefsd.fs.flusher import Flusher
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.records import Inode


class RangeEditor:
    def __init__(self, meta: MetaClient, buffer: WriteBuffer, flusher: Flusher, *,
                 clock_ns: Callable[[], int]) -> None:
        self.meta = meta
        self.buffer = buffer
        self.flusher = flusher
        self.clock_ns = clock_ns

    async def punch_hole(self, ino: int, first_block: int, end_block: int) -> Inode:
        """Unmap file blocks [first_block, end_block) of `ino`; the inode it left."""
        async with self.buffer.locked(ino) as st:
            await self.flusher.flush_held(st)
            result: Inode = await self.meta.propose(c.PunchHole(ino, first_block, end_block, self.clock_ns()))
        return result

    async def clone(self, src: int, src_block: int, dst: int, dst_block: int, count: int, size: int) -> Inode:
        """Make `count` blocks of `dst` from `dst_block` share those of `src` from `src_block`,
        growing `dst` to `size` at least; the destination inode it left.

        The source is flushed first, so the clone holds every write to it that returned before
        (its buffered bytes are not in its block map yet); then the destination, under its lock."""
        if src != dst:
            await self.flusher.flush(src)
        async with self.buffer.locked(dst) as st:
            await self.flusher.flush_held(st)
            result: Inode = await self.meta.propose(
                c.CloneRange(src, src_block, dst, dst_block, count, size, self.clock_ns()))
        return result
