"""Reads of tiered data against a real S3 server through the fault proxy: byte-identical ranges
from the store, then from memory and from the disk cache (also after a restart), each block
checked (a wrong byte from the store or a damaged cache file is fetched again, twice wrong is
EIO), an outage fails within the read timeout, concurrent readers share one GET, sequential reads
prefetch, and the disk cache stays within its size."""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from awsomefsd.io.checksum import CHECKSUM_BYTES, block_checksums
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.tier.cache import ChunkCache
from awsomefsd.tier.reader import TieredRange, TieredReader, TierReadError
from tests.support.s3 import FaultProxy, S3Server
from tests.tier.conftest import make_store

CHUNK = 64 * 1024
OBJECT_BYTES = 40 * CHUNK + 3 * BLOCK_SIZE  # a short last chunk


class Stored:
    """One object in the store, and how to ask for whole blocks of it."""

    def __init__(self, key: str, data: bytes) -> None:
        self.key = key
        self.data = data
        self.sums = block_checksums(data)

    def range(self, first_block: int, blocks: int) -> TieredRange:
        return TieredRange(self.key, len(self.data), first_block * BLOCK_SIZE,
                           self.sums[first_block * CHECKSUM_BYTES : (first_block + blocks) * CHECKSUM_BYTES])

    def bytes(self, first_block: int, blocks: int) -> bytes:
        return self.data[first_block * BLOCK_SIZE : (first_block + blocks) * BLOCK_SIZE]


@pytest.fixture
def stored(s3: S3Server) -> Stored:
    key = f"objects/{os.urandom(6).hex()}"
    data = os.urandom(OBJECT_BYTES)
    make_store(s3.endpoint, s3.bucket).put(key, data)
    return Stored(key, data)


def reader_for(proxy: FaultProxy, s3: S3Server, cache_dir: Path | None, **kwargs: object) -> TieredReader:
    cache = ChunkCache(cache_dir, disk_bytes=int(kwargs.pop("disk_bytes", 64 << 20)),  # type: ignore[call-overload]
                       memory_bytes=int(kwargs.pop("memory_bytes", 8 << 20)))  # type: ignore[call-overload]
    store = make_store(proxy.endpoint, s3.bucket, timeout_s=float(kwargs.pop("timeout_s", 5.0)))  # type: ignore[arg-type]
    return TieredReader(store, cache, chunk_bytes=CHUNK, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as running:
        yield running
        running.cancel_scope.cancel()


async def test_ranges_come_back_byte_identical_cold_then_warm(proxy: FaultProxy, s3: S3Server, stored: Stored,
                                                              tmp_path: Path) -> None:
    reader = reader_for(proxy, s3, tmp_path / "cache")
    blocks = OBJECT_BYTES // BLOCK_SIZE
    rng = random.Random(16)
    wanted = [(0, 1), (blocks - 1, 1), (0, blocks), *[(b, rng.randrange(1, blocks - b + 1))
                                                     for b in (rng.randrange(blocks) for _ in range(30))]]
    for first, count in wanted:
        assert await reader.read(stored.range(first, count)) == stored.bytes(first, count)
    gets = proxy.forwarded
    assert gets <= OBJECT_BYTES // CHUNK + 1, "each chunk fetched once"
    for first, count in wanted:  # warm: memory
        assert await reader.read(stored.range(first, count)) == stored.bytes(first, count)
    assert proxy.forwarded == gets

    restarted = reader_for(proxy, s3, tmp_path / "cache", memory_bytes=0)  # a new process: the disk cache
    for first, count in wanted:
        assert await restarted.read(stored.range(first, count)) == stored.bytes(first, count)
    assert proxy.forwarded == gets and restarted.cache.stats.disk_hits > 0


async def test_wrong_bytes_from_the_store_are_fetched_again(proxy: FaultProxy, s3: S3Server, stored: Stored) -> None:
    reader = reader_for(proxy, s3, None)
    per_chunk = CHUNK // BLOCK_SIZE  # the proxy alters a chunk's first byte: read from there
    proxy.plan("corrupt_response", method="GET")
    assert await reader.read(stored.range(0, 5)) == stored.bytes(0, 5)
    assert proxy.injected == {"corrupt_response": 1} and reader.gets == 2

    proxy.plan("corrupt_response", method="GET", times=2)
    with pytest.raises(TierReadError) as caught:
        await reader.read(stored.range(2 * per_chunk, 2))  # another chunk: wrong twice
    assert caught.value.errno == errno.EIO and "checksum mismatch" in str(caught.value)
    assert await reader.read(stored.range(2 * per_chunk, 2)) == stored.bytes(2 * per_chunk, 2), "nothing wrong kept"


async def test_a_damaged_disk_cache_file_is_fetched_again(proxy: FaultProxy, s3: S3Server, stored: Stored,
                                                          tmp_path: Path) -> None:
    reader = reader_for(proxy, s3, tmp_path / "cache", memory_bytes=0)
    assert await reader.read(stored.range(0, 4)) == stored.bytes(0, 4)
    (cached,) = [p for p in (tmp_path / "cache").iterdir()]
    damaged = bytearray(cached.read_bytes())
    damaged[100] ^= 0x01
    cached.write_bytes(bytes(damaged))
    before = proxy.forwarded
    assert await reader.read(stored.range(0, 4)) == stored.bytes(0, 4)
    assert proxy.forwarded == before + 1 and cached.read_bytes() == stored.data[:CHUNK]


async def test_a_disk_cache_file_cut_short_is_fetched_again(proxy: FaultProxy, s3: S3Server, stored: Stored,
                                                             tmp_path: Path) -> None:
    """A part of a chunk is read from its file alone: a file cut short is a miss, then a whole
    read of it fails its checksum; both fetch the chunk again, neither returns other bytes."""
    reader = reader_for(proxy, s3, tmp_path / "cache", memory_bytes=0)
    assert await reader.read(stored.range(0, 4)) == stored.bytes(0, 4)
    (cached,) = [p for p in (tmp_path / "cache").iterdir()]
    cached.write_bytes(cached.read_bytes()[: 3 * 4096])
    before = proxy.forwarded
    assert await reader.read(stored.range(2, 2)) == stored.bytes(2, 2)
    assert proxy.forwarded == before + 1 and cached.read_bytes() == stored.data[:CHUNK]
    cached.write_bytes(cached.read_bytes()[: 3 * 4096])
    assert await reader.read(stored.range(0, CHUNK // 4096)) == stored.bytes(0, CHUNK // 4096)
    assert proxy.forwarded == before + 2


async def test_an_outage_fails_within_the_read_timeout(proxy: FaultProxy, s3: S3Server, stored: Stored) -> None:
    for kind, kwargs in (("status", {"status": 503, "code": "SlowDown"}), ("delay", {"delay_s": 30.0}),
                         ("drop", {})):
        reader = reader_for(proxy, s3, None, read_timeout_s=2.0, timeout_s=1.0)
        proxy.plan(kind, times=10_000, method="GET", **kwargs)  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(TierReadError) as caught:
            await reader.read(stored.range(0, 1))
        assert caught.value.errno == errno.EIO
        assert time.monotonic() - started < 2.0 + 1.0, kind
        proxy.clear()
    assert await reader_for(proxy, s3, None).read(stored.range(0, 1)) == stored.bytes(0, 1), "back after the outage"


async def test_concurrent_readers_of_a_chunk_share_one_get(proxy: FaultProxy, s3: S3Server, stored: Stored) -> None:
    reader = reader_for(proxy, s3, None)
    proxy.plan("delay", method="GET", delay_s=0.3)  # so that all readers wait on the first GET
    results: list[bytes] = []

    async def read_one(block: int) -> None:
        results.append(await reader.read(stored.range(block, 1)))

    async with trio.open_nursery() as readers:
        for block in range(10):  # all in chunk 0
            readers.start_soon(read_one, block)
    assert sorted(results) == sorted(stored.bytes(b, 1) for b in range(10))
    assert proxy.forwarded == 1 and reader.gets == 1


async def test_sequential_reads_prefetch_the_next_chunks(proxy: FaultProxy, s3: S3Server, stored: Stored,
                                                         nursery: trio.Nursery) -> None:
    reader = reader_for(proxy, s3, None, prefetch_chunks=3)
    await nursery.start(reader.run)
    per_chunk = CHUNK // BLOCK_SIZE
    assert await reader.read(stored.range(0, per_chunk)) == stored.bytes(0, per_chunk)
    assert await reader.read(stored.range(per_chunk, per_chunk)) == stored.bytes(per_chunk, per_chunk)
    with trio.fail_after(10):
        while reader.gets < 5 or reader.cache.stats.memory_bytes < 5 * CHUNK:  # 0 and 1 read, 2-4 prefetched
            await trio.sleep(0.01)  # `gets` counts a GET when it starts: its chunk is cached when it ends
    fetched = proxy.forwarded
    for chunk in (2, 3, 4):
        assert await reader.read(stored.range(chunk * per_chunk, per_chunk)) == stored.bytes(chunk * per_chunk, per_chunk)
    assert proxy.forwarded >= fetched and reader.cache.stats.memory_hits >= 3
    random_reader = reader_for(proxy, s3, None, prefetch_chunks=3)
    await nursery.start(random_reader.run)
    await random_reader.read(stored.range(5 * per_chunk, 1))
    await random_reader.read(stored.range(20 * per_chunk, 1))
    await trio.sleep(0.2)
    assert random_reader.gets == 2, "no prefetch for reads that do not follow each other"


async def test_the_disk_cache_stays_within_its_size(proxy: FaultProxy, s3: S3Server, stored: Stored,
                                                    tmp_path: Path) -> None:
    limit = 5 * CHUNK
    reader = reader_for(proxy, s3, tmp_path / "cache", disk_bytes=limit, memory_bytes=0)
    per_chunk = CHUNK // BLOCK_SIZE
    for chunk in range(12):
        assert await reader.read(stored.range(chunk * per_chunk, 1)) == stored.bytes(chunk * per_chunk, 1)
        used = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
        assert used <= limit and used == reader.cache.stats.disk_bytes
    assert reader.cache.stats.evicted == 12 - 5
    before = proxy.forwarded
    assert await reader.read(stored.range(11 * per_chunk, 1)) == stored.bytes(11 * per_chunk, 1)  # recent: cached
    assert proxy.forwarded == before
    assert await reader.read(stored.range(0, 1)) == stored.bytes(0, 1)  # the oldest was evicted
    assert proxy.forwarded == before + 1


def test_a_cache_directory_shared_with_other_files_loses_none_of_them(tmp_path: Path) -> None:
    """An operator may point cache_dir at a directory that holds other things: the cache indexes,
    evicts and removes only the files it writes (a half-written one of its own is removed)."""
    from awsomefsd.tier.cache import TEMP_SUFFIX, chunk_name

    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    (shared / "notes.txt").write_bytes(b"keep me")
    (shared / "build.part").write_bytes(b"someone else's")
    own = shared / chunk_name("object", 0)
    own.write_bytes(bytes(CHUNK))
    (shared / (chunk_name("object", 1) + TEMP_SUFFIX)).write_bytes(b"half")
    cache = ChunkCache(shared, disk_bytes=0, memory_bytes=0)  # everything of its own must go
    assert cache.stats.disk_bytes == 0
    assert sorted(p.name for p in shared.iterdir()) == ["build.part", "notes.txt", "sub"]
