"""Fencing of device writes: the fence on a fake clock, then a real image file, then FileData.

The story: a node writes while its lease holds; once fewer than `margin_s` seconds of lease are
left every device write fails with EIO (reads go on), and data a flush could not write stays
buffered until the lease is renewed. No sleeps: the clock is a number the test moves.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from awsomefsd.config import DeviceSettings, MetaSettings, NodeSettings, Settings
from awsomefsd.daemon.node import NODE_ID, Core, open_core
from awsomefsd.io.device import BlockDevice, DeviceError, create_image
from awsomefsd.io.extent_io import INLINE_IO_MAX_BYTES
from awsomefsd.io.fence import MAX_WRITE_S, WriteFence, WriteFencedError
from awsomefsd.io.layout import BLOCK_SIZE, MiB
from awsomefsd.io.superblock import format_device
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.replication.fs_log import ReplicatedFsLog

MARGIN_S = 0.5


class FakeClock:
    """A monotonic clock the test sets; `hold` makes calls from worker threads wait (see below)."""

    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s
        self.hold: tuple[threading.Event, threading.Event] | None = None

    def __call__(self) -> float:
        if self.hold is not None and threading.current_thread() is not threading.main_thread():
            entered, release = self.hold
            entered.set()
            assert release.wait(10), "test never released the worker thread"
        return self.now_s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fence(clock: FakeClock) -> WriteFence:
    return WriteFence(margin_s=MARGIN_S, clock=clock)


def expect_fenced(fence: WriteFence, size_bytes: int = BLOCK_SIZE) -> WriteFencedError:
    with pytest.raises(WriteFencedError) as info:
        fence.check(size_bytes)
    return info.value


# -- the fence on its own -------------------------------------------------------------------------
def test_open_until_margin_before_lease_end_then_eio(fence: WriteFence, clock: FakeClock) -> None:
    fence.renewed(clock.now_s + 10)
    clock.now_s += 10 - MARGIN_S - 0.001
    assert fence.is_open()
    fence.check(BLOCK_SIZE)
    assert fence.remaining_s() == pytest.approx(MARGIN_S + 0.001)
    clock.now_s += 0.001  # exactly margin_s before the lease ends: a write might outlive it
    assert not fence.is_open()
    exc = expect_fenced(fence)
    assert isinstance(exc, DeviceError) and isinstance(exc, OSError)
    assert exc.errno == errno.EIO
    assert "within the 0.5s write margin" in str(exc)
    clock.now_s += MARGIN_S + 2.25
    exc = expect_fenced(fence)
    assert "node lease expired 2.250s ago: device writes fenced" in str(exc)
    assert fence.fenced_writes == 2
    assert fence.remaining_s() == pytest.approx(-2.25)


def test_new_fence_is_closed_until_the_first_renewal(fence: WriteFence, clock: FakeClock) -> None:
    assert not fence.is_open()
    assert "node holds no lease yet" in str(expect_fenced(fence))
    assert fence.renewed(clock.now_s + 5)
    assert fence.is_open()


def test_renewal_reopens_an_expired_fence_and_older_renewals_are_ignored(fence: WriteFence,
                                                                         clock: FakeClock) -> None:
    fence.renewed(clock.now_s + 5)
    clock.now_s += 6
    expect_fenced(fence)
    assert not fence.renewed(clock.now_s - 1), "an expired lease end reopens nothing"
    assert not fence.is_open()
    assert fence.renewed(clock.now_s + 5)
    fence.check(BLOCK_SIZE)
    late = clock.now_s + 3  # a reply to an older renewal arriving after a newer one
    assert not fence.renewed(late)
    assert fence.valid_until_s == clock.now_s + 5
    clock.now_s += 4
    assert fence.is_open(), "the older renewal did not move the deadline backwards"


def test_always_open_never_fences(clock: FakeClock) -> None:
    fence = WriteFence.always_open()
    for _ in range(3):
        fence.check(64 * MiB)
    assert fence.is_open() and fence.remaining_s() == float("inf") and fence.fenced_writes == 0


def test_margin_must_cover_the_longest_write() -> None:
    WriteFence(margin_s=MAX_WRITE_S)
    with pytest.raises(ValueError, match="longest device write"):
        WriteFence(margin_s=MAX_WRITE_S / 2)


# -- a block device on an image file --------------------------------------------------------------
def test_fenced_device_refuses_writes_with_eio_while_reads_go_on(tmp_path: Path, fence: WriteFence,
                                                                 clock: FakeClock) -> None:
    image = tmp_path / "device.img"
    create_image(image, 4 * MiB)
    with BlockDevice.open(image) as dev:
        assert dev.fence.is_open(), "a device without a lease (formatting, one node) is never fenced"
        dev.write(0, b"a" * BLOCK_SIZE)
        dev.fence = fence
        fence.renewed(clock.now_s + 10)
        dev.write(BLOCK_SIZE, b"b" * BLOCK_SIZE)
        clock.now_s += 10
        before = dev.writes, dev.bytes_written
        for attempt in (lambda: dev.write(2 * BLOCK_SIZE, b"c" * BLOCK_SIZE),
                        lambda: dev.write(0, b"x" * 2 * BLOCK_SIZE)):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EIO and isinstance(info.value, WriteFencedError)
        assert (dev.writes, dev.bytes_written) == before
        assert fence.fenced_writes == 2
        assert dev.read(0, 3 * BLOCK_SIZE) == b"a" * BLOCK_SIZE + b"b" * BLOCK_SIZE + bytes(BLOCK_SIZE)
        dev.sync()  # moves no new bytes: not fenced
        fence.renewed(clock.now_s + 10)
        dev.write(2 * BLOCK_SIZE, b"c" * BLOCK_SIZE)
        assert dev.read(2 * BLOCK_SIZE, BLOCK_SIZE) == b"c" * BLOCK_SIZE


# -- FileData on a real core: a fenced flush keeps its data ----------------------------------------
@contextmanager
def fenced_core(tmp_path: Path, fence: WriteFence, clock: FakeClock, meta: MetaSettings) -> Iterator[Core]:
    """A core on a fresh image whose device writes go through `fence`, renewed for 10 s."""
    image = tmp_path / "device.img"
    create_image(image, 64 * MiB)
    with BlockDevice.open(image, direct=False) as dev:
        format_device(dev, cluster_id=uuid.uuid4(), label="fence")
    settings = Settings(node=NodeSettings(state_dir=tmp_path / "state", name="test"),
                        device=DeviceSettings(path=image, shared=False, direct_io=False), meta=meta)
    core = open_core(settings)
    core.device.fence = fence
    fence.renewed(clock.now_s + 10)
    try:
        yield core
    finally:
        core.close()


@pytest.fixture
def core(tmp_path: Path, fence: WriteFence, clock: FakeClock) -> Iterator[Core]:
    with fenced_core(tmp_path, fence, clock, MetaSettings()) as opened:
        yield opened


async def read_all(core: Core, ino: int) -> bytes:
    inode = core.sm.ns.require_inode(core.log.read_txn(), ino)
    return await core.data.read(inode, 0, 1 << 30)


async def test_fenced_flush_fails_with_eio_and_keeps_the_data_buffered(core: Core, clock: FakeClock,
                                                                        fence: WriteFence) -> None:
    fh, inode = await core.ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, b"1" * 3 * BLOCK_SIZE)
    await core.ops.flush(fh)
    free_before = core.allocator.free_blocks
    await core.ops.write(fh, BLOCK_SIZE, b"2" * 100)  # a partial block: the flush reads around it
    await core.ops.write(fh, 5 * BLOCK_SIZE, b"3" * BLOCK_SIZE)
    expected = b"1" * BLOCK_SIZE + b"2" * 100 + b"1" * (2 * BLOCK_SIZE - 100) + bytes(2 * BLOCK_SIZE) + b"3" * BLOCK_SIZE
    dirty = core.data.total_dirty_bytes
    clock.now_s += 10

    for attempt in (lambda: core.ops.flush(fh), lambda: core.ops.fsync(fh, False), core.data.flush_all):
        with pytest.raises(FsError) as info:
            await attempt()
        assert info.value.errno == errno.EIO and "node lease expired" in str(info.value)
        assert core.data.total_dirty_bytes == dirty, "nothing was dropped"
        assert core.allocator.free_blocks == free_before, "the refused write's extents were released"
        assert await read_all(core, inode.ino) == expected, "readers still see the buffered bytes"

    fence.renewed(clock.now_s + 10)
    await core.ops.fsync(fh, False)  # (a close may leave a small file to the batch now: fs/batch.py)
    assert core.data.total_dirty_bytes == 0 and inode.ino not in core.data.files
    assert await read_all(core, inode.ino) == expected, "the retried flush wrote it all"
    await core.ops.release(fh)


async def test_a_close_defers_nothing_while_the_lease_is_not_current_or_ends_before_the_batch(
        core: Core, clock: FakeClock, fence: WriteFence) -> None:
    """With the batch of closed files (fs/batch.py) a small file's close is answered before its
    data is written. Not while the lease has lapsed: the close tries the write and reports EIO
    (it once answered success and left the data to a batch the fence would refuse). Nor while the
    lease ends before a batch could be written: the close writes the data itself, still open."""
    core.data.batch.attach(core.log)  # ([data] batch_closed_files)
    fh, inode = await core.ops.create(ROOT_INO, b"d", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, b"d" * 100)
    assert core.ops.flush_is_immediate(fh), "a current lease: the close is left to the batch"
    clock.now_s += 10
    assert not core.ops.flush_is_immediate(fh)
    with pytest.raises(FsError) as info:
        await core.ops.flush(fh)
    assert info.value.errno == errno.EIO and "node lease expired" in str(info.value)
    fence.renewed(clock.now_s + MARGIN_S + 1.0)  # open, for less time than a batch may take
    assert fence.is_open() and not core.ops.flush_is_immediate(fh)
    await core.ops.flush(fh)
    assert not core.data.has_buffered(inode.ino), "the close wrote the data itself"
    assert await read_all(core, inode.ino) == b"d" * 100
    await core.ops.release(fh)


async def flush_held_in_the_fence(core: Core, clock: FakeClock, fh: int,
                                  meanwhile: Callable[[], Awaitable[None]]) -> list[FsError]:
    """Flush `fh` with the lease over: the fence's clock holds the flush's worker thread inside
    `check` while `meanwhile` runs; returns the errors the flush raised."""
    clock.now_s += 10
    entered, release = threading.Event(), threading.Event()
    clock.hold = (entered, release)
    failures: list[FsError] = []

    async def flush() -> None:
        try:
            await core.ops.flush(fh)
        except FsError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush)
        assert await trio.to_thread.run_sync(entered.wait, 10)
        await meanwhile()
        clock.hold = None
        release.set()
    return failures


async def test_bytes_written_during_a_fenced_flush_stay_on_top(core: Core, clock: FakeClock,
                                                               fence: WriteFence) -> None:
    """The flush's run is big enough to be written from a worker thread; the fence's clock holds
    that thread inside `check` while the application overwrites part of the run."""
    size = 2 * INLINE_IO_MAX_BYTES
    fh, inode = await core.ops.create(ROOT_INO, b"g", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, b"o" * size)
    async def overwrite() -> None:
        assert core.data.files[inode.ino].inflight and not core.data.files[inode.ino].dirty
        await core.ops.write(fh, BLOCK_SIZE, b"n" * BLOCK_SIZE)

    failures = await flush_held_in_the_fence(core, clock, fh, overwrite)
    assert [exc.errno for exc in failures] == [errno.EIO]
    expected = b"o" * BLOCK_SIZE + b"n" * BLOCK_SIZE + b"o" * (size - 2 * BLOCK_SIZE)
    assert core.data.total_dirty_bytes == size
    assert await read_all(core, inode.ino) == expected

    fence.renewed(clock.now_s + 10)
    await core.ops.fsync(fh, False)
    assert core.data.total_dirty_bytes == 0
    assert await read_all(core, inode.ino) == expected
    await core.ops.release(fh)


async def test_a_flush_fenced_after_the_lease_was_lost_keeps_nothing(core: Core, clock: FakeClock,
                                                                      fence: WriteFence) -> None:
    """The cluster expires the node (its buffers are dropped) while a flush is in the device
    thread; the flush then meets the fence. Its runs must not be buffered again: after the renewal
    they would be written over what other nodes wrote meanwhile. The loss is reported once (the
    flush's own EIO)."""
    size = 2 * INLINE_IO_MAX_BYTES
    fh, inode = await core.ops.create(ROOT_INO, b"l", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, b"o" * size)
    async def expire() -> None:
        assert core.data.lose_buffers("expired while paused") == 1, "the in-flight file counts as hit"

    failures = await flush_held_in_the_fence(core, clock, fh, expire)
    assert [exc.errno for exc in failures] == [errno.EIO]
    state = core.data.files.get(inode.ino)
    assert core.data.total_dirty_bytes == 0 and (state is None or not state.dirty), "nothing buffered again"
    fence.renewed(clock.now_s + 10)
    await core.ops.flush(fh)  # the fenced flush's EIO was this descriptor's report of the loss: once
    assert await read_all(core, inode.ino) == b"", "none of the dropped bytes reached the file"
    await core.ops.release(fh)


async def test_fenced_node_refuses_writes_once_the_buffer_is_full(core: Core, clock: FakeClock) -> None:
    core.data.write_buffer_bytes = 4 * BLOCK_SIZE
    fh, _ = await core.ops.create(ROOT_INO, b"h", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    clock.now_s += 10
    await core.ops.write(fh, 0, b"a" * 4 * BLOCK_SIZE)  # fits: buffered
    with pytest.raises(FsError) as info:
        await core.ops.write(fh, 4 * BLOCK_SIZE, b"b")
    assert info.value.errno == errno.EIO
    assert core.data.total_dirty_bytes == 4 * BLOCK_SIZE
    await core.ops.release(fh)


async def test_a_failed_flush_is_reported_to_every_descriptor(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two descriptors append to one file; a flush fails and its runs are gone. Each descriptor
    hears it once at its next fsync (as Linux reports a writeback error to each open file): the
    second one's fsync used to succeed with its record lost (a nemesis run)."""
    fh1, inode = await core.ops.create(ROOT_INO, b"two", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    fh2 = await core.ops.open(inode.ino, os.O_WRONLY)
    await core.ops.write(fh1, 0, b"a" * 64)
    await core.ops.write(fh2, 64, b"b" * 64)
    real_propose = core.meta.propose

    async def failing(command: object, *, epoch: int | None = None) -> object:
        if isinstance(command, c.WriteData):
            raise FsError(errno.EIO, "the metadata group refused it")
        return await real_propose(command, epoch=epoch)

    monkeypatch.setattr(core.meta, "propose", failing)
    reasons = []
    for fh in (fh1, fh2):
        with pytest.raises(FsError) as info:
            await core.ops.fsync(fh, False)
        assert info.value.errno == errno.EIO
        reasons.append(str(info.value.args[1]))
    assert "refused it" in reasons[0], "the flush's own reason reaches the report (the EIO log names it)"
    monkeypatch.setattr(core.meta, "propose", real_propose)
    for fh in (fh1, fh2):
        await core.ops.fsync(fh, False)  # once each
        await core.ops.release(fh)


async def test_a_background_flush_failure_is_reported_with_its_reason(core: Core,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The flusher's own flush fails (nobody waits for it); the application's next fsync reports
    the EIO with the reason, said once."""
    fh, inode = await core.ops.create(ROOT_INO, b"bg", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, b"a" * 64)

    async def failing(command: object, *, epoch: int | None = None) -> object:
        raise FsError(errno.EIO, "the metadata group refused it")

    monkeypatch.setattr(core.meta, "propose", failing)
    async with trio.open_nursery() as nursery:
        await nursery.start(core.data.run)
        assert core.data.flusher.request(inode.ino)
        with trio.fail_after(10):
            while (st := core.data.files.get(inode.ino)) is None or st.error is None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    with pytest.raises(FsError) as info:
        await core.ops.fsync(fh, False)
    said = str(info.value.args[1])
    assert info.value.errno == errno.EIO and "refused it" in said
    assert said.count("flush of the file's buffered writes failed") == 1, said
    await core.ops.release(fh)


# -- a flush across a lost and renewed lease (a cluster member) -----------------------------------
@pytest.fixture
def raft_core(tmp_path: Path, fence: WriteFence, clock: FakeClock) -> Iterator[Core]:
    """A one-member Raft group; the test makes it a cluster whose founder owns every allocation
    group, so that its proposals are fenced (epoch and group checks) as a cluster member's are."""
    with fenced_core(tmp_path, fence, clock, MetaSettings(log="raft")) as opened:
        yield opened


async def test_data_written_under_a_lost_lease_is_not_mapped_after_the_renewal(
        raft_core: Core, clock: FakeClock, fence: WriteFence) -> None:
    """A flush is held at the fence while the cluster expires this node (its groups and write
    leases go to others; its buffers are dropped) and the node comes back: renewed under the next
    epoch, its groups claimed again, the fence open. The flush then writes its runs and proposes
    their mapping. It must be refused: those bytes were buffered under the lost lease, and other
    nodes may have written the file since. (Fenced with the epoch current at the proposal, as it
    once was, the mapping was accepted.)"""
    core = raft_core
    assert isinstance(core.log, ReplicatedFsLog)
    raft = core.log
    layout = core.superblock.layout
    epoch = [1]
    async with trio.open_nursery() as nursery:
        await nursery.start(raft.run)
        await raft.propose_outcome(cc.InitCluster(b"cert", b"key", b"v" * 48, 1, layout.data_start_block,
                                                 layout.ag_blocks, layout.ag_count, NODE_ID, "n1",
                                                 "127.0.0.1:1", "127.0.0.1:2", 1), fenced=False)
        raft.fence_epoch = lambda: epoch[0]
        await core.meta.propose(cc.ClaimGroups(NODE_ID, 1, layout.ag_count))
        size = 2 * INLINE_IO_MAX_BYTES
        fh, inode = await core.ops.create(ROOT_INO, b"e", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
        await core.ops.write(fh, 0, b"x" * size)

        async def expire_and_come_back() -> None:
            # The flush's worker thread, parked in the fence check, holds the device's lock: a
            # commit's device flush would wait for it. Nothing written here needs one.
            raft.before_commit = None
            freed = await raft.propose_outcome(cc.ExpireNode(NODE_ID, 2), fenced=False)
            assert freed == (True, list(range(layout.ag_count))), "its groups are free for others"
            core.data.lose_buffers("expired while paused")
            assert await raft.propose_outcome(cc.RenewLease(NODE_ID, 2), fenced=False) == (True, True)
            epoch[0] = 2
            await core.meta.propose(cc.ClaimGroups(NODE_ID, 2, layout.ag_count))
            fence.renewed(clock.now_s + 10)

        failures = await flush_held_in_the_fence(core, clock, fh, expire_and_come_back)
        assert [exc.errno for exc in failures] == [errno.EIO]
        assert core.meta.require_inode(inode.ino).size == 0, "the mapping was refused"
        assert await read_all(core, inode.ino) == b""
        await core.ops.release(fh)
        nursery.cancel_scope.cancel()
