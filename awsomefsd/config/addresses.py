"""The one form of every address the settings and the daemons pass around: `host:port`, an IPv6
host in brackets (`[fd00::5]:9450`). Listen, advertise, peer and seed addresses are all read and
written here, so a setting checked when the settings load is read the same way when a listener
binds it."""

from __future__ import annotations


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into its parts (ValueError otherwise)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host.strip("[]"):
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    """`split_host_port`'s inverse: an IPv6 host goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
