"""The filesystem layer in-process, without a mount (S3QL's t3_fs_api shape): POSIX operations
(awsomefsd/fs/operations.py) over the file data parts and the metadata client, on an image file
and the local group-commit log. Fast, no root, no /dev/fuse.

Each test says what it checks; the data checks compare with a model of the file (a bytearray)
before the flush (bytes from the write buffer), after it (from the device) and after the commit
and a restart (from the image and the log alone).
"""

from __future__ import annotations

import errno
import os
import random
import stat
import time
import uuid
from pathlib import Path

import pytest
import trio

from awsomefsd.cli.fsck import run_fsck
from awsomefsd.config import DataSettings, DeviceSettings, NodeSettings, Settings
from awsomefsd.daemon.node import Core, open_core
from awsomefsd.io.device import BlockDevice, create_image
from awsomefsd.io.layout import BLOCK_SIZE, MiB
from awsomefsd.io.superblock import format_device
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError, OutcomeUnknown
from awsomefsd.meta.levels import LOG_LEVEL
from awsomefsd.meta.records import ROOT_INO, Inode

IMAGE_BYTES = 64 * MiB
GRACE_MS = 200


def settings_for(tmp_path: Path, *, delayed_free_ms: int = GRACE_MS) -> Settings:
    image = tmp_path / "device.img"
    if not image.exists():
        create_image(image, IMAGE_BYTES)
        with BlockDevice.open(image, direct=False) as device:
            format_device(device, cluster_id=uuid.uuid4(), label="fs-api")
    return Settings(node=NodeSettings(state_dir=tmp_path / "state", name="fs-api"),
                    device=DeviceSettings(path=image, shared=False, direct_io=False),
                    data=DataSettings(delayed_free_ms=delayed_free_ms))


async def flushed(core: Core, fh: int) -> None:
    """A close's flush, and the batch of closed files it may have joined written (fs/batch.py):
    these tests look at what a flush writes, which on a single node can wait for the next commit."""
    await core.ops.flush(fh)
    await core.data.batch.write_pending()


class File:
    """An open file of the core, and the model of its bytes."""

    def __init__(self, core: Core, fh: int, ino: int) -> None:
        self.core, self.fh, self.ino = core, fh, ino
        self.model = bytearray()

    @classmethod
    async def create(cls, core: Core, name: bytes, parent: int = ROOT_INO) -> File:
        fh, inode = await core.ops.create(parent, name, stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
        return cls(core, fh, inode.ino)

    async def write(self, offset: int, data: bytes) -> None:
        assert await self.core.ops.write(self.fh, offset, data) == len(data)
        if offset > len(self.model):
            self.model.extend(bytes(offset - len(self.model)))
        self.model[offset : offset + len(data)] = data

    async def truncate(self, size: int) -> None:
        await self.core.ops.setattr(self.ino, size=size)
        del self.model[size:]
        self.model.extend(bytes(size - len(self.model)))

    async def read_all(self) -> bytes:
        size = (await self.core.ops.getattr(self.ino)).size
        return await self.core.ops.read(self.fh, 0, size + BLOCK_SIZE)

    async def stat(self) -> Inode:
        return await self.core.ops.getattr(self.ino)

    async def check(self) -> None:
        assert (await self.stat()).size == len(self.model)
        assert await self.read_all() == bytes(self.model)


async def test_unaligned_writes_read_back_from_the_buffer_the_device_and_after_a_restart(tmp_path: Path) -> None:
    """Writes at odd offsets and lengths, overlapping each other and block boundaries: each
    partial block is completed with the committed bytes around it when flushed."""
    core = open_core(settings_for(tmp_path))
    rng = random.Random(12)
    try:
        f = await File.create(core, b"unaligned")
        for round_ in range(4):
            for _ in range(25):
                offset = rng.randrange(0, 6 * BLOCK_SIZE)
                await f.write(offset, bytes([rng.randrange(256)]) * rng.randrange(1, 3 * BLOCK_SIZE))
            await f.check()  # from the write buffer, over whatever was flushed before
            if round_ % 2:
                await flushed(core, f.fh)
                assert f.ino not in core.data.files
                await f.check()  # from the device
        await core.ops.fsync(f.fh, False)
        await core.ops.release(f.fh)
        model = bytes(f.model)
    finally:
        core.close()
    core = open_core(settings_for(tmp_path))
    try:
        ino = core.meta.lookup(ROOT_INO, b"unaligned")
        assert ino is not None
        fh = await core.ops.open(ino, os.O_RDONLY)
        assert await core.ops.read(fh, 0, len(model) + 1) == model
        await core.ops.release(fh)
    finally:
        core.close()


async def test_a_truncate_zeroes_the_tail_of_its_block_and_drops_buffered_bytes_past_it(core: Core) -> None:
    """Shrinking into the middle of a block rewrites that block with its tail zeroed; growing
    again reads zeros there, never the old bytes, whether they were committed or still buffered."""
    f = await File.create(core, b"tail")
    await f.write(0, b"x" * 3 * BLOCK_SIZE)
    await flushed(core, f.fh)
    await f.write(3 * BLOCK_SIZE, b"y" * 100)  # buffered, past the new size
    await f.truncate(BLOCK_SIZE + 5)
    await f.check()
    await f.truncate(4 * BLOCK_SIZE)
    await f.check()
    assert (await f.read_all())[BLOCK_SIZE + 5 : 2 * BLOCK_SIZE] == bytes(BLOCK_SIZE - 5)
    await f.write(BLOCK_SIZE + 1, b"z")  # buffered inside the rewritten tail block
    await f.truncate(BLOCK_SIZE + 3)
    await f.check()
    await flushed(core, f.fh)
    await f.check()
    assert (await f.stat()).blocks == 2
    await core.ops.release(f.fh)


async def test_holes_read_as_zeros_and_take_no_space(core: Core) -> None:
    f = await File.create(core, b"sparse")
    free_before = core.ops.statfs().free_blocks
    await f.write(0, b"a" * BLOCK_SIZE)
    await f.write(1000 * BLOCK_SIZE + 17, b"b" * 10)  # one partial block, a thousand blocks on
    await flushed(core, f.fh)
    await f.check()
    assert (await f.stat()).blocks == 2
    assert core.ops.statfs().free_blocks == free_before - 2
    assert await core.ops.read(f.fh, 500 * BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)
    assert [ext.file_block for ext in core.meta.all_extents(f.ino)] == [0, 1000]
    await core.ops.release(f.fh)


async def test_a_write_past_the_quota_fails_at_write_time(core: Core) -> None:
    """EDQUOT at write(), not at a later flush the application may never see; the refused write
    leaves nothing buffered, and bytes still buffered count against the quota. A write into a hole
    does not grow the file, so only its flush finds the volume full: that flush reports EDQUOT."""
    number = await core.ops.new_ino()
    volume = await core.meta.propose_volume(c.CreateVolume(number, "q", number, 8 * BLOCK_SIZE, 0, time.time_ns()))
    f = await File.create(core, b"f", parent=volume.root)
    await f.write(0, b"q" * 6 * BLOCK_SIZE)  # buffered
    with pytest.raises(FsError) as info:
        await core.ops.write(f.fh, 6 * BLOCK_SIZE, b"q" * 3 * BLOCK_SIZE)
    assert info.value.errno == errno.EDQUOT
    assert core.data.total_dirty_bytes == 6 * BLOCK_SIZE
    await f.write(6 * BLOCK_SIZE, b"q" * BLOCK_SIZE)  # still fits
    await flushed(core, f.fh)
    used = core.meta.volume(number)
    assert used is not None and used.used_blocks == 7
    await f.truncate(20 * BLOCK_SIZE)  # a hole: no blocks, no quota
    await core.ops.write(f.fh, 10 * BLOCK_SIZE, b"h" * 2 * BLOCK_SIZE)
    with pytest.raises(FsError) as info:
        await flushed(core, f.fh)
    assert info.value.errno == errno.EDQUOT
    await f.check()  # the refused bytes never landed
    await core.ops.release(f.fh)


async def test_a_full_device_fails_writes_with_enospc_and_frees_come_back_after_the_grace(running: Core) -> None:
    """Writes are refused up front once the node's space (less what is buffered) is gone; space
    an unlink freed returns after the delayed-free grace period, and a write that needs it waits
    for it instead of failing."""
    core = running
    chunk = b"F" * (1 * MiB)
    f = await File.create(core, b"fill")
    written = 0
    with pytest.raises(FsError) as info:
        while written < IMAGE_BYTES:
            await f.write(written, chunk)
            written += len(chunk)
    assert info.value.errno == errno.ENOSPC
    assert written > IMAGE_BYTES // 2
    await flushed(core, f.fh)
    assert await core.ops.read(f.fh, written - len(chunk), len(chunk)) == chunk
    await core.ops.release(f.fh)
    await core.ops.unlink(ROOT_INO, b"fill", is_dir=False)  # freed after the grace period
    g = await File.create(core, b"again")
    started = trio.current_time()
    for offset in range(0, written // 2, len(chunk)):
        await g.write(offset, chunk)
    await flushed(core, g.fh)
    assert trio.current_time() - started < 10 * GRACE_MS / 1000 + 5
    assert await core.ops.read(g.fh, 0, len(chunk)) == chunk
    await core.ops.release(g.fh)


async def _fill_then_unlink(core: Core, name: bytes) -> int:
    """Write a file until the device is full, then unlink it (its blocks go to the delayed frees);
    the bytes it held."""
    chunk = b"F" * (1 * MiB)
    f = await File.create(core, name)
    written = 0
    with pytest.raises(FsError):
        while written < IMAGE_BYTES:
            await f.write(written, chunk)
            written += len(chunk)
    await flushed(core, f.fh)
    await core.ops.release(f.fh)
    await core.ops.unlink(ROOT_INO, name, is_dir=False)
    return written


async def test_a_single_node_takes_back_freed_space_without_sitting_out_the_grace(tmp_path: Path) -> None:
    """On a single node a write short of space takes back what an unlink freed as soon as the
    reads running then have ended, not after the grace period (60 s here): every reader of a
    block map is in this process. `rm` of a large file then a large write on a full device."""
    core = open_core(settings_for(tmp_path, delayed_free_ms=60_000))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(core.data.run)
            written = await _fill_then_unlink(core, b"fill")
            g = await File.create(core, b"again")
            with trio.fail_after(20):
                for offset in range(0, written // 2, MiB):
                    await g.write(offset, b"G" * MiB)
                await flushed(core, g.fh)
            await g.check()
            await core.ops.release(g.fh)
            nursery.cancel_scope.cancel()
    finally:
        core.close()


async def test_freed_space_is_not_reused_while_a_read_that_saw_it_mapped_runs(tmp_path: Path) -> None:
    """The grace period cut short must still wait for the reads that looked up the old block map:
    a read parked in its device read holds back the write that needs the blocks it reads, and
    then returns the old bytes, not the new ones (nor a checksum error)."""
    core = open_core(settings_for(tmp_path, delayed_free_ms=60_000))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(core.data.run)
            f = await File.create(core, b"read-me")
            await f.write(0, b"R" * MiB)
            await flushed(core, f.fh)
            io = core.data.reader.io
            device_read = io.read
            parked, release = trio.Event(), trio.Event()

            async def parked_read(dev_block: int, checksums: bytes, start: int, end: int) -> bytes:
                parked.set()
                await release.wait()
                return await device_read(dev_block, checksums, start, end)

            io.read = parked_read  # type: ignore[method-assign]
            got: list[bytes | bytearray] = []

            async def reader() -> None:
                got.append(await core.ops.read(f.fh, 0, MiB))

            nursery.start_soon(reader)
            await parked.wait()
            io.read = device_read  # type: ignore[method-assign]
            await core.ops.release(f.fh)
            await core.ops.unlink(ROOT_INO, b"read-me", is_dir=False)
            filled = trio.Event()

            room = core.ops.statfs().free_blocks * BLOCK_SIZE - MiB // 4  # needs the read's blocks

            async def filler() -> None:
                g = await File.create(core, b"filler")
                for offset in range(0, room, MiB):
                    await g.write(offset, b"W" * min(MiB, room - offset))
                await flushed(core, g.fh)
                filled.set()

            nursery.start_soon(filler)
            with trio.move_on_after(2):
                await filled.wait()
            assert not filled.is_set(), "the read's blocks were taken back while it was reading them"
            release.set()
            with trio.fail_after(20):
                await filled.wait()
            assert got == [b"R" * MiB]
            nursery.cancel_scope.cancel()
    finally:
        core.close()


async def test_lost_buffered_writes_are_reported_once_to_the_descriptors_open_then(core: Core) -> None:
    """A node that lost its lease drops its buffered writes (fs/losses.py): each descriptor open on
    the file at that moment gets EIO once, at its next flush or fsync; one opened later does not."""
    f = await File.create(core, b"lost")
    await f.write(0, b"kept")
    await flushed(core, f.fh)
    await core.ops.write(f.fh, 0, b"gone")
    other = await core.ops.open(f.ino, os.O_RDWR)
    assert core.data.lose_buffers("test: the lease expired") == 1
    assert core.data.total_dirty_bytes == 0
    later = await core.ops.open(f.ino, os.O_RDWR)
    for fh in (f.fh, other):
        with pytest.raises(FsError) as info:
            await flushed(core, fh)
        assert info.value.errno == errno.EIO and info.value.cause == "lost-writes"
        await core.ops.fsync(fh, False)  # reported once
    await core.ops.fsync(later, False)
    assert await core.ops.read(later, 0, 10) == b"kept"
    for fh in (f.fh, other, later):
        await core.ops.release(fh)


async def test_a_flush_that_found_the_device_full_is_reported_as_enospc_to_every_descriptor(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes accepted into the buffer whose flush then met a full device (under the kernel's
    writeback cache the application's write() returned long before) are lost, and every
    descriptor open on the file hears it once, with the flush's own error: ENOSPC, as Linux
    reports a writeback error, not a generic EIO (fsync after filling a disk said EIO)."""
    f = await File.create(core, b"full")
    other = await core.ops.open(f.ino, os.O_RDWR)
    await core.ops.write(f.fh, 0, b"x" * BLOCK_SIZE)

    async def full(nblocks: int, hint: int | None) -> list[tuple[int, int]]:
        raise FsError(errno.ENOSPC)

    monkeypatch.setattr(core.data.space, "allocate", full)
    for fh in (f.fh, other):
        with pytest.raises(FsError) as info:
            await core.ops.fsync(fh, False)
        assert info.value.errno == errno.ENOSPC
        await core.ops.fsync(fh, False)  # reported once
    for fh in (f.fh, other):
        await core.ops.release(fh)


async def test_a_mapping_whose_outcome_is_unknown_keeps_its_blocks_from_the_next_write(core: Core) -> None:
    """A flush whose WriteData times out may still commit (a cluster's log): its blocks must not be
    handed out again. If they were, the next append would be written over the block the log then
    maps, under its checksum, and the file would read EIO for good (a nemesis run found this: the
    append's tail block is allocated next to the block before it, where the lost one was)."""
    core.data.batch.enabled = False  # as on a cluster member, whose log can time out: a close flushes
    f = await File.create(core, b"unknown")
    await f.write(0, b"a" * BLOCK_SIZE)
    await flushed(core, f.fh)
    propose = core.meta.propose

    async def commit_then_time_out(command: object, *, epoch: int | None = None) -> object:
        result = await propose(command, epoch=epoch)
        if isinstance(command, c.WriteData):
            raise OutcomeUnknown("test: the proposal timed out after it committed")
        return result

    core.meta.propose = commit_then_time_out  # type: ignore[method-assign]
    await f.write(BLOCK_SIZE, b"b" * 100)
    with pytest.raises(FsError) as info:
        await flushed(core, f.fh)
    assert info.value.errno == errno.EIO
    core.meta.propose = propose  # type: ignore[method-assign]
    await f.write(BLOCK_SIZE + 100, b"c" * 100)
    await flushed(core, f.fh)
    await f.check()  # the mapping that timed out committed: its bytes are the file's
    assert core.allocator.withheld_blocks == 1


async def test_punch_and_clone_wait_for_the_cluster_log_level_zero_range_writes_zeros(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rolling upgrade: while a member's build could not decode PunchHole and CloneRange
    (meta/levels.py LOG_LEVEL), no member proposes them. PUNCH_HOLE answers EOPNOTSUPP (what a
    filesystem without it says), copy_file_range EOPNOTSUPP (the kernel then copies the bytes
    itself), and ZERO_RANGE writes the zeros instead of unmapping. Until Preallocate is allowed,
    fallocate checks the space without reserving it."""
    assert core.meta.log_level() == LOG_LEVEL  # a single node waits for nobody
    f = await File.create(core, b"upgrading")
    g = await File.create(core, b"copy")
    await f.write(0, b"x" * (4 * BLOCK_SIZE))
    monkeypatch.setattr(core.meta, "log_level", lambda: 3)
    with pytest.raises(FsError) as err:
        await core.ops.fallocate(f.fh, 0, BLOCK_SIZE, 0x02 | 0x01)  # PUNCH_HOLE | KEEP_SIZE
    assert err.value.errno == errno.EOPNOTSUPP
    with pytest.raises(FsError) as err:
        await core.ops.copy_file_range(f.fh, 0, g.fh, 0, 2 * BLOCK_SIZE)
    assert err.value.errno == errno.EOPNOTSUPP
    await core.ops.fallocate(f.fh, 100, 3 * BLOCK_SIZE, 0x10)  # ZERO_RANGE: written, not unmapped
    f.model[100 : 100 + 3 * BLOCK_SIZE] = bytes(3 * BLOCK_SIZE)
    await flushed(core, f.fh)
    await f.check()
    assert (await f.stat()).blocks == 4
    monkeypatch.setattr(core.meta, "log_level", lambda: 4)  # PunchHole, but not yet Preallocate
    await core.ops.fallocate(g.fh, 0, 2 * BLOCK_SIZE, 0)  # the space is checked, not reserved
    assert (await core.ops.getattr(g.ino)).size == 2 * BLOCK_SIZE and (await core.ops.getattr(g.ino)).blocks == 0
    monkeypatch.undo()  # the upgrade is over: the same calls share and unmap blocks
    await core.ops.fallocate(f.fh, BLOCK_SIZE, 2 * BLOCK_SIZE, 0x02 | 0x01)
    f.model[BLOCK_SIZE : 3 * BLOCK_SIZE] = bytes(2 * BLOCK_SIZE)
    await f.check()
    assert (await f.stat()).blocks == 2
    assert await core.ops.copy_file_range(f.fh, 0, g.fh, 0, 4 * BLOCK_SIZE) == 4 * BLOCK_SIZE
    await core.ops.release(f.fh)
    await core.ops.release(g.fh)


async def fill_device(core: Core, name: bytes) -> None:
    """Write a file until ENOSPC, in 1 MiB writes and then in single blocks: the device is left
    with room for less than one more block's write (SpaceGuard keeps two blocks in hand)."""
    fh, _ = await core.ops.create(ROOT_INO, name, stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    offset = 0
    for size in (MiB, BLOCK_SIZE):
        while True:
            try:
                await core.ops.write(fh, offset, b"f" * size)
                await flushed(core, fh)
            except FsError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
            offset += size
    await core.ops.release(fh)


async def test_fallocated_space_takes_writes_in_place_on_a_full_device(tmp_path: Path) -> None:
    """What fallocate promises a database or a download manager: once it returned, writes into the
    range never fail for want of space, however full the device got since. The reservation reads
    as zeros, counts in st_blocks, is a hole to SEEK_DATA (as on ext4), and the writes go in place:
    no block more is taken. After a restart the bytes are there and fsck finds the data sound."""
    settings = settings_for(tmp_path)
    core = open_core(settings)
    rng = random.Random(43)
    try:
        f = await File.create(core, b"reserved")
        await core.ops.fallocate(f.fh, 0, 32 * BLOCK_SIZE, 0)
        f.model.extend(bytes(32 * BLOCK_SIZE))
        await f.check()
        assert (await f.stat()).blocks == 32
        assert core.data.data_ranges(await f.stat(), 0) == []
        await core.ops.fallocate(f.fh, 40 * BLOCK_SIZE, 8 * BLOCK_SIZE, 0x01)  # KEEP_SIZE: past the end
        await fill_device(core, b"filler")
        with pytest.raises(FsError) as full:
            await core.ops.write(f.fh, 50 * BLOCK_SIZE, bytes(4 * BLOCK_SIZE))
        assert full.value.errno == errno.ENOSPC, "the device is full outside the reservations"
        free = core.allocator.free_blocks
        await f.write(100, rng.randbytes(3 * BLOCK_SIZE))  # partial blocks at both edges
        await f.write(20 * BLOCK_SIZE, rng.randbytes(12 * BLOCK_SIZE))
        await f.write(41 * BLOCK_SIZE + 7, rng.randbytes(2 * BLOCK_SIZE))  # into the KEEP_SIZE part
        await f.check()
        await flushed(core, f.fh)
        await f.check()
        assert core.allocator.free_blocks == free and (await f.stat()).blocks == 40
        written = [(e.file_block, e.count) for e in core.meta.all_extents(f.ino) if not e.unwritten]
        assert written == [(0, 4), (20, 12), (41, 3)]
        await core.ops.release(f.fh)
    finally:
        core.close()
    core = open_core(settings)
    try:
        ino = core.meta.lookup(ROOT_INO, b"reserved")
        assert ino is not None
        fh = await core.ops.open(ino, os.O_RDONLY)
        assert await core.ops.read(fh, 0, len(f.model) + BLOCK_SIZE) == bytes(f.model)
        await core.ops.release(fh)
    finally:
        core.close()
    assert run_fsck(settings, repair=False, verify_data=True) == 0


async def test_with_room_to_spare_writes_to_reserved_blocks_are_copy_on_write(core: Core) -> None:
    """Writing in place is for a node short of space; otherwise a flush lays its scattered runs
    side by side in fresh blocks (one device write) and the reservation they replace comes back
    after the grace period: the file's block count, its quota and its bytes are the same."""
    f = await File.create(core, b"roomy")
    await core.ops.fallocate(f.fh, 0, 16 * BLOCK_SIZE, 0)
    f.model.extend(bytes(16 * BLOCK_SIZE))
    reserved = {e.dev_block for e in core.meta.all_extents(f.ino)}
    await f.write(BLOCK_SIZE, b"a" * BLOCK_SIZE)
    await f.write(9 * BLOCK_SIZE, b"b" * BLOCK_SIZE)
    await flushed(core, f.fh)
    await f.check()
    written = [e for e in core.meta.all_extents(f.ino) if not e.unwritten]
    assert [e.file_block for e in written] == [1, 9] and written[1].dev_block == written[0].dev_block + 1
    assert not {e.dev_block for e in written} & reserved and (await f.stat()).blocks == 16
    await core.ops.release(f.fh)


async def test_fallocate_checks_before_it_reserves_and_reserves_only_holes(core: Core) -> None:
    """A reservation larger than the free space fails whole (ENOSPC, nothing taken); one over data
    and over an earlier reservation takes only the holes; truncating gives the space back."""
    f = await File.create(core, b"holes")
    free0 = core.ops.statfs().free_blocks
    await f.write(4 * BLOCK_SIZE, b"d" * (2 * BLOCK_SIZE))  # buffered: the reservation flushes it first
    with pytest.raises(FsError) as full:
        await core.ops.fallocate(f.fh, 0, IMAGE_BYTES, 0)
    assert full.value.errno == errno.ENOSPC and core.ops.statfs().free_blocks == free0 - 2
    assert (await f.stat()).size == 6 * BLOCK_SIZE, "nothing changed"
    await core.ops.fallocate(f.fh, 0, 8 * BLOCK_SIZE, 0)
    assert core.ops.statfs().free_blocks == free0 - 2 - 6
    await core.ops.fallocate(f.fh, 2 * BLOCK_SIZE, 10 * BLOCK_SIZE, 0)
    f.model.extend(bytes(12 * BLOCK_SIZE - len(f.model)))
    await f.check()
    assert (await f.stat()).blocks == 12 and core.ops.statfs().free_blocks == free0 - 12
    await f.truncate(BLOCK_SIZE + 10)
    await f.check()
    assert (await f.stat()).blocks == 2
    await core.ops.release(f.fh)


async def test_a_write_in_place_whose_commit_is_unknown_is_not_repeated_in_place(tmp_path: Path) -> None:
    """A WriteData onto reserved blocks that times out may still commit, later. Written in place
    again meanwhile, those blocks would change under the checksum the late commit maps, and the
    file would read EIO for good; or a late commit supersedes the reservation the next write
    counts on. The next write of the range is copy-on-write instead. (The writer is told it is
    short of space, as on a full device, where it writes reservations in place, but the device
    has the room copy-on-write needs.)"""
    settings = settings_for(tmp_path)
    core = open_core(settings)
    core.data.batch.enabled = False  # as on a cluster member, whose log can time out: a close flushes
    try:
        f = await File.create(core, b"unknown")
        await core.ops.fallocate(f.fh, 0, 4 * BLOCK_SIZE, 0)
        f.model.extend(bytes(4 * BLOCK_SIZE))
        core.data.writer.short_of_space = lambda blocks: True  # type: ignore[method-assign]  # as on a full device
        propose = core.meta.propose
        held: list[tuple[object, int | None]] = []

        async def commit_late(command: object, *, epoch: int | None = None) -> object:
            if isinstance(command, c.WriteData) and not held:
                held.append((command, epoch))
                raise OutcomeUnknown("test: the proposal timed out; it commits later")
            if isinstance(command, c.WriteData):  # the late commit lands while the next write is in flight
                await propose(*held[0][:1], epoch=held[0][1])
            return await propose(command, epoch=epoch)

        core.meta.propose = commit_late  # type: ignore[method-assign]
        await f.write(0, b"a" * (2 * BLOCK_SIZE))
        with pytest.raises(FsError) as info:
            await flushed(core, f.fh)
        assert info.value.errno == errno.EIO
        await f.write(100, b"b" * (3 * BLOCK_SIZE))  # over the blocks the late commit maps, and past them
        await flushed(core, f.fh)
        core.meta.propose = propose  # type: ignore[method-assign]
        got = await f.read_all()  # no EIO: every block matches its checksum
        assert got[100:] == bytes(f.model[100:])
        assert got[:100] in (b"a" * 100, bytes(100)), "the write reported failed may or may not be there"
        await core.ops.release(f.fh)
    finally:
        core.close()
    assert run_fsck(settings, repair=False, verify_data=True) == 0
