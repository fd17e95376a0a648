"""Every call the other site makes on the link (`Stage`, `Push`; `Cursor`, `Unlink` and `Digest`
take no fields), fed hostile fields: wrong types, oversize values, unknown ids, stamps that are no
stamps. Each must be refused the way the link's handlers turn into a status the caller reads
(wire.WireError: INVALID_ARGUMENT; RpcAbort with its code; never another exception, which the
bridge answers INTERNAL with a traceback in the log), and must change nothing: the cursor stays,
and a well-formed push afterwards still applies.

A receiver on a real single-node core (tests/repl/test_receiving.py's fixture); the peer is this
test speaking the link's messages directly."""

from __future__ import annotations

import random
from typing import Any

import grpc

from awsomefsd.crdt import ops as o
from awsomefsd.crdt import wire
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.daemon.node import Core
from awsomefsd.io.checksum import crc32c
from awsomefsd.repl.service import SiteService
from awsomefsd.rpc.bridge import RpcAbort
from tests.repl.test_receiving import PEER, Peer, chunk, file_bytes, push_header, receiver  # noqa: F401 (fixture)

HOSTILE: list[Any] = [None, True, False, -1, 0, 2**70, -2**70, 1.5, "", "zz", "00" * 40, "a" * 100_000, [], {},
                      [None], [[]], [1, 2, 3], ["00", 0, 0], {"x": 1}, [[0, 1 << 62, 1]], [["", "", []]]]
"""Values a field may be replaced with: each type JSON has, numbers out of every range, hex that
is not hex or is too long, nested lists of the wrong shape."""


def hostile_ops(peer: Peer) -> list[Any]:
    """Operations that decode or not, naming objects and directories this site never heard of."""
    obj, node = o.global_id(PEER, 99), o.global_id(PEER, 1 << 63 | 99)
    unknown = o.Moved(peer.stamp(), node, o.global_id(PEER, 12345), b"x", obj)
    foreign = o.Created(Stamp(peer.wall + 5000, 0, b"\x01" * 16), obj, 0o100644, 0, 0)
    return [["zz"], [o.encode(unknown).hex()], [o.encode(foreign).hex()], ["7b7d"], ["00" * 300_000],
            [o.encode(o.ContentSet(peer.stamp(), obj, -5, 0)).hex()],
            [o.encode(o.ContentSet(peer.stamp(), obj, 1 << 62, 0)).hex()], "notalist", [1, 2]]


async def answer(call: Any) -> str:
    """How the link's handler answers a call: OK, or the status code it is refused with."""
    try:
        await call
    except wire.WireError:
        return "INVALID_ARGUMENT"
    except RpcAbort as abort:
        assert abort.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), abort
        return str(abort.code.name)
    return "OK"


async def test_every_link_call_with_hostile_fields_is_refused_and_changes_nothing(
        receiver: tuple[Core, SiteService]) -> None:  # noqa: F811 (the fixture)
    core, service = receiver
    peer = Peer()
    ops, content = peer.new_file(b"good", 8192)
    body = random.Random(1).randbytes(8192)
    good_chunk = chunk(content.stamp, 0, body, first=True)[0]
    good_push = push_header(None, ops)
    answers: dict[str, str] = {}
    for field in sorted(good_push):  # first: nothing is staged, so no push may apply
        for value in [*HOSTILE, *hostile_ops(peer)] if field == "ops" else HOSTILE:
            if value != good_push[field]:
                header = {**good_push, field: value}
                answers[f"Push {field}={str(value)[:20]}"] = await answer(service.push(header, memoryview(b"")))
    for field in sorted({*good_chunk, "pieces"}):
        for value in HOSTILE:
            if value != good_chunk.get(field):
                header = {**good_chunk, field: value}
                answers[f"Stage {field}={str(value)[:20]}"] = await answer(service.stage(header, memoryview(body)))
    assert service.cursor() is None, "a hostile call applied something"
    assert set(answers.values()) <= {"INVALID_ARGUMENT", "OK", "FAILED_PRECONDITION", "OUT_OF_RANGE"}, \
        {k: v for k, v in answers.items() if v not in ("INVALID_ARGUMENT",)}
    await service.stage(*chunk(content.stamp, 0, body, first=True))
    reply = await service.push(good_push, memoryview(b""))
    assert Stamp.unpack(bytes.fromhex(reply["applied"])) == content.stamp, reply
    assert await file_bytes(core, b"good") == body
    assert crc32c(body) == good_chunk["crc"]
