"""A push's small contents travel inside it and are staged together (repl/receiver.py,
`_stage_inline`; fs/staging.py, `stage_many`): one write to the device for the lot where their
space is contiguous, not a synchronous write on the event loop per file. Against a real
single-node core; the write is counted where the stager hands it to the device layer. And the
sending side's mirror: a push's small contents read together (fs/reader.py, `read_files`)."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

import grpc
import pytest
import trio

from awsomefsd.crdt import ops as o
from awsomefsd.crdt import wire
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.crdt.tree import ROOT
from awsomefsd.daemon.node import Core
from awsomefsd.io.checksum import crc32c
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.repl import receiver as receiver_module
from awsomefsd.repl.service import SiteService
from awsomefsd.rpc.bridge import RpcAbort
from tests.repl.test_receiving import MIB, PEER, Peer, file_bytes, push_header, receiver, small_files  # noqa: F401


def counting_writes(core: Core, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[int]:
    """The block runs of each write the stager asks of the device layer (`fail`: each fails)."""
    io = core.data.stager.io
    write = io.write_async
    writes: list[int] = []

    async def counted(runs: Any) -> list[bytes]:
        writes.append(len(runs))
        if fail:
            raise OSError(5, "the device refused the write")
        return await write(runs)
    monkeypatch.setattr(io, "write_async", counted)
    return writes


async def test_a_pushs_small_contents_are_staged_in_one_write(receiver: tuple[Core, SiteService],  # noqa: F811
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """60 files of 1 byte to 5 KiB, one all zeros (a hole, nothing written) and one empty: one
    write of every non-zero block run, and each file reads back as sent."""
    core, service = receiver
    peer = Peer()
    ops, inline, data, files = small_files(peer, 60)
    for n, (name, body) in enumerate(((b"zeros", bytes(8192)), (b"empty", b""))):
        obj = o.global_id(PEER, 5000 + n)
        created = o.Created(peer.stamp(), obj, stat.S_IFREG | 0o644, 0, 0)
        content = o.ContentSet(peer.stamp(), obj, len(body), peer.wall)
        ops += [created, content, o.Moved(peer.stamp(), o.global_id(PEER, 1 << 63 | (5000 + n)), ROOT, name, obj)]
        inline.append([wire.stamp_text(content.stamp), len(body), crc32c(body)])
        data += body
        files[name] = body
    data = bytes(data)
    writes = counting_writes(core, monkeypatch)
    with trio.fail_after(30):
        reply = await service.push({**push_header(None, ops), "inline": inline}, memoryview(data))
    assert Stamp.unpack(bytes.fromhex(reply["applied"])) == ops[-1].stamp
    assert writes == [60], f"the stager's writes, by runs each: {writes}"
    for name, body in files.items():
        assert await file_bytes(core, name) == body


async def test_a_failed_write_stages_none_of_them_and_gives_their_space_back(
        receiver: tuple[Core, SiteService], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The device refuses the write: the push fails, nothing of it is left staged, the space it
    reserved is free again, and the same push applies once the device takes writes."""
    core, service = receiver
    peer = Peer()
    ops, inline, data, files = small_files(peer, 20)
    free = core.data.space.allocator.free_blocks
    counting_writes(core, monkeypatch, fail=True)
    with pytest.raises(OSError):
        await service.push({**push_header(None, ops), "inline": inline}, memoryview(data))
    assert not service._staged, "a staging left behind by a push whose write failed"
    assert core.data.space.allocator.free_blocks == free, "the space reserved for the failed write"
    monkeypatch.undo()
    reply = await service.push({**push_header(None, ops), "inline": inline}, memoryview(data))
    assert Stamp.unpack(bytes.fromhex(reply["applied"])) == ops[-1].stamp
    for name, body in files.items():
        assert await file_bytes(core, name) == body


async def test_what_a_sender_can_make_us_hold_staged_is_bounded(
        receiver: tuple[Core, SiteService], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Bytes staged and not yet pushed stay within MAX_STAGED_BYTES, for a Stage call and for a
    push's inline contents alike: past it RESOURCE_EXHAUSTED, nothing of the refused call is kept,
    and once a push takes what waits, the same contents are staged and applied."""
    core, service = receiver
    monkeypatch.setattr(receiver_module, "MAX_STAGED_BYTES", 3 * MIB)
    peer = Peer()
    ops, content = peer.new_file(b"big", 2 * MIB)
    body = os.urandom(2 * MIB)
    await service.stage({"stamp": wire.stamp_text(content.stamp), "offset": 0, "crc": crc32c(body)},
                        memoryview(body))
    with pytest.raises(RpcAbort) as refused:  # 2 MiB held + 1.5 MiB more
        other = o.ContentSet(peer.stamp(), o.global_id(PEER, 8), 3 * MIB // 2, peer.wall)
        chunk = bytes(3 * MIB // 2)
        await service.stage({"stamp": wire.stamp_text(other.stamp), "offset": 0, "crc": crc32c(chunk)},
                            memoryview(chunk))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    small_ops, inline, data, files = small_files(peer, 400, first=3000)  # 1.2 MiB: fits alone, not beside it
    assert MIB < len(data) < 2 * MIB
    with pytest.raises(RpcAbort) as refused:
        await service.push({**push_header(None, small_ops), "inline": inline}, memoryview(data))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(service._staged) == 1, "only the big file's staging waits"
    reply = await service.push(push_header(None, ops), memoryview(b""))
    assert Stamp.unpack(bytes.fromhex(reply["applied"])) == content.stamp
    assert not service._staged
    reply = await service.push({**push_header(content.stamp, small_ops), "inline": inline}, memoryview(data))
    assert Stamp.unpack(bytes.fromhex(reply["applied"])) == small_ops[-1].stamp
    assert await file_bytes(core, b"big") == body
    for name, small in files.items():
        assert await file_bytes(core, name) == small


async def test_the_sender_reads_a_pushs_small_contents_together(receiver: tuple[Core, SiteService],  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side (fs/reader.py `read_files`, what the shipper reads a push's small contents
    with): 60 small files lying together on the device come in one device read, and each reads
    as `read` reads it, among files it must read the usual way (buffered bytes, empty, a size
    asked past the end). A bad block is EIO, never bytes."""
    core, service = receiver
    peer = Peer()
    ops, inline, data, files = small_files(peer, 60)
    await service.push({**push_header(None, ops), "inline": inline}, memoryview(data))
    fh, buffered = await core.ops.create(ROOT_INO, b"buffered", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    await core.ops.write(fh, 0, b"still in memory")
    _, empty = await core.ops.create(ROOT_INO, b"empty", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
    inodes = []
    for name in files:
        ino = core.meta.lookup(ROOT_INO, name)
        assert ino is not None
        inode = core.meta.inode(ino)
        assert inode is not None
        inodes.append(inode)
    wanted = [(inode, inode.size) for inode in inodes] + [(buffered, 15), (empty, 0), (inodes[0], inodes[0].size + 9)]
    device = core.data.reader.io.device
    reads: list[int] = []
    read_into = device.read_into

    def counted(view: Any, offset: int) -> None:
        reads.append(len(view))
        read_into(view, offset)
    monkeypatch.setattr(device, "read_into", counted)
    got = await core.data.reader.read_files(wanted)
    # the 60 in one read; the first file, asked again, is its block again (runs never overlap in a read)
    assert sorted(reads) == [BLOCK_SIZE, 60 * BLOCK_SIZE], f"device reads of {reads} bytes for 60 files written together"
    monkeypatch.setattr(device, "read_into", read_into)
    assert [bytes(g) for g in got] == [bytes(await core.data.reader.read(i, 0, n)) for i, n in wanted]
    assert [bytes(g) for g in got[:60]] == list(files.values())
    assert bytes(got[60]) == b"still in memory" and got[61] == b""
    victim = core.meta.extents(inodes[7].ino, 0, 1)[0]
    device.write_from(memoryview(bytes(BLOCK_SIZE)), victim.dev_block * BLOCK_SIZE)  # a bad block
    with pytest.raises(FsError) as failed:
        await core.data.reader.read_files(wanted[:60])
    assert failed.value.errno == errno.EIO
