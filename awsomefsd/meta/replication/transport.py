"""Raft messages between daemons: one long-lived connection per peer, batched frames.

Why this shape: the Raft core produces many small messages (appends, heartbeats, responses) and
tolerates loss, duplication and reordering, so the transport optimises for never blocking the node
driver. `send()` is synchronous and non-blocking: it puts messages on a bounded per-peer queue and
drops them (counted) when the queue is full. A task per peer drains that queue into one
connection, packing whatever is queued into one frame, so a busy leader sends few large frames and
an idle one sends heartbeats alone. A broken connection is reported to the core as
`report_unreachable` (the leader then probes instead of pipelining), its queue is discarded (stale
messages are worthless) and the connection is reopened after a jittered exponential backoff.

Two paths (design note 125). The **wire** (awsomefsd.rpc.wire: trio's own sockets and TLS, on the
cluster port + `WIRE_PORT_OFFSET`) is the one every peer of this build is dialled on: no thread
hop, a message and its answer in ~0.25 ms between idle daemons against 1-2 ms over gRPC. A peer
whose wire does not answer (a build from before it, during a rolling upgrade) is sent the same
frames over gRPC's `Send` stream from a worker thread (transport_grpc.py), which this build also
serves; its wire is tried again every `WIRE_PROBE_S`, so a peer that was only starting, or was
upgraded, moves to the wire by itself.

Snapshots travel on a separate gRPC client stream (`Snapshot`, transport_grpc.py), at most one
per peer at a time; the receiver stages the copy, fsyncs it and hands the driver a SNAP message
whose `snapshot.data` is the staged directory. Followers forward entries to the leader on the
wire too (wire_calls.py), or over gRPC's `Forward` when there is no wire to it; so do members
ask a directory's holder to look or create (`ask_holder`; gRPC's `LookFor`, `CreateFor`), and
followers the leader for a read point (`ask_read_point`; Raft's ReadIndex without the wire).

Security: the constructor takes gRPC credential objects and a `WireSecurity` (mutual TLS from the
cluster layer, both). Plaintext needs `insecure=True`, meant for tests and benchmarks on loopback.
"""

from __future__ import annotations

import errno
import logging
import math
import queue
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import trio

from awsomefsd.config.addresses import join_host_port, split_host_port
from awsomefsd.meta.raft import CodecError, Message, MessageType
from awsomefsd.meta.raft.messages import LOCAL_MESSAGES
from awsomefsd.meta.replication.transport_grpc import (
    MAX_MESSAGE_BYTES,
    RaftService,
    add_raft_service,
    decode_frame,
    encode_frame,
    open_channel,
    send_snapshot,
    send_stream,
)
from awsomefsd.meta.replication.transport_peer import (
    DEFAULT_LIMITS,
    GRPC_POLL_S,
    WIRE_HEARD_S,
    WIRE_PROBE_FIRST_S,
    WIRE_PROBE_S,
    PeerLink,
    RaftPeerHandler,
    TransportLimits,
)
from awsomefsd.meta.replication.wire_calls import (
    KIND_ANSWER,
    KIND_FORWARD,
    KIND_HOLDER,
    KIND_RAFT,
    KIND_READ_POINT,
    ServeHolder,
    WireCalls,
    WireUnavailable,
    answer_forward,
    answer_holder,
    answer_read_point,
    call_origin,
)
from awsomefsd.rpc import wire
from awsomefsd.rpc.bridge import Binding, BridgeLimits, RpcAbort, serve_grpc
from awsomefsd.rpc.wire import WireSecurity

log = logging.getLogger(__name__)

WIRE_PORT_OFFSET = 2
"""The Raft wire listens on the cluster port + 2 (the join listener has + 1)."""
SENT_WAIT_S = 0.002
"""The longest `sent` waits for the wire senders before the driver's fsync."""
MAX_FORWARDS_IN_FLIGHT = 256
"""Forwarded entries and holder calls served at once (beyond: the wire connection waits, TCP pushes back)."""
MAX_QUEUED_ANSWERS = 4 * MAX_FORWARDS_IN_FLIGHT  # for a peer while no connection to it is open


class RaftTransport:
    """Serve incoming Raft traffic and stream outgoing messages to peers; see the module docstring."""

    def __init__(
        self,
        node_id: int,
        peers: Mapping[int, str],
        *,
        staging_dir: Path,
        server_credentials: grpc.ServerCredentials | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        insecure: bool = False,
        channel_options: Callable[[int], Sequence[tuple[str, Any]]] | None = None,
        peer_identity: Callable[[grpc.ServicerContext], int] | None = None,
        guard: Callable[[object], object] | None = None,
        wire_security: WireSecurity | None = None,
        limits: TransportLimits = DEFAULT_LIMITS,
    ) -> None:
        """`channel_options(peer_id)` adds per-peer channel arguments, e.g. the TLS target name
        that makes the dialled server prove it is that node (awsomefsd.cluster.tls).
        `peer_identity(context)` names the node whose verified certificate opened a stream (e.g.
        `authenticated_peer(...).node_id`); messages on it claiming another sender are dropped,
        so one member's key cannot speak for another. It raises to refuse the stream.
        `guard(servicer)` wraps every servicer served on the listener (e.g. a RevocationGuard).
        `wire_security` is the same for the Raft wire."""
        if insecure:
            assert server_credentials is None and channel_credentials is None and wire_security is None, \
                "insecure with credentials"
        elif server_credentials is None or channel_credentials is None or wire_security is None:
            raise ValueError("the Raft transport needs TLS credentials (or insecure=True for tests)")
        assert node_id not in peers, "a node is not its own peer"
        self.node_id = node_id
        self._handler: RaftPeerHandler | None = None
        self.staging_dir = staging_dir
        self.limits = limits
        self._server_credentials = server_credentials
        self._channel_credentials = channel_credentials
        self._channel_options = channel_options
        self._peer_identity = peer_identity
        self._guard = guard or (lambda servicer: servicer)
        self._wire_security = wire_security
        self.calls = WireCalls(node_id)
        """This node's calls on the wire waiting for an answer (and how many it made)."""
        self._accept_forward: Callable[[bytes], Awaitable[int]] | None = None
        self.serve_holder: ServeHolder | None = None
        """Another member's look or create in a directory this node holds, asked on the wire (set
        once the file system is up; until then such a call is answered unavailable)."""
        self.read_point: Callable[[], int | None] = lambda: None
        """This node's read point from its leader's lease now, for a follower that asks on the wire
        (RaftNode.lease_read_point; None: it has none, the follower asks through Raft)."""
        self.read_points_answered = 0
        """Read points this node gave followers on the wire (awsomefs_raft_read_points_answered_total)."""
        self._heard_on_wire: dict[int, float] = {}  # node -> when a Raft frame from it came on the wire
        self._forward_slots = trio.Semaphore(MAX_FORWARDS_IN_FLIGHT)
        self.spoofed_messages = 0
        self._peers: dict[int, PeerLink] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self.received_messages = 0
        self.rejected_frames = 0
        for peer_id, address in peers.items():
            self._peers[peer_id] = PeerLink(peer_id, address, limits.queue_messages)

    @property
    def handler(self) -> RaftPeerHandler:
        """The node this transport serves (given to `run`)."""
        assert self._handler is not None, "the transport serves a node only while it runs"
        return self._handler

    # --- sending (trio thread) --------------------------------------------------------------------
    def send(self, messages: Sequence[Message]) -> None:
        """Queue messages for their peers; never blocks. Unknown peers and full queues drop."""
        for m in messages:
            peer = self._peers.get(m.to)
            if peer is None:
                log.debug("no address for node %d; dropping %s", m.to, m.type.name)
                continue
            if m.type == MessageType.SNAP:
                self._start_snapshot(peer, m)
                continue
            try:
                peer.queue.put_nowait(m)
            except queue.Full:
                peer.dropped += 1
            peer.wake()

    def add_peer(self, peer_id: int, address: str) -> None:
        """Learn a new member's address (membership change); starts its sender when running."""
        assert peer_id != self.node_id
        known = self._peers.get(peer_id)
        if known is not None:
            if known.address != address:
                known.address = address
                if known.channel is not None:
                    known.channel.close()  # the stream fails and reopens on the new address
                    known.channel = None
                if known.connection is not None:
                    known.connection.cancel()
            return
        peer = PeerLink(peer_id, address, self.limits.queue_messages)
        self._peers[peer_id] = peer
        if self._nursery is not None:
            self._nursery.start_soon(self._run_peer, peer)

    def stats(self) -> dict[int, dict[str, int]]:
        """Per-peer counters for status and tests."""
        return {p.id: {"dropped": p.dropped, "sent_frames": p.sent_frames, "failures": p.failures,
                       "legacy_frames": p.legacy_frames} for p in self._peers.values()}

    def link(self, peer_id: int) -> str:
        """How this node sends to `peer_id` now: "wire", "grpc" (it has no wire: an older build)
        or "none" (no connection: the peer is down or cut off, or one is being opened)."""
        peer = self._peers.get(peer_id)
        return "none" if peer is None else "wire" if peer.connection else "grpc" if peer.on_grpc else "none"

    def remove_peer(self, peer_id: int) -> None:
        """Forget a removed member: stop dialling it and drop what is queued for it."""
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            peer.removed = True
            peer.queued.set()
            if peer.channel is not None:
                peer.channel.close()

    def channel_to(self, peer_id: int) -> grpc.Channel | None:
        """The (mTLS) channel to a member, shared with its Raft stream; None for an unknown one."""
        peer = self._peers.get(peer_id)
        return None if peer is None else self._channel(peer)

    def peer_address(self, peer_id: int) -> str | None:
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.address

    async def run(self, handler: RaftPeerHandler, listen: str, *, extra_bindings: Sequence[Binding] = (),
                  accept_forward: Callable[[bytes], Awaitable[int]] | None = None,
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve `handler` (the node) on `listen` (gRPC: the Raft service and `extra_bindings`, each
        wrapped by the guard) and on the wire (listen's port + WIRE_PORT_OFFSET), and keep one
        connection per peer open until cancelled; started(bound gRPC address). The node is given
        here, not when the transport is built: the node is built with the transport's `send`, so
        the transport comes first. `accept_forward` (forwarding.accept_forwarded on the node)
        orders the entries followers forward on the wire. The wire is bound before gRPC, so a
        dialler that finds gRPC up and the wire refused is talking to an older build (or to a
        port 0 listener in a test)."""
        assert self._handler is None, "a transport serves one node, once"
        self._handler = handler
        self._accept_forward = accept_forward
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        host, port = split_host_port(listen)
        try:
            async with trio.open_nursery() as nursery:
                # Before anything listens: a peer may forward an entry on the wire the moment it
                # accepts (a restarted node's wire was up while gRPC still started, and the first
                # forward crashed it: the nemesis, session 30). The peers' senders start with it,
                # so a peer added from here on gets one sender (`add_peer`), never two.
                self._nursery = nursery
                for peer in self._peers.values():
                    nursery.start_soon(self._run_peer, peer)
                if port:
                    await nursery.start(self._serve_wire, host, port + WIRE_PORT_OFFSET)
                bound = await nursery.start(self._serve, listen, extra_bindings)
                if not port:
                    await nursery.start(self._serve_wire, host, split_host_port(bound)[1] + WIRE_PORT_OFFSET)
                task_status.started(bound)
        finally:
            self._closing = True
            for peer in self._peers.values():
                if peer.channel is not None:
                    peer.channel.close()

    async def _serve(self, listen: str, extra_bindings: Sequence[Binding] = (), *,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        limits = BridgeLimits(
            max_workers=16, max_concurrent_rpcs=64, max_inflight=16, max_call_s=self.limits.snapshot_timeout_s,
            grace_s=0.5, max_message_bytes=MAX_MESSAGE_BYTES,
        )
        options = [
            ("grpc.http2.min_recv_ping_interval_without_data_ms", self.limits.keepalive_ms // 2),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        await serve_grpc(
            [Binding(b.add_to_server, self._guard(b.servicer))
             for b in (Binding(add_raft_service, RaftService(self)), *extra_bindings)],
            listen, limits=limits,
            credentials=self._server_credentials, options=options, task_status=task_status,
        )

    def _channel(self, peer: PeerLink) -> grpc.Channel:
        if peer.channel is None:
            extra = self._channel_options(peer.id) if self._channel_options is not None else ()
            peer.channel = open_channel(peer.address, self._channel_credentials, self.limits.keepalive_ms,
                                        (self.limits.backoff_min_s, self.limits.backoff_max_s), extra)
        return peer.channel

    async def _serve_wire(self, host: str, port: int, *,
                          task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        security = self._wire_security
        try:
            listeners = await trio.open_tcp_listeners(port, host=host or None)
        except OSError as exc:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {join_host_port(host, port)} for the Raft wire "
                                            f"(the cluster port + {WIRE_PORT_OFFSET}): {exc.strerror}") from None
        await wire.serve(self._receive_wire, listeners, ssl_context=None if security is None else security.server,
                         max_frame_bytes=MAX_MESSAGE_BYTES, on_error=_log_wire_error, task_status=task_status)

    async def _run_peer(self, peer: PeerLink) -> None:
        """Keep a connection to `peer` open: the wire, or a gRPC stream while the peer refuses the
        wire (an older build); after a failure report it, drop the backlog, back off."""
        backoff_s = self.limits.backoff_min_s
        while not self._closing and not peer.removed:
            started = time.monotonic()
            frames_before = peer.sent_frames
            connection = await self._dial_wire(peer)
            if connection == _WIRE_REFUSED:
                connection = await self._grpc_until_wire(peer)
            error = connection if isinstance(connection, str) else await self._send_on_wire(peer, connection)
            if self._closing or peer.removed:
                return
            peer.failures += 1
            if peer.sent_frames > frames_before or time.monotonic() - started > self.limits.backoff_max_s:
                backoff_s = self.limits.backoff_min_s
            log.debug("connection to node %d ended (%s); retrying in %.2fs", peer.id, error, backoff_s)
            peer.discard_queued()
            self.handler.report_unreachable(peer.id)
            await trio.sleep(backoff_s * (0.5 + random.random() / 2))
            backoff_s = min(backoff_s * 2, self.limits.backoff_max_s)

    async def _dial_wire(self, peer: PeerLink) -> wire.FrameStream | str:
        """A wire connection to `peer`, or why there is none (`_WIRE_REFUSED`: nothing listens)."""
        host, port = split_host_port(peer.address)
        security = self._wire_security
        try:
            return await wire.dial(host, port + WIRE_PORT_OFFSET,
                                   ssl_context=None if security is None else security.client,
                                   server_hostname=None if security is None else security.name_of(peer.id),
                                   max_frame_bytes=MAX_MESSAGE_BYTES, timeout_s=self.limits.keepalive_ms / 1000)
        except ConnectionRefusedError:
            return _WIRE_REFUSED
        except wire.CONNECTION_ERRORS as exc:  # a TLS refusal arrives as BrokenResourceError
            return f"dial failed: {exc!r}"

    async def _grpc_until_wire(self, peer: PeerLink) -> wire.FrameStream | str:
        """Send to `peer` over a gRPC stream (in a worker thread) until it fails (why, returned) or
        the peer's wire answers (the connection, returned; the stream is ended). The wire is tried
        again and again (WIRE_PROBE_S): a peer that was only starting when its wire was refused,
        or that was upgraded, is not left on the slow path for as long as a stream lives."""
        outcome: list[wire.FrameStream | str] = []
        peer.on_grpc = True
        try:
            async with trio.open_nursery() as nursery:
                async def stream() -> None:
                    ended = await trio.to_thread.run_sync(self._stream_once, peer, abandon_on_cancel=True)
                    if not outcome:
                        outcome.append(ended)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stream)
                probe_s = WIRE_PROBE_FIRST_S
                while not outcome:
                    await trio.sleep(probe_s)
                    probe_s = min(probe_s * 1.5, WIRE_PROBE_S)
                    connection = await self._dial_wire(peer)
                    if isinstance(connection, wire.FrameStream):
                        outcome.append(connection)
                        # The frame generator stops; what it already took from the queue is still
                        # sent before the stream closes, so waiting for it loses nothing.
                        peer.generation += 1
                        await trio.sleep_forever()
        except BaseException:
            if outcome and isinstance(outcome[0], wire.FrameStream):
                await outcome[0].close_now()
            raise
        finally:
            peer.on_grpc = False
        return outcome[0]

    async def _send_on_wire(self, peer: PeerLink, stream: wire.FrameStream) -> str:
        """Send `peer`'s queue on `stream` until it fails; returns why it ended."""
        try:
            with trio.CancelScope() as peer.connection:
                await self._pump(peer, stream)
            return "dropped (the peer's address changed)"
        except wire.CONNECTION_ERRORS as exc:
            return f"broken: {exc!r}"
        finally:
            peer.connection = None
            peer.outbox.clear()
            self.calls.lost(peer.id)
            await stream.close_now()

    async def _pump(self, peer: PeerLink, stream: wire.FrameStream) -> None:
        try:
            while not self._closing and not peer.removed:
                if peer.outbox:
                    await stream.send_frame(peer.outbox.popleft())
                    continue
                batch = peer.take_batch(self.limits, None)
                if not batch:
                    peer.queued = trio.Event()
                    if peer.queue.empty() and not peer.outbox:
                        peer.writing_since = math.inf
                        peer.idle.set()
                        await peer.queued.wait()
                    continue
                await stream.send_frame(encode_frame(batch), prefix=KIND_RAFT)
                peer.sent_frames += 1
        finally:
            peer.idle.set()

    async def forward(self, leader: int, entry: bytes, timeout_s: float) -> int:
        """Forward `entry` to `leader` on the wire (forwarding.Forwarder's fast path); raises
        WireUnavailable when no wire connection to it is open, and what Forward raises."""
        return await self.calls.forward(leader, entry, self._poster(leader), timeout_s)

    async def ask_holder(self, node: int, kind: str, request: bytes, timeout_s: float) -> bytes:
        """A look or a create for the member holding its directory, on the wire; WireUnavailable
        as `forward`, ConnectionError when it did not answer."""
        return await self.calls.ask_holder(node, kind, request, self._poster(node), timeout_s)

    async def ask_read_point(self, leader: int, timeout_s: float) -> int:
        """WireCalls.read_point of `leader`; WireUnavailable as `forward`, and while the leader's
        own messages do not reach us on the wire (its connection to us is down or on gRPC: its
        answer would wait for the wire, where Raft's ReadIndex answer goes at once)."""
        if trio.current_time() - self._heard_on_wire.get(leader, -math.inf) > WIRE_HEARD_S:
            raise WireUnavailable(leader)
        return await self.calls.read_point(leader, self._poster(leader), timeout_s)

    def _poster(self, node: int) -> Callable[[bytes], None]:
        """What queues a frame on the wire connection to `node` (WireUnavailable: none open)."""
        peer = self._peers.get(node)
        if peer is None or peer.connection is None:
            raise WireUnavailable(node)
        return lambda frame: self._post(peer, frame)

    def _post(self, peer: PeerLink, frame: bytes) -> None:
        peer.outbox.append(frame)
        peer.wake()

    async def sent(self) -> None:
        """Return once each wire sender that is not stuck has written what was queued for it (at
        most SENT_WAIT_S). The driver calls it before persisting on the loop: the senders are
        tasks, and a write to the kernel takes them a few steps (TLS), so without it a leader's
        appends, meant to leave before its fsync, left after it (~1-2 ms on each leg of a
        follower's fsync). A sender stuck on a full socket (a paused peer) is not waited for."""
        now = time.monotonic()
        with trio.move_on_after(SENT_WAIT_S):
            for peer in list(self._peers.values()):
                if peer.connection is not None and now - peer.writing_since < SENT_WAIT_S:
                    await peer.idle.wait()

    async def _answer_call(self, sender: int, frame: bytes) -> None:
        try:
            if frame[:1] == KIND_HOLDER:
                answer = await answer_holder(frame, self.serve_holder)
            else:
                assert self._accept_forward is not None
                answer = await answer_forward(frame, self._accept_forward)
        finally:
            self._forward_slots.release()
        self._answer_now(sender, answer)

    def _answer_now(self, node: int, answer: bytes) -> None:
        """Queue `answer` for `node`, also while ours to it is redialled (it restarted): the next
        connection sends it first. Dropped, it left the asker waiting out its call (a nemesis run)."""
        peer = self._peers.get(node)
        if peer is not None and not peer.removed and len(peer.outbox) < MAX_QUEUED_ANSWERS:
            self._post(peer, answer)

    def _stream_once(self, peer: PeerLink) -> str:
        """In a worker thread: one gRPC client stream that lives until it fails; returns why it ended."""
        peer.generation += 1
        try:
            return send_stream(self._channel(peer), self._frames(peer, peer.generation))
        finally:
            peer.retire_grpc_frames()

    def _frames(self, peer: PeerLink, generation: int) -> Iterator[bytes]:
        """The frames of one gRPC stream. grpc takes them in a thread of its own, which may still
        be waiting on the queue when the call has failed: the generation is checked under
        `peer.taking`, so once `PeerLink.retire_grpc_frames` returns nothing more is taken."""
        while True:
            with peer.taking:
                if self._closing or peer.generation != generation:
                    return
                try:
                    first = peer.queue.get(timeout=GRPC_POLL_S)
                except queue.Empty:
                    continue
                batch = peer.take_batch(self.limits, first)
                peer.sent_frames += 1
                peer.legacy_frames += 1
            yield encode_frame(batch)

    # --- snapshots --------------------------------------------------------------------------------
    def _start_snapshot(self, peer: PeerLink, m: Message) -> None:
        if peer.snapshot_in_flight or self._nursery is None:
            self.handler.report_snapshot(peer.id, delivered=False)
            return
        peer.snapshot_in_flight = True
        self._nursery.start_soon(self._send_snapshot, peer, m)

    async def _send_snapshot(self, peer: PeerLink, m: Message) -> None:
        delivered = False
        try:
            delivered = await trio.to_thread.run_sync(self._snapshot_once, peer, m, abandon_on_cancel=True)
        finally:
            peer.snapshot_in_flight = False
            if not self._closing:
                self.handler.report_snapshot(peer.id, delivered)

    def _snapshot_once(self, peer: PeerLink, m: Message) -> bool:
        return send_snapshot(self._channel(peer), peer.id, m, self.handler.snapshot_chunks,
                             lambda: self._closing, self.limits.snapshot_timeout_s)

    # --- receiving (trio thread: the wire, and gRPC through the bridge) ----------------------------
    async def _receive_wire(self, stream: wire.FrameStream) -> None:
        """One incoming wire connection: its frames to the node, as long as its certificate holds."""
        certificate = stream.peer_certificate()
        sender = self._wire_sender(certificate)
        if sender == _REFUSED:
            return
        while (frame := await stream.receive_frame()) is not None:
            if self._wire_security is not None and self._wire_sender(certificate) == _REFUSED:
                return  # revoked since the connection opened
            kind = frame[:1]
            try:
                if kind == KIND_RAFT:
                    messages = decode_frame(frame[1:])
                    if messages:  # (by the certificate's node where there is one)
                        self._heard_on_wire[messages[0].frm if sender is None else sender] = trio.current_time()
                    self.accept(messages, sender)
                elif kind == KIND_ANSWER:
                    self.calls.answered(frame, sender)
                elif (kind == KIND_FORWARD and self._accept_forward is not None) or kind == KIND_HOLDER:
                    origin = call_origin(frame, sender)
                    assert self._nursery is not None
                    await self._forward_slots.acquire()
                    self._nursery.start_soon(self._answer_call, origin, frame)
                elif kind == KIND_READ_POINT:  # answered here: no task, no turn of the Raft loop
                    origin = call_origin(frame, sender)
                    point = self.read_point()
                    self.read_points_answered += point is not None
                    self._answer_now(origin, answer_read_point(frame, point))
                else:
                    raise CodecError(f"a frame of kind {kind!r} from node {sender}")
            except CodecError as exc:
                self.rejected_frames += 1
                log.warning("malformed frame on the raft wire from node %s: %s", sender, exc)
                return

    def _wire_sender(self, certificate: bytes | None) -> int | None:
        """The node a wire connection's certificate names (None on a plain one); `_REFUSED`,
        logged, when the certificate is refused."""
        if self._wire_security is None:
            return None
        try:
            return self._wire_security.identify(certificate)
        except Exception as exc:
            log.warning("refused a raft wire connection: %s", exc)
            return _REFUSED

    def identify(self, context: grpc.ServicerContext) -> int | None:
        """The node whose certificate opened a gRPC stream (None without `peer_identity`)."""
        if self._peer_identity is None:
            return None
        try:
            return self._peer_identity(context)
        except Exception as exc:
            log.warning("refused a raft stream from %s: %s", context.peer(), exc)
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, "peer not authenticated") from None

    def accept(self, messages: list[Message], sender: int | None = None) -> None:
        """Hand the messages addressed to this node to it, dropping any that claim a sender other
        than the node whose certificate brought them."""
        if sender is not None:
            claimed = len(messages)
            messages = [m for m in messages if m.frm == sender]
            if len(messages) != claimed:
                self.spoofed_messages += claimed - len(messages)
                log.warning("dropped %d raft messages claiming a sender other than node %d",
                            claimed - len(messages), sender)
        mine = [m for m in messages if m.to == self.node_id and m.type not in LOCAL_MESSAGES]
        self.received_messages += len(mine)
        if mine:
            self.handler.deliver(mine)


_WIRE_REFUSED = "the wire was refused"
_REFUSED = -1  # a certificate refused (node ids are positive)


def _log_wire_error(peer: str, exc: BaseException) -> None:
    log.debug("raft wire connection from %s ended: %r", peer, exc)


__all__ = ["WIRE_PORT_OFFSET", "RaftPeerHandler", "RaftTransport", "TransportLimits"]
