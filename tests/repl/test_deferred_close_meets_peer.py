"""A close left to the batch of closed files (fs/batch.py) meeting the other site's version of the
same file (repl/receiver.py `_files_locked`, fs/data.py `commit_before_peer`), on a real single-node
core with the batch on, the peer spoken to directly (tests/repl/test_receiving.py's harness).

The local write is buffered and its close answered before its data is written. If the peer's
version were applied first, the write would commit on top of it later, as a change that saw it:
the two sites would show a merge neither wrote, and the peer's write would be neither the winner
nor kept. It must instead be this site's own version, judged against the peer's by their stamps:
the later shows on both sites and the other is kept whole (design note 107)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import pytest
import trio

from awsomefsd.crdt import ops as o
from awsomefsd.crdt import wire
from awsomefsd.daemon.node import Core
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.log import LocalLog
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.repl import delta
from awsomefsd.repl.service import SiteService
from tests.repl.test_receiving import MIB, Peer, chunk, file_bytes, push_header
from tests.repl.test_receiving import receiver as receiver  # the fixture

SIZE = 2 * MIB


@pytest.fixture
async def batched(receiver: tuple[Core, SiteService]) -> AsyncIterator[tuple[Core, SiteService]]:
    """The receiving core with `[data] batch_closed_files` on (the default: attached again, as the test
    needs it), and its batch task."""
    core, service = receiver
    assert isinstance(core.log, LocalLog)
    core.data.batch.attach(core.log)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(core.data.batch.run)
        yield core, service
        nursery.cancel_scope.cancel()


async def peer_file(core: Core, service: SiteService, peer: Peer) -> tuple[o.ContentSet, bytearray, int]:
    """The peer's 2 MiB file /big, applied here: its content version, its bytes, its inode."""
    ops, content = peer.new_file(b"big", SIZE)
    data = bytearray(os.urandom(SIZE))
    await service.stage(*chunk(content.stamp, 0, bytes(data), first=True))
    await service.push(push_header(None, ops), memoryview(b""))
    ino = core.meta.lookup(ROOT_INO, b"big")
    assert ino is not None
    return content, data, ino


async def write_and_close_deferred(core: Core, ino: int, offset: int, data: bytes) -> None:
    """An application's pwrite and close: the close answered at once, the data left to the batch."""
    fh = await core.ops.open(ino, os.O_WRONLY)
    await core.ops.write(fh, offset, data)
    assert core.ops.flush_is_immediate(fh), "the close was not left to the batch"
    await core.ops.flush(fh)
    await core.ops.release(fh)
    assert ino in core.data.batch.pending and core.data.has_buffered(ino)


async def peer_writes(core: Core, service: SiteService, peer: Peer, after: o.ContentSet, data: bytearray,
                      offset: int, patch: bytes, *, as_delta: bool) -> bytes:
    """The peer's next version of the file (its own write at `offset`, one block, not having seen
    this site's), pushed; returns its bytes. `as_delta`: as its sender first offers it, the blocks
    it did not write named unchanged from `after` (digests of what both sites held), only its
    write staged; the whole version staged when this site asks for it."""
    body = bytearray(data)
    body[offset:offset + len(patch)] = patch
    newer = o.ContentSet(peer.stamp(), after.object, SIZE, peer.wall)
    header = push_header(after.stamp, [newer])
    if as_delta:
        ino = core.meta.lookup(ROOT_INO, b"big")
        assert ino is not None
        changed, blocks = offset // BLOCK_SIZE, SIZE // BLOCK_SIZE
        kept = [(0, changed), (changed + 1, blocks)]
        header["unchanged"] = [[wire.stamp_text(newer.stamp), wire.stamp_text(after.stamp),
                                [[lo, hi, delta.range_digest(core.meta.extents(ino, lo, hi), lo, hi)] for lo, hi in kept]]]
        await service.stage(*chunk(newer.stamp, offset, patch, first=True))
        reply = await service.push(header, memoryview(b""))
        if not reply.get("restage"):
            return bytes(body)
        header["unchanged"] = []
    await service.stage(*chunk(newer.stamp, 0, bytes(body), first=True))
    await service.push(header, memoryview(b""))
    return bytes(body)


async def kept_bytes(core: Core, ino: int) -> bytes:
    """The copy a conflict keeps in /.conflicts, as this site reads it."""
    inode = core.meta.inode(ino)
    assert inode is not None, "the kept copy is gone"
    return bytes(await core.data.reader.read(inode, 0, inode.size))


@pytest.mark.parametrize(("peer_is_later", "as_delta"), [(True, False), (False, False), (True, True)],
                         ids=["peer-later", "peer-earlier", "peer-later-as-delta"])
async def test_a_close_left_to_the_batch_is_this_sites_own_version_when_the_peers_arrives(
        batched: tuple[Core, SiteService], peer_is_later: bool, as_delta: bool) -> None:
    core, service = batched
    peer = Peer()
    content, data, ino = await peer_file(core, service, peer)
    local = b"a" * BLOCK_SIZE
    peer.wall = time.time_ns() + (10**9 if peer_is_later else -10**9)  # its write 1 s after (before) ours
    written_at = time.time_ns()
    await write_and_close_deferred(core, ino, 0, local)
    assert time.time_ns() - written_at < 10**9, "the machine took a second over a buffered write"
    theirs = await peer_writes(core, service, peer, content, data, MIB, b"b" * BLOCK_SIZE, as_delta=as_delta)
    ours = bytes(local + data[BLOCK_SIZE:])
    shown = await file_bytes(core, b"big")
    assert shown != bytes(local + theirs[BLOCK_SIZE:]), "a merge of the two writes, which neither site wrote"
    assert shown == (theirs if peer_is_later else ours), "the later write does not show"
    conflicts = [r for r in core.meta.site_conflicts() if r["open"]]
    assert [r["kind"] for r in conflicts] == ["content"], "the two writes are not listed as a conflict"
    assert await kept_bytes(core, conflicts[0]["kept_ino"]) == (ours if peer_is_later else theirs), \
        "the losing write is not kept whole in /.conflicts"
