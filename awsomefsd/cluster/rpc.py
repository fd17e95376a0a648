"""Member-to-member calls besides Raft itself, and the local control socket.

`Member.Forward` (on the mTLS cluster listener): a follower hands the leader a metadata entry,
header included; the leader appends and applies it and answers with its index. The follower takes
the command's result from its own apply of that entry (RaftNode._propose_via_leader), so nothing but
the index crosses the wire. Error mapping: FAILED_PRECONDITION "leader=N" (not the leader:
NotLeader, certainly not appended), ABORTED (ProposalLost), anything else (fate unknown:
ProposalTimeout). The follower sends the same entry again in every case; de-duplication by the
entry's id makes that safe (RaftNode._propose_via_leader).

`Control` (on `<state>/control.sock`, mode 0600, so root or the daemon's user only): what the CLI
asks a running daemon — the join token, token rotation, node removal, the cluster's status. JSON in,
JSON out; it is an operator interface, not a hot path.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import trio

from awsomefsd.meta.replication.driver import RaftNode
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.rpc.bridge import Binding, RpcAbort

log = logging.getLogger(__name__)

MEMBER_SERVICE = "awsomefs.cluster.v1.Member"
FORWARD_METHOD = f"/{MEMBER_SERVICE}/Forward"
PROGRESS_METHOD = f"/{MEMBER_SERVICE}/Progress"
PROGRESS_TIMEOUT_S = 3.0
CONTROL_SERVICE = "awsomefs.cluster.v1.Control"
FORWARD_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 30.0
_U64 = struct.Struct("<Q")


class MemberService:
    def __init__(self, node: RaftNode, progress: Callable[[], dict[str, Any]] | None = None) -> None:
        self.node = node
        self.progress = progress
        self.forwarded = 0

    async def Forward(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            index = await self.node.propose_forwarded(request)
        except NotLeader as exc:
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, f"leader={exc.leader_id}") from None
        except ProposalLost as exc:
            raise RpcAbort(grpc.StatusCode.ABORTED, str(exc)) from None
        except ProposalTimeout as exc:
            raise RpcAbort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except ValueError as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.forwarded += 1
        return _U64.pack(index)

    async def Progress(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The leader's view of replication (each member's match index), for `status` on a follower."""
        if self.progress is None:
            raise RpcAbort(grpc.StatusCode.UNIMPLEMENTED, "no progress here")
        return json.dumps(self.progress(), sort_keys=True).encode()

    def binding(self) -> Binding:
        return Binding(_generic_adder(MEMBER_SERVICE, ("Forward", "Progress")), self)


async def ask_progress(channel_to: Callable[[int], grpc.Channel | None], leader: int,
                       timeout_s: float = PROGRESS_TIMEOUT_S) -> dict[str, Any]:
    """Member.Progress of `leader` (raises ConnectionError when it cannot be asked)."""
    channel = channel_to(leader)
    if channel is None:
        raise ConnectionError(f"no address for node {leader}")
    try:
        future = channel.unary_unary(PROGRESS_METHOD).future(b"", timeout=timeout_s)
        reply = await await_future(future)
    except (grpc.RpcError, ValueError) as exc:
        raise ConnectionError(str(exc)) from None
    result: dict[str, Any] = json.loads(reply)
    return result


class Forwarder:
    """The follower's side of Forward: one unary call on the channel the transport keeps to the
    leader, awaited on trio without a thread (the call's future wakes the loop)."""

    def __init__(self, channel_to: Callable[[int], grpc.Channel | None], timeout_s: float = FORWARD_TIMEOUT_S) -> None:
        self.channel_to = channel_to
        self.timeout_s = timeout_s

    async def __call__(self, leader: int, entry: bytes) -> int:
        channel = self.channel_to(leader)
        if channel is None:
            raise NotLeader(0)  # no address for it yet: wait for the next leader or address
        call = channel.unary_unary(FORWARD_METHOD)
        try:
            future = call.future(entry, timeout=self.timeout_s)
        except ValueError:  # the channel was closed under us (the leader's address changed): not sent
            raise NotLeader(0) from None
        try:
            reply = await await_future(future)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
            if code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("leader="):
                raise NotLeader(int(details.removeprefix("leader="))) from None
            if code == grpc.StatusCode.ABORTED:
                raise ProposalLost(details) from None
            raise ProposalTimeout(f"forwarding to node {leader}: {code.name}: {details}") from None
        return int(_U64.unpack(reply)[0])


async def await_future(future: grpc.Future) -> Any:
    """Wait on trio for a grpc future; cancelling the wait cancels the call."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_f: grpc.Future) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        future.cancel()
        raise
    return future.result()


# --- the control socket ---------------------------------------------------------------------------
ControlHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlService:
    """Dispatches JSON requests `{"op": ...}` to the daemon's handlers; errors come back as
    `{"error": message}` so the CLI prints one clear line."""

    def __init__(self, handlers: dict[str, ControlHandler]) -> None:
        self.handlers = handlers

    async def Call(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            body = json.loads(request)
            handler = self.handlers[body["op"]]
        except (ValueError, KeyError, TypeError):
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "malformed control request") from None
        try:
            reply = await handler(body)
        except ControlError as exc:
            reply = {"error": str(exc)}
        return json.dumps(reply, sort_keys=True).encode()

    def binding(self) -> Binding:
        return Binding(_generic_adder(CONTROL_SERVICE, ("Call",)), self)


class ControlError(Exception):
    """A refusal the operator should read (unknown node, not the leader and no leader, ...)."""


def control_call(socket_path: str, request: dict[str, Any], timeout_s: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
    """From the CLI: one request to the daemon behind `socket_path`. Raises ConnectionError when no
    daemon answers there."""
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        call = channel.unary_unary(f"/{CONTROL_SERVICE}/Call")
        try:
            reply = call(json.dumps(request).encode(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise ConnectionError(f"no running awsomefsd answers on {socket_path}: "
                                  f"{exc.code().name}") from None  # type: ignore[attr-defined]
    result: dict[str, Any] = json.loads(reply)
    return result


def _generic_adder(service: str, methods: tuple[str, ...]) -> Callable[[Any, grpc.Server], None]:
    def add(servicer: Any, server: grpc.Server) -> None:
        handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name)) for name in methods}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    return add
