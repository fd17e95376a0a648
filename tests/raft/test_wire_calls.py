"""Forward's framing on the Raft wire (wire_calls.py) without sockets: every outcome the leader
can give reaches the follower as the exception the gRPC Forwarder raises, an answer from a node
other than the one asked is ignored, and a connection that ends fails its calls at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.meta.replication.wire_calls import KIND_FORWARD, WireCalls, answer_forward, forward_origin


def leader_that(outcome: Callable[[bytes], Awaitable[int]], calls: WireCalls, *, answer_from: int = 2
                ) -> Callable[[bytes], None]:
    """A `send` for `calls.forward` that has `outcome` order the entry and answers as `answer_from`."""
    def send(frame: bytes) -> None:
        assert frame[:1] == KIND_FORWARD and forward_origin(frame) == calls.node_id

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
