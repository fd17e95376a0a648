"""The requests a cluster member's reader answers itself (`inline.INLINE_MEMBER`,
`INLINE_MEMBER_CACHING`, `KernelHandlers.member_quick`): the reader must stay free to read (the
invalidator's notifications may wait for a request it has still to read), so such a request may
wait for nothing, and it must not need the member's coherence (a delegation may wait for another
node). Each handler of the set runs here in an already cancelled scope, over a core whose
coherence fails whenever it is asked anything but what never waits: any wait, or any other
question to it, fails the test."""

from __future__ import annotations

import os
import stat
from typing import Any

import trio

from awsomefsd.daemon.node import Core
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Body, Header, Op
from awsomefsd.fuse.kernel.handlers import KernelHandlers
from awsomefsd.fuse.kernel.inline import INLINE_MEMBER, INLINE_MEMBER_CACHING
from awsomefsd.meta.records import ROOT_INO


class AskedCoherence:
    """A member's coherence that must not be asked anything by an inline request but the two
    things that never wait: whether the node is strict (it is not), and to queue the release of
    an orphan for the orphan task."""

    name_timeout_s = None
    strict = False

    def __init__(self) -> None:
        self.orphans_released: list[int] = []

    def release_orphan(self, ino: int) -> None:
        self.orphans_released.append(ino)

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"an inline request asked the coherence for {name!r}")


def request(opcode: int, nodeid: int, body: bytes) -> tuple[Header, Body]:
    raw = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, 1, nodeid, 0, 0, 0, 0, 0) + body
    return Header(*abi.IN_HEADER.unpack_from(raw)), Body(raw)


async def answered_without_waiting(handler: Any, opcode: int, nodeid: int, body: bytes) -> Any:
    """The handler's answer, run in an already cancelled scope: any checkpoint inside it raises
    Cancelled, which the scope swallows before the handler finished."""
    answered: Any = None
    finished = False
    with trio.CancelScope() as scope:
        scope.cancel()
        answered = await handler(*request(opcode, nodeid, body))
        finished = True
    assert finished, f"{abi.OP_NAMES[opcode]} waited for something"
    return answered


async def test_every_request_a_member_serves_inline_waits_for_nothing_and_asks_no_other_node(core: Core) -> None:
    fh, inode = await core.ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    await core.ops.setxattr(inode.ino, b"user.k", b"v", 0)
    link = await core.ops.symlink(ROOT_INO, b"l", b"f", 0, 0)
    listing = await core.ops.opendir(ROOT_INO)
    # an orphan still open, with two kernel references: its release and forgets queue its release
    orphan_fh, orphan = await core.ops.create(ROOT_INO, b"gone", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    core.ops.remember(orphan.ino)
    core.ops.remember(orphan.ino)
    await core.ops.unlink(ROOT_INO, b"gone", is_dir=False)
    read_in = abi.READ_IN.pack(listing, 0, 4096, 0, 0, 0, 0)
    bodies = {
        Op.GETXATTR: (inode.ino, abi.GETXATTR_IN.pack(64, 0) + b"user.k\0"),
        Op.LISTXATTR: (inode.ino, abi.GETXATTR_IN.pack(64, 0)),
        Op.READLINK: (link.ino, b""),
        Op.STATFS: (ROOT_INO, b""),
        Op.GETATTR: (inode.ino, b""),
        Op.READDIR: (ROOT_INO, read_in),
        Op.READDIRPLUS: (ROOT_INO, read_in),
        Op.RELEASEDIR: (ROOT_INO, abi.RELEASE_IN.pack(listing, 0, 0, 0)),
        Op.RELEASE: (orphan.ino, abi.RELEASE_IN.pack(orphan_fh, 0, 0, 0)),
        Op.FORGET: (orphan.ino, abi.U64.pack(1)),
        Op.BATCH_FORGET: (0, abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(orphan.ino, 1)),
    }
    assert set(bodies) == set(INLINE_MEMBER_CACHING), "a request added to the set needs its case here"
    assert {Op.GETATTR} == INLINE_MEMBER_CACHING - INLINE_MEMBER, "only a strict member's getattr catches up"
    handlers = KernelHandlers(core.ops)
    coherence = AskedCoherence()
    core.ops.coherence = coherence  # type: ignore[assignment]
    try:
        for opcode, (nodeid, body) in bodies.items():
            await answered_without_waiting(handlers.table[opcode], opcode, nodeid, body)
        assert coherence.orphans_released == [orphan.ino, orphan.ino], "the release and the last forget"
        assert not core.ops.handles.is_open(orphan.ino) and core.ops.handles.find(listing) is None
    finally:
        core.ops.coherence = None
    await core.ops.release(fh)


async def test_a_members_flush_is_answered_inline_only_with_nothing_buffered(core: Core) -> None:
    """`KernelHandlers.member_quick`: FLUSH alone, and only for a file with nothing buffered (a
    flush of buffered data writes it to the device and maps it first)."""
    written_fh, _ = await core.ops.create(ROOT_INO, b"written", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    await core.ops.write(written_fh, 0, b"buffered")
    empty_fh, _ = await core.ops.create(ROOT_INO, b"empty", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    handlers = KernelHandlers(core.ops)
    assert set(handlers.member_quick) == {Op.FLUSH}
    quick = handlers.member_quick[Op.FLUSH]

    def flush_of(fh: int) -> bytes:
        body = abi.FLUSH_IN.pack(fh, 0, 0, 0)
        return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), Op.FLUSH, 1, 0, 0, 0, 0, 0, 0) + body

    core.ops.coherence = AskedCoherence()  # type: ignore[assignment]
    try:
        assert not quick(flush_of(written_fh)), "buffered data: its flush gets a task"
        assert not quick(flush_of(12345)), "an unknown handle: its error comes from a task"
        assert quick(flush_of(empty_fh))
        await answered_without_waiting(handlers.table[Op.FLUSH], Op.FLUSH, 0, abi.FLUSH_IN.pack(empty_fh, 0, 0, 0))
    finally:
        core.ops.coherence = None
    for fh in (written_fh, empty_fh):
        await core.ops.flush(fh)
        await core.ops.release(fh)
