"""Checks made before a daemon changes anything: the addresses it will listen on are free.

Why before: `init` formats the device and `join` becomes a member of the cluster before the
listeners are bound; a port taken by another process (a second daemon, an old one still running)
would otherwise be found only then, leaving a formatted device or a member that never served. And
some listeners would not fail at all: gRPC binds TCP ports with SO_REUSEPORT, and the unix sockets
(the control socket, CSI) are renamed into place, so a second daemon would silently share or steal
them. Each refusal is one line naming the setting to change.

The check binds each TCP address and lets it go (a port in TIME_WAIT is free: SO_REUSEADDR), and
connects to each unix socket path that exists (a socket nobody accepts on is a stale file).
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from awsomefsd.config import Settings
from awsomefsd.config.addresses import split_host_port
from awsomefsd.meta.replication.transport import WIRE_PORT_OFFSET


class PortInUse(Exception):
    """A listener's address cannot be used; the message names the setting."""


def tcp_free(host: str, port: int, setting: str) -> None:
    """Raise PortInUse unless `host:port` can be bound now."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"{setting}: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{setting}: port {port} on {host or '*'} is already in use "
                                "(another awsomefsd, or another program)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PortInUse(f"{setting}: {host} is not an address of this machine") from None
            raise PortInUse(f"{setting}: cannot listen on {host or '*'}:{port}: {exc.strerror}") from None


def unix_free(path: Path, setting: str) -> None:
    """Raise PortInUse when a live process accepts connections on the unix socket `path`."""
    if not path.exists():
        return
    if not path.is_socket():
        raise PortInUse(f"{setting}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return  # a stale socket file: the daemon replaces it
    raise PortInUse(f"{setting}: {path} is in use by a running process")


def check_listeners(settings: Settings, *, cluster_listen: str | None = None, control: Path | None = None) -> None:
    """Every address the daemon will listen on is free: metrics (when on, unless port 0), CSI,
    for a cluster member its cluster listener, its join listener (port + 1), its Raft wire
    (port + 2) and its control
    socket, and with [site] its link listener and its pairing listener (port + 1). Raises
    PortInUse naming the setting."""
    if settings.metrics.enabled:
        tcp_free(settings.metrics.host, settings.metrics.port, "[metrics] port (--metrics-port)")
    if settings.csi.socket is not None:
        unix_free(settings.csi.socket, "[csi] socket (--csi-socket)")
    if cluster_listen:
        host, port = split_host_port(cluster_listen)
        tcp_free(host, port, f"[cluster] listen (--listen {cluster_listen})")
        tcp_free(host, port + 1, f"the join listener, [cluster] listen port + 1 ({port + 1})")
        tcp_free(host, port + WIRE_PORT_OFFSET,
                 f"the Raft wire, [cluster] listen port + {WIRE_PORT_OFFSET} ({port + WIRE_PORT_OFFSET})")
    if settings.site.listen:
        host, port = split_host_port(settings.site.listen)
        tcp_free(host, port, f"[site] listen ({settings.site.listen})")
        tcp_free(host, port + 1, f"the site pairing listener, [site] listen port + 1 ({port + 1})")
    if control is not None:
        unix_free(control, "the control socket (is this node's daemon already running?)")


__all__ = ["PortInUse", "check_listeners", "tcp_free", "unix_free"]
