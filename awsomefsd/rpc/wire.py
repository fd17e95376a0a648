"""Length-prefixed frames between daemons on trio's own sockets, with mutual TLS: the fast path.

Why not gRPC here: grpcio's synchronous stack hands every message across threads (our sender
thread, grpc's completion-queue threads, a server worker thread, then the trio loop), and each hop
waits for the GIL. Between two idle daemons on this project's 2-core machines one small Raft
message and its answer took 1.0-2.1 ms over the gRPC stream, against 0.23-0.27 ms over a trio TLS
stream (design note 125). Raft's heartbeats, appends and ReadIndex rounds are on the answer path of
every fsync and every read a follower confirms, so the cluster's hot path uses this wire, and gRPC
stays for what is rare or must stay compatible (snapshots, the member calls, older builds).

A connection carries frames one way, dialler to listener: the dialler first sends `MAGIC` (a
version: a listener refuses any other), then frames of `u32 length + payload`, each at most the
`max_frame_bytes` both sides were given. The listener answers nothing; a frame it refuses closes
the connection. Who is on the other end is TLS's business: the listener's context requires a
client certificate chaining to the cluster CA, the dialler's checks the listener's certificate
names the node it dialled (`server_hostname`); `FrameStream.peer_certificate` hands the verified
certificate to the caller, which decides what it may say.

Dead peers: TCP keepalive (idle 2 s, then 1 s probes, 3 of them) and TCP_USER_TIMEOUT (4 s of
unacknowledged data) end a connection to a host that vanished or was cut off, so a partition is
noticed in seconds, as gRPC's keepalive pings did. A peer process that is paused keeps its kernel
acknowledging until its buffers fill; Raft tolerates the delay (the leader's inflight window
fills and it probes), and the connection carries on when the process resumes.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

MAGIC = b"AWSW\x01"
KEEPALIVE_IDLE_S = 2
KEEPALIVE_INTERVAL_S = 1
KEEPALIVE_PROBES = 3
USER_TIMEOUT_MS = 4000
HANDSHAKE_TIMEOUT_S = 5.0
_U32 = struct.Struct("<I")
_RECEIVE_BYTES = 256 << 10


class WireError(Exception):
    """The other end broke the framing (bad magic, an oversized frame, a frame cut short)."""


def _tune(sock: trio.socket.SocketType) -> None:
    """Keepalive and a user timeout, so a vanished peer ends the connection within seconds."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


@dataclass(frozen=True)
class WireSecurity:
    """Mutual TLS on the Raft wire (awsomefsd.cluster.tls builds it for the Raft transport): `server` requires a cluster
    certificate from a dialler, `client` dials with ours, `name_of(peer)` is the name the dialled
    node's certificate must carry, `identify(der)` the node a connection's certificate names
    (checked again before every frame, so a revocation cuts an open connection; raises to refuse)."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    name_of: Callable[[int], str]
    identify: Callable[[bytes | None], int]


class FrameStream:
    """One framed connection (TLS or plain). Not safe for two concurrent senders or receivers."""

    def __init__(self, stream: trio.abc.Stream, max_frame_bytes: int) -> None:
        self._stream = stream
        self._max = max_frame_bytes
        self._buffer = bytearray()

    async def send_frame(self, payload: bytes, prefix: bytes = b"") -> None:
        """Send `prefix + payload` as one frame (the prefix saves the caller a copy of the payload)."""
        size = len(prefix) + len(payload)
        assert size <= self._max, (size, self._max)
        await self._stream.send_all(_U32.pack(size) + prefix + payload)

    async def receive_frame(self) -> bytes | None:
        """The next frame, or None when the other end closed cleanly between frames."""
        if not await self._fill(4):
            return None
        (size,) = _U32.unpack_from(self._buffer)
        if size > self._max:
            raise WireError(f"a frame of {size} bytes (at most {self._max})")
        if not await self._fill(4 + size):
            raise WireError("the connection ended inside a frame")
        frame = bytes(self._buffer[4 : 4 + size])
        del self._buffer[: 4 + size]
        return frame

    async def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            data = await self._stream.receive_some(_RECEIVE_BYTES)
            if not data:
                if self._buffer:
                    raise WireError("the connection ended inside a frame")
                return False
            self._buffer += data
        return True

    async def receive_exactly(self, size: int) -> bytes:
        """`size` bytes outside the framing (the magic); WireError when the connection ends first."""
        if not await self._fill(size):
            raise WireError("the connection ended before it said anything")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def peer_certificate(self) -> bytes | None:
        """The other end's verified certificate (DER); None on a plain connection."""
        if isinstance(self._stream, trio.SSLStream):
            der = self._stream.getpeercert(binary_form=True)
            return bytes(der) if der else None
        return None

    async def close_now(self) -> None:
        """Close without waiting for the other end (no TLS goodbye to a peer that may be gone)."""
        await trio.aclose_forcefully(self._stream)


async def dial(host: str, port: int, *, ssl_context: ssl.SSLContext | None, server_hostname: str | None,
               max_frame_bytes: int, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> FrameStream:
    """Connect, shake hands and send the magic; OSError, ssl.SSLError or trio.TooSlowError on failure,
    ConnectionRefusedError when every address refused (nothing listens there)."""
    with trio.fail_after(timeout_s):
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            if _all_refused(exc):
                raise ConnectionRefusedError(f"{host}:{port} refused the connection") from None
            raise
        try:
            _tune(tcp.socket)
            stream: trio.abc.Stream = tcp
            if ssl_context is not None:
                stream = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname)
                await stream.do_handshake()
            await stream.send_all(MAGIC)
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
    return FrameStream(stream, max_frame_bytes)


async def serve(handle: Callable[[FrameStream], Awaitable[None]], listeners: list[trio.SocketListener], *,
                ssl_context: ssl.SSLContext | None, max_frame_bytes: int,
                on_error: Callable[[str, BaseException], None],
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept connections on `listeners` (trio.open_tcp_listeners) until cancelled; started(the
    bound port). Each connection that completes the handshake and sends the magic within
    HANDSHAKE_TIMEOUT_S is given to `handle` in its own task and closed when `handle` returns;
    one that does not, or whose `handle` fails on the connection (a broken stream, a frame
    refused), is closed and reported to `on_error(peer, error)`."""
    bound = listeners[0].socket.getsockname()[1]

    async def accepted(tcp: trio.SocketStream) -> None:
        peer = _peer_name(tcp)
        try:
            _tune(tcp.socket)
            stream: trio.abc.Stream = tcp
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                if ssl_context is not None:
                    stream = trio.SSLStream(tcp, ssl_context, server_side=True)
                    await stream.do_handshake()
                framed = FrameStream(stream, max_frame_bytes)
                magic = await framed.receive_exactly(len(MAGIC))
                if magic != MAGIC:
                    raise WireError(f"not an awsomefs wire connection (began {magic!r})")
        except CONNECTION_ERRORS as exc:
            on_error(peer, exc)
            await trio.aclose_forcefully(tcp)
            return
        try:
            await handle(framed)
        except CONNECTION_ERRORS as exc:
            on_error(peer, exc)
        finally:
            await trio.aclose_forcefully(stream)

    task_status.started(bound)
    await trio.serve_listeners(accepted, listeners)


CONNECTION_ERRORS = (OSError, ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                      WireError)


def _all_refused(exc: BaseException) -> bool:
    """trio reports a failed connect as OSError from the attempts' errors (one or a group)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return all(_all_refused(e) for e in cause.exceptions)
    return cause is not None and _all_refused(cause)


def _peer_name(tcp: trio.SocketStream) -> str:
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"
