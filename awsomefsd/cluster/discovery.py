"""Finding the cluster's members: zeroconf on the local link, or seed addresses when there is none.

Every member advertises `_awsomefs._tcp.local.` with its cluster port as the SRV port and a TXT record
carrying `cluster=<uuid>`, `join=<join port>` and `v=1`. A joiner browses for that service type and
keeps only instances whose TXT names its cluster id; instances of other clusters on the same link are
reported separately (for a log line) and never used. Nothing found by discovery is trusted: the
joiner still checks the CA pin and the server certificate (see `join_service.py`).

When multicast is not available the user passes `--peer host:port` (a member's cluster address);
`find_join_peers` then uses those seeds, and the token's own seeds, without any multicast at all. A
member's join listener is on its cluster port + `JOIN_PORT_OFFSET` unless its advertisement says
otherwise.

python-zeroconf runs its own thread; everything here blocks and is meant to be called through
`trio.to_thread.run_sync` from the daemon.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
    get_all_addresses,
)

from awsomefsd.config.addresses import join_host_port, split_host_port

log = logging.getLogger(__name__)

SERVICE_TYPE = "_awsomefs._tcp.local."
TXT_VERSION = "1"
JOIN_PORT_OFFSET = 1
RESOLVE_TIMEOUT_S = 1.0
MAX_SERVICES = 256  # instances looked at per browse; a link with more is not ours to sort out


@dataclass(frozen=True, order=True)
class Peer:
    """A member to contact: its cluster (mTLS) address and its join listener."""

    host: str
    port: int
    join_port: int

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def join_address(self) -> str:
        return join_host_port(self.host, self.join_port)

    @classmethod
    def from_seed(cls, seed: str) -> Peer:
        """A `--peer host:port` seed: the member's cluster address; its join port by convention."""
        host, port = split_host_port(seed)
        if not 1 <= port <= 65535 - JOIN_PORT_OFFSET:
            raise ValueError(f"seed {seed!r}: port out of range")
        return cls(host, port, port + JOIN_PORT_OFFSET)


@dataclass
class BrowseResult:
    """Members of the wanted cluster, and instance names of other clusters seen on the link."""

    members: list[Peer] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


def _local_ipv4() -> list[str]:
    return [a for a in get_all_addresses() if not ipaddress.ip_address(a).is_loopback]


class Advertisement:
    """Announce this member on the local link while the context is open (blocking calls).

    `addresses` default to every non-loopback IPv4 address of this network namespace; pass the
    listen address when the daemon binds one address only.
    """

    def __init__(
        self,
        cluster_id: uuid.UUID,
        instance: str,
        port: int,
        *,
        join_port: int | None = None,
        addresses: Sequence[str] | None = None,
    ) -> None:
        addrs = list(addresses) if addresses is not None else _local_ipv4()
        if not addrs:
            raise OSError("no non-loopback IPv4 address to advertise")
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in addrs],
            port=port,
            properties={
                "cluster": str(cluster_id),
                "join": str(join_port if join_port is not None else port + JOIN_PORT_OFFSET),
                "v": TXT_VERSION,
            },
            server=f"{instance}.local.",
        )
        self._zc: Zeroconf | None = None

    @property
    def name(self) -> str:
        return self._info.name

    def __enter__(self) -> Advertisement:
        self._zc = Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
        try:
            self._zc.register_service(self._info, allow_name_change=True)
        except BaseException:
            self._zc.close()
            raise
        log.info("advertising %s on port %d", self._info.name, self._info.port)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._zc is not None:
            try:
                self._zc.unregister_service(self._info)
            finally:
                self._zc.close()
                self._zc = None


def _peer_of(info: ServiceInfo) -> tuple[str | None, Peer | None]:
    """(cluster id text, peer) from a resolved instance; (None, None) for one that is not ours."""
    props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
    if props.get("v") != TXT_VERSION or "cluster" not in props:
        return None, None
    addresses = info.parsed_addresses(IPVersion.V4Only)
    join = props.get("join", "")
    if not addresses or info.port is None or not join.isdigit() or not 1 <= int(join) <= 65535:
        return props["cluster"], None
    return props["cluster"], Peer(addresses[0], info.port, int(join))


def browse(cluster_id: uuid.UUID, timeout_s: float, *, min_members: int = 1) -> BrowseResult:
    """Members of `cluster_id` advertised on the link, returned as soon as `min_members` are known or
    when `timeout_s` runs out (possibly with none: the caller then reports "no member found")."""
    assert timeout_s > 0 and min_members >= 1
    deadline = time.monotonic() + timeout_s
    names: queue.Queue[str] = queue.Queue(maxsize=MAX_SERVICES)
    result = BrowseResult()
    wanted = str(cluster_id)

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            try:
                names.put_nowait(name)
            except queue.Full:
                pass

    zc = Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
    seen: set[str] = set()
    try:
        while len(result.members) < min_members:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                name = names.get(timeout=remaining)
            except queue.Empty:
                break
            if name in seen:
                continue
            info = ServiceInfo(SERVICE_TYPE, name)
            if not info.request(zc, timeout=1000 * min(RESOLVE_TIMEOUT_S, max(deadline - time.monotonic(), 0.05))):
                continue  # not resolved in time; a later Updated event retries it
            seen.add(name)
            cluster, peer = _peer_of(info)
            if cluster == wanted and peer is not None:
                result.members.append(peer)
            else:
                result.others.append(name)
    finally:
        browser.cancel()
        zc.close()
    if result.others:
        log.info("ignored %d AwsomeFS services of other clusters: %s", len(result.others), result.others)
    return result


def find_join_peers(
    cluster_id: uuid.UUID, seeds: Iterable[str] = (), *, timeout_s: float = 5.0, min_members: int = 1
) -> list[Peer]:
    """Where to join: the seeds when any are given (no multicast at all), else zeroconf members."""
    seed_list = list(seeds)
    if seed_list:
        return [Peer.from_seed(s) for s in seed_list]
    return browse(cluster_id, timeout_s, min_members=min_members).members
