"""A push's small contents travel inside it and are staged together (repl/receiver.py,
`_stage_inline`; fs/staging.py, `stage_many`): one write to the device for the lot where their
space is contiguous, not a synchronous write on the event loop per file. Against a real
single-node core; the write is counted where the stager hands it to the device layer."""

from __future__ import annotations

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
