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
forwarding sends the entry again (the proposal id makes a second copy a no-op). An answer made
while the connection back to the asker is being redialled waits for the next one (transport.py
`_answer_now`); call ids start at random, so it cannot match a call of the asker's next process.

A follower's read point travels the same way (`KIND_READ_POINT`, design note 153): the leader's
wire reader answers it from its lease at once, without a task or a turn of either Raft loop, where a
ReadIndex crossed three of them; a leader that cannot (no lease now, not leading) says so and the
follower asks through Raft.

The same calls carry a member's look or create to the member holding its directory (fs/forwarding.py
says what they mean; design note 147): the wire's round trip is a fraction of a gRPC call's
(note 125), and the asker's kernel waits for it.

Frames: every wire frame starts with its kind: `KIND_RAFT` (then transport_grpc's frame of Raft
messages), `KIND_FORWARD` (u64 call id, u32 the asking node, then the entry with its header; the node is
checked against the connection's certificate, and names where to answer on a plain connection),
`KIND_HOLDER` (u64 call id, u32 the asking node, u8 what: 0 look, 1 create, then the request),
`KIND_READ_POINT` (u64 call id, u32 the asking node), `KIND_ANSWER` (u64 call id, u8 outcome,
then the outcome's payload: the index or read point, the leader to try, a reason, or a holder's
reply). A build before level 25 (HOLDER_WIRE_LEVEL) takes a KIND_HOLDER
frame for a malformed one and closes the connection, so none is sent before every member's build
knows it; nor a KIND_READ_POINT frame before level 26 (READ_POINT_WIRE_LEVEL).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from awsomefsd.meta.raft import CodecError
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout

log = logging.getLogger(__name__)

KIND_RAFT = b"R"
KIND_FORWARD = b"F"
KIND_ANSWER = b"A"
KIND_HOLDER = b"H"
KIND_READ_POINT = b"P"
HOLDER_KINDS = ("look", "create")
"""What a KIND_HOLDER frame asks, by its code (fs/forwarding.py's kinds)."""
MAX_PENDING_CALLS = 65_536

_CALL = struct.Struct("<Q")
_REQUEST = struct.Struct("<QI")
_HOLDER = struct.Struct("<QIB")
_ANSWER = struct.Struct("<QB")
_U64 = struct.Struct("<Q")
_APPLIED, _NOT_LEADER, _LOST, _UNKNOWN, _INVALID, _REPLY, _UNAVAILABLE = range(7)
ServeHolder = Callable[[str, bytes], Awaitable[bytes]]
"""`await serve(kind, request)`: this member's file system answering another's look or create (a
ValueError: a request that does not decode)."""


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
        self._next_id = int.from_bytes(os.urandom(7), "little") + 1
        """Call ids start at random: an answer the peer queued for this node's previous process (it
        sends answers on its next connection when none is open) cannot match a call of this one."""
        self.holder_calls = 0
        """Looks and creates this node sent to a holder here (awsomefs_holder_calls_on_wire_total)."""
        self.read_points_asked = 0
        """Read points this node asked the leader for on the wire (awsomefs_raft_read_points_asked_total)."""

    async def forward(self, peer_id: int, entry: bytes, send: Callable[[bytes], None], timeout_s: float) -> int:
        """Send `entry` to `peer_id` (through `send`, which queues a frame on the connection to it)
        and wait for its answer: the leader's index of it, or NotLeader, ProposalLost,
        ProposalTimeout, OSError as the gRPC Forwarder raises them."""
        answer = await self._call(peer_id, lambda call_id: KIND_FORWARD + _REQUEST.pack(call_id, self.node_id) + entry,
                                  send, timeout_s)
        if answer is None:
            raise ProposalTimeout(f"no answer from node {peer_id} in {timeout_s:.0f} s")
        return _outcome(answer, peer_id)

    async def ask_holder(self, peer_id: int, kind: str, request: bytes, send: Callable[[bytes], None],
                         timeout_s: float) -> bytes:
        """Send a look or a create to the member holding its directory and return its reply;
        ConnectionError when it did not answer in time, could not serve it, or the connection
        ended."""
        code = HOLDER_KINDS.index(kind)
        self.holder_calls += 1
        answer = await self._ask(peer_id, lambda call_id: KIND_HOLDER + _HOLDER.pack(call_id, self.node_id, code)
                                 + request, send, timeout_s, "answer")
        if answer[:1] == bytes([_REPLY]):
            return answer[1:]
        raise ConnectionError(f"node {peer_id} did not serve the {kind}: {answer[1:].decode(errors='replace')}")

    async def read_point(self, peer_id: int, send: Callable[[bytes], None], timeout_s: float) -> int:
        """Ask the leader `peer_id` for a read point (its commit index while its lease holds);
        ConnectionError when it cannot answer so now, did not answer in time, or the connection ended."""
        self.read_points_asked += 1
        answer = await self._ask(peer_id, lambda call_id: KIND_READ_POINT + _REQUEST.pack(call_id, self.node_id),
                                 send, timeout_s, "read point")
        if answer[:1] == bytes([_APPLIED]) and len(answer) == 1 + _U64.size:
            return int(_U64.unpack_from(answer, 1)[0])
        raise ConnectionError(f"node {peer_id} gave no read point: {answer[1:].decode(errors='replace')}")

    async def _ask(self, peer_id: int, frame_for: Callable[[int], bytes], send: Callable[[bytes], None],
                   timeout_s: float, what: str) -> bytes:
        """`_call` for a caller that has another way to go: every failure (no `what` in time, the
        connection ended, too many calls waiting) is a ConnectionError."""
        try:
            answer = await self._call(peer_id, frame_for, send, timeout_s)
        except (OSError, ProposalTimeout) as exc:
            raise ConnectionError(str(exc)) from None
        if answer is None:
            raise ConnectionError(f"no {what} from node {peer_id} in {timeout_s:.1f} s")
        return answer

    async def _call(self, peer_id: int, frame_for: Callable[[int], bytes], send: Callable[[bytes], None],
                    timeout_s: float) -> bytes | None:
        """Send the frame `frame_for(call_id)` and wait for its answer's payload (None: none in
        time); OSError when the connection ended first."""
        if len(self._calls) >= MAX_PENDING_CALLS:
            raise ProposalTimeout("too many calls waiting for an answer")
        call_id = self._next_id
        self._next_id += 1
        call = _Call(peer_id)
        self._calls[call_id] = call
        try:
            send(frame_for(call_id))
            with trio.move_on_after(timeout_s):
                await call.done.wait()
        finally:
            self._calls.pop(call_id, None)
        if call.failure is not None:
            raise call.failure
        return call.answer if call.done.is_set() else None

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


def call_origin(frame: bytes, sender: int | None = None) -> int:
    """The node a KIND_FORWARD, KIND_HOLDER or KIND_READ_POINT frame says it comes from (CodecError
    when it is too short, asks for something unknown, or claims another node than `sender`, the
    one its connection's certificate names)."""
    header = _HOLDER if frame[:1] == KIND_HOLDER else _REQUEST
    if len(frame) < 1 + header.size:
        raise CodecError("a call frame shorter than its header")
    fields = header.unpack_from(frame, 1)
    if header is _HOLDER and fields[2] >= len(HOLDER_KINDS):
        raise CodecError(f"a holder call of unknown kind {fields[2]}")
    if sender is not None and fields[1] != sender:
        raise CodecError(f"a call claiming to come from node {fields[1]}")
    return int(fields[1])


async def answer_holder(frame: bytes, serve: ServeHolder | None) -> bytes:
    """The holder's side: the KIND_ANSWER frame for a KIND_HOLDER frame (checked by `call_origin`),
    served by `serve` (None: this member's file system is not up yet, and the asker goes the usual
    way)."""
    (call_id, origin, code) = _HOLDER.unpack_from(frame, 1)
    if serve is None:
        outcome, payload = _UNAVAILABLE, b"this member's file system is not up"
    else:
        try:
            outcome, payload = _REPLY, await serve(HOLDER_KINDS[code], frame[1 + _HOLDER.size:])
        except ValueError as exc:
            outcome, payload = _INVALID, f"malformed request: {exc}".encode()
        except Exception as exc:  # a bug here must not end the transport's nursery (and the daemon)
            log.exception("serving node %d's %s failed", origin, HOLDER_KINDS[code])
            outcome, payload = _UNAVAILABLE, f"the holder failed: {exc!r}".encode()
    return KIND_ANSWER + _ANSWER.pack(call_id, outcome) + payload


def answer_read_point(frame: bytes, point: int | None) -> bytes:
    """The leader's side: the KIND_ANSWER frame for a KIND_READ_POINT frame (checked by
    `call_origin`), given this node's read point from its lease now (None: it has none)."""
    (call_id, _) = _REQUEST.unpack_from(frame, 1)
    if point is None:
        return KIND_ANSWER + _ANSWER.pack(call_id, _UNAVAILABLE) + b"no leader's lease here now"
    return KIND_ANSWER + _ANSWER.pack(call_id, _APPLIED) + _U64.pack(point)


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


__all__ = ["HOLDER_KINDS", "KIND_ANSWER", "KIND_FORWARD", "KIND_HOLDER", "KIND_RAFT", "KIND_READ_POINT", "ServeHolder",
           "WireCalls", "WireUnavailable", "answer_forward", "answer_holder", "answer_read_point", "call_origin"]
