"""Compaction (fs/compactor.py): fragments merged without changing what a reader or stat sees,
shared blocks left alone, a file still being written left until it is quiet or its last writer
closes, and a writer never waiting for more than one window of a compaction of its file."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio

from awsomefsd.daemon.node import Core
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS
from tests.unit.test_fs_api import File, flushed


async def test_compaction_merges_fragments_and_keeps_bytes_size_and_times(running: Core) -> None:
    """Small writes flushed one by one, back to front, leave one extent per block; compaction
    rewrites them as one extent without changing what a reader or stat sees."""
    core = running
    f = await File.create(core, b"fragmented")
    for block in reversed(range(16)):
        await f.write(block * BLOCK_SIZE, bytes([block]) * BLOCK_SIZE)
        await flushed(core, f.fh)
    assert len(core.meta.all_extents(f.ino)) == 16
    before = await f.stat()
    assert await core.data.compact(f.ino) == 15
    assert len(core.meta.all_extents(f.ino)) == 1
    after = await f.stat()
    assert (after.size, after.mtime_ns, after.blocks) == (before.size, before.mtime_ns, before.blocks)
    await f.check()
    await core.ops.release(f.fh)


async def test_compaction_leaves_blocks_a_clone_shares(running: Core) -> None:
    """A fragmented file cloned (copy_file_range) shares its blocks with the copy: compacting
    either would rewrite them into blocks of its own and take the space twice. Only fragments
    nothing else shares are merged."""
    core = running
    f = await File.create(core, b"fragmented")
    for block in reversed(range(16)):
        await f.write(block * BLOCK_SIZE, bytes([block]) * BLOCK_SIZE)
        await flushed(core, f.fh)
    g = await File.create(core, b"clone")
    assert await core.ops.copy_file_range(f.fh, 0, g.fh, 0, 8 * BLOCK_SIZE) == 8 * BLOCK_SIZE
    free = core.ops.statfs().free_blocks
    assert await core.data.compact(g.ino) == 0  # every block of the clone is shared
    assert await core.data.compact(f.ino) == 7  # blocks 8-15 are its own: one extent
    assert [(e.file_block, e.count) for e in core.meta.all_extents(f.ino)] == [(b, 1) for b in range(8)] + [(8, 8)]
    assert core.ops.statfs().free_blocks == free  # the merged blocks come back after the grace
    g.model[:] = f.model[: 8 * BLOCK_SIZE]
    await f.check()
    await g.check()
    await core.ops.release(f.fh)
    await core.ops.release(g.fh)


async def test_a_file_still_being_written_is_compacted_only_once_quiet(running: Core) -> None:
    """A check queued by the small-run count waits for quiet: compacting a file its writer is still
    writing makes the writer wait on the file's lock and is undone by its next small writes. A
    check at the last close, or once the file has been quiet, compacts."""
    core = running
    f = await File.create(core, b"busy")
    for block in reversed(range(8)):
        await f.write(block * BLOCK_SIZE, bytes([block]) * BLOCK_SIZE)
        await flushed(core, f.fh)
    compactor = core.data.compactor
    assert await compactor.check(f.ino, wait_for_quiet=True) == 0, "written just now: not yet"
    assert len(core.meta.all_extents(f.ino)) == 8
    compactor.small_written[f.ino] -= 2.0  # as if quiet for two seconds
    assert await compactor.check(f.ino, wait_for_quiet=True) == 7
    assert len(core.meta.all_extents(f.ino)) == 1
    await f.check()
    await core.ops.release(f.fh)


async def test_only_the_last_writers_close_asks_for_a_compaction(core: Core) -> None:
    """Writers sharing a file (fio's jobs, a database's processes): one of them closing must not
    start a compaction under the others, whose flushes would then wait for it."""
    f = await File.create(core, b"shared")
    other = await core.ops.open(f.ino, os.O_RDWR)
    for block in reversed(range(8)):
        await f.write(block * BLOCK_SIZE, bytes([block]) * BLOCK_SIZE)
        await flushed(core, f.fh)
    compactor = core.data.compactor
    assert compactor.small_runs[f.ino] == 8
    await core.ops.release(other)
    assert compactor.small_runs.get(f.ino) == 8, "another writer still has the file open: not yet"
    await core.ops.release(f.fh)
    assert f.ino not in compactor.small_runs, "the last writer closed: its check is queued"


async def test_a_flush_during_a_compaction_waits_for_one_window_not_the_whole_file(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction rewrites a window (MAX_EXTENT_BLOCKS) at a time under the file's lock and lets
    go between windows: a flush of the file (a writer whose buffer is full waits for one) waits
    for at most the window in progress. (It waited for the whole file: fio's 16 buffered random
    writers ran at a quarter of their rate while a 1 GiB file of 4 KiB fragments was rewritten.)"""
    windows = 4
    f = await File.create(core, b"fragmented")
    for first in (0, 1):  # every other block, then the rest: one extent per block
        for block in range(first, windows * MAX_EXTENT_BLOCKS, 2):
            await f.write(block * BLOCK_SIZE, bytes([block % 251]) * BLOCK_SIZE)
        await flushed(core, f.fh)
    assert len(core.meta.all_extents(f.ino)) == windows * MAX_EXTENT_BLOCKS
    compactor = core.data.compactor
    rewritten: list[int] = []
    one_done = trio.Event()
    rewrite = compactor._rewrite

    async def counting(*args: Any, **kwargs: Any) -> int:
        result = await rewrite(*args, **kwargs)
        rewritten.append(args[2])
        one_done.set()
        return result
    monkeypatch.setattr(compactor, "_rewrite", counting)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(core.data.compact, f.ino)
            await one_done.wait()
            await f.write(0, b"written during the compaction")
            await core.data.flush(f.ino)
            assert len(rewritten) < windows, "the flush waited for the whole compaction"
    await f.check()
    await core.ops.release(f.fh)
