"""The requests a cluster member's reader answers itself (`session.INLINE_MEMBER`): the reader
must stay free to read (the invalidator's notifications may wait for a request it has still to
read), so such a request may wait for nothing, and it must not need the member's coherence (a
delegation may wait for another node). Each handler of the set runs here in an already cancelled
scope, over a core whose coherence fails whenever it is asked: any wait, or any question to it,
fails the test."""

from __future__ import annotations

import os
import stat

import trio

from awsomefsd.daemon.node import Core
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Body, Header, Op
from awsomefsd.fuse.kernel.handlers import KernelHandlers
from awsomefsd.fuse.kernel.session import INLINE_MEMBER
from awsomefsd.meta.records import ROOT_INO


class AskedCoherence:
    """A member's coherence that must not be asked anything by an inline request."""

    name_timeout_s = None

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"an inline request asked the coherence for {name!r}")


def request(opcode: int, nodeid: int, body: bytes) -> tuple[Header, Body]:
    raw = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, 1, nodeid, 0, 0, 0, 0, 0) + body
    return Header(*abi.IN_HEADER.unpack_from(raw)), Body(raw)


async def test_every_request_a_member_serves_inline_waits_for_nothing_and_asks_no_other_node(core: Core) -> None:
    _, inode = await core.ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    await core.ops.setxattr(inode.ino, b"user.k", b"v", 0)
    link = await core.ops.symlink(ROOT_INO, b"l", b"f", 0, 0)
    bodies = {
        Op.GETXATTR: (inode.ino, abi.GETXATTR_IN.pack(64, 0) + b"user.k\0"),
        Op.LISTXATTR: (inode.ino, abi.GETXATTR_IN.pack(64, 0)),
        Op.READLINK: (link.ino, b""),
        Op.STATFS: (ROOT_INO, b""),
    }
    assert set(bodies) == set(INLINE_MEMBER), "a request added to the set needs its case here"
    handlers = KernelHandlers(core.ops).table
    core.ops.coherence = AskedCoherence()  # type: ignore[assignment]
    try:
        for opcode, (nodeid, body) in bodies.items():
            answered = None
            with trio.CancelScope() as scope:
                scope.cancel()  # any checkpoint inside the handler would raise Cancelled
                answered = await handlers[opcode](*request(opcode, nodeid, body))
            assert answered is not None, f"{abi.OP_NAMES[opcode]} waited for something"
    finally:
        core.ops.coherence = None

