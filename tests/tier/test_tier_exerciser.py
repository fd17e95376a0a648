"""A seeded random exerciser of tiering (fsx's shape, in-process): random writes, truncates, holes,
reservations and clones of a few files, explicit evictions, recalls, delayed frees and garbage
collection, while the engine runs pass after pass beside them (everything is cold; its reads, PUTs
and commits interleave with the writes), against the S3 test server. After every step every file
reads back as its model says; at the end every file is evicted and read back from the store, and
fsck's space check agrees with the objects table. A failure prints the seed and the step; the same
seed replays it.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from awsomefsd.fs.file_ops import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from tests.support import seeds
from tests.support.s3 import S3Server
from tests.support.tiering import Node, tier_settings, tiered_node
from tests.unit.test_fs_api import File

FILES = 4
MAX_BYTES = 96 * BLOCK_SIZE
STEPS = 200


async def step(node: Node, files: list[File], rng: random.Random) -> str:
    f = rng.choice(files)
    kind = rng.choice(["write", "write", "write", "truncate", "punch", "reserve", "clone",
                       "evict", "recall", "flush", "flush", "reclaim", "gc"])
    if kind == "write":
        offset, length = rng.randrange(MAX_BYTES), rng.randrange(1, 5 * BLOCK_SIZE)
        await f.write(offset, rng.randbytes(length))
        return f"write {f.ino} {offset}+{length}"
    if kind == "truncate":
        size = rng.randrange(MAX_BYTES)
        await f.truncate(size)
        return f"truncate {f.ino} {size}"
    if kind == "punch":
        offset, length = rng.randrange(MAX_BYTES), rng.randrange(1, 8 * BLOCK_SIZE)
        await node.core.ops.fallocate(f.fh, offset, length, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        end = min(offset + length, len(f.model))
        if offset < end:
            f.model[offset:end] = bytes(end - offset)
        return f"punch {f.ino} {offset}+{length}"
    if kind == "reserve":
        offset, length = rng.randrange(MAX_BYTES), rng.randrange(1, 8 * BLOCK_SIZE)
        await node.core.ops.fallocate(f.fh, offset, length, FALLOC_FL_KEEP_SIZE)
        return f"reserve {f.ino} {offset}+{length}"
    if kind == "clone":
        dst = rng.choice(files)
        if dst is f or not f.model:
            return "clone skipped"
        src_block = rng.randrange(len(f.model) // BLOCK_SIZE + 1)
        dst_block = rng.randrange(MAX_BYTES // BLOCK_SIZE)
        count = rng.randrange(1, 16)
        start, length = src_block * BLOCK_SIZE, count * BLOCK_SIZE
        copied = 0
        while copied < length:
            n = await node.core.ops.copy_file_range(f.fh, start + copied, dst.fh, dst_block * BLOCK_SIZE + copied,
                                                    length - copied)
            if n == 0:
                break
            copied += n
        data = bytes(f.model[start : start + copied])
        at = dst_block * BLOCK_SIZE
        if at > len(dst.model) and data:
            dst.model.extend(bytes(at - len(dst.model)))
        if data:
            dst.model[at : at + len(data)] = data
        return f"clone {f.ino}@{src_block} -> {dst.ino}@{dst_block} ({copied} bytes)"
    if kind == "evict":
        await node.core.data.flush(f.ino)
        return f"evict {f.ino}: {await node.engine.evict(f.ino)} bytes"
    if kind == "recall":
        await node.core.data.flush(f.ino)
        return f"recall {f.ino}: {await node.core.data.recall(f.ino)} blocks"
    if kind == "flush":
        await node.core.data.flush(f.ino)
        return f"flush {f.ino}"
    if kind == "reclaim":
        await node.core.meta.propose(c.ReclaimFrees(time.time_ns() + 10**9))
        return "reclaim"
    return f"gc: {await node.engine.collect_garbage()} deleted"


@pytest.fixture
async def node(tmp_path: Path, s3: S3Server) -> AsyncIterator[Node]:
    """Small caches: reads come from memory, the disk cache and the store in turn."""
    async with tiered_node(tier_settings(tmp_path, s3.endpoint, s3.bucket, memory_cache_bytes=256 << 10,
                                         cache_bytes=512 << 10)) as running:
        yield running


@pytest.mark.parametrize("seed", seeds.params("tier-exerciser", 3))
async def test_random_operations_with_tiering_keep_every_byte(node: Node, seed: int) -> None:
    node.engine.settings = node.settings.tier.model_copy(update={"cold_after_s": 0.001, "repack_below": 0.6})
    rng = random.Random(seed)
    files = [await File.create(node.core, b"f%d" % i) for i in range(FILES)]
    done: list[str] = []
    passes = 0

    async def engine_passes() -> None:
        """The engine, all along: its reads, PUTs and commits interleave with the steps."""
        nonlocal passes
        while True:
            await node.engine.step()
            passes += 1
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine_passes)
        for _ in range(STEPS):
            done.append(await step(node, files, rng))
            for f in files:
                try:
                    await f.check()
                except AssertionError as exc:
                    raise AssertionError(f"seed {seed}, after {len(done)} steps (last: {done[-5:]}): inode "
                                         f"{f.ino} differs from its model") from exc
        nursery.cancel_scope.cancel()
    assert passes > 10
    await node.core.data.flush_all()
    # Every file evicted at the end and read back from the store: where the engine's last pass
    # fell (CI run 29: a live object or not) no longer decides what the end checks.
    evicted = 0
    for f in files:
        evicted += await node.engine.evict(f.ino)
        await f.check()
    await node.core.meta.propose(c.ReclaimFrees(time.time_ns() + 10**9))
    node.check_space()
    kinds = {d.split()[0] for d in done}
    assert {"write", "evict", "recall", "clone"} <= kinds, kinds
    assert evicted == 0 or any(o.state == "live" for o in node.core.meta.tier_objects()), "evicted, yet no object"
