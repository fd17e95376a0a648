"""Native AIO reads: right bytes under concurrency, short and failed reads are EIO, a cancelled read
waits for the kernel before its buffer is released, closing drains, and the inline fallback.

Real I/O on an image file opened with O_DIRECT (skipped where the filesystem refuses it)."""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from awsomefsd.io import device as device_module
from awsomefsd.io.aio import (
    PROBE_EVERY,
    SOLO_READS_BEFORE_INLINE,
    SUBMIT_TOGETHER,
    AioReader,
    AioUnavailableError,
)
from awsomefsd.io.device import BlockDevice, BufferPool, aligned_buffer, create_image
from awsomefsd.io.layout import BLOCK_SIZE

BLOCKS = 256


def _pattern(block: int) -> bytes:
    return block.to_bytes(4, "little") * (BLOCK_SIZE // 4)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlockDevice]:
    path = tmp_path / "device.img"
    create_image(path, BLOCKS * BLOCK_SIZE)
    with BlockDevice.open(path) as dev:
        if not dev.direct:
            pytest.skip(f"{tmp_path} refuses O_DIRECT; AIO needs it")
        buf = aligned_buffer(BLOCKS * BLOCK_SIZE)
        for block in range(BLOCKS):
            buf[block * BLOCK_SIZE : (block + 1) * BLOCK_SIZE] = _pattern(block)
        dev.write_from(buf, 0)
        dev.sync()
        yield dev


async def test_concurrent_reads_return_the_right_blocks(device: BlockDevice) -> None:
    pool = BufferPool(4 * BLOCK_SIZE, 8)
    rng = random.Random(7)
    wanted = [(rng.randrange(BLOCKS - 3), rng.randrange(1, 4)) for _ in range(200)]
    got: dict[int, bytes] = {}

    async def read(i: int, block: int, count: int) -> None:
        with pool.borrow() as buf:
            view = memoryview(buf)[: count * BLOCK_SIZE]
            await device.read_into_async(view, block * BLOCK_SIZE)
            got[i] = bytes(view)

    async with trio.open_nursery() as serving:
        await serving.start(device.serve_async_reads)
        reader = device._aio
        assert reader is not None
        reads_before = device.reads
        async with trio.open_nursery() as nursery:
            for i, (block, count) in enumerate(wanted):
                nursery.start_soon(read, i, block, count)
        assert reader.submitted == len(wanted) and reader.completed == len(wanted)
        assert 1 < reader.peak_in_flight <= reader.max_in_flight, "reads overlapped, within the bound"
        assert device.reads - reads_before == len(wanted)
        serving.cancel_scope.cancel()
    for i, (block, count) in enumerate(wanted):
        assert got[i] == b"".join(_pattern(b) for b in range(block, block + count)), f"read {i}"
    assert device._aio is None


async def test_short_read_at_the_end_of_the_image_is_eio_and_logged(
    device: BlockDevice, caplog: pytest.LogCaptureFixture
) -> None:
    os.truncate(device.path, 4 * BLOCK_SIZE)  # the device still believes it has BLOCKS blocks
    buf = aligned_buffer(2 * BLOCK_SIZE)
    async with trio.open_nursery() as serving:
        await serving.start(device.serve_async_reads)
        with caplog.at_level(logging.ERROR, logger="awsomefsd.io.device"):
            with pytest.raises(OSError) as past_end:
                await device.read_into_async(memoryview(buf)[:BLOCK_SIZE], 10 * BLOCK_SIZE)
            with pytest.raises(OSError) as straddling:
                await device.read_into_async(buf, 3 * BLOCK_SIZE)
        await device.read_into_async(memoryview(buf)[:BLOCK_SIZE], 3 * BLOCK_SIZE)  # still fine before EOF
        assert buf[:BLOCK_SIZE] == _pattern(3)
        serving.cancel_scope.cancel()
    assert past_end.value.errno == errno.EIO and "0 of 4096 bytes" in str(past_end.value)
    assert straddling.value.errno == errno.EIO and "4096 of 8192 bytes" in str(straddling.value)
    assert sum("short read" in r.getMessage() for r in caplog.records) == 2


async def test_a_failed_read_is_eio_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A read the kernel completes with an error (an empty non-blocking pipe: -EAGAIN) and one
    io_submit refuses (a write-only descriptor: EBADF) both become EIO."""
    reader = AioReader()
    buf = aligned_buffer(BLOCK_SIZE)
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            with caplog.at_level(logging.ERROR, logger="awsomefsd.io.aio"):
                with pytest.raises(OSError) as failed:
                    await reader.read_into(read_end, memoryview(buf), 0)
                with pytest.raises(OSError) as refused:
                    await reader.read_into(write_end, memoryview(buf), 0)
            nursery.cancel_scope.cancel()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert failed.value.errno == errno.EIO and os.strerror(errno.EAGAIN) in str(failed.value)
    assert refused.value.errno == errno.EIO
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    assert reader.in_flight == 0


async def test_a_cancelled_read_returns_only_after_the_kernel_is_done_with_the_buffer(
    device: BlockDevice,
) -> None:
    """Cancel reads while they are in flight: each raises Cancelled, but only once its completion
    arrived, so the buffer already holds the blocks when the task lets go of it."""
    reader = AioReader()
    count, blocks = 16, BLOCKS // 16
    cancelled: list[bool] = []  # per cancelled read: did the buffer hold the data?

    async def read(first: int, scope: trio.CancelScope) -> None:
        buf = aligned_buffer(blocks * BLOCK_SIZE)
        with scope:
            try:
                await reader.read_into(device._fd, memoryview(buf), first * BLOCK_SIZE)
            except trio.Cancelled:
                cancelled.append(buf[:] == b"".join(_pattern(b) for b in range(first, first + blocks)))
                raise

    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        for _ in range(20):  # until a round catches reads in flight (nearly always the first)
            scopes = [trio.CancelScope() for _ in range(count)]
            submitted = reader.submitted
            async with trio.open_nursery() as reads:
                for i, scope in enumerate(scopes):
                    reads.start_soon(read, i * blocks, scope)
                while reader.submitted < submitted + count:
                    await trio.sleep(0)
                in_flight = reader.in_flight
                for scope in scopes:
                    scope.cancel()
            if in_flight:
                break
        nursery.cancel_scope.cancel()
    assert len(cancelled) >= in_flight > 0 and all(cancelled), (in_flight, cancelled)
    assert reader.in_flight == 0 and reader.completed == reader.submitted


async def test_closing_with_reads_in_flight_drains_them_and_later_reads_go_inline(device: BlockDevice) -> None:
    outcomes: list[str] = []

    async def read(block: int) -> None:
        buf = aligned_buffer(BLOCK_SIZE)
        try:
            await device.read_into_async(buf, block * BLOCK_SIZE)
        except trio.Cancelled:
            outcomes.append("cancelled")
            raise
        assert buf[:] == _pattern(block)
        outcomes.append("read")

    async with trio.open_nursery() as nursery:
        await nursery.start(device.serve_async_reads)
        reader = device._aio
        assert reader is not None
        for block in range(100):
            nursery.start_soon(read, block)
        await trio.testing.wait_all_tasks_blocked()  # all submitted or waiting for a slot
        assert reader.in_flight > 0 or reader.completed > 0
        nursery.cancel_scope.cancel()
    assert len(outcomes) == 100
    assert reader.in_flight == 0 and reader.completed == reader.submitted
    assert not reader.accepting and device._aio is None
    buf = aligned_buffer(BLOCK_SIZE)
    await device.read_into_async(buf, 5 * BLOCK_SIZE)  # the inline path after AIO stopped
    assert buf[:] == _pattern(5)


async def test_without_direct_io_reads_stay_inline_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_module, "_warned_paths", set())
    path = tmp_path / "buffered.img"
    create_image(path, 16 * BLOCK_SIZE)
    with BlockDevice.open(path, direct=False) as dev, caplog.at_level(logging.INFO, logger="awsomefsd.io.device"):
        dev.write(2 * BLOCK_SIZE, _pattern(2))
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                await nursery.start(dev.serve_async_reads)
                assert dev._aio is None
                buf = aligned_buffer(BLOCK_SIZE)
                await dev.read_into_async(buf, 2 * BLOCK_SIZE)
                assert buf[:] == _pattern(2)
    assert sum("no AIO" in r.getMessage() for r in caplog.records) == 1


async def test_when_the_kernel_refuses_aio_reads_stay_inline_logged_once(
    device: BlockDevice, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse() -> AioReader:
        raise AioUnavailableError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(device_module, "_warned_paths", set())
    monkeypatch.setattr(device_module, "AioReader", refuse)
    with caplog.at_level(logging.WARNING, logger="awsomefsd.io.device"):
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                await nursery.start(device.serve_async_reads)
                buf = aligned_buffer(BLOCK_SIZE)
                await device.read_into_async(buf, 7 * BLOCK_SIZE)
                assert buf[:] == _pattern(7)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "native AIO unavailable" in warnings[0]


async def test_in_flight_reads_are_bounded(device: BlockDevice) -> None:
    reader = AioReader(max_in_flight=4)
    done = 0

    async def read(block: int) -> None:
        nonlocal done
        buf = aligned_buffer(BLOCK_SIZE)
        await reader.read_into(device._fd, memoryview(buf), block * BLOCK_SIZE)
        assert buf[:] == _pattern(block)
        done += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        async with trio.open_nursery() as reads:
            for block in range(40):
                reads.start_soon(read, block)
        nursery.cancel_scope.cancel()
    assert done == 40
    assert reader.peak_in_flight == 4, "the others waited for a slot before submitting"
    assert reader.in_flight == 0


async def test_reads_one_at_a_time_go_inline_with_periodic_probes(device: BlockDevice) -> None:
    """A lone read is cheaper inline; a probe every PROBE_EVERY reads finds concurrency again."""
    buf = aligned_buffer(BLOCK_SIZE)
    async with trio.open_nursery() as serving:
        await serving.start(device.serve_async_reads)
        reader = device._aio
        assert reader is not None
        for block in range(SOLO_READS_BEFORE_INLINE + 2 * PROBE_EVERY):
            await device.read_into_async(buf, block * BLOCK_SIZE)
            assert buf[:] == _pattern(block)
        assert reader.submitted == SOLO_READS_BEFORE_INLINE + 2, "the solo reads, then one probe per round"

        async def read(block: int) -> None:
            own = aligned_buffer(BLOCK_SIZE)
            await device.read_into_async(own, block * BLOCK_SIZE)
            assert own[:] == _pattern(block)

        before = reader.submitted
        async with trio.open_nursery() as nursery:
            for block in range(64):
                nursery.start_soon(read, block)
        assert reader.submitted - before > 64 - PROBE_EVERY, "concurrent reads are submitted again"
        assert reader.peak_in_flight > 1
        serving.cancel_scope.cancel()


async def test_a_large_read_is_submitted_even_when_reads_come_one_at_a_time(device: BlockDevice) -> None:
    """Past SMALL_READ_BYTES the inline advice does not apply: a large read made inline would hold
    up every other request for its whole transfer, and AIO's fixed cost is small next to it."""
    small = aligned_buffer(BLOCK_SIZE)
    large_bytes = device_module.SMALL_READ_BYTES * 2
    large = aligned_buffer(large_bytes)
    async with trio.open_nursery() as serving:
        await serving.start(device.serve_async_reads)
        reader = device._aio
        assert reader is not None
        for block in range(SOLO_READS_BEFORE_INLINE + 1):  # the reader now advises inline reads
            await device.read_into_async(small, block * BLOCK_SIZE)
        assert not reader.worth_submitting()
        before = reader.submitted
        for _ in range(3):
            await device.read_into_async(large, 0)
            blocks = large_bytes // BLOCK_SIZE
            assert bytes(large[:]) == b"".join(_pattern(block) for block in range(blocks))
        assert reader.submitted - before == 3
        assert device.reads_asynchronously
        serving.cancel_scope.cancel()
    assert not device.reads_asynchronously


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.001)


async def test_reads_started_without_a_task_go_to_the_kernel_together(device: BlockDevice) -> None:
    """`submit` queues: the queue goes in one io_submit when the task collecting completions next
    runs (here: at the first checkpoint), or at once when SUBMIT_TOGETHER reads are queued; every
    read gets its own block, and a read queued while a `read_into` leads completes too."""
    bufs = [aligned_buffer(BLOCK_SIZE) for _ in range(SUBMIT_TOGETHER + 6)]
    results: dict[int, tuple[int, bool]] = {}

    def start(reader: AioReader, i: int) -> None:
        block = (i * 7) % BLOCKS
        view = memoryview(bufs[i])

        def done(result: int) -> None:
            results[i] = (result, bytes(view) == _pattern(block))

        assert reader.submit(device._fd, view, block * BLOCK_SIZE, done)

    reader = AioReader()
    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        for i in range(5):  # no checkpoint between: all queued
            start(reader, i)
        assert (reader.submit_calls, reader.submitted, reader.in_flight) == (0, 0, 5)
        await _until(lambda: len(results) == 5)
        assert (reader.submit_calls, reader.submitted) == (1, 5), "one io_submit for the five"
        for i in range(5, 5 + SUBMIT_TOGETHER):
            start(reader, i)
        assert (reader.submit_calls, reader.submitted) == (2, 5 + SUBMIT_TOGETHER), "a full queue goes at once"
        await _until(lambda: len(results) == 5 + SUBMIT_TOGETHER)

        leading = aligned_buffer(BLOCK_SIZE)
        nursery.start_soon(reader.read_into, device._fd, memoryview(leading), 0)
        await trio.testing.wait_all_tasks_blocked()
        start(reader, 5 + SUBMIT_TOGETHER)
        await _until(lambda: len(results) == 6 + SUBMIT_TOGETHER)
        nursery.cancel_scope.cancel()
    assert results == {i: (BLOCK_SIZE, True) for i in range(6 + SUBMIT_TOGETHER)}
    assert reader.in_flight == 0


async def test_queued_reads_the_kernel_refuses_fail_free_their_slots_and_leave_nothing_to_wait_for(
        device: BlockDevice, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    reader = AioReader(max_in_flight=4)
    results: list[int] = []
    real_call = reader._sys.call

    def refusing(number: int, *args: object) -> int:
        if number == reader._sys.nr_submit:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return real_call(number, *args)

    async with trio.open_nursery() as nursery:
        await nursery.start(reader.run)
        monkeypatch.setattr(reader._sys, "call", refusing)
        for block in range(4):
            assert reader.submit(device._fd, memoryview(aligned_buffer(BLOCK_SIZE)), block * BLOCK_SIZE, results.append)
        assert not reader.submit(device._fd, memoryview(aligned_buffer(BLOCK_SIZE)), 0, results.append), "no slot left"
        await _until(lambda: len(results) == 4)
        assert results == [-errno.EAGAIN] * 4 and reader.in_flight == 0
        await trio.testing.wait_all_tasks_blocked()
        assert not reader._leading, "nothing is in flight: no completion to wait for (a stop would hang on it)"
        assert "io_submit of 4 reads failed" in caplog.text
        monkeypatch.undo()
        buf = aligned_buffer(BLOCK_SIZE)
        assert reader.submit(device._fd, memoryview(buf), 5 * BLOCK_SIZE, results.append), "the slots came back"
        await _until(lambda: len(results) == 5)
        assert results[-1] == BLOCK_SIZE and buf[:] == _pattern(5)
        nursery.cancel_scope.cancel()
