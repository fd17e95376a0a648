"""This site's end of the link to another site (design note 48), as every job of the link shares
it: who this site is and where it listens, what it knows of the peer (its pinned CA, its removed
members, its addresses), the link's figures (`LinkState`), and the checks every call from the peer
passes.

The jobs are mixins of `Endpoint`, each in its own module: pairing (repl/pairing.py), receiving
the peer's operations (repl/receiver.py), shipping ours (repl/shipper.py, with what the peer holds
of our large files in repl/bases.py) and answering the `site` commands (repl/control.py).
repl/service.py's `SiteService` puts them together and runs them: one object, whose state they
share, as they did when they were one class.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import trio
from cryptography import x509

from awsomefsd.cluster.ca import MAX_REVOCATIONS, CertificateError, Revocations, cluster_dns_name
from awsomefsd.cluster.tls import NodeCredentials, authenticated_peer
from awsomefsd.crdt.hlc import EPOCH, Stamp
from awsomefsd.fs.data import FileData
from awsomefsd.fs.operations import Operations
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.rpc.bridge import RpcAbort

log = logging.getLogger(__name__)

LINK_SERVICE = "awsomefs.site.v1.Link"
MAX_MESSAGE_BYTES = 64 << 20
INLINE_BYTES = 1 << 20
"""Content versions up to this size travel inside the push (one round trip for many files)."""
DELTA = "delta"
FEATURES = (DELTA,)
"""What this build's link listener takes beyond the first version's protocol, told in `Cursor`:
a sender uses a feature only when its peer names it, so sites upgrade one at a time."""
MAX_STAGE_PIECES = 2048
"""Changed ranges one `Stage` carries at most (a delta names at most MAX_SHARED_RANGES unchanged)."""
CALL_TIMEOUT_S = 60.0
MAX_DELEGATIONS_PER_BATCH = 256
"""Directories and files of a batch another member may hold, taken one per refusal (each a
proposal of the batch again): a batch is at most `batch_operations` operations."""
NOT_RUNNING_THE_LINK = "this node does not run the site link"
MAX_PEER_ADDRESSES, MAX_ADDRESS_CHARS = 16, 300
HEX = frozenset("0123456789abcdef")


@dataclass
class LinkState:
    """What `site status` shows of the link, kept by the shipper and the listener."""

    up: bool = False
    last_error: str = ""
    last_exchange_ns: int = 0
    pushed_ops: int = 0
    pushed_bytes: int = 0
    unchanged_bytes: int = 0
    """Bytes of large files the peer had already: named by range in a delta, not sent."""
    received_ops: int = 0
    received_bytes: int = 0
    peer_applied: Stamp | None = None
    """The greatest of our stamps the peer acknowledged."""
    forgotten: Stamp = EPOCH
    conflicts_made: int = 0
    peer_pending: int = 0
    """What the peer last said of its own outbound direction (our inbound): operations waiting."""
    peer_lag_s: float = 0.0
    inbound_refused: str = ""
    """Why the peer's pushes are refused and wait in its outbox (its clock far ahead of ours:
    repl/receiver.py), "" once one applies."""


class Endpoint:
    """The state every job of the link shares; `SiteService.__init__` sets it."""

    meta: MetaClient
    data: FileData
    ops: Operations
    applied: Callable[[object, object], None]
    """Hears of every ApplyRemote that committed (`SiteService`)."""
    site: uuid.UUID
    state_dir: Path
    listen: str
    _advertise: Callable[[], list[str]]
    elsewhere: Callable[[], str | None]
    """None while this node runs the link, else where it runs (`SiteService`)."""
    batch_operations: int
    batch_bytes: int
    outbox_max_operations: int
    """`[site] outbox_max_operations` (0: no bound; repl/bound.py)."""
    mount: Path | None
    credentials: NodeCredentials
    state: LinkState
    clock_ns: Callable[[], int]
    """This node's physical clock, which the peer's stamps may not run ahead of (time.time_ns)."""
    _relink: trio.Event
    _peer_ca: x509.Certificate | None
    _peer_revoked: Revocations
    """The linked site's removed members, whose certificates its CA still signs (UpdateSiteLink)."""

    def relink(self) -> None:
        """The link changed (linked, unlinked): restart the listener and the shipper."""
        self._relink.set()

    def addresses(self) -> list[str]:
        """Where the other site reaches this one (the link token's, and what pairing tells it)."""
        return self._advertise() or [self.listen]

    def check_caller(self, context: grpc.ServicerContext) -> None:
        """The handshake checked that the caller's certificate chains to the linked site's CA;
        it must also be current and not a removed member's (the other site told us, `Cursor`)."""
        assert self._peer_ca is not None, "the link listener runs only while linked"
        try:
            authenticated_peer(context, self._peer_ca, self._peer_revoked)
        except CertificateError as exc:
            log.warning("refused a call from the other site: %s", exc)
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, f"refused: {exc}") from None

    def describe_self(self) -> dict[str, Any]:
        """What the other site learns of this one in each answer to `Cursor` and `Push`: where
        its members listen now and which members' certificates it no longer accepts."""
        return {"addresses": self.addresses(), "revoked": [f"{serial:x}" for serial in sorted(self.meta.revoked_serials())]}

    async def _learn_peer(self, link: dict[str, Any], header: dict[str, Any], reached_at: str) -> None:
        """Keep what the peer says of itself (`describe_self`, in every answer to `Cursor` and
        `Push`: a push goes at least every heartbeat) with the link, when it changed (a build
        before it says nothing). The address this call reached it at stays in the list."""
        addresses, revoked = header.get("addresses"), header.get("revoked")
        if not isinstance(addresses, list) or not isinstance(revoked, list) \
                or not 0 < len(addresses) <= MAX_PEER_ADDRESSES or len(revoked) > MAX_REVOCATIONS \
                or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDRESS_CHARS for a in addresses) \
                or not all(isinstance(r, str) and 0 < len(r) <= 64 and all(ch in HEX for ch in r) for r in revoked):
            return
        if reached_at not in addresses:
            addresses = [*addresses, reached_at][-MAX_PEER_ADDRESSES:]
        if (addresses, revoked) == (link["addresses"], link.get("revoked", [])) \
                or not self.meta.may_propose(c.UpdateSiteLink):
            return
        await self.meta.propose(c.UpdateSiteLink(tuple(addresses), tuple(revoked), time.time_ns()))
        log.info("the other site listens at %s now; %d of its members removed", ", ".join(addresses), len(revoked))
        self.relink()  # the shipper goes on with the new addresses, the listener refuses the removed

    def check_running_the_link(self) -> None:
        """The other site's sender calls the node that runs the link; any other says where it runs
        (UNAVAILABLE: the sender tries its next address)."""
        where = self.elsewhere()
        if where is not None:
            raise RpcAbort(grpc.StatusCode.UNAVAILABLE, f"{NOT_RUNNING_THE_LINK}: {where}")

    def _channel(self, link: dict[str, Any], address: str) -> grpc.Channel:
        """A channel to the peer's link listener: its certificate must chain to its pinned CA, ours
        is presented."""
        peer = uuid.UUID(link["peer"])
        options = [("grpc.ssl_target_name_override", cluster_dns_name(peer)),
                   ("grpc.default_authority", cluster_dns_name(peer)),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        credentials = grpc.ssl_channel_credentials(root_certificates=link["ca_pem"].encode(),
                                                   private_key=self.credentials.key_pem,
                                                   certificate_chain=self.credentials.cert_pem)
        return grpc.secure_channel(address, credentials, options=options)


def why_failed(exc: BaseException) -> str:
    """Why a call to the other site failed, in one line: a gRPC error by its status code and
    details, anything else by its message (for `site status`, the log and an operator's error)."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details()  # type: ignore[attr-defined]
        return f"{code.name}: {details}" if details else code.name
    return str(exc) or type(exc).__name__
