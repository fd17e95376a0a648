"""The batch of closed files (fs/batch.py) on a single node's core, no mount: a close answered
without waiting, many files in one device write, and a failed write kept for the file's next
fsync while the commit that waited for it goes on."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from awsomefsd.daemon.node import Core
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO


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
