"""The userspace WAN link the replication tests put between sites (tests/support/wan.py)."""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.daemon import REPO
from tests.support.wan import WanLink


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionError:
            pass  # the link was cut


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[:2]
    server.shutdown()
    server.server_close()


def exchange(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=30) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        sender.join()
        return bytes(received)


def round_trip_s(sock: socket.socket) -> float:
    start = time.monotonic()
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    return time.monotonic() - start


def refused(address: tuple[str, int]) -> bool:
    """Reset at connect, or at the first exchange (which one depends on timing): refused."""
    try:
        with socket.create_connection(address, timeout=10) as sock:
            round_trip_s(sock)
    except (ConnectionResetError, AssertionError):
        return True
    return False


def test_bytes_cross_unchanged_and_each_round_trip_takes_twice_the_delay(echo: tuple[str, int]) -> None:
    payload = os.urandom(3 << 20)
    with WanLink(echo, delay_s=0.05) as link:
        assert exchange(link.address, payload) == payload
        with socket.create_connection(link.address, timeout=10) as sock:
            trips = sorted(round_trip_s(sock) for _ in range(5))
        assert trips[0] >= 0.1, trips  # 50 ms each way
        assert link.connections == 2


def test_the_rate_cap_bounds_throughput(echo: tuple[str, int]) -> None:
    payload = os.urandom(256 << 10)
    with WanLink(echo, delay_s=0.0, rate_bytes_s=512 << 10) as link:
        start = time.monotonic()
        assert exchange(link.address, payload) == payload
        assert time.monotonic() - start >= 0.4  # 256 KiB at 512 KiB/s, in both directions at once


def test_a_cut_resets_connections_and_refuses_new_ones_until_healed(echo: tuple[str, int]) -> None:
    with WanLink(echo, delay_s=0.0) as link:
        sock = socket.create_connection(link.address, timeout=10)
        assert round_trip_s(sock) >= 0
        link.cut()
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            for _ in range(50):  # the reset reaches us within a few sends
                round_trip_s(sock)
        sock.close()
        assert refused(link.address)
        link.heal()
        assert exchange(link.address, b"back") == b"back"


def test_as_a_process_it_prints_its_port_and_takes_cut_and_heal(echo: tuple[str, int]) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.wan", "127.0.0.1", f"{echo[0]}:{echo[1]}",
                             "--delay-ms", "10"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        assert exchange(("127.0.0.1", port), b"hello") == b"hello"
        for command in ("cut", "heal", "jump"):
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == (f"ok {command}" if command != "jump" else "unknown command 'jump'")
        assert exchange(("127.0.0.1", port), b"again") == b"again"
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_reply_that_takes_longer_than_the_connect_timeout_still_arrives(echo: tuple[str, int]) -> None:
    """The proxy connected upstream with a 5 s time-out that stayed on the socket: a server that
    answered after more than 5 s (the other site applying a large push, digesting a large tree
    for `site verify`, pairing with a large initial sync) had its connection closed under it, and
    the sender saw "Stream removed (Socket closed)" and sent it all again, for ever."""
    with WanLink(echo, delay_s=0.0) as link, socket.create_connection(link.address, timeout=30) as sock:
        assert round_trip_s(sock) < 5
        time.sleep(5.5)  # nothing either way for longer than the connect time-out
        assert round_trip_s(sock) < 5
