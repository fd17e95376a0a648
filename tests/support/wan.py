"""A WAN between two sites, in user space: this kernel has no netem (DESIGN §10), so replication
tests put this TCP proxy between the sites. Each direction of each connection gets a one-way
delay and a bandwidth cap (a token bucket), and the whole link can be cut (every connection reset,
new ones refused) and healed, which is how a test partitions two sites.

In-process (`WanLink`, threads), or as a process in a network namespace like the S3 test server:
`python -m tests.support.wan LISTEN_ADDRESS UPSTREAM_HOST:PORT [--delay-ms N] [--rate-kib-s N]`
prints its port, then takes `cut`, `heal` and `quit` lines on stdin.

Everything is bounded: bytes held per direction (`max_buffered_bytes`, then the reader waits, as
a real link's sender would), connections at once, and every thread stops with the link.
"""

from __future__ import annotations

import argparse
import collections
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

CHUNK_BYTES = 64 << 10
MAX_CONNECTIONS = 256


@dataclass
class WanLink:
    upstream: tuple[str, int]
    delay_s: float = 0.05
    rate_bytes_s: float | None = None
    """None: no cap."""
    listen: str = "127.0.0.1"
    port: int = 0
    """0: any free port (the root namespace); a fixed one inside a test's own network namespace."""
    max_buffered_bytes: int = 16 << 20
    connections: int = 0
    """Accepted so far."""
    _server: socket.socket | None = None
    _cut: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _open: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.getsockname()[:2]
        return host, port

    def start(self) -> WanLink:
        self._server = socket.create_server((self.listen, self.port))
        self._server.settimeout(0.2)
        self._spawn(self._accept)
        return self

    def cut(self) -> None:
        """Partition: reset every connection, refuse new ones until `heal`."""
        self._cut.set()
        with self._lock:
            for sock in list(self._open):
                _reset(sock)
            self._open.clear()

    def heal(self) -> None:
        self._cut.clear()

    def stop(self) -> None:
        self._stop.set()
        self.cut()
        for thread in self._threads:
            thread.join(5)
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> WanLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set() or len(self._open) >= 2 * MAX_CONNECTIONS:  # two sockets each
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)  # the 5 s were for connecting: a reply may take longer to come
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.connections += 1
                self._open |= {client, server}
            directions_left = [2]
            for source, sink in ((client, server), (server, client)):
                self._direction(source, sink, (client, server), directions_left)

    def _finished(self, pair: tuple[socket.socket, socket.socket], directions_left: list[int]) -> None:
        """One direction ended; when both have, the connection is closed and forgotten."""
        with self._lock:
            directions_left[0] -= 1
            if directions_left[0] == 0:
                for sock in pair:
                    self._open.discard(sock)
                    sock.close()

    def _direction(self, source: socket.socket, sink: socket.socket, pair: tuple[socket.socket, socket.socket],
                   directions_left: list[int]) -> None:
        """One way of one connection: a reader stamps chunks, a writer sends each `delay_s` after
        it was read, no faster than the rate."""
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()
        held = [0]

        def read() -> None:
            while not self._stop.is_set():
                try:
                    data = source.recv(CHUNK_BYTES)
                except OSError:
                    data = b""
                with ready:
                    while held[0] >= self.max_buffered_bytes and not self._stop.is_set():
                        ready.wait(0.2)
                    queue.append((time.monotonic() + self.delay_s, data))
                    held[0] += len(data)
                    ready.notify_all()
                if not data:
                    return

        def write() -> None:
            try:
                send_delayed()
            finally:
                self._finished(pair, directions_left)

        def send_delayed() -> None:
            allowance, last = 0.0, time.monotonic()
            while not self._stop.is_set():
                with ready:
                    while not queue and not self._stop.is_set():
                        ready.wait(0.2)
                    if not queue:
                        return
                    due, data = queue.popleft()
                    held[0] -= len(data)
                    ready.notify_all()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    _shutdown_write(sink)
                    return
                if self.rate_bytes_s is not None:
                    now = time.monotonic()
                    allowance = min(allowance + (now - last) * self.rate_bytes_s, float(CHUNK_BYTES))
                    last = now
                    if allowance < len(data):
                        time.sleep((len(data) - allowance) / self.rate_bytes_s)
                        last = time.monotonic()
                        allowance = 0.0
                    else:
                        allowance -= len(data)
                try:
                    sink.sendall(data)
                except OSError:
                    _reset(source)
                    return

        self._spawn(read)
        self._spawn(write)


def _reset(sock: socket.socket) -> None:
    """Reset the connection: the peer gets an RST (linger 0), and our own thread blocked in recv
    on it wakes (shutdown for reading: close alone does not wake another thread's recv)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("listen")
    parser.add_argument("upstream", help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--rate-kib-s", type=float, default=0.0, help="0: no cap")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    link = WanLink((host, int(port)), args.delay_ms / 1000, args.rate_kib_s * 1024 or None, listen=args.listen,
                   port=args.port).start()
    print(link.address[1], flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "cut":
            link.cut()
        elif command == "heal":
            link.heal()
        elif command == "quit":
            break
        print(f"ok {command}" if command in ("cut", "heal") else f"unknown command {command!r}", flush=True)
    link.stop()


if __name__ == "__main__":
    main()
