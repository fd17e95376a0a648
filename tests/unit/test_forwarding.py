"""The messages a create, a look or a rename in another member's directories travels in
(fs/forwarding.py, design notes 145, 148): they decode to what was encoded, and a malformed one is refused whole, as the
Member service answers it (INVALID_ARGUMENT, nothing run)."""

from __future__ import annotations

import struct

import grpc
import pytest
import trio

from awsomefsd.cluster.rpc import HOLDER_METHODS, HOLDER_TIMEOUT_S, MemberService, ask_holder, holder_timeouts
from awsomefsd.fs import forwarding as fw
from awsomefsd.meta.replication.wire_calls import HOLDER_KINDS
from awsomefsd.rpc.bridge import RpcAbort


def test_requests_and_answers_round_trip() -> None:
    assert fw.decode_look(fw.look_request(17, b"name", 99)) == (17, b"name", 99)
    request = fw.create_request(17, b"f", 1 << 40, 0o100640, 1000, 1001, 3, 7, 123)
    assert fw.decode_create(request) == (17, b"f", 1 << 40, 0o100640, 1000, 1001, 3, 7, 123)
    assert fw.decode_answer(fw.answer(fw.Status.DONE, value=555, applied=9)) == (fw.Status.DONE, 0, 555, 9)
    assert fw.decode_answer(fw.answer(fw.Status.FAILED, error=17)) == (fw.Status.FAILED, 17, 0, 0)
    request = fw.rename_request(17, b"old", 18, b"a new name", 1, 321)
    assert fw.decode_rename(request) == (17, b"old", 18, b"a new name", 1, 321)
    longest = fw.rename_request(17, b"o" * 255, 17, b"n" * 255, 0, 1)
    assert fw.decode_rename(longest) == (17, b"o" * 255, 17, b"n" * 255, 0, 1)
    assert set(HOLDER_METHODS) == set(fw.KINDS)
    assert HOLDER_KINDS == fw.KINDS, "the Raft wire numbers the kinds in this order"


@pytest.mark.parametrize("request_bytes", [b"", b"\0" * 7, fw.look_request(1, b"", 0)[:16],
                                           fw.look_request(1, b"x" * 256, 0)])
def test_a_malformed_look_is_refused(request_bytes: bytes) -> None:
    with pytest.raises(fw.BadRequest):
        fw.decode_look(request_bytes)


@pytest.mark.parametrize("request_bytes", [b"", fw.create_request(1, b"f", 2, 0o100644, 0, 0, 1, 1, 0)[:30],
                                           fw.create_request(1, b"", 2, 0o100644, 0, 0, 1, 1, 0)])
def test_a_malformed_create_is_refused(request_bytes: bytes) -> None:
    with pytest.raises(fw.BadRequest):
        fw.decode_create(request_bytes)


@pytest.mark.parametrize("request_bytes", [b"", fw.rename_request(1, b"o", 2, b"n", 0, 0)[:27],
                                           fw.rename_request(1, b"", 2, b"n", 0, 0),
                                           fw.rename_request(1, b"o", 2, b"", 0, 0),
                                           fw.rename_request(1, b"o" * 256, 2, b"n", 0, 0),
                                           fw.rename_request(1, b"o", 2, b"n" * 256, 0, 0),
                                           # an old name's length past the end of the request
                                           struct.pack(">QQIHQ", 1, 2, 0, 9, 0) + b"on"])
def test_a_malformed_rename_is_refused(request_bytes: bytes) -> None:
    with pytest.raises(fw.BadRequest):
        fw.decode_rename(request_bytes)


def test_an_answer_that_does_not_decode_is_no_answer() -> None:
    with pytest.raises(ConnectionError):
        fw.decode_answer(b"\0" * 5)
    with pytest.raises(ConnectionError):
        fw.decode_answer(bytes([200]) + bytes(18))


def test_the_member_service_answers_a_malformed_request_invalid_argument() -> None:
    service = MemberService(node=None)  # type: ignore[arg-type]
    ran: list[bytes] = []

    async def serve(kind: str, request: bytes) -> bytes:
        ran.append(request)
        fw.decode_create(request)
        return b""

    async def call() -> None:
        with pytest.raises(RpcAbort) as info:
            await service.CreateFor(b"garbage", None)  # type: ignore[arg-type]
        assert info.value.code == grpc.StatusCode.UNAVAILABLE, "not up yet: the caller goes the usual way"
        service.serve_forwarded = serve
        with pytest.raises(RpcAbort) as info:
            await service.CreateFor(b"garbage", None)  # type: ignore[arg-type]
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

    trio.run(call)
    assert ran == [b"garbage"]


def test_a_rename_waits_for_the_holder_past_its_lease_and_margin() -> None:
    """A rename the holder may have made cannot be made again, so it waits for the answer as long
    as the holder may keep its delegations without renewing (design note 148); a look and a create
    wait HOLDER_TIMEOUT_S. Fails with the rename's wait at the default (the delegation nemesis, seed
    575865226, got EIO for a rename a holder just back from a partition answered after 2 s)."""
    waited: dict[str, float] = {}

    class Wire:
        async def ask_holder(self, node: int, kind: str, request: bytes, timeout_s: float) -> bytes:
            waited[kind] = timeout_s
            return b"answer"

    timeouts = holder_timeouts(lease_s=10.0, lease_margin_s=2.0)

    async def ask_each() -> None:
        for kind in fw.KINDS:
            assert await ask_holder(Wire(), lambda: True, 2, kind, b"request",  # type: ignore[arg-type]
                                    timeouts=timeouts) == b"answer"

    trio.run(ask_each)
    assert waited == {fw.LOOK: HOLDER_TIMEOUT_S, fw.CREATE: HOLDER_TIMEOUT_S, fw.RENAME: 10.0 + 2.0 + HOLDER_TIMEOUT_S}
