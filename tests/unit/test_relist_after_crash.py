"""After a crash of the daemon before, the kernel may keep directory listings that show changes
the crash took, and it checks a kept listing only against the directory's mtime, which can come
back equal (the coarse clock of the writeback cache). So a daemon continuing a crashed mount
answers each directory's OPENDIR without FOPEN_KEEP_CACHE (the kernel drops what it kept) until
it has itself listed that directory from the start (`KernelHandlers.relist_directories`). The
mounted `test_a_directory_fsync_reports_the_rename_a_crash_lost` shows the kernel's side."""

from __future__ import annotations

import os
import stat

import pytest

from awsomefsd.daemon.node import Core
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Body, Fopen, Header, Op
from awsomefsd.fuse.kernel.handlers import KernelHandlers
from awsomefsd.meta.records import ROOT_INO


def _request(opcode: int, nodeid: int, body: bytes) -> tuple[Header, Body]:
    raw = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, 1, nodeid, 0, 0, 0, 0, 0) + body
    return Header(*abi.IN_HEADER.unpack_from(raw)), Body(raw)


async def _opendir(handlers: KernelHandlers, ino: int) -> tuple[int, int]:
    """(the handle, the FOPEN flags) an OPENDIR of `ino` answers."""
    out = await handlers.opendir(*_request(Op.OPENDIR, ino, abi.OPEN_IN.pack(os.O_RDONLY, 0)))
    assert isinstance(out, bytes)
    fh, flags, _ = abi.OPEN_OUT.unpack(out)
    return fh, flags


async def _list(handlers: KernelHandlers, ino: int, fh: int, offset: int) -> None:
    await handlers.readdirplus(*_request(Op.READDIRPLUS, ino, abi.READ_IN.pack(fh, offset, 4096, 0, 0, 0, 0)))


async def test_after_a_crash_a_listing_is_kept_only_once_this_daemon_listed_it(core: Core) -> None:
    a = await core.ops.mknod(ROOT_INO, b"a", stat.S_IFDIR | 0o755, 0, 0, 0)
    b = await core.ops.mknod(ROOT_INO, b"b", stat.S_IFDIR | 0o755, 0, 0, 0)
    handlers = KernelHandlers(core.ops, cache_dirs=True)
    kept = Fopen.CACHE_DIR | Fopen.KEEP_CACHE
    assert (await _opendir(handlers, a.ino))[1] == kept, "a mount this daemon served from the start"

    handlers.relist_directories()
    fh, flags = await _opendir(handlers, a.ino)
    assert flags == Fopen.CACHE_DIR, "the kernel drops what it kept, and keeps what it reads now"
    await _list(handlers, a.ino, fh, 1)
    assert (await _opendir(handlers, a.ino))[1] == Fopen.CACHE_DIR, "a listing read from the middle is not ours"
    await _list(handlers, a.ino, fh, 0)
    assert (await _opendir(handlers, a.ino))[1] == kept, "listed from the start by this daemon"
    assert (await _opendir(handlers, b.ino))[1] == Fopen.CACHE_DIR, "every directory on its own"


async def test_a_member_keeps_a_listing_only_while_it_is_current(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a cluster member the coherence layer says whether a kept listing is current (no change
    made elsewhere applied since the kernel read it: tests/cluster/test_member_listings.py); the
    handlers ask at each OPENDIR and tell it of every listing read from the start."""
    d = await core.ops.mknod(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0, 0)
    current: set[int] = set()
    monkeypatch.setattr(core.ops, "listing_current", lambda ino: ino in current)
    monkeypatch.setattr(core.ops, "listed", current.add)
    handlers = KernelHandlers(core.ops, cache_dirs=False)
    handlers.relist_directories()  # nothing to do on a member: its coherence starts with no listing
    fh, flags = await _opendir(handlers, d.ino)
    assert flags == Fopen.CACHE_DIR, "not read yet: whatever the kernel has is dropped"
    await _list(handlers, d.ino, fh, 1)
    assert d.ino not in current, "a listing read from the middle is not one"
    await _list(handlers, d.ino, fh, 0)
    assert (await _opendir(handlers, d.ino))[1] == Fopen.CACHE_DIR | Fopen.KEEP_CACHE
    current.clear()  # a change made elsewhere was applied
    assert (await _opendir(handlers, d.ino))[1] == Fopen.CACHE_DIR
