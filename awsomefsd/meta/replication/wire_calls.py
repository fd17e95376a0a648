"""Forward on the Raft wire: a follower's entry to the leader, and the leader's answer back.

The wire (awsomefsd.rpc.wire) carries frames one way, dialler to listener, and every pair of
members keeps a connection each way, so a call is two one-way frames: the request on the
follower's connection to the leader, the answer on the leader's connection to the follower,
matched by a call id. What a call means is forwarding.py's (the same statuses as the gRPC
`Forward`, which stays for peers without the wire); this module is only its framing and the table
of calls waiting for an answer.

A lost answer costs little: the follower waits for its own apply of the entry, not for the answer
(forwarding.propose_via_leader cancels the call once the entry is applied there), so only a
refusal (NotLeader, ProposalLost) that never arrives waits for the call's deadline. A call whose
request may not have left (the connection to the leader ended) fails at once with OSError, and
forwarding sends the entry again (the proposal id makes a second copy a no-op).

Frames: every wire frame starts with its kind: `KIND_RAFT` (then transport_grpc's frame of Raft
messages), `KIND_FORWARD` (u64 call id, u32 the asking node, then the entry with its header; the node is
checked against the connection's certificate, and names where to answer on a plain connection), `KIND_ANSWER` (u64 call
id, u8 outcome, then the outcome's payload: the index, the leader to try, or a reason).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from awsomefsd.meta.raft import CodecError
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout

KIND_RAFT = b"R"
KIND_FORWARD = b"F"
KIND_ANSWER = b"A"
MAX_PENDING_CALLS = 65_536

_CALL = struct.Struct("<Q")
_REQUEST = struct.Struct("<QI")
_ANSWER = struct.Struct("<QB")
_U64 = struct.Struct("<Q")
_APPLIED, _NOT_LEADER, _LOST, _UNKNOWN, _INVALID = range(5)


class WireUnavailable(Exception):
    """No wire connection to that member now: use the gRPC call instead."""


@dataclass
class _Call:
    peer_id: int
    done: trio.Event = field(default_factory=trio.Event)
    answer: bytes = b""
    failure: Exception | None = None


class WireCalls:
    """The calls this node made on the wire and waits to hear about, by call id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self._calls: dict[int, _Call] = {}
        self._next_id = 1

    async def forward(self, peer_id: int, entry: bytes, send: Callable[[bytes], None], timeout_s: float) -> int:
        """Send `entry` to `peer_id` (through `send`, which queues a frame on the connection to it)
        and wait for its answer: the leader's index of it, or NotLeader, ProposalLost,
        ProposalTimeout, OSError as the gRPC Forwarder raises them."""
        if len(self._calls) >= MAX_PENDING_CALLS:
            raise ProposalTimeout("too many forwarded entries waiting for an answer")
        call_id = self._next_id
        self._next_id += 1
        call = _Call(peer_id)
        self._calls[call_id] = call
        try:
            send(KIND_FORWARD + _REQUEST.pack(call_id, self.node_id) + entry)
            with trio.move_on_after(timeout_s):
                await call.done.wait()
        finally:
            self._calls.pop(call_id, None)
        if call.failure is not None:
            raise call.failure
        if not call.done.is_set():
            raise ProposalTimeout(f"no answer from node {peer_id} in {timeout_s:.0f} s")
        return _outcome(call.answer, peer_id)

    def answered(self, frame: bytes, sender: int | None) -> None:
        """A KIND_ANSWER frame arrived (from `sender`, when the connection names one)."""
        if len(frame) < 1 + _ANSWER.size:
            raise CodecError("an answer frame shorter than its header")
        (call_id,) = _CALL.unpack_from(frame, 1)
        call = self._calls.get(call_id)
        if call is None or (sender is not None and call.peer_id != sender):
            return  # answered after its caller gave up, or not by the node it asked
        call.answer = frame[1 + _CALL.size :]
        call.done.set()

    def lost(self, peer_id: int) -> None:
        """The connection to `peer_id` ended: its requests may not have left, so their callers
        send again now rather than at their deadline."""
        for call in self._calls.values():
            if call.peer_id == peer_id and not call.done.is_set():
                call.failure = OSError(f"the connection to node {peer_id} ended")
                call.done.set()


def forward_origin(frame: bytes) -> int:
    """The node a KIND_FORWARD frame says it comes from (CodecError when it is too short)."""
    if len(frame) < 1 + _REQUEST.size:
        raise CodecError("a forward frame shorter than its header")
    return int(_REQUEST.unpack_from(frame, 1)[1])


async def answer_forward(frame: bytes, accept: Callable[[bytes], Awaitable[int]]) -> bytes:
    """The leader's side: order the KIND_FORWARD frame's entry (checked by `forward_origin`) with
    `accept` (forwarding.accept_forwarded) and return the KIND_ANSWER frame to send back."""
    (call_id, _) = _REQUEST.unpack_from(frame, 1)
    try:
        index = await accept(frame[1 + _REQUEST.size :])
    except NotLeader as exc:
        outcome, payload = _NOT_LEADER, _U64.pack(exc.leader_id)
    except ProposalLost as exc:
        outcome, payload = _LOST, str(exc).encode()
    except ProposalTimeout as exc:
        outcome, payload = _UNKNOWN, str(exc).encode()
    except ValueError as exc:
        outcome, payload = _INVALID, str(exc).encode()
    else:
        outcome, payload = _APPLIED, _U64.pack(index)
    return KIND_ANSWER + _ANSWER.pack(call_id, outcome) + payload


def _outcome(answer: bytes, peer_id: int) -> int:
    if not answer:
        raise ProposalTimeout(f"an empty answer from node {peer_id}")
    outcome, payload = answer[0], answer[1:]
    if outcome == _APPLIED and len(payload) == _U64.size:
        return int(_U64.unpack(payload)[0])
    if outcome == _NOT_LEADER and len(payload) == _U64.size:
        raise NotLeader(int(_U64.unpack(payload)[0]))
    if outcome == _LOST:
        raise ProposalLost(payload.decode(errors="replace"))
    raise ProposalTimeout(f"forwarding to node {peer_id}: {payload.decode(errors='replace')}")


__all__ = ["KIND_ANSWER", "KIND_FORWARD", "KIND_RAFT", "WireCalls", "WireUnavailable", "answer_forward",
           "forward_origin"]
