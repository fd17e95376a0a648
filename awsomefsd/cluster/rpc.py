"""Member-to-member calls besides Raft itself, and the local control socket.

The Member service (on the mTLS cluster listener): `Forward`, a follower's metadata entry for the
leader to order (the whole path, both sides and its error statuses, is in
meta/replication/forwarding.py), and `Progress`, the leader's view of replication for `status`
on a follower.

`Control` (on `<state>/control.sock`, mode 0600, so root or the daemon's user only): what the CLI
asks a running daemon — the join token, token rotation, node removal, the cluster's status. JSON in,
JSON out; it is an operator interface, not a hot path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from awsomefsd.duty import one_line
from awsomefsd.meta.levels import BASE_LOG_LEVEL, LOG_LEVEL
from awsomefsd.meta.replication.driver import RaftNode
from awsomefsd.meta.replication.forwarding import FORWARD_METHOD, serve_forward
from awsomefsd.meta.replication.transport import RaftTransport
from awsomefsd.meta.replication.wire_calls import WireUnavailable
from awsomefsd.rpc.bridge import Binding, BridgeLimits, RpcAbort, unary_call

log = logging.getLogger(__name__)

MEMBER_SERVICE = "awsomefs.cluster.v1.Member"
PROGRESS_METHOD = f"/{MEMBER_SERVICE}/Progress"
PROGRESS_TIMEOUT_S = 3.0
LOG_LEVEL_METHOD = f"/{MEMBER_SERVICE}/LogLevel"
LOG_LEVEL_TIMEOUT_S = 2.0
CONTROL_SERVICE = "awsomefs.cluster.v1.Control"
CONTROL_TIMEOUT_S = 30.0
CONTROL_LIMITS = BridgeLimits(max_call_s=3600.0)
"""The control socket's server: the caller's deadline bounds a request, not the bridge's usual
60 s. `site verify` digests both whole trees and may take many minutes (50,000 files a site took
more than 60 s: the server cut it off while the CLI still waited); the CLI gives each request the
deadline it expects (cli/repl.py VERIFY_TIMEOUT_S)."""
assert f"/{MEMBER_SERVICE}/Forward" == FORWARD_METHOD, "Forward is served by MemberService"
HOLDER_METHODS = {"look": f"/{MEMBER_SERVICE}/LookFor", "create": f"/{MEMBER_SERVICE}/CreateFor"}
"""A look that found nothing, or a create, in a directory another member holds, sent to that member
(fs/forwarding.py, whose kinds these are; design note 145)."""
HOLDER_TIMEOUT_S = 2.0
"""A holder that has not answered by then is taken for slow or gone: the create goes the usual
way (with the same inode number), the look takes the delegation."""
ServeForwarded = Callable[[str, bytes], Awaitable[bytes]]


class MemberService:
    def __init__(self, node: RaftNode, progress: Callable[[], dict[str, Any]] | None = None) -> None:
        self.node = node
        self.progress = progress
        self.forwarded = 0
        self.serve_forwarded: ServeForwarded | None = None
        """`serve(kind, request)`: this member's file system answering another's look or create
        (set once it is up; until then such a call is answered UNAVAILABLE and the caller goes
        the usual way). A ValueError: a request that does not decode."""

    async def Forward(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        reply = await serve_forward(self.node, request)
        self.forwarded += 1
        return reply

    async def LookFor(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return await self._for_another("look", request)

    async def CreateFor(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return await self._for_another("create", request)

    async def _for_another(self, kind: str, request: bytes) -> bytes:
        serve = self.serve_forwarded
        if serve is None:
            raise RpcAbort(grpc.StatusCode.UNAVAILABLE, "this member's file system is not up")
        try:
            return await serve(kind, request)
        except ValueError as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {kind} request: {exc}") from None

    async def Progress(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The leader's view of replication (each member's match index), for `status` on a follower."""
        if self.progress is None:
            raise RpcAbort(grpc.StatusCode.UNIMPLEMENTED, "no progress here")
        return json.dumps(self.progress(), sort_keys=True).encode()

    async def LogLevel(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The newest commands this member's build decodes (meta/levels.py LOG_LEVEL), for the
        leader that raises the cluster's level after a rolling upgrade."""
        return LOG_LEVEL.to_bytes(4, "big")

    def binding(self) -> Binding:
        return Binding(generic_adder(MEMBER_SERVICE, ("Forward", "Progress", "LogLevel", "LookFor", "CreateFor")), self)


async def ask_progress(channel_to: Callable[[int], grpc.Channel | None], leader: int,
                       timeout_s: float = PROGRESS_TIMEOUT_S) -> dict[str, Any]:
    """Member.Progress of `leader` (raises ConnectionError when it cannot be asked)."""
    channel = channel_to(leader)
    if channel is None:
        raise ConnectionError(f"no address for node {leader}")
    try:
        reply = await unary_call(channel, PROGRESS_METHOD, b"", timeout_s)
    except (grpc.RpcError, ValueError) as exc:
        raise ConnectionError(str(exc)) from None
    result: dict[str, Any] = json.loads(reply)
    return result


async def ask_log_level(channel_to: Callable[[int], grpc.Channel | None], node: int,
                        timeout_s: float = LOG_LEVEL_TIMEOUT_S) -> int:
    """Member.LogLevel of `node`: BASE_LOG_LEVEL from a build before the call existed (it answers
    UNIMPLEMENTED); ConnectionError when it cannot be asked."""
    channel = channel_to(node)
    if channel is None:
        raise ConnectionError(f"no address for node {node}")
    try:
        reply = await unary_call(channel, LOG_LEVEL_METHOD, b"", timeout_s)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
            return BASE_LOG_LEVEL
        raise ConnectionError(str(exc)) from None
    except ValueError as exc:
        raise ConnectionError(str(exc)) from None
    if len(reply) != 4:
        raise ConnectionError(f"node {node} answered LogLevel with {len(reply)} bytes")
    return int.from_bytes(reply, "big")


async def ask_holder(transport: RaftTransport, on_wire: Callable[[], bool], node: int, kind: str, request: bytes,
                     timeout_s: float = HOLDER_TIMEOUT_S) -> bytes:
    """Send a look or a create (`kind`, fs/forwarding.py) to the member holding its directory:
    its answer, or ConnectionError when it cannot be asked or did not answer in time. On the Raft
    wire when `on_wire()` (every member's build knows the call there: HOLDER_WIRE_LEVEL) and a wire
    connection to it is open, else over gRPC."""
    if on_wire():
        try:
            return await transport.ask_holder(node, kind, request, timeout_s)
        except WireUnavailable:
            pass  # no wire connection to it now (it is starting, or cut off): gRPC may still reach it
    channel = transport.channel_to(node)
    if channel is None:
        raise ConnectionError(f"no address for node {node}")
    try:
        return await unary_call(channel, HOLDER_METHODS[kind], request, timeout_s)
    except (grpc.RpcError, ValueError) as exc:
        raise ConnectionError(one_line(exc)) from None


async def ask_read_point(transport: RaftTransport, on_wire: Callable[[], bool], leader: int, timeout_s: float) -> int:
    """The leader's read point from its lease, asked on the Raft wire (RaftNode.read_barrier's
    fast path): only once `on_wire()` (every member's build answers it: READ_POINT_WIRE_LEVEL);
    ConnectionError when it cannot be asked now or gave none (the read then goes through Raft)."""
    if not on_wire():
        raise ConnectionError("not every member's build answers a read point on the wire yet")
    try:
        return await transport.ask_read_point(leader, timeout_s)
    except WireUnavailable:
        raise ConnectionError(f"no wire connection to node {leader} now") from None


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
        return Binding(generic_adder(CONTROL_SERVICE, ("Call",)), self)


class ControlError(Exception):
    """A refusal the operator should read (unknown node, not the leader and no leader, ...)."""


class ControlTimeout(ConnectionError):
    """The daemon took the request but did not answer it within the deadline (it may still be at
    work on it): not the same as no daemon at all, and said so."""


def control_call(socket_path: str, request: dict[str, Any], timeout_s: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
    """From the CLI: one request to the daemon behind `socket_path`. Raises ControlTimeout when
    the daemon did not answer within `timeout_s`, ConnectionError when no daemon answers there;
    either's message is one line for the operator."""
    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        call = channel.unary_unary(f"/{CONTROL_SERVICE}/Call")
        began = time.monotonic()
        try:
            reply = call(json.dumps(request).encode(), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # ours, or the server's own limit
                raise ControlTimeout(f"the awsomefsd on {socket_path} did not finish the request in "
                                     f"{time.monotonic() - began:.0f} s") from None
            raise ConnectionError(f"no running awsomefsd answers on {socket_path} ({code.name}): "
                                  "is the daemon running?") from None
    result: dict[str, Any] = json.loads(reply)
    return result


def generic_adder(service: str, methods: tuple[str, ...]) -> Callable[[Any, grpc.Server], None]:
    def add(servicer: Any, server: grpc.Server) -> None:
        handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name)) for name in methods}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))

    return add
