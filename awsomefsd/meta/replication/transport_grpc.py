"""The Raft transport's gRPC side: the frame codec both paths share, and the `Raft` service.

The service's `Send` stream is how builds from before the Raft wire (awsomefsd.rpc.wire, design
note 125) speak to this one, and how this one speaks to them: the transport dials a peer's wire
first and falls back to a `Send` stream when the wire is not there (a rolling upgrade from an
older build). `Snapshot` streams stay on gRPC for every peer: they are rare and bulky, so the
thread hops that cost a small message milliseconds do not matter to them.

Wire format of a `Send` frame (and of a wire frame): u32 message count, then per message u32
length + `encode_message`.
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import trio

from awsomefsd.meta.raft import CodecError, Message, MessageType, Snapshot, decode_message, encode_message
from awsomefsd.meta.replication.lmdb_storage import SnapshotReceiver
from awsomefsd.rpc.bridge import RpcAbort, client_stream

if TYPE_CHECKING:
    from awsomefsd.meta.replication.transport import RaftTransport

log = logging.getLogger(__name__)

SERVICE = "awsomefs.raft.v1.Raft"
SEND_METHOD = f"/{SERVICE}/Send"
SNAPSHOT_METHOD = f"/{SERVICE}/Snapshot"
MAX_FRAME_MESSAGES = 4096
MAX_MESSAGE_BYTES = 64 << 20

_U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
TAG_CHUNK = b"C"
TAG_END = b"E"


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



class RaftService:
    """The gRPC side of the transport; methods run on the trio loop through the bridge."""

    def __init__(self, transport: RaftTransport) -> None:
        self.t = transport

    @client_stream
    async def Send(self, requests: trio.MemoryReceiveChannel[bytes], context: grpc.ServicerContext) -> bytes:
        sender = self.t.identify(context)
        async for frame in requests:
            try:
                messages = decode_frame(frame)
            except CodecError as exc:
                self.t.rejected_frames += 1
                log.warning("malformed raft frame from %s: %s", context.peer(), exc)
                raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {exc}") from None
            self.t.accept(messages, sender)
        return b""

    @client_stream
    async def Snapshot(self, requests: trio.MemoryReceiveChannel[bytes], context: grpc.ServicerContext) -> bytes:
        sender = self.t.identify(context)
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
                if frame[:1] == TAG_CHUNK and total is None:
                    await trio.to_thread.run_sync(receiver.write, frame[1:])
                elif frame[:1] == TAG_END and len(frame) == 1 + U64.size and total is None:
                    (total,) = U64.unpack(frame[1:])
                else:
                    raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "malformed snapshot frame")
            if total is None or total != receiver.received_bytes:
                raise RpcAbort(grpc.StatusCode.DATA_LOSS, "snapshot stream ended early")
            await trio.to_thread.run_sync(receiver.finish, target)
        except BaseException:
            receiver.abort()
            raise
        self.t.accept([replace(m, snapshot=Snapshot(m.snapshot.meta, str(target).encode()))], sender)
        return b"ok"


def open_channel(address: str, credentials: grpc.ChannelCredentials | None, keepalive_ms: int,
                 backoff_s: tuple[float, float], extra: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """The channel to a peer's gRPC listener (its `Send` stream, snapshots, the member calls)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", int(backoff_s[0] * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(backoff_s[0] * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(backoff_s[1] * 1000)),
        *extra,
    ]
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def send_stream(channel: grpc.Channel, frames: Iterator[bytes]) -> str:
    """In a worker thread: one `Send` stream of `frames` (to a peer without the wire) that lives
    until it fails or `frames` ends; returns why it ended."""
    try:
        channel.stream_unary(SEND_METHOD)(frames, wait_for_ready=False)
        return "closed"
    except grpc.RpcError as exc:
        return str(exc.code() if hasattr(exc, "code") else None)
    except ValueError as exc:  # the channel was closed under us (the peer's address changed)
        return f"channel closed: {exc}"


def send_snapshot(channel: grpc.Channel, peer_id: int, m: Message, chunks: Callable[[], Iterator[bytes]],
                  closing: Callable[[], bool], timeout_s: float) -> bool:
    """In a worker thread: stream the SNAP message `m` (its header, then `chunks()` of the state
    machine, then the end frame with their total length); True once the peer has it."""
    assert m.snapshot is not None
    header = encode_message(replace(m, snapshot=Snapshot(m.snapshot.meta, b"")))

    def frames() -> Iterator[bytes]:
        yield header
        total = 0
        for chunk in chunks():
            if closing():
                return
            total += len(chunk)
            yield TAG_CHUNK + chunk
        yield TAG_END + U64.pack(total)

    try:
        call = channel.stream_unary(SNAPSHOT_METHOD)
        call(frames(), timeout=timeout_s, wait_for_ready=False)
        log.info("sent snapshot at %d to node %d", m.snapshot.meta.index, peer_id)
        return True
    except (grpc.RpcError, ValueError) as exc:  # ValueError: the channel was closed under us
        log.warning("snapshot to node %d failed: %s", peer_id, exc)
        return False


def add_raft_service(servicer: Any, server: grpc.Server) -> None:
    """Register the two client-streaming methods with raw-bytes (de)serialisation."""
    handlers = {
        "Send": grpc.stream_unary_rpc_method_handler(servicer.Send),
        "Snapshot": grpc.stream_unary_rpc_method_handler(servicer.Snapshot),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
