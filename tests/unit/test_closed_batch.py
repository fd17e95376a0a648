"""The batch of closed files (fs/batch.py) on a single node's core, no mount: a close answered
without waiting, many files in one device write, and a failed write kept for the file's next
fsync while the commit that waited for it goes on."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from awsomefsd.daemon.node import Core, open_core
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.log import LocalLog
from awsomefsd.meta.records import ROOT_INO
from tests.unit.test_fs_api import settings_for


async def _written_and_closed(core: Core, name: bytes, data: bytes) -> int:
    """Create, write, close (FLUSH + RELEASE); returns the inode. The close must be immediate."""
    fh, inode = await core.ops.create(ROOT_INO, name, stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, data)
    assert core.ops.flush_is_immediate(fh), "a small file's close waited for its data"
    with trio.CancelScope() as scope:
        scope.cancel()  # any checkpoint inside raises Cancelled: an immediate close awaits nothing
        await core.ops.flush(fh)
    assert not scope.cancelled_caught
    await core.ops.release(fh)
    return inode.ino


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    """The unit tests' single node with `[data] batch_closed_files` on (the default: attached again,
    as these tests need it)."""
    core = open_core(settings_for(tmp_path))
    assert isinstance(core.log, LocalLog)
    core.data.batch.attach(core.log)
    try:
        yield core
    finally:
        core.close()


async def test_closed_files_go_to_the_device_together_before_the_commit(core: Core) -> None:
    files = {f"f{i}".encode(): os.urandom(100 + 997 * i) for i in range(40)}
    inos = {name: await _written_and_closed(core, name, data) for name, data in files.items()}
    writes = core.device.writes
    await core.meta.barrier()  # an fsync of any file: the closed ones are written first
    assert core.device.writes - writes <= 2, "one device write for the batch (a pool buffer's worth)"
    assert core.data.batch.batched_files == len(files) and not core.data.batch.pending
    for name, data in files.items():
        assert not core.data.has_buffered(inos[name])
        inode = core.meta.require_inode(inos[name])
        assert inode.size == len(data)
        assert bytes(await core.data.read(inode, 0, len(data))) == data


async def test_a_failed_batch_is_reported_by_the_files_next_fsync_and_the_commit_goes_on(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    ino = await _written_and_closed(core, b"lost", os.urandom(5000))

    def broken(*_args: object) -> None:
        raise OSError(errno.EIO, "the device refused the write")

    monkeypatch.setattr(core.device, "write_from", broken)
    other = await _written_and_closed(core, b"other", b"x")
    await core.meta.barrier()  # must not raise: the commit goes on without the lost data
    monkeypatch.undo()
    assert core.meta.require_inode(other).size == 0
    fh = await core.ops.open(ino, os.O_WRONLY)
    with pytest.raises(FsError) as lost:
        await core.ops.fsync(fh, datasync=False)
    assert lost.value.errno == errno.EIO
    await core.ops.fsync(fh, datasync=False)  # reported once
    await core.ops.release(fh)


async def test_a_close_whose_data_would_pass_the_quota_flushes_and_reports_edquot(core: Core) -> None:
    """A write into a hole grows nothing, so write() does not meet the volume's quota; its flush
    does. A close deferred to the batch would hear nothing of that (a file closed once has no next
    close): such a close flushes and reports EDQUOT itself (SpaceGuard.buffered_fit)."""
    from awsomefsd.meta import commands as c
    from tests.unit.test_fs_api import File

    number = await core.ops.new_ino()
    volume = await core.meta.propose_volume(c.CreateVolume(number, "q", number, 4 * BLOCK_SIZE, 0, 1))
    f = await File.create(core, b"f", parent=volume.root)
    await f.write(0, b"q" * 3 * BLOCK_SIZE)
    await core.ops.flush(f.fh)  # fits: deferred
    await core.ops.fsync(f.fh, False)
    await f.truncate(20 * BLOCK_SIZE)
    await core.ops.write(f.fh, 10 * BLOCK_SIZE, b"h" * 2 * BLOCK_SIZE)  # into the hole: 2 blocks, 1 left
    with pytest.raises(FsError) as info:
        await core.ops.flush(f.fh)
    assert info.value.errno == errno.EDQUOT
    await core.ops.release(f.fh)


async def test_df_and_du_count_a_closed_files_data_before_the_batch_writes_it(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ext4 counts delayed allocation: a file's st_blocks and the free space statfs reports
    count its closed data at once, the same before the batch writes it as after (they once
    counted it only then, and statfs a guess before); a rewrite of mapped blocks takes none more;
    and data whose write failed gives its blocks back."""
    free = core.ops.statfs().free_blocks
    ino = await _written_and_closed(core, b"counted", b"c" * (3 * BLOCK_SIZE + 100))
    assert core.data.batch.pending, "still waiting for the batch"
    assert ((await core.ops.getattr(ino)).blocks, core.ops.statfs().free_blocks) == (4, free - 4)
    await core.meta.barrier()  # the batch writes it
    assert not core.data.batch.pending
    assert ((await core.ops.getattr(ino)).blocks, core.ops.statfs().free_blocks) == (4, free - 4)

    fh = await core.ops.open(ino, os.O_WRONLY)
    await core.ops.write(fh, BLOCK_SIZE, b"r" * 10)  # over a mapped block: replaces it
    await core.ops.write(fh, 9 * BLOCK_SIZE, b"h" * 10)  # past the end, after a hole: one more
    await core.ops.flush(fh)
    await core.ops.release(fh)
    assert core.data.batch.pending
    assert ((await core.ops.getattr(ino)).blocks, core.ops.statfs().free_blocks) == (5, free - 5)

    def broken(*_args: object) -> None:
        raise OSError(errno.EIO, "the device refused the write")

    monkeypatch.setattr(core.device, "write_from", broken)
    lost = await _written_and_closed(core, b"lost", b"l" * (2 * BLOCK_SIZE))
    assert ((await core.ops.getattr(lost)).blocks, core.ops.statfs().free_blocks) == (2, free - 7)
    await core.meta.barrier()  # both writes fail: the buffered data is gone, and so are its blocks
    monkeypatch.undo()
    assert (await core.ops.getattr(lost)).blocks == 0 and (await core.ops.getattr(ino)).blocks == 4
    assert core.ops.statfs().free_blocks == free - 4


async def test_df_in_a_volume_counts_its_files_closed_data_before_the_batch_writes_it(core: Core) -> None:
    from awsomefsd.meta import commands as c

    number = await core.ops.new_ino()
    volume = await core.meta.propose_volume(c.CreateVolume(number, "v", number, 64 * BLOCK_SIZE, 0, 1))
    free = core.ops.statfs(volume.root).free_blocks
    fh, _ = await core.ops.create(volume.root, b"f", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, b"v" * 5 * BLOCK_SIZE)
    await core.ops.flush(fh)
    await core.ops.release(fh)
    assert core.data.batch.pending and core.ops.statfs(volume.root).free_blocks == free - 5
    await core.meta.barrier()
    assert core.ops.statfs(volume.root).free_blocks == free - 5


async def test_a_time_set_over_a_closed_files_data_is_kept_and_its_write_names_when_it_came(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """tar: write, close (left to the batch), then futimens to the archive's time. The time commits
    at once; the batch's WriteData keeps it and names when the data was written, which a linked
    site stamps the content with (meta/sites/capture.py `content_time`): the archive's time is no
    write's, and the batch's own is later than the write."""
    from awsomefsd.meta import commands as c

    proposed: list[c.WriteData] = []
    real_propose = core.meta.propose

    async def recording(command: object, *, epoch: int | None = None, hurry: bool = True) -> object:
        if isinstance(command, c.WriteData):
            proposed.append(command)
        return await real_propose(command, epoch=epoch, hurry=hurry)

    monkeypatch.setattr(core.meta, "propose", recording)
    before = core.data.buffer.clock_ns()
    ino = await _written_and_closed(core, b"from-tar", b"t" * 3000)
    after = core.data.buffer.clock_ns()
    archived = 1_500_000_000_123_456_789
    assert (await core.ops.setattr(ino, mtime_ns=archived)).mtime_ns == archived
    assert core.data.batch.pending, "the data still waits for the batch"
    await core.meta.barrier()
    (command,) = proposed
    assert not command.touch and before <= command.mtime_ns <= after, "the write's time, the times kept"
    inode = await core.ops.getattr(ino)
    assert (inode.mtime_ns, inode.size) == (archived, 3000)
