"""The one bridge between grpcio (threads) and the daemon's trio event loop.

grpcio's server is thread-based: each RPC runs a handler in a worker thread of a
`ThreadPoolExecutor`. The daemon is a single trio loop. This module lets servicers be written as
plain `async def Method(self, request, context)` coroutines that run *on the trio loop*, so they may
use the same trio locks, nurseries and metadata client as the rest of the daemon.

Concurrency notes (what callers may rely on):

- A handler thread calls `trio.from_thread.run(...)` and blocks until the coroutine finishes; the
  event loop itself never blocks on gRPC. Starting and stopping the grpc server (both blocking
  calls) happen in `trio.to_thread` threads.
- Three limits bound the work: `max_workers` threads accept RPCs, `max_concurrent_rpcs` is the
  grpc-level admission limit (beyond it clients get RESOURCE_EXHAUSTED at once instead of queueing
  without bound), and a `trio.CapacityLimiter(max_inflight)` bounds how many handler coroutines run
  on the loop at the same time. Every call also runs under `trio.fail_after` with the smaller of
  the client's deadline and `max_call_s`, so no RPC holds loop resources forever.
- Coroutines started this way are trio system tasks: cancelling the nursery that runs
  `serve_grpc` does not cancel RPCs in flight; shutdown instead stops accepting, gives in-flight
  RPCs `grace_s` to finish, then cancels the rest through grpc (their threads return UNAVAILABLE
  once the loop is gone).
- A handler reports an error by raising `RpcAbort(code, message)`; any other exception becomes
  INTERNAL with the exception's class name only (no internal details leak to clients) and is logged.
- Unary-unary methods are bridged as above. A method decorated with `@client_stream` serves a
  client-streaming RPC: it runs once per call as a trio system task and reads the requests from a
  bounded `trio.MemoryReceiveChannel` that the grpc worker thread fills. The thread hands each
  request over with `run_sync_soon` and goes back to reading (no round trip to the loop per
  request); back-pressure: it blocks while `STREAM_BUFFER_ITEMS` requests wait for room in the
  full channel, so a fast sender is slowed by TCP flow control, never buffered without bound. Its return value is the single response. A stream occupies one worker thread for
  its lifetime, so `max_workers` bounds concurrent streams too.
- A servicer method that is missing answers UNIMPLEMENTED.
- The client side, for calls the daemon makes to its peers from the loop: `unary_call` awaits a
  grpc call's future on trio without a thread (grpc's completion callback only schedules the
  wake-up with `run_sync_soon`); cancelling the wait cancels the call.
- Unix-socket addresses (`unix:///abs/path`) get mode 0600 with no window where the socket is
  reachable with a wider mode: it is bound inside a private 0700 directory, chmod-ed, then renamed
  into place. A stale socket file left by a crashed daemon is removed; a live one (something accepts
  connections on it) or a non-socket file at that path is an error, never silently replaced.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import inspect
import logging
import os
import socket
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

UNIX_PREFIX = "unix://"
UNIX_PATH_MAX_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
SOCKET_MODE = 0o600
STREAM_BUFFER_ITEMS = 16  # requests of one client stream buffered between grpc's thread and trio
STOP_SLACK_S = 5.0  # beyond the grace period, how long to wait for grpc's own shutdown


class RpcAbort(Exception):
    """Raised by an async handler to end its RPC with `code` and a human-readable `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Binding:
    """One servicer to serve: the generated `add_XServicer_to_server` and the async implementation."""

    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: object


@dataclass(frozen=True)
class BridgeLimits:
    max_workers: int = 8
    max_concurrent_rpcs: int = 64
    max_inflight: int = 16
    max_call_s: float = 60.0
    grace_s: float = 2.0
    max_message_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        assert 1 <= self.max_workers <= 256, self.max_workers
        assert self.max_workers <= self.max_concurrent_rpcs <= 4096, self.max_concurrent_rpcs
        assert 1 <= self.max_inflight <= self.max_concurrent_rpcs, self.max_inflight
        assert 0 < self.max_call_s <= 3600, self.max_call_s
        assert 0 <= self.grace_s <= 600, self.grace_s
        assert 1024 <= self.max_message_bytes <= 64 << 20, self.max_message_bytes


class TrioBridge:
    """Runs async handlers on one trio loop on behalf of grpc worker threads."""

    def __init__(self, token: trio.lowlevel.TrioToken, limits: BridgeLimits) -> None:
        self._token = token
        self._limits = limits
        self._limiter = trio.CapacityLimiter(limits.max_inflight)

    def handle(
        self,
        method: Callable[[Any, grpc.ServicerContext], Awaitable[T]],
        request: Any,
        context: grpc.ServicerContext,
    ) -> T:
        """Called in a grpc worker thread: run `method` on the loop and translate its outcome."""
        remaining = context.time_remaining()
        timeout_s = self._limits.max_call_s
        if remaining is not None:
            timeout_s = min(timeout_s, max(remaining, 0.0))
        try:
            return trio.from_thread.run(
                self._run, method, request, context, timeout_s, trio_token=self._token
            )
        except RpcAbort as abort:
            context.abort(abort.code, abort.message)
        except trio.TooSlowError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:.1f}s")
        except (trio.RunFinishedError, trio.Cancelled):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down")
        except Exception as exc:
            if _is_grpc_abort(context):
                raise
            log.exception("unhandled error in %s", getattr(method, "__qualname__", method))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises

    async def _run(
        self,
        method: Callable[[Any, grpc.ServicerContext], Awaitable[T]],
        request: Any,
        context: grpc.ServicerContext,
        timeout_s: float,
    ) -> T:
        async with self._limiter:
            with trio.fail_after(timeout_s):
                return await method(request, context)


    def handle_stream(
        self,
        method: Callable[[trio.MemoryReceiveChannel[Any], grpc.ServicerContext], Awaitable[T]],
        requests: Any,
        context: grpc.ServicerContext,
    ) -> T:
        """Called in a grpc worker thread for a client stream: feed `method` item by item."""
        token = self._token
        try:
            send, done, outcome = trio.from_thread.run(
                self._start_stream, method, context, trio_token=token
            )
        except (trio.RunFinishedError, trio.Cancelled):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down")
        feed = _StreamFeed(token, send, STREAM_BUFFER_ITEMS)
        try:
            try:
                for item in requests:
                    feed.put(item)
            except grpc.RpcError:
                pass  # the client went away: the handler sees the end of its stream
            finally:
                feed.close()
            trio.from_thread.run(done.wait, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down")
        if isinstance(outcome.get("error"), RpcAbort):
            abort = outcome["error"]
            context.abort(abort.code, abort.message)
        if "error" in outcome:
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(outcome['error']).__name__})")
        return outcome["value"]

    async def _start_stream(
        self,
        method: Callable[[trio.MemoryReceiveChannel[Any], grpc.ServicerContext], Awaitable[T]],
        context: grpc.ServicerContext,
    ) -> tuple[trio.MemorySendChannel[Any], trio.Event, dict[str, Any]]:
        send, recv = trio.open_memory_channel[Any](STREAM_BUFFER_ITEMS)
        done = trio.Event()
        outcome: dict[str, Any] = {}

        async def run() -> None:
            try:
                async with recv:
                    outcome["value"] = await method(recv, context)
            except Exception as exc:  # a system task must not raise: it would crash the loop
                if not isinstance(exc, RpcAbort):
                    log.exception("unhandled error in %s", getattr(method, "__qualname__", method))
                outcome["error"] = exc
            finally:
                done.set()

        trio.lowlevel.spawn_system_task(run)
        return send, done, outcome


class _StreamFeed:
    """Hands one client stream's requests from its grpc thread to the loop without a round trip
    per request: the thread schedules each item with `run_sync_soon` and goes back to reading.
    At most `limit` items are on their way (scheduled, or waiting for room in the handler's
    channel); beyond that the thread blocks, so back-pressure still reaches the sender."""

    def __init__(self, token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[Any], limit: int) -> None:
        self._token = token
        self._send = send
        self._room = threading.Semaphore(limit)
        self._waiting: collections.deque[Any] = collections.deque()  # loop only: no room yet
        self._pumping = False
        self._eof = False

    # --- the grpc thread ---
    def put(self, item: Any) -> None:
        while not self._room.acquire(timeout=1.0):
            self._token.run_sync_soon(_nothing)  # raises RunFinishedError once the loop is gone
        self._token.run_sync_soon(self._arrive, item)

    def close(self) -> None:
        self._token.run_sync_soon(self._arrive_eof)

    # --- the loop (run_sync_soon callbacks must not raise) ---
    def _arrive(self, item: Any) -> None:
        if not self._pumping:
            try:
                self._send.send_nowait(item)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._room.release()  # the handler stopped reading: discard the rest
                return
            else:
                self._room.release()
                return
            self._pumping = True
            trio.lowlevel.spawn_system_task(self._pump)
        self._waiting.append(item)

    def _arrive_eof(self) -> None:
        self._eof = True
        if not self._pumping:
            self._send.close()

    async def _pump(self) -> None:
        try:
            while self._waiting:
                try:
                    await self._send.send(self._waiting[0])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                self._waiting.popleft()
                self._room.release()
        finally:
            self._pumping = False
        if self._eof:
            self._send.close()


def _nothing() -> None:
    pass


def client_stream(method: F) -> F:
    """Mark an `async def M(self, requests: MemoryReceiveChannel, context)` as a client stream."""
    method.__awsomefs_client_stream__ = True  # type: ignore[attr-defined]
    return method


def _is_grpc_abort(context: grpc.ServicerContext) -> bool:
    """True when the handler already called context.abort itself (grpc raised to unwind)."""
    code = getattr(context, "code", None)
    return callable(code) and code() not in (None, grpc.StatusCode.OK)


def _unimplemented(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented by this plugin")


class _SyncServicer:
    """What grpc sees: each attribute lookup yields a sync handler that defers to the async method."""

    def __init__(self, impl: object, bridge: TrioBridge) -> None:
        self._impl = impl
        self._bridge = bridge

    def __getattr__(self, name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        method = getattr(self._impl, name, None)
        if method is None:
            return _unimplemented
        if not inspect.iscoroutinefunction(method):
            raise TypeError(f"{type(self._impl).__name__}.{name} must be `async def`")
        bridge = self._bridge
        if getattr(method, "__awsomefs_client_stream__", False):

            def stream_handler(requests: Any, context: grpc.ServicerContext) -> Any:
                return bridge.handle_stream(method, requests, context)

            return stream_handler

        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            return bridge.handle(method, request, context)

        return handler


def unix_socket_path(address: str) -> Path | None:
    """The filesystem path of a `unix:///abs/path` address, None for other addresses."""
    if not address.startswith(UNIX_PREFIX):
        return None
    path = Path(address[len(UNIX_PREFIX) :])
    if not path.is_absolute():
        raise ValueError(f"unix socket address must be absolute (unix:///path): {address!r}")
    if len(os.fsencode(path)) > UNIX_PATH_MAX_BYTES:
        raise ValueError(f"unix socket path longer than {UNIX_PATH_MAX_BYTES} bytes: {path}")
    return path


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse a live socket or a file of another kind."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise FileExistsError(f"{path} is served by another process; is a daemon already running?")


def _bind_unix_private(server: grpc.Server, path: Path, credentials: grpc.ServerCredentials | None) -> None:
    """Bind in a fresh 0700 directory, chmod 0600, then rename onto `path` (no exposure window)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    private = Path(tempfile.mkdtemp(prefix=".sock-", dir=path.parent))
    try:
        staged = private / "s"
        if len(os.fsencode(staged)) > UNIX_PATH_MAX_BYTES:
            raise ValueError(f"socket directory path too long to stage a socket in: {path.parent}")
        _add_port(server, UNIX_PREFIX + os.fspath(staged), credentials)
        os.chmod(staged, SOCKET_MODE)
        os.rename(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            for leftover in private.iterdir():
                leftover.unlink()
        with contextlib.suppress(FileNotFoundError):
            private.rmdir()


def _add_port(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `address`; OSError when it cannot be. grpc says so with RuntimeError (older releases
    returned port 0), which would reach the user as a traceback."""
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(errno.EADDRINUSE, f"cannot listen on {address} (the address is in use, or not this host's)")
    return port


def _bound_address(address: str, port: int) -> str:
    """`host:0` becomes `host:<port>`; other addresses are returned unchanged."""
    if address.startswith(UNIX_PREFIX) or not address.endswith(":0"):
        return address
    return f"{address[:-2]}:{port}"


async def serve_grpc(
    bindings: Sequence[Binding],
    address: str,
    *,
    limits: BridgeLimits = BridgeLimits(),
    credentials: grpc.ServerCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `bindings` on `address` until cancelled; `task_status.started(bound_address)`.

    `address` is `unix:///abs/path` (mode 0600) or `host:port` (`:0` picks a port; the started
    value carries the real one). `credentials` turns on TLS for TCP listeners (the Raft transport);
    `options` adds grpc channel arguments (e.g. the keepalive policy a peer-to-peer service needs).
    On cancellation the server stops accepting, in-flight RPCs get `limits.grace_s` to finish,
    and a unix socket file is removed.
    """
    assert bindings, "nothing to serve"
    sock_path = unix_socket_path(address)
    bridge = TrioBridge(trio.lowlevel.current_trio_token(), limits)
    executor = ThreadPoolExecutor(max_workers=limits.max_workers, thread_name_prefix="grpc")
    channel_args = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
        *options,
    ]
    server = grpc.server(executor, options=channel_args, maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    for binding in bindings:
        binding.add_to_server(_SyncServicer(binding.servicer, bridge), server)

    def bind_and_start() -> str:
        if sock_path is not None:
            remove_stale_socket(sock_path)
            _bind_unix_private(server, sock_path, credentials)
            bound = address
        else:
            bound = _bound_address(address, _add_port(server, address, credentials))
        server.start()
        return bound

    try:
        bound = await trio.to_thread.run_sync(bind_and_start)
        log.info("grpc serving on %s", bound)
        task_status.started(bound)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            stopped = server.stop(limits.grace_s)
            # The loop keeps running while we wait, so handlers blocked in from_thread can finish.
            await trio.to_thread.run_sync(stopped.wait, limits.grace_s + STOP_SLACK_S)
            executor.shutdown(wait=False, cancel_futures=True)
            if sock_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(sock_path.lstat().st_mode):
                        sock_path.unlink()


# --- the client side ---------------------------------------------------------------------------------
async def unary_call(channel: grpc.Channel, method: str, request: bytes, timeout_s: float) -> bytes:
    """Call the unary `method` (raw bytes both ways) on `channel` from the trio loop and return the
    reply. Raises grpc.RpcError when the call fails, ValueError when the channel was closed before
    the request could be sent."""
    future = channel.unary_unary(method).future(request, timeout=timeout_s)
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
    reply: bytes = future.result()
    return reply
