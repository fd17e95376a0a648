"""The link to another site in a running daemon (design note 48): `SiteService` puts its jobs
together and runs them, with the two listeners the peer calls.

- **Pairing** (repl/pairing.py): on the pairing listener (port + 1 of `[site] listen`),
  server-authenticated TLS only; both sides then propose `LinkSite`, each pinning the other's CA.
- **The link listener** (`[site] listen`) is mutual TLS: a client certificate must chain to the
  pinned peer CA (repl/endpoint.py's `check_caller`); its calls are received by repl/receiver.py.
- **The shipper** (repl/shipper.py) pushes this site's operations to the peer, large versions as
  deltas against what the peer holds (repl/bases.py).
- **The outbox's bound** (repl/bound.py) pauses capture while the peer is away too long.
- **The initial sync's walk** (repl/seeding.py) is proposed in slices while directories are left.
- **The `site` commands** are answered by repl/control.py.

The jobs are mixins of repl/endpoint.py's `Endpoint`, sharing this one object's state.
A site of several nodes runs this service on every member; only the member that leads the site's
metadata group ships and receives.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import trio
from cryptography import x509

from awsomefsd.cluster.ca import Revocations
from awsomefsd.cluster.rpc import generic_adder
from awsomefsd.cluster.tls import NodeCredentials
from awsomefsd.config.addresses import join_host_port, split_host_port
from awsomefsd.crdt import wire
from awsomefsd.fs.data import FileData
from awsomefsd.fs.operations import Operations
from awsomefsd.meta.client import MetaClient
from awsomefsd.repl.bound import OutboxBound
from awsomefsd.repl.control import VERIFY_TIMEOUT_S, Control
from awsomefsd.repl.endpoint import LINK_SERVICE, MAX_MESSAGE_BYTES, LinkState
from awsomefsd.repl.folding import Folding
from awsomefsd.repl.identity import load_or_create
from awsomefsd.repl.pairing import PAIRING_SERVICE, Pairing
from awsomefsd.repl.receiver import Receiver
from awsomefsd.repl.seeding import Seeding
from awsomefsd.repl.shipper import Shipper
from awsomefsd.rpc.bridge import Binding, BridgeLimits, RpcAbort, serve_grpc

log = logging.getLogger(__name__)

LINK_POLL_S = 0.5
LISTEN_RETRY_S = 10.0
"""How often a member looks whether another member linked or unlinked the site."""


class SiteService(Pairing, Receiver, Shipper, Control, Folding, OutboxBound, Seeding):
    """The link to another site, every job of it on one object: it builds their shared state and
    runs the listeners, the shipper and the expiry of stagings while the site is linked."""

    def __init__(self, meta: MetaClient, data: FileData, ops: Operations, *, site: uuid.UUID, state_dir: Path,
                 listen: str, advertise: Callable[[], list[str]], batch_operations: int, batch_bytes: int,
                 mount: Path | None, pushes_in_flight: int = 8, applied: Callable[[object, object], None] = lambda command, result: None,
                 elsewhere: Callable[[], str | None] = lambda: None,
                 credentials: NodeCredentials | None = None, outbox_max_operations: int = 0) -> None:
        """`applied(command, result)` hears of every ApplyRemote that committed: the mount's kernel
        caches must forget what it changed (no FUSE request told the kernel).

        A site of several nodes (a cluster) runs this service on every member: each listens and
        pairs, but only the member that leads the site's metadata group ships and receives (one
        sender, one receiver: its log orders them anyway). `elsewhere()`: None while this node
        runs the link, else where it runs (said to the other site, which tries its next address,
        and to an operator). `advertise()`: the addresses the other site reaches this one at
        (every member's); `credentials`: a member's, issued by its cluster's CA, which the other
        site pins (None: a single node's own, made on first use)."""
        self.meta, self.data, self.ops = meta, data, ops
        self.applied = applied
        self.site = site
        self.state_dir = state_dir
        self.listen = listen
        self._advertise = advertise
        self.elsewhere = elsewhere
        self.batch_operations = batch_operations
        self.batch_bytes = batch_bytes
        self.pushes_in_flight = pushes_in_flight
        self._last_forget = 0.0
        self.outbox_max_operations = outbox_max_operations
        self.mount = mount
        self.credentials = credentials or load_or_create(state_dir, site)
        self.state = LinkState()
        self.clock_ns = time.time_ns
        self._nonces = {}
        self._staged = {}
        self._peer_takes_deltas = False
        self._shipped = {}
        self._sending = set()
        self._moves = {}
        self._moves_made = 0
        self._moves_dropped = 0
        self._apply_lock = trio.Lock()
        self._cursor_moved = trio.Event()
        self._receiving = {}
        self._relink = trio.Event()
        self._peer_ca = None
        self._peer_revoked = Revocations()

    # -- running ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, port = split_host_port(self.listen)
        pairing = join_host_port(host, port + 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_grpc(
                [Binding(generic_adder(PAIRING_SERVICE, ("Challenge", "Pair")), _Pairing(self))], pairing,
                credentials=grpc.ssl_server_credentials(
                    [(self.credentials.key_pem, self.credentials.cert_pem + self.credentials.ca_pem)],
                    root_certificates=None, require_client_auth=False),
                task_status=task_status))
            task_status.started()
            while True:
                link = self.meta.site_link()
                self._relink = trio.Event()
                if link is None:
                    await self._link_changed(None)
                    continue
                async with trio.open_nursery() as linked:
                    peer_ca = link["ca_pem"].encode()
                    self._peer_ca = x509.load_pem_x509_certificate(peer_ca)
                    self._peer_revoked = Revocations(int(serial, 16) for serial in link.get("revoked", []))
                    linked.start_soon(self._serve_the_link, peer_ca)
                    linked.start_soon(self._ship_while_running_the_link, link)
                    linked.start_soon(self._expire_staged)
                    linked.start_soon(self._fold_captures)
                    linked.start_soon(self._keep_outbox_bounded)
                    linked.start_soon(self._seed_walk)
                    await self._link_changed(link)
                    linked.cancel_scope.cancel()
                self.state = LinkState()

    async def _serve_the_link(self, peer_ca: bytes) -> None:
        """The link listener, for the linked site's calls. A port another process took after the
        start's check (another site's pairing listener on this host, say) is one error line, in
        `site status` too, and another try later, never the end of the daemon: shipping to the
        other site goes on meanwhile."""
        while True:
            try:
                await serve_grpc(
                    [Binding(generic_adder(LINK_SERVICE, ("Cursor", "Stage", "Push", "Digest", "Unlink")), _Link(self))],
                    self.listen, limits=BridgeLimits(max_message_bytes=MAX_MESSAGE_BYTES, max_call_s=VERIFY_TIMEOUT_S),
                    credentials=grpc.ssl_server_credentials(
                        [(self.credentials.key_pem, self.credentials.cert_pem + self.credentials.ca_pem)],
                        root_certificates=peer_ca, require_client_auth=True))
                return
            except OSError as exc:
                self.state.last_error = f"the link listener: {exc.strerror or exc}"
                log.error("site: %s; trying again in %.0f s", self.state.last_error, LISTEN_RETRY_S)
                await trio.sleep(LISTEN_RETRY_S)

    async def _link_changed(self, link: dict[str, Any] | None) -> None:
        """Until the link is no longer `link`: this node changed it (`relink`), or, on a cluster,
        another member did (its LinkSite or UnlinkSite applied here too)."""
        while self.meta.site_link() == link:
            with trio.move_on_after(LINK_POLL_S):
                await self._relink.wait()
                return

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]:
        async def invite(_body: dict[str, Any]) -> dict[str, Any]:
            return {"token": self.invite()}

        async def join(body: dict[str, Any]) -> dict[str, Any]:
            return await self.join(str(body.get("token", "")))

        async def unlink(body: dict[str, Any]) -> dict[str, Any]:
            was_linked = self.meta.site_link() is not None
            return {"untold": await self.unlink(forget=body.get("forget") is True), "was_linked": was_linked}

        async def status(_body: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        async def conflicts(_body: dict[str, Any]) -> dict[str, Any]:
            return {"conflicts": self.meta.site_conflicts()}

        async def verify(_body: dict[str, Any]) -> dict[str, Any]:
            return await self.verify()

        async def resolve(body: dict[str, Any]) -> dict[str, Any]:
            return await self.resolve(str(body.get("id", "")), str(body.get("keep", "")))

        return {"site_invite": invite, "site_join": join, "site_unlink": unlink, "site_status": status,
                "site_conflicts": conflicts, "site_verify": verify, "site_resolve": resolve}


class _Pairing:
    def __init__(self, service: SiteService) -> None:
        self.service = service

    async def Challenge(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return wire.frame({"nonce": self.service.new_nonce().hex()})

    async def Pair(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            header, _ = wire.unframe(request)
        except wire.WireError as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return wire.frame(await self.service.accept_pairing(header))


class _Link:
    """The peer's calls; the TLS handshake already required its certificate to chain to its CA."""

    def __init__(self, service: SiteService) -> None:
        self.service = service

    async def Cursor(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.service.check_caller(context)
        self.service.check_running_the_link()
        return wire.frame({"applied": wire.stamp_text(self.service.cursor()), "features": self.service.features(),
                           **self.service.describe_self()})

    async def Stage(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.service.check_caller(context)
        self.service.check_running_the_link()
        try:
            header, data = wire.unframe(request)
            await self.service.stage(header, data)
        except wire.WireError as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return wire.frame({})

    async def Unlink(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.service.check_caller(context)
        self.service.check_running_the_link()
        await self.service.unlinked_by_peer()
        return wire.frame({})

    async def Push(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.service.check_caller(context)
        self.service.check_running_the_link()
        try:
            header, data = wire.unframe(request)
            return wire.frame({**await self.service.push(header, data), **self.service.describe_self()})
        except wire.WireError as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    async def Digest(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """This site's tree digested for the other site's `site verify`. What stops the walk (no
        mount, a mount aborted or unmounted under it, the walk cancelled) is the caller's one-line
        answer, not an unhandled error with a traceback in this daemon's log."""
        from awsomefsd.repl.verify import DigestError, local_digest

        self.service.check_caller(context)
        try:
            return wire.frame(await local_digest(self.service.mount, self.service.meta.site_volumes()))
        except (DigestError, OSError) as exc:
            raise RpcAbort(grpc.StatusCode.UNAVAILABLE, f"the other site could not digest its tree: {exc}") from None
