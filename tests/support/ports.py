"""Ports for a test's listeners that nothing else takes between the probe and the listen.

A port the kernel picks for bind(0) lies in its ephemeral range (ip_local_port_range), the range
it also draws every outgoing connection's port from: between the probe and the listener's own
bind, a connection of another test (a parallel worker's gRPC clients) may take it, and the
listener fails with "address in use" (tests/raft/test_transport.py in a CI run). So a port is
drawn at random below that range, where the kernel hands out nothing by itself, and probed.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10_000
"""Below this, well-known services' ports (and the project's defaults, 7470, 9337, 9450...)."""


def free_port(host: str = "127.0.0.1", *, with_next: bool = False) -> int:
    """A port on `host` with nothing bound to it now (`with_next`: nor to the one above it, for a
    daemon's join listener beside its Raft port), outside the kernel's ephemeral range."""
    top = _ephemeral_start() - 1
    draw = random.SystemRandom()
    for _ in range(1000):
        port = draw.randrange(LOWEST, top) if top - LOWEST > 1000 else _kernel_pick(host)
        if is_free(port, host) and (not with_next or is_free(port + 1, host)):
            return port
    raise AssertionError(f"no free port on {host}")


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _kernel_pick(host: str) -> int:
    """A port the kernel picks (where no room is left below its ephemeral range)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Is nothing bound to `port` on `host` now?"""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
