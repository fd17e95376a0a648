"""Room for writes: this node's allocation groups, a volume's quota, and space on its way back.

A write is refused up front when it cannot fit (an error at write() is one the application sees;
one at a later flush may go unnoticed). What fits is counted against the node's allocator minus
what the write buffer will need. When the node's groups run short, a cluster member claims more
(`claim_space`, given at construction); space superseded or deleted a moment ago comes back
after its grace period, and a write that needs it waits for it (bounded by that period) rather
than failing with ENOSPC; in a cluster, groups other nodes own and can spare are given on demand
(cluster/duties.py, GroupKeeper), so ENOSPC means the file system is full. A node whose write
fence is closed has lost its groups (or is about to): its allocation failure is EIO, not ENOSPC,
and its data stays buffered.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import trio

from awsomefsd.fs.allocator import NodeAllocator, NoSpaceError
from awsomefsd.fs.buffer import WriteBuffer
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Inode

ClaimSpace = Callable[[int], Awaitable[bool]]
"""`await claim(blocks)`: get more allocation groups for this node; True if it got any."""


class SpaceGuard:
    def __init__(self, meta: MetaClient, allocator: NodeAllocator, buffer: WriteBuffer, device: BlockDevice, *,
                 clock_ns: Callable[[], int], claim_space: ClaimSpace | None = None,
                 reads_drained: Callable[[], Awaitable[None]] | None = None) -> None:
        self.meta = meta
        self.allocator = allocator
        self.buffer = buffer
        self.device = device
        self.clock_ns = clock_ns
        self.claim_space = claim_space
        self.reads_drained = reads_drained
        """A single node's: every reader of a block map is in this process (no other node caches
        one), so a write short of space need not sit out the grace period (`wait_for_frees`)."""

    def fits(self, need_blocks: int) -> bool:
        """This node's free blocks, less what the buffer will need, hold `need_blocks` more."""
        return self.room_blocks() >= need_blocks

    def room_blocks(self) -> int:
        """The blocks a write may still be promised: this node's free blocks, less what the
        buffer will need (blocks in the grace period after a delete not counted)."""
        return self.allocator.free_blocks - self.buffer.dirty_blocks()

    async def claim(self, need_blocks: int) -> bool:
        """Ask for more allocation groups (a cluster member); True when `need_blocks` fit now."""
        return (self.claim_space is not None and await self.claim_space(need_blocks + self.buffer.dirty_blocks())
                and self.fits(need_blocks))

    def buffered_fit(self, volume: int) -> bool:
        """Would every buffered byte fit if flushed now: the node's free blocks, and the quota of
        `volume` (0: none) with its buffered bytes counted as blocks? A write into a hole passes
        `check_quota` (it grows nothing) and meets the quota only at its flush: a close may be
        answered before its flush (fs/batch.py) only where no such failure can wait."""
        if not self.fits(0):
            return False
        record = self.meta.volume(volume) if volume else None
        if record is None or not record.capacity_bytes:
            return True
        return record.used_blocks * BLOCK_SIZE + self.buffer.dirty_bytes_of(volume) <= record.capacity_bytes

    def check_quota(self, inode: Inode, grow_blocks: int) -> None:
        """EDQUOT when growing the file by `grow_blocks` would take its volume past its quota
        (buffered bytes of the volume count); EROFS inside a snapshot."""
        volume = self.meta.volume(inode.volume)
        if volume is None:
            return
        if volume.kind == "snapshot":
            raise FsError(errno.EROFS)
        if not volume.capacity_bytes:
            return
        pending = self.buffer.dirty_bytes_of(inode.volume)
        if (volume.used_blocks + grow_blocks) * BLOCK_SIZE + pending > volume.capacity_bytes:
            raise FsError(errno.EDQUOT)

    async def wait_for_frees(self, need_blocks: int) -> None:
        """Space superseded or deleted a moment ago comes back after its grace period: wait for it
        (bounded by that period) rather than fail a write that would fit a few seconds later.

        The grace period keeps a block out of reuse while a read may still go to it from a block
        map looked up before it was freed. On a single node such reads are this process's reads
        in flight: once those running now have ended (`reads_drained`), the frees are returned
        at once, the grace period cut short. (`rm` of a large file then a large write on a full
        device: the write waited up to 5 s, at 215 MiB/s in bench/fsbench.py's sequential write.)"""
        due = [(free.not_before_ns, free.blocks) for free in self.meta.deferred_frees()]
        if not due:
            return
        got = 0
        deadline_ns = due[0][0]
        for not_before, count in due:
            got += count
            deadline_ns = not_before
            if self.allocator.free_blocks + got - self.buffer.dirty_blocks() >= need_blocks:
                break
        if self.reads_drained is not None:
            await self.reads_drained()
            await self.meta.propose(c.ReclaimFrees(now_ns=max(deadline_ns, self.clock_ns())))
            return
        await trio.sleep(max(0.0, (deadline_ns - self.clock_ns()) / 1e9) + 0.001)
        await self.meta.propose(c.ReclaimFrees(now_ns=self.clock_ns()))

    async def allocate(self, nblocks: int, hint: int | None) -> list[tuple[int, int]]:
        """Reserve `nblocks` device blocks (near `hint`): waits for delayed frees once, then
        ENOSPC; EIO while the write fence is closed."""
        try:
            return self.allocator.allocate(nblocks, hint=hint)
        except NoSpaceError:
            # A fenced node has lost its groups (or is about to): that is why there is no space
            # here, so say so (EIO, the data stays buffered), not ENOSPC.
            self.device.fence.check(nblocks * BLOCK_SIZE)
            if self.claim_space is None or not await self.claim_space(nblocks):
                await self.wait_for_frees(nblocks)
            try:
                return self.allocator.allocate(nblocks, hint=hint)
            except NoSpaceError:
                raise FsError(errno.ENOSPC) from None

    def release(self, extents: list[tuple[int, int]]) -> None:
        """Give back reserved extents that were not committed."""
        self.allocator.release(extents)

    def release_after_failure(self, extents: list[tuple[int, int]], failure: BaseException) -> None:
        """Give back extents reserved for a change whose proposal failed, unless it may still
        commit (`NodeAllocator.release_after_failure`)."""
        self.allocator.release_after_failure(extents, failure)
