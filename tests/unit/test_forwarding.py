"""The messages a create or a look in another member's directory travels in (fs/forwarding.py,
design note 145): they decode to what was encoded, and a malformed one is refused whole, as the
Member service answers it (INVALID_ARGUMENT, nothing run)."""

from __future__ import annotations

import grpc
import pytest
import trio

from awsomefsd.cluster.rpc import HOLDER_METHODS, MemberService
from awsomefsd.fs import forwarding as fw
from awsomefsd.rpc.bridge import RpcAbort


def test_requests_and_answers_round_trip() -> None:
    assert fw.decode_look(fw.look_request(17, b"name", 99)) == (17, b"name", 99)
    request = fw.create_request(17, b"f", 1 << 40, 0o100640, 1000, 1001, 3, 7, 123)
    assert fw.decode_create(request) == (17, b"f", 1 << 40, 0o100640, 1000, 1001, 3, 7, 123)
    assert fw.decode_answer(fw.answer(fw.Status.DONE, value=555, applied=9)) == (fw.Status.DONE, 0, 555, 9)
    assert fw.decode_answer(fw.answer(fw.Status.FAILED, error=17)) == (fw.Status.FAILED, 17, 0, 0)
    assert set(HOLDER_METHODS) == set(fw.KINDS)


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
