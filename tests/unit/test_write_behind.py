"""Write-behind (io/write_behind.py): blocks held for the pipeline's next proposal read back as
held through every read path, reach the device at `settle`, and never do when their lease epoch
ended or their extents were given back; a settle that fails keeps them for the next one. On a
real image file, through a real BlockDevice and its write fence."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio

from awsomefsd.daemon.node import Core
from awsomefsd.io import write_behind
from awsomefsd.io.checksum import block_checksums
from awsomefsd.io.device import BlockDevice, create_image
from awsomefsd.io.extent_io import ChecksumMismatch, ExtentIO
from awsomefsd.io.fence import WriteFence, WriteFencedError
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.errors import FsError
from tests.support import seeds

MiB = 1 << 20


def _device(tmp_path: Path, fence: WriteFence | None = None) -> BlockDevice:
    path = tmp_path / "device.img"
    create_image(path, 8 * MiB)
    return BlockDevice.open(path, fence=fence)


def _raw(dev: BlockDevice, dev_block: int, count: int) -> bytes:
    return dev.read(dev_block * BLOCK_SIZE, count * BLOCK_SIZE)


def _blocks(rng: random.Random, count: int) -> bytes:
    return rng.randbytes(count * BLOCK_SIZE)


async def _every_read(io: ExtentIO, dev_block: int, checksums: bytes) -> list[bytes]:
    """The run's bytes as each read path gives them (verified against `checksums`)."""
    n = len(checksums) // 4 * BLOCK_SIZE
    into = bytearray(n)
    await io.read_into(dev_block, checksums, 0, n, memoryview(into))
    got_runs = await trio.to_thread.run_sync(io.read_runs, [(dev_block, checksums)])
    return [await io.read(dev_block, checksums, 0, n), bytes(into), got_runs[0],
            io.read_blocking(dev_block, checksums, 0, n)]


async def test_held_blocks_read_as_held_until_settle_writes_them(tmp_path: Path) -> None:
    rng = random.Random(seeds.fresh_one("write-behind"))
    with _device(tmp_path) as dev:
        io = ExtentIO(dev, max_run_bytes=MiB)
        old = _blocks(rng, 2)
        [old_sums] = await io.write_async([(100, memoryview(old))])  # written blocks beside the held ones
        a, b = _blocks(rng, 3), _blocks(rng, 1)
        sums = io.write_behind([(102, memoryview(a)), (110, memoryview(b))], epoch=7)
        assert sums == [block_checksums(a), block_checksums(b)]
        assert _raw(dev, 102, 3) == bytes(3 * BLOCK_SIZE), "nothing reached the device yet"
        for got in await _every_read(io, 102, sums[0]):
            assert got == a
        for got in await _every_read(io, 110, sums[1]):
            assert got == b
        # a run the map merged with the written blocks before it (one extent over both)
        merged = old_sums + sums[0]
        for got in await _every_read(io, 100, merged):
            assert got == old + a
        await io.settle(7)
        assert not io.behind and io.behind.bytes == 0
        assert _raw(dev, 102, 3) == a and _raw(dev, 110, 1) == b
        for got in await _every_read(io, 102, sums[0]):
            assert got == a


async def test_a_settle_drops_what_an_ended_lease_held(tmp_path: Path) -> None:
    rng = random.Random(seeds.fresh_one("write-behind-epoch"))
    with _device(tmp_path) as dev:
        io = ExtentIO(dev, max_run_bytes=MiB)
        stale, fresh = _blocks(rng, 1), _blocks(rng, 1)
        io.write_behind([(200, memoryview(stale))], epoch=3)
        io.write_behind([(201, memoryview(fresh))], epoch=4)
        await io.settle(4)
        assert _raw(dev, 200, 1) == bytes(BLOCK_SIZE), "its blocks may be another node's by now"
        assert _raw(dev, 201, 1) == fresh
        assert not io.behind and io.behind.dropped == 1
        io.write_behind([(202, memoryview(stale))], epoch=4)
        io.drop_behind()  # the lease expired: the node drops everything held at once
        await io.settle(4)
        assert _raw(dev, 202, 1) == bytes(BLOCK_SIZE) and io.behind.dropped == 2


async def test_blocks_given_back_unmapped_are_never_written(tmp_path: Path) -> None:
    with _device(tmp_path) as dev:
        io = ExtentIO(dev, max_run_bytes=MiB)
        data = os.urandom(2 * BLOCK_SIZE)
        io.write_behind([(300, memoryview(data))], epoch=1)
        io.discard_behind([(300, 2)])
        assert not io.behind
        await io.settle(1)
        assert _raw(dev, 300, 2) == bytes(2 * BLOCK_SIZE)


async def test_a_failed_settle_keeps_the_blocks_held_and_the_next_one_writes_them(tmp_path: Path) -> None:
    now = [100.0]
    fence = WriteFence(margin_s=1.0, clock=lambda: now[0])
    fence.renewed(110.0)
    with _device(tmp_path, fence) as dev:
        io = ExtentIO(dev, max_run_bytes=MiB)
        data = os.urandom(BLOCK_SIZE)
        [sums] = io.write_behind([(400, memoryview(data))], epoch=5)
        now[0] = 109.5  # the fence closed: the lease is about to end
        with pytest.raises(WriteFencedError):
            await io.settle(5)
        assert io.behind and (await io.read(400, sums, 0, BLOCK_SIZE)) == data, "still held, still read"
        fence.renewed(120.0)  # renewed under the same epoch: the blocks stayed this node's
        await io.settle(5)
        assert not io.behind and _raw(dev, 400, 1) == data


async def test_write_behind_holds_a_bounded_amount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(write_behind, "BEHIND_MAX_BYTES", 2 * BLOCK_SIZE)
    with _device(tmp_path) as dev:
        io = ExtentIO(dev, max_run_bytes=MiB)
        assert io.write_behind([(500, memoryview(bytes(2 * BLOCK_SIZE)))], epoch=1) is not None
        assert io.write_behind([(510, memoryview(bytes(BLOCK_SIZE)))], epoch=1) is None, "past the bound"
        assert list(io.behind.runs) == [500]


async def test_a_read_of_blocks_neither_held_nor_written_still_fails_its_checksum(tmp_path: Path) -> None:
    """The overlay covers only what is held: a map naming blocks nobody wrote is still caught."""
    with _device(tmp_path) as dev:
        io = ExtentIO(dev, max_run_bytes=MiB)
        data = os.urandom(BLOCK_SIZE)
        [sums] = io.write_behind([(600, memoryview(data))], epoch=1)
        with pytest.raises(ChecksumMismatch):
            await io.read(601, sums, 0, BLOCK_SIZE)


async def test_an_expired_lease_drops_what_the_node_held(core: Core) -> None:
    """`FileData.lose_buffers` (the cluster expired this node's lease) drops the held runs with the
    buffered writes: their blocks may be another node's, and a read must not overlay them."""
    io = core.data.writer.io
    io.write_behind([(4096, memoryview(os.urandom(BLOCK_SIZE)))], epoch=1)
    core.data.lose_buffers("the lease expired (test)")
    assert not io.behind and io.behind.dropped == 1


async def test_a_fenced_settle_fails_the_proposal_with_eio_naming_the_fence(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's hook (`RunWriter.settle_behind`) turns a refused write into the EIO the
    proposal fails with, its cause the fence; the runs stay held for the next settle."""
    writer = core.data.writer
    monkeypatch.setattr(core.meta, "lease_epoch", lambda: 1)
    writer.io.write_behind([(4096, memoryview(os.urandom(BLOCK_SIZE)))], epoch=1)

    async def fenced(runs: object) -> list[bytes]:
        raise WriteFencedError("the lease is about to end (test)")

    monkeypatch.setattr(writer.io, "write_async", fenced)
    with pytest.raises(FsError) as info:
        await writer.settle_behind()
    assert info.value.errno == errno.EIO and info.value.cause == "fence"
    assert writer.io.behind, "kept for the next settle"
