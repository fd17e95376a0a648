"""Punching holes, reserving blocks and cloning block ranges: metadata commands, settled with the
buffered data.

Like a truncate (truncate.py), each runs under the file's lock after flushing what is buffered:
a buffered write older than the command must reach the block map before it, or its later flush
would put the old bytes back over the hole or the clone; a flush or compaction that read the
map before the command cannot commit after it. The commit's own time starts the grace period of
the blocks it unmaps.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from awsomefsd.fs.buffer import WriteBuffer
from awsomefsd.fs.flusher import Flusher
from awsomefsd.fs.space import SpaceGuard
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, Extent, Inode

MAX_RESERVE_BLOCKS = 1 << 16
"""Blocks one Preallocate reserves (256 MiB in at most 256 records): a large fallocate is a few
bounded commands, not one unbounded one."""


class RangeEditor:
    def __init__(self, meta: MetaClient, buffer: WriteBuffer, flusher: Flusher, space: SpaceGuard, *,
                 clock_ns: Callable[[], int]) -> None:
        self.meta = meta
        self.buffer = buffer
        self.flusher = flusher
        self.space = space
        self.clock_ns = clock_ns

    async def preallocate(self, ino: int, first_block: int, end_block: int, *, reserve: bool = True) -> int:
        """fallocate's space for file blocks [first_block, end_block): its holes (blocks that
        hold no data and are reserved for none) must fit the device and the volume's quota, or
        ENOSPC/EDQUOT before anything is reserved. With `reserve`, they are then mapped as
        unwritten extents (Preallocate), which later writes fill in place: the space stays
        theirs whatever else fills the device. Returns the blocks the holes held.

        Under the file's lock, after a flush: the holes are those of the whole file, buffered
        writes included, and no flush that read the map before can commit over a reservation."""
        async with self.buffer.locked(ino) as st:
            await self.flusher.flush_held(st)
            holes = _holes(self.meta.extents(ino, first_block, end_block), first_block, end_block)
            need = sum(end - first for first, end in holes)
            if not need:
                return 0
            inode = self.meta.require_inode(ino)
            if inode.volume:
                self.space.check_quota(inode, need)
            if need > self.meta.free_blocks() + self.meta.pending_free_blocks() - self.buffer.dirty_blocks():
                raise FsError(errno.ENOSPC)
            if not (self.space.fits(need) or await self.space.claim(need)):
                await self.space.wait_for_frees(need)
                if not (self.space.fits(need) or await self.space.claim(need)):
                    raise FsError(errno.ENOSPC)
            if reserve:
                for chunk in _chunks(holes, MAX_RESERVE_BLOCKS):
                    await self._reserve(ino, chunk)
        return need

    async def _reserve(self, ino: int, holes: list[tuple[int, int]]) -> None:
        extents = await self.space.allocate(sum(end - first for first, end in holes), None)
        try:
            records = _unwritten(holes, extents)
            await self.meta.propose(c.Preallocate(ino, records, self.clock_ns()))
        except BaseException as exc:
            self.space.release_after_failure(extents, exc)
            raise

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


def _holes(extents: list[Extent], first: int, end: int) -> list[tuple[int, int]]:
    """File blocks [first, end) that none of `extents` (in file order) maps, as [start, end) ranges."""
    holes: list[tuple[int, int]] = []
    at = first
    for ext in extents:
        if ext.file_block > at:
            holes.append((at, min(ext.file_block, end)))
        at = max(at, ext.end_block)
    if at < end:
        holes.append((at, end))
    return holes


def _chunks(ranges: list[tuple[int, int]], limit: int) -> list[list[tuple[int, int]]]:
    """[start, end) ranges cut into groups of at most `limit` blocks each."""
    chunks: list[list[tuple[int, int]]] = [[]]
    room = limit
    for first, end in ranges:
        while first < end:
            if not room:
                chunks.append([])
                room = limit
            take = min(end - first, room)
            chunks[-1].append((first, first + take))
            first, room = first + take, room - take
    return chunks


def _unwritten(holes: list[tuple[int, int]], extents: list[tuple[int, int]]) -> tuple[Extent, ...]:
    """The holes laid, in order, onto the allocated device extents: unwritten records of at most
    MAX_EXTENT_BLOCKS each."""
    records: list[Extent] = []
    free = iter(extents)
    dev, left = 0, 0
    for first, end in holes:
        while first < end:
            if not left:
                dev, left = next(free)
            n = min(end - first, left, MAX_EXTENT_BLOCKS)
            records.append(Extent(first, dev, n, b""))
            first, dev, left = first + n, dev + n, left - n
    assert next(free, None) is None and not left, "allocation and holes differ in size"
    return tuple(records)
