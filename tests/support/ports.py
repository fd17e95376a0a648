"""Ports for a test's listeners that nothing else takes between the probe and the listen.

A port the kernel picks for bind(0) lies in its ephemeral range (ip_local_port_range), the range
it also draws every outgoing connection's port from: between the probe and the listener's own
bind, a connection of another test (a parallel worker's gRPC clients) may take it, and the
listener fails with "address in use" (tests/raft/test_transport.py in a CI run). So a port is
drawn below that range, where the kernel hands out nothing by itself, and probed.

A random draw alone still collided (CI on 2e94740: a Raft node's gRPC port was taken, most likely
by another test's listener on a drawn port's neighbour, which nobody had probed): every port is
the first of a block of `BLOCK` (a daemon listens on port, port + 1 and port + 2), the whole block
is probed, each xdist worker draws from its own slice of the range, and a process never hands
out a block that overlaps one it handed out before.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

LOWEST = 10_000
"""Below this, well-known services' ports (and the project's defaults, 7470, 9337, 9450...)."""
BLOCK = 3
"""Ports a daemon derives from its listen port: the port, the join or pairing listener (+1) and
the Raft wire (+2)."""

_handed: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` with nothing bound to it nor to the `BLOCK - 1` ports above it now,
    outside the kernel's ephemeral range and this worker's own, not handed out before here."""
    low, high = _slice()
    draw = random.SystemRandom()
    for _ in range(1000):
        port = draw.randrange(low, high - BLOCK) if high - low > 10 * BLOCK else _kernel_pick(host)
        block = range(port, port + BLOCK)
        if not _handed.intersection(block) and all(is_free(p, host) for p in block):
            _handed.update(block)
            return port
    raise AssertionError(f"no free port on {host}")


def _slice() -> tuple[int, int]:
    """This process's part of [LOWEST, the ephemeral range): one per xdist worker."""
    top = _ephemeral_start()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker) % count if worker.isdigit() else 0
    width = (top - LOWEST) // count
    return LOWEST + index * width, LOWEST + (index + 1) * width


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
