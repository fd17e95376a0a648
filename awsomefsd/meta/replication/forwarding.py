"""Forwarding: a follower's proposals ordered by the leader.

A follower with a `forward` hook (RaftNode.forward) sends the entry, header included, to the
leader, which appends it under the follower's own proposal id (`accept_forwarded`) and answers
with its index once applied there. The follower answers its caller from its own apply of that
entry (proposals.py matches the id), so the result needs no encoding and the caller's next read
on the follower already sees the effect. Without the hook, or with no leader known, a follower
raises NotLeader with the leader it knows of.

A call in flight to a node that stops leading (it was paused: SIGSTOP, a VM freeze, a long GC)
is abandoned as soon as this node learns of the election, and the entry goes to the new leader:
a paused leader's connection stays open and answers nothing until the call's deadline (10 s),
while the group elects another leader within 1-2 s.

When a call fails we cannot always tell whether the leader appended the entry (it may have died
mid-call), so the same entry (same id) is sent again, to whichever node leads next, until it is
applied here or the timeout ends; the id makes a second copy a no-op on every replica alike
(de-duplication, proposals.py). For the same reason no refusal of one copy is final: when this
node leads for a while and its own copy is refused (NotLeader, ProposalLost), an earlier copy may
still be committed, so the loop goes on; a caller only ever hears the result or ProposalTimeout.

On the wire between members of this build, Forward is a request frame and an answer frame on the
Raft wire (wire_calls.py: the same statuses). To a member without the wire (an older build, or
none open yet) it is a unary call of the cluster's Member service over mutual-TLS gRPC: the entry
in, the leader's index of it out (u64); nothing but the index crosses back.
`Forwarder` is the follower's side, `serve_forward` the leader's (cluster/rpc.py serves it). Errors
travel as statuses: FAILED_PRECONDITION "leader=N" (NotLeader: certainly not appended, N is where
to go), ABORTED (ProposalLost), INVALID_ARGUMENT (no header), anything else (fate unknown:
ProposalTimeout). The follower sends the same entry again in every case.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import trio

from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.meta.replication.proposals import DUPLICATE, HEADER, Proposal
from awsomefsd.meta.replication.wire_calls import WireUnavailable
from awsomefsd.rpc.bridge import RpcAbort, unary_call

if TYPE_CHECKING:
    from awsomefsd.meta.replication.driver import RaftNode

log = logging.getLogger(__name__)

RESEND_PAUSE_S = 0.05
FORWARD_METHOD = "/awsomefs.cluster.v1.Member/Forward"
FORWARD_TIMEOUT_S = 10.0
_INDEX = struct.Struct("<Q")

Forward = Callable[[int, bytes], Awaitable[int]]
"""Hand an entry (header included) to the leader with this id; returns once the leader applied it
(its index). Raises NotLeader when that node does not lead (certainly not appended there),
ProposalLost when it was certainly not applied, anything else when its fate is unknown."""


async def propose_via_leader(node: RaftNode, forward: Forward, command: bytes, timeout_s: float) -> Any:
    """Follower side: see the module docstring."""
    p = Proposal(node.proposals.next_id(forwarded=True), command)
    entry = p.entry()
    node.proposals.forwarded[p.pid] = p
    try:
        with trio.move_on_after(timeout_s):
            while not p.done.is_set():
                leader = node.raw.leader_id
                if leader == node.id:  # we lead now: append it here, under the same id
                    try:
                        result = await node.submit(Proposal(p.pid, command), timeout_s)
                    except (NotLeader, ProposalLost) as exc:
                        # Certain for this copy only: one sent before may still be applied.
                        node.forward_retries += 1
                        log.debug("our own copy of a forwarded entry: %s; sending it again", exc)
                        await _wait_or(p.done, RESEND_PAUSE_S)
                        continue
                    if result is DUPLICATE:  # an earlier copy was applied: its result is ours
                        await p.done.wait()
                        result = p.result
                    return result
                if leader == 0:
                    await _wait_or(p.done, node.settings.tick_ms / 1000)
                    continue
                try:
                    index = None
                    with trio.CancelScope() as p.call:  # cancelled once answered here (Proposal.answered)
                        index = await _forward_while_leading(node, forward, leader, entry)
                    p.call = None
                    if index is not None:
                        p.index = index
                        await p.done.wait()
                    elif not p.done.is_set():  # another node leads now: send this copy there
                        node.forward_retries += 1
                        log.debug("node %d stopped leading while forwarding to it; sending it again", leader)
                except NotLeader as exc:  # certainly not appended there; try where it points
                    node.forward_retries += 1
                    await _wait_or(p.done, 0.0 if exc.leader_id not in (0, leader) else RESEND_PAUSE_S)
                except (ProposalLost, ProposalTimeout, OSError) as exc:
                    node.forward_retries += 1
                    log.debug("forwarding to node %d: %s; sending it again", leader, exc)
                    await _wait_or(p.done, RESEND_PAUSE_S)
    finally:
        node.proposals.forwarded.pop(p.pid, None)
    if not p.done.is_set():
        raise ProposalTimeout(f"forwarded entry {p.index or '?'} not applied here in time")
    if p.error is not None:
        raise p.error
    return p.result


async def _forward_while_leading(node: RaftNode, forward: Forward, leader: int, entry: bytes) -> int | None:
    """`forward(leader, entry)`, abandoned (None) as soon as this node learns that another node
    leads (or that none does): a leader that stopped answering (paused, its process frozen, its
    host swapping) keeps the call open until its deadline, while the group elected another within
    an election timeout. The entry is then sent to the new leader under the same id, which is safe
    (de-duplication) and learns its outcome long before the call's deadline."""
    answer: list[int] = []
    failure: list[Exception] = []

    async def call(scope: trio.CancelScope) -> None:
        try:
            answer.append(await forward(leader, entry))
        except (NotLeader, ProposalLost, ProposalTimeout, OSError) as exc:
            failure.append(exc)
        scope.cancel()

    tick_s = node.settings.tick_ms / 1000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, nursery.cancel_scope)
        while node.raw.leader_id == leader:
            await trio.sleep(tick_s)
        nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return answer[0] if answer else None


async def accept_forwarded(node: RaftNode, entry: bytes, timeout_s: float | None = None) -> int:
    """Leader side: order an entry that already carries its proposer's header; returns its index
    once applied here (the follower reads its result from its own apply of the same entry)."""
    if not node.raw.is_leader:
        raise NotLeader(node.raw.leader_id)
    if len(entry) < HEADER.size:
        raise ValueError("a forwarded entry without its header")
    p = Proposal(HEADER.unpack_from(entry), entry[HEADER.size :])
    await node.submit(p, timeout_s)
    return p.index


async def _wait_or(event: trio.Event, timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        await event.wait()


# --- on the wire ----------------------------------------------------------------------------------
class Forwarder:
    """The follower's side of Forward: on the Raft wire when the transport has a wire connection
    to the leader (`wire`, RaftTransport.forward; wire_calls.py), else one unary call on the
    channel the transport keeps to the leader, awaited on trio through the bridge (no thread)."""

    def __init__(self, channel_to: Callable[[int], grpc.Channel | None], timeout_s: float = FORWARD_TIMEOUT_S,
                 wire: Callable[[int, bytes, float], Awaitable[int]] | None = None) -> None:
        self.channel_to = channel_to
        self.timeout_s = timeout_s
        self.wire = wire
        self.over_grpc = 0
        """Calls that went over gRPC (no wire connection to the leader then)."""

    async def __call__(self, leader: int, entry: bytes) -> int:
        if self.wire is not None:
            try:
                return await self.wire(leader, entry, self.timeout_s)
            except WireUnavailable:
                pass
        self.over_grpc += 1
        channel = self.channel_to(leader)
        if channel is None:
            raise NotLeader(0)  # no address for it yet: wait for the next leader or address
        try:
            reply = await unary_call(channel, FORWARD_METHOD, entry, self.timeout_s)
        except ValueError:  # the channel was closed under us (the leader's address changed): not sent
            raise NotLeader(0) from None
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
            if code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("leader="):
                raise NotLeader(int(details.removeprefix("leader="))) from None
            if code == grpc.StatusCode.ABORTED:
                raise ProposalLost(details) from None
            raise ProposalTimeout(f"forwarding to node {leader}: {code.name}: {details}") from None
        return int(_INDEX.unpack(reply)[0])


async def serve_forward(node: RaftNode, request: bytes) -> bytes:
    """The leader's side of Forward, for the gRPC servicer: the entry's index, or a status."""
    try:
        index = await accept_forwarded(node, request)
    except NotLeader as exc:
        raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, f"leader={exc.leader_id}") from None
    except ProposalLost as exc:
        raise RpcAbort(grpc.StatusCode.ABORTED, str(exc)) from None
    except ProposalTimeout as exc:
        raise RpcAbort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
    except ValueError as exc:
        raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    return _INDEX.pack(index)

