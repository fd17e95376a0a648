"""Forward's framing on the Raft wire (wire_calls.py) without sockets: every outcome the leader
can give reaches the follower as the exception the gRPC Forwarder raises, an answer from a node
other than the one asked is ignored, and a connection that ends fails its calls at once. The same
for a member's look or create sent to a directory's holder, and a follower's read point."""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from awsomefsd.meta.raft import CodecError
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.meta.replication.wire_calls import (
    KIND_FORWARD,
    KIND_HOLDER,
    KIND_READ_POINT,
    ServeHolder,
    WireCalls,
    answer_forward,
    answer_holder,
    answer_read_point,
    call_origin,
)


def leader_that(outcome: Callable[[bytes], Awaitable[int]], calls: WireCalls, *, answer_from: int = 2
                ) -> Callable[[bytes], None]:
    """A `send` for `calls.forward` that has `outcome` order the entry and answers as `answer_from`."""
    def send(frame: bytes) -> None:
        assert frame[:1] == KIND_FORWARD and call_origin(frame) == calls.node_id

        async def answer() -> None:
            calls.answered(await answer_forward(frame, outcome), answer_from)

        trio.lowlevel.spawn_system_task(answer)

    return send


def raising(exc: Exception) -> Callable[[bytes], Awaitable[int]]:
    async def accept(entry: bytes) -> int:
        raise exc

    return accept


async def test_the_index_comes_back_and_the_entry_arrives_whole() -> None:
    calls = WireCalls(node_id=3)
    seen: list[bytes] = []

    async def accept(entry: bytes) -> int:
        seen.append(entry)
        return 41

    assert await calls.forward(2, b"header+command", leader_that(accept, calls), timeout_s=5) == 41
    assert seen == [b"header+command"]


@pytest.mark.parametrize(("refusal", "raised"), [
    (NotLeader(5), NotLeader), (ProposalLost("term moved on"), ProposalLost),
    (ProposalTimeout("slow"), ProposalTimeout), (ValueError("no header"), ProposalTimeout),
])
async def test_each_refusal_is_raised_as_forwarding_expects(refusal: Exception, raised: type[Exception]) -> None:
    calls = WireCalls(node_id=3)
    with pytest.raises(raised) as err:
        await calls.forward(2, b"entry", leader_that(raising(refusal), calls), timeout_s=5)
    if isinstance(refusal, NotLeader):
        assert isinstance(err.value, NotLeader) and err.value.leader_id == 5


async def test_an_answer_from_another_node_is_ignored() -> None:
    async def accept(entry: bytes) -> int:
        return 7

    calls = WireCalls(node_id=3)
    with pytest.raises(ProposalTimeout):
        await calls.forward(2, b"entry", leader_that(accept, calls, answer_from=4), timeout_s=0.2)


async def test_a_connection_that_ends_fails_its_calls_at_once() -> None:
    calls = WireCalls(node_id=3)
    with trio.fail_after(2):  # not the call's 60 s deadline
        async with trio.open_nursery() as nursery:
            async def lose_it() -> None:
                await trio.testing.wait_all_tasks_blocked()
                calls.lost(2)

            nursery.start_soon(lose_it)
            with pytest.raises(OSError):
                await calls.forward(2, b"entry", lambda frame: None, timeout_s=60)


def holder_that(serve: ServeHolder | None, calls: WireCalls, *, answer_from: int = 2) -> Callable[[bytes], None]:
    """A `send` for `calls.ask_holder` that has `serve` answer as the holder `answer_from`."""
    def send(frame: bytes) -> None:
        assert frame[:1] == KIND_HOLDER and call_origin(frame) == calls.node_id

        async def answer() -> None:
            calls.answered(await answer_holder(frame, serve), answer_from)

        trio.lowlevel.spawn_system_task(answer)

    return send


async def test_a_holder_call_brings_its_reply_back_and_every_failure_is_a_connection_error() -> None:
    """What the asker's file system expects of `ask_holder` (fs/forwarded_ops.py): the holder's
    reply, or ConnectionError (then it goes the usual way), never another exception."""
    calls = WireCalls(node_id=3)

    async def serve(kind: str, request: bytes) -> bytes:
        if request == b"garbled":
            raise ValueError("no directory")
        return kind.encode() + b" " + request

    assert await calls.ask_holder(2, "create", b"f", holder_that(serve, calls), timeout_s=5) == b"create f"
    with pytest.raises(ConnectionError, match="not up"):
        await calls.ask_holder(2, "look", b"f", holder_that(None, calls), timeout_s=5)
    with pytest.raises(ConnectionError, match="malformed request: no directory"):
        await calls.ask_holder(2, "look", b"garbled", holder_that(serve, calls), timeout_s=5)
    with pytest.raises(ConnectionError, match="no answer"):
        await calls.ask_holder(2, "look", b"f", holder_that(serve, calls, answer_from=4), timeout_s=0.2)
    await fails_at_once_when_the_connection_ends(
        calls, lambda: calls.ask_holder(2, "look", b"f", lambda frame: None, timeout_s=60))


async def fails_at_once_when_the_connection_ends(calls: WireCalls, call: Callable[[], Awaitable[object]]) -> None:
    """`call` waits for node 2's answer when the connection to node 2 ends: ConnectionError, not
    its deadline."""
    async with trio.open_nursery() as nursery:
        async def lose_it() -> None:
            await trio.testing.wait_all_tasks_blocked()
            calls.lost(2)

        nursery.start_soon(lose_it)
        with pytest.raises(ConnectionError, match="ended"):
            await call()


def test_a_holder_frame_of_an_unknown_kind_or_cut_short_is_malformed() -> None:
    with pytest.raises(CodecError, match="unknown kind"):
        call_origin(KIND_HOLDER + struct.pack("<QIB", 1, 3, 9) + b"request")
    with pytest.raises(CodecError, match="shorter"):
        call_origin(KIND_HOLDER + struct.pack("<QI", 1, 3))


async def test_a_read_point_comes_back_or_the_read_goes_through_raft() -> None:
    """`read_point` (RaftNode.read_barrier's fast path): the leader's point, or ConnectionError —
    no lease there now, an answer from another node, a connection that ended — and then the
    driver asks through ReadIndex."""
    calls = WireCalls(node_id=3)

    def leader_with(point: int | None, answer_from: int = 2) -> Callable[[bytes], None]:
        def send(frame: bytes) -> None:
            assert frame[:1] == KIND_READ_POINT and call_origin(frame) == 3
            calls.answered(answer_read_point(frame, point), answer_from)

        return send

    assert await calls.read_point(2, leader_with(1 << 40), timeout_s=5) == 1 << 40
    with pytest.raises(ConnectionError, match="no leader's lease"):
        await calls.read_point(2, leader_with(None), timeout_s=5)
    with pytest.raises(ConnectionError, match="no read point"):
        await calls.read_point(2, leader_with(7, answer_from=4), timeout_s=0.2)
    await fails_at_once_when_the_connection_ends(calls, lambda: calls.read_point(2, lambda frame: None, timeout_s=60))
    assert calls.read_points_asked == 4
    with pytest.raises(CodecError, match="shorter"):
        call_origin(KIND_READ_POINT + struct.pack("<Q", 1))
