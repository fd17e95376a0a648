"""Truncate: a SetAttr that changes a file's size, after settling its buffered data.

Flush, tail rewrite and commit happen under one hold of the file's lock: a compaction or a
background flush that read the file before the truncate cannot commit after it (the truncated
bytes would come back). Shrinking to the middle of a block rewrites that block copy-on-write
with its tail zeroed (`SetAttr.tail`), so a later extension reads zeros there, never old bytes.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable

from awsomefsd.fs.allocator import NodeAllocator
from awsomefsd.fs.buffer import WriteBuffer
from awsomefsd.fs.flusher import Flusher
from awsomefsd.fs.reader import Reader
from awsomefsd.io.extent_io import ExtentIO
from awsomefsd.io.fence import WriteFencedError
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Extent, Inode


class Truncator:
    def __init__(self, meta: MetaClient, buffer: WriteBuffer, flusher: Flusher, reader: Reader,
                 allocator: NodeAllocator, io: ExtentIO, *, clock_ns: Callable[[], int]) -> None:
        self.meta = meta
        self.buffer = buffer
        self.flusher = flusher
        self.reader = reader
        self.allocator = allocator
        self.io = io
        self.clock_ns = clock_ns

    async def truncate(self, ino: int, size: int, setattr: c.SetAttr) -> Inode:
        """Apply `setattr` with the new `size` (and the tail block it needs); the inode it left."""
        async with self.buffer.locked(ino) as st:
            await self.flusher.flush_held(st)
            inode = self.meta.require_inode(ino)
            tail_ext = None
            extents: list[tuple[int, int]] = []
            if size < inode.size and size % BLOCK_SIZE:
                block = size // BLOCK_SIZE
                mapped = self.meta.extents(ino, block, block + 1)
                if mapped and not mapped[0].unwritten:  # reserved: zeros past the new end already
                    old = bytearray(await self.reader.read_block(ino, block))
                    old[size % BLOCK_SIZE :] = bytes(BLOCK_SIZE - size % BLOCK_SIZE)
                    extents = self.allocator.allocate(1, hint=mapped[0].dev_block + 1)
                    (dev, _), = extents
                    try:
                        checksums = self.io.write([(dev, memoryview(old))])
                    except WriteFencedError as exc:
                        self.allocator.release(extents)
                        raise FsError(errno.EIO, exc.strerror or "", cause="fence") from exc
                    tail_ext = Extent(block, dev, 1, checksums[0])
            # now_ns starts the grace period of the extents it cuts off: the commit's time, not the request's
            cmd = dataclasses.replace(setattr, size=size, tail=tail_ext, now_ns=self.clock_ns())
            try:
                result: Inode = await self.meta.propose(cmd)
            except BaseException as exc:
                self.allocator.release_after_failure(extents, exc)
                raise
        return result
