"""The background flusher under a backlog (fs/flusher.py): more files older than the flush
interval than a tick's slots flush. Each tick used to start one more flush for every such file
whatever was already waiting, so slow flushes piled tasks up (472 flushes for 120 files here);
now a file has at most one flush waiting for a slot, and the timer leaves alone one at work."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest
import trio

from awsomefsd.daemon.node import Core
from awsomefsd.meta.records import ROOT_INO

FILES = 120
FLUSH_S = 0.03
"""Each flush this long: FLUSH_CONCURRENCY at a time, the 120 files take about a second, ten ticks."""


async def test_a_backlog_of_old_files_gets_one_flush_each_not_one_per_tick(
        running: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    core = running
    flusher = core.data.flusher
    flusher.flush_interval_s = 0.01
    write_runs = flusher.writer.write_runs

    async def slow(*args: Any, **kwargs: Any) -> Any:  # a slow device, or a busy metadata leader
        await trio.sleep(FLUSH_S)
        return await write_runs(*args, **kwargs)
    monkeypatch.setattr(flusher.writer, "write_runs", slow)
    contents: dict[int, bytes] = {}
    for n in range(FILES):  # left open: no close flushes them; only the background flusher does
        fh, inode = await core.ops.create(ROOT_INO, b"f%d" % n, stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
        contents[inode.ino] = os.urandom(1000 + n)
        await core.ops.write(fh, 0, contents[inode.ino])
    with trio.fail_after(30):
        while any(st.dirty for st in core.data.buffer.files.values()) or flusher._waiting or flusher._at_work:
            await trio.sleep(0.02)
    assert flusher.background_flushes <= FILES + 10, f"{flusher.background_flushes} flushes for {FILES} files"
    for ino, body in contents.items():  # every file's bytes are in the metadata's mapping
        inode = core.meta.inode(ino)
        assert inode is not None and inode.size == len(body)
        assert bytes(await core.data.reader.read(inode, 0, inode.size)) == body
