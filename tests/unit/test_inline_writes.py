"""Writes a transport serves without a task of their own (`FileOperations.write_is_immediate`,
`KernelHandlers.quick`): the reader itself serves them, so one it is told will not wait must
not wait for anything (a flush, room on the device), or every other request waits with it."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from awsomefsd.daemon.node import Core
from awsomefsd.io.layout import MiB
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO


async def _write(core: Core, fh: int, offset: int, data: bytes, kinds: list[bool]) -> None:
    """Write; append to `kinds` whether it was said to be immediate (and then check it: any
    checkpoint inside it would raise trio.Cancelled, as the scope around it is cancelled from
    the start)."""
    kinds.append(core.ops.write_is_immediate(fh, len(data)))
    if not kinds[-1]:
        await core.ops.write(fh, offset, data)
        return
    with trio.CancelScope() as scope:
        scope.cancel()
        await core.ops.write(fh, offset, data)
    assert not scope.cancelled_caught, f"a write said to be immediate waited (at offset {offset})"


async def test_a_write_short_of_room_is_not_immediate(core: Core) -> None:
    """With buffers too large to ask for a flush, writes are inline until the device is short of
    room for them; then they get a task (such a write flushes every file's buffer, here also
    `g`'s, and waits for frees before it gives up with ENOSPC). Everything written reads back."""
    core.data.buffer.file_buffer_bytes = core.data.write_buffer_bytes = 1 << 30
    fh, _ = await core.ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    other, _ = await core.ops.create(ROOT_INO, b"g", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    await core.ops.write(other, 0, bytes(MiB))
    chunk = os.urandom(256 << 10)
    kinds: list[bool] = []
    offset = 0
    with pytest.raises(FsError) as full:
        while offset < 128 * MiB:  # twice the device
            await _write(core, fh, offset, chunk, kinds)
            offset += len(chunk)
    assert full.value.errno == errno.ENOSPC
    assert kinds.count(True) > len(kinds) // 2 and not kinds[-1]  # the one that failed
    await core.ops.flush(fh)
    assert await core.ops.read(fh, offset - len(chunk), len(chunk)) == chunk
    assert await core.ops.read(fh, 0, len(chunk)) == chunk
    await core.ops.release(fh)
    await core.ops.release(other)


async def test_a_write_that_fills_its_files_buffer_is_not_immediate(core: Core) -> None:
    """At the file's buffer limit a write asks for a flush (and past twice the limit flushes
    itself): from there on it gets a task."""
    core.data.buffer.file_buffer_bytes = MiB
    fh, _ = await core.ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    chunk = bytes(64 << 10)
    kinds: list[bool] = []
    for i in range(48):  # 3 MiB
        await _write(core, fh, i * len(chunk), chunk, kinds)
    assert kinds[:15] == [True] * 15 and not any(kinds[16:32])


async def test_past_the_node_wide_buffer_limit_a_small_write_is_not_immediate(core: Core) -> None:
    """The node's whole buffer counts too: past its limit a write asks for a flush, so it gets a
    task even though its own file holds little."""
    core.data.write_buffer_bytes = 4 * MiB
    chunk = bytes(64 << 10)
    fhs = [(await core.ops.create(ROOT_INO, b"f%d" % i, stat.S_IFREG | 0o644, os.O_RDWR, 0, 0))[0]
           for i in range(12)]
    kinds: list[bool] = []
    for i in range(96):  # 6 MiB
        await _write(core, fhs[i % 12], (i // 12) * len(chunk), chunk, kinds)
    assert kinds[0] and not all(kinds)
    assert core.data.files[core.ops.handle(fhs[0]).ino].dirty.dirty_bytes < core.data.buffer.file_buffer_bytes
