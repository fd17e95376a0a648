"""Raft messages between daemons over gRPC: one long-lived client stream per peer, batched frames.

Why this shape: the Raft core produces many small messages (appends, heartbeats, responses) and
tolerates loss, duplication and reordering, so the transport optimises for never blocking the node
driver. `send()` is synchronous and non-blocking: it puts messages on a bounded per-peer queue and
drops them (counted) when the queue is full. A worker thread per peer drains that queue into one
gRPC client stream, packing whatever is queued into one frame, so a busy leader sends few large
frames and an idle one sends heartbeats alone. A broken stream is reported to the core as
`report_unreachable` (the leader then probes instead of pipelining), its queue is discarded (stale
messages are worthless) and the stream is reopened after a jittered exponential backoff.

Snapshots travel on a separate client stream (`Snapshot`), at most one per peer at a time: a
header frame with the SNAP message (metadata only), then chunks of a compacted copy of the
state-machine environment, then an end frame with the total length. The receiver stages the copy
with `SnapshotReceiver`, fsyncs it and hands the driver a SNAP message whose `snapshot.data` is the
staged directory. A stream that ends without a matching end frame is discarded.

Security: the constructor takes gRPC credential objects (mutual TLS from the cluster layer).
Plaintext needs `insecure=True`, meant for tests and benchmarks on loopback.

Wire format of a `Send` frame: u32 message count, then per message u32 length + `encode_message`.
"""

from __future__ import annotations

import logging
import queue
import random
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import grpc
import trio

from awsomefsd.meta.raft import CodecError, Message, MessageType, Snapshot, decode_message, encode_message
from awsomefsd.meta.replication.lmdb_storage import SnapshotReceiver
from awsomefsd.rpc.bridge import Binding, BridgeLimits, RpcAbort, client_stream, serve_grpc

log = logging.getLogger(__name__)

SERVICE = "awsomefs.raft.v1.Raft"
SEND_METHOD = f"/{SERVICE}/Send"
SNAPSHOT_METHOD = f"/{SERVICE}/Snapshot"
MAX_FRAME_MESSAGES = 4096
MAX_MESSAGE_BYTES = 64 << 20

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TAG_CHUNK = b"C"
_TAG_END = b"E"


class RaftPeerHandler(Protocol):
    """What the transport needs from the node driver. All but `snapshot_chunks` run on trio."""

    def deliver(self, messages: list[Message]) -> None:
        """Accept messages from a peer without blocking (the driver queues them)."""
        ...

    def report_unreachable(self, peer_id: int) -> None: ...

    def report_snapshot(self, peer_id: int, delivered: bool) -> None: ...

    def snapshot_chunks(self) -> Iterator[bytes]:
        """A consistent copy of the state machine in bounded chunks; runs in a worker thread."""
        ...


@dataclass(frozen=True)
class TransportLimits:
    queue_messages: int = 4096
    """Messages waiting per peer; beyond that new ones are dropped (Raft retransmits)."""
    max_frame_messages: int = 1024
    max_frame_bytes: int = 8 << 20
    backoff_min_s: float = 0.05
    backoff_max_s: float = 1.0
    snapshot_timeout_s: float = 300.0
    keepalive_ms: int = 2000

    def __post_init__(self) -> None:
        assert 0 < self.queue_messages <= 1 << 20
        assert 0 < self.max_frame_messages <= MAX_FRAME_MESSAGES
        assert 0 < self.max_frame_bytes <= MAX_MESSAGE_BYTES // 2
        assert 0 < self.backoff_min_s <= self.backoff_max_s <= 60
        assert 0 < self.snapshot_timeout_s <= 3600
        assert 100 <= self.keepalive_ms <= 600_000


def encode_frame(messages: Sequence[Message]) -> bytes:
    assert 0 < len(messages) <= MAX_FRAME_MESSAGES, len(messages)
    out = [_U32.pack(len(messages))]
    for m in messages:
        raw = encode_message(m)
        out.append(_U32.pack(len(raw)))
        out.append(raw)
    return b"".join(out)


def decode_frame(frame: bytes) -> list[Message]:
    """Inverse of encode_frame; CodecError on anything malformed (counts and lengths are checked)."""
    view = memoryview(frame)
    if len(view) < 4:
        raise CodecError("frame shorter than its header")
    (count,) = _U32.unpack_from(view, 0)
    if not 0 < count <= MAX_FRAME_MESSAGES:
        raise CodecError(f"frame with {count} messages")
    pos = 4
    out = []
    for _ in range(count):
        if pos + 4 > len(view):
            raise CodecError("truncated frame")
        (n,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise CodecError("truncated message in frame")
        out.append(decode_message(bytes(view[pos : pos + n])))
        pos += n
    if pos != len(view):
        raise CodecError(f"{len(view) - pos} trailing bytes in frame")
    return out


class _Peer:
    """Sending state for one peer; the queue is shared between the trio thread and a grpc thread."""

    def __init__(self, peer_id: int, address: str, limit: int) -> None:
        self.id = peer_id
        self.address = address
        self.queue: queue.Queue[Message] = queue.Queue(maxsize=limit)
        self.generation = 0
        self.dropped = 0
        self.sent_frames = 0
        self.failures = 0
        self.snapshot_in_flight = False
        self.removed = False
        self.channel: grpc.Channel | None = None
        self.wake = trio.Event()


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
        limits: TransportLimits = TransportLimits(),
    ) -> None:
        """`channel_options(peer_id)` adds per-peer channel arguments, e.g. the TLS target name
        that makes the dialled server prove it is that node (awsomefsd.cluster.tls).
        `peer_identity(context)` names the node whose verified certificate opened a stream (e.g.
        `authenticated_peer(...).node_id`); messages on it claiming another sender are dropped,
        so one member's key cannot speak for another. It raises to refuse the stream.
        `guard(servicer)` wraps every servicer served on the listener (e.g. a RevocationGuard)."""
        if insecure:
            assert server_credentials is None and channel_credentials is None, "insecure with credentials"
        elif server_credentials is None or channel_credentials is None:
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
        self.spoofed_messages = 0
        self._peers: dict[int, _Peer] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self.received_messages = 0
        self.rejected_frames = 0
        for peer_id, address in peers.items():
            self._peers[peer_id] = _Peer(peer_id, address, limits.queue_messages)

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
            return
        peer = _Peer(peer_id, address, self.limits.queue_messages)
        self._peers[peer_id] = peer
        if self._nursery is not None:
            self._nursery.start_soon(self._run_peer, peer)

    def stats(self) -> dict[int, dict[str, int]]:
        """Per-peer counters for status and tests."""
        return {
            p.id: {"dropped": p.dropped, "sent_frames": p.sent_frames, "failures": p.failures}
            for p in self._peers.values()
        }

    def remove_peer(self, peer_id: int) -> None:
        """Forget a removed member: stop dialling it and drop what is queued for it."""
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            peer.removed = True
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
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve `handler` (the node) on `listen` (the Raft service and `extra_bindings`, each
        wrapped by the guard) and keep one stream per peer open until cancelled; started(bound
        address). The node is given here, not when the transport is built: the node is built
        with the transport's `send`, so the transport comes first."""
        assert self._handler is None, "a transport serves one node, once"
        self._handler = handler
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        try:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(self._serve, listen, extra_bindings)
                self._nursery = nursery
                for peer in self._peers.values():
                    nursery.start_soon(self._run_peer, peer)
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
             for b in (Binding(_add_raft_service, _RaftService(self)), *extra_bindings)],
            listen, limits=limits,
            credentials=self._server_credentials, options=options, task_status=task_status,
        )

    def _channel(self, peer: _Peer) -> grpc.Channel:
        if peer.channel is None:
            options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", self.limits.keepalive_ms),
                ("grpc.keepalive_timeout_ms", self.limits.keepalive_ms),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.initial_reconnect_backoff_ms", int(self.limits.backoff_min_s * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(self.limits.backoff_min_s * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(self.limits.backoff_max_s * 1000)),
            ]
            if self._channel_options is not None:
                options.extend(self._channel_options(peer.id))
            if self._channel_credentials is None:
                peer.channel = grpc.insecure_channel(peer.address, options=options)
            else:
                peer.channel = grpc.secure_channel(peer.address, self._channel_credentials, options=options)
        return peer.channel

    async def _run_peer(self, peer: _Peer) -> None:
        """Keep a stream to `peer` open; after a failure report it, drop the backlog, back off."""
        backoff_s = self.limits.backoff_min_s
        while not self._closing and not peer.removed:
            started = time.monotonic()
            frames_before = peer.sent_frames
            error = await trio.to_thread.run_sync(self._stream_once, peer, abandon_on_cancel=True)
            if self._closing or peer.removed:
                return
            peer.failures += 1
            if peer.sent_frames > frames_before or time.monotonic() - started > self.limits.backoff_max_s:
                backoff_s = self.limits.backoff_min_s
            log.debug("stream to node %d ended (%s); retrying in %.2fs", peer.id, error, backoff_s)
            _drain(peer.queue)
            self.handler.report_unreachable(peer.id)
            await trio.sleep(backoff_s * (0.5 + random.random() / 2))
            backoff_s = min(backoff_s * 2, self.limits.backoff_max_s)

    def _stream_once(self, peer: _Peer) -> str:
        """In a worker thread: one client stream that lives until it fails; returns why it ended."""
        peer.generation += 1
        generation = peer.generation
        try:
            call = self._channel(peer).stream_unary(SEND_METHOD)
            call(self._frames(peer, generation), wait_for_ready=False)
            return "closed"
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return str(code)
        except ValueError as exc:  # the channel was closed under us (the peer's address changed)
            return f"channel closed: {exc}"
        finally:
            peer.generation += 1  # stops the frame generator if grpc still holds it

    def _frames(self, peer: _Peer, generation: int) -> Iterator[bytes]:
        limits = self.limits
        while not self._closing and peer.generation == generation:
            try:
                first = peer.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            size = sum(e.size_bytes() for e in first.entries)
            while len(batch) < limits.max_frame_messages and size < limits.max_frame_bytes:
                try:
                    m = peer.queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(m)
                size += sum(e.size_bytes() for e in m.entries)
            peer.sent_frames += 1
            yield encode_frame(batch)

    # --- snapshots --------------------------------------------------------------------------------
    def _start_snapshot(self, peer: _Peer, m: Message) -> None:
        if peer.snapshot_in_flight or self._nursery is None:
            self.handler.report_snapshot(peer.id, delivered=False)
            return
        peer.snapshot_in_flight = True
        self._nursery.start_soon(self._send_snapshot, peer, m)

    async def _send_snapshot(self, peer: _Peer, m: Message) -> None:
        delivered = False
        try:
            delivered = await trio.to_thread.run_sync(self._snapshot_once, peer, m, abandon_on_cancel=True)
        finally:
            peer.snapshot_in_flight = False
            if not self._closing:
                self.handler.report_snapshot(peer.id, delivered)

    def _snapshot_once(self, peer: _Peer, m: Message) -> bool:
        assert m.snapshot is not None
        header = encode_message(replace(m, snapshot=Snapshot(m.snapshot.meta, b"")))

        def frames() -> Iterator[bytes]:
            yield header
            total = 0
            for chunk in self.handler.snapshot_chunks():
                if self._closing:
                    return
                total += len(chunk)
                yield _TAG_CHUNK + chunk
            yield _TAG_END + _U64.pack(total)

        try:
            call = self._channel(peer).stream_unary(SNAPSHOT_METHOD)
            call(frames(), timeout=self.limits.snapshot_timeout_s, wait_for_ready=False)
            log.info("sent snapshot at %d to node %d", m.snapshot.meta.index, peer.id)
            return True
        except (grpc.RpcError, ValueError) as exc:  # ValueError: the channel was closed under us
            log.warning("snapshot to node %d failed: %s", peer.id, exc)
            return False

    # --- receiving (trio thread, via the bridge) --------------------------------------------------
    def _identify(self, context: grpc.ServicerContext) -> int | None:
        if self._peer_identity is None:
            return None
        try:
            return self._peer_identity(context)
        except Exception as exc:
            log.warning("refused a raft stream from %s: %s", context.peer(), exc)
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, "peer not authenticated") from None

    def _accept(self, messages: list[Message], sender: int | None = None) -> None:
        if sender is not None:
            claimed = len(messages)
            messages = [m for m in messages if m.frm == sender]
            if len(messages) != claimed:
                self.spoofed_messages += claimed - len(messages)
                log.warning("dropped %d raft messages claiming a sender other than node %d",
                            claimed - len(messages), sender)
        mine = [m for m in messages if m.to == self.node_id and m.type not in _LOCAL_ONLY]
        self.received_messages += len(mine)
        if mine:
            self.handler.deliver(mine)


_LOCAL_ONLY = frozenset(
    {MessageType.HUP, MessageType.BEAT, MessageType.UNREACHABLE, MessageType.SNAP_STATUS,
     MessageType.CHECK_QUORUM}
)


def _drain(q: queue.Queue[Message]) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


class _RaftService:
    """The gRPC side of the transport; methods run on the trio loop through the bridge."""

    def __init__(self, transport: RaftTransport) -> None:
        self.t = transport

    @client_stream
    async def Send(self, requests: trio.MemoryReceiveChannel[bytes], context: grpc.ServicerContext) -> bytes:
        sender = self.t._identify(context)
        async for frame in requests:
            try:
                messages = decode_frame(frame)
            except CodecError as exc:
                self.t.rejected_frames += 1
                log.warning("malformed raft frame from %s: %s", context.peer(), exc)
                raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {exc}") from None
            self.t._accept(messages, sender)
        return b""

    @client_stream
    async def Snapshot(self, requests: trio.MemoryReceiveChannel[bytes], context: grpc.ServicerContext) -> bytes:
        sender = self.t._identify(context)
        try:
            header = await requests.receive()
            m = decode_message(header)
        except trio.EndOfChannel:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "empty snapshot stream") from None
        except CodecError as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed snapshot header: {exc}") from None
        if m.type != MessageType.SNAP or m.snapshot is None or m.to != self.t.node_id or (
            sender is not None and m.frm != sender
        ):
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "snapshot stream without a SNAP header")
        receiver = SnapshotReceiver(self.t.staging_dir)
        target = self.t.staging_dir / f"snap-{m.snapshot.meta.index}-{uuid.uuid4().hex[:8]}"
        try:
            total = None
            async for frame in requests:
                if frame[:1] == _TAG_CHUNK and total is None:
                    await trio.to_thread.run_sync(receiver.write, frame[1:])
                elif frame[:1] == _TAG_END and len(frame) == 1 + _U64.size and total is None:
                    (total,) = _U64.unpack(frame[1:])
                else:
                    raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "malformed snapshot frame")
            if total is None or total != receiver.received_bytes:
                raise RpcAbort(grpc.StatusCode.DATA_LOSS, "snapshot stream ended early")
            await trio.to_thread.run_sync(receiver.finish, target)
        except BaseException:
            receiver.abort()
            raise
        self.t._accept([replace(m, snapshot=Snapshot(m.snapshot.meta, str(target).encode()))], sender)
        return b"ok"


def _add_raft_service(servicer: Any, server: grpc.Server) -> None:
    """Register the two client-streaming methods with raw-bytes (de)serialisation."""
    handlers = {
        "Send": grpc.stream_unary_rpc_method_handler(servicer.Send),
        "Snapshot": grpc.stream_unary_rpc_method_handler(servicer.Snapshot),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


__all__ = [
    "SERVICE",
    "RaftPeerHandler",
    "RaftTransport",
    "TransportLimits",
    "decode_frame",
    "encode_frame",
]
