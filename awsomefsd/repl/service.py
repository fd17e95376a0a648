"""The link to another site in a running daemon (design note 48): pairing, the listener the peer
pushes to, and the shipper that pushes this site's operations to the peer.

- **Pairing** (`awsomefsd site link` here prints a token; `awsomefsd site link TOKEN` on the other
  site): the pairing listener (port + 1 of `[site] listen`) is server-authenticated TLS only,
  since the other site has no certificate we trust yet. The joining site fetches our CA and checks
  it against the fingerprint in the token, asks for a nonce (`Challenge`) and proves it knows the
  token's secret over its own CA certificate (`Pair`, cluster/token.py's proof with the site-link
  purpose). Then both sides propose `LinkSite`, each pinning the other's CA. The secret is never
  stored: only its verifier, in `<state>/site/invite`, which a pairing consumes.
- **The link listener** (`[site] listen`) is mutual TLS: a client certificate must chain to the
  pinned peer CA, ours is checked by the peer against ours. `Cursor` says how far we applied the
  peer's operations; `Stage` writes a chunk of a content version's bytes to fresh extents here
  (kept in memory until the push that maps them); `Push` applies a batch of operations as one
  `ApplyRemote` command and acknowledges it (repl/link.py's Ack: how far, and our own head).
  A large version changed in places comes as its changed chunks and, in the push, the ranges
  it keeps from a version this site shows, whose blocks the command shares (repl/delta.py,
  design note 50).
- **The shipper** reads the outbox after the peer's cursor, sends the bytes of content versions
  first, then the operations, and from the acknowledgements keeps the horizon (repl/link.py) up
  to which `ForgetSite` lets both logs go. It never blocks a local write: it runs beside them and
  only reads what committed.

A single-node site only, in this version (a cluster member's leader would run the shipper).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trio
from cryptography import x509
from prometheus_client import Metric

from awsomefsd.cluster.ca import MAX_REVOCATIONS, CertificateError, Revocations, cluster_dns_name, fingerprint
from awsomefsd.cluster.join_service import JoinError, fetch_cluster_ca, join_host_port, split_host_port
from awsomefsd.cluster.rpc import ControlError, generic_adder
from awsomefsd.cluster.tls import NodeCredentials, authenticated_peer
from awsomefsd.cluster.token import LINK, NONCE_BYTES, LinkToken, TokenError, TokenVerifier
from awsomefsd.fs.data import FileData
from awsomefsd.fs.operations import Operations
from awsomefsd.io.checksum import crc32c
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import Delegated, FsError
from awsomefsd.meta.records import Extent
from awsomefsd.metrics import counter, gauge
from awsomefsd.repl import delta, wire
from awsomefsd.repl import ops as o
from awsomefsd.repl.hlc import EPOCH, Stamp
from awsomefsd.repl.identity import ca_fingerprint, load_or_create, site_dir
from awsomefsd.repl.link import Ack, Horizon
from awsomefsd.rpc.bridge import Binding, BridgeLimits, RpcAbort, serve_grpc, unary_call

log = logging.getLogger(__name__)

PAIRING_SERVICE = "awsomefs.site.v1.Pairing"
LINK_SERVICE = "awsomefs.site.v1.Link"
INVITE_FILE = "invite"
MAX_MESSAGE_BYTES = 64 << 20
CHUNK_BYTES = 16 << 20
"""Bytes of one file per Stage call: a larger content version travels in several."""
INLINE_BYTES = 1 << 20
"""Content versions up to this size travel inside the push (one round trip for many files)."""
DELTA = "delta"
FEATURES = (DELTA,)
"""What this build's link listener takes beyond the first version's protocol, told in `Cursor`:
a sender uses a feature only when its peer names it, so sites upgrade one at a time."""
MAX_REMEMBERED_FILES = 4096
MAX_REMEMBERED_PIECES = 1 << 16
"""Bounds on what the shipper remembers of the large versions it sent (bases of deltas): files,
and map records per file."""
MAX_MOVES_KEPT = 64
"""The compactor's copies kept per file for versions in flight (one per MiB it rewrote)."""
MAX_STAGED_BYTES = 512 << 20
"""Bytes staged and not yet pushed at most: bounds what a sender can make us hold."""
MAX_STAGE_PIECES = 2048
"""Changed ranges one `Stage` carries at most (a delta names at most MAX_SHARED_RANGES unchanged)."""
STAGED_TTL_S = 600.0
CALL_TIMEOUT_S = 60.0
SLOWEST_LINK_BYTES_S = 128 << 10
"""A call carrying bytes waits for them too, at this rate (1 Mbit/s): a 16 MiB chunk on a slow
link must not time out, and be sent again, forever."""
VERIFY_TIMEOUT_S = 3600.0
IDLE_POLL_S = 0.05
"""How often an idle shipper looks at the outbox (a read of one LMDB page)."""
HEARTBEAT_S = 2.0
"""An idle shipper pushes an empty batch this often: the peer's acknowledgement carries its head,
which moves the horizon on, and the link's state stays current."""
FORGET_EVERY_S = 5.0
MAX_RESTAGES = 3
"""Restage answers in a row a sender takes (the peer restarted and lost what was staged) before
it calls the link broken: a peer asking for ever would otherwise stall the link without a word."""
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0
LINK_POLL_S = 0.5
"""How often a member looks whether another member linked or unlinked the site."""
ROLE_POLL_S = 0.2
"""How often a member looks whether it runs the link (leads its cluster) now."""
MAX_DELEGATIONS_PER_BATCH = 256
"""Directories and files of a batch another member may hold, taken one per refusal (each a
proposal of the batch again): a batch is at most `batch_operations` operations."""
NOT_RUNNING_THE_LINK = "this node does not run the site link"
MAX_PEER_ADDRESSES, MAX_ADDRESS_CHARS = 16, 300
HEX = frozenset("0123456789abcdef")
ROLLING_UPGRADE = ("a member of this site runs a build that cannot take part in cross-site replication yet "
                   "(a rolling upgrade under way): upgrade every member first")


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


@dataclass
class _Staged:
    extents: list[Extent] = field(default_factory=list)
    held: int = 0
    """Bytes received (what MAX_STAGED_BYTES bounds)."""
    end: int = 0
    """Where the last chunk claimed ended: the next one starts there or later (a delta skips ranges)."""
    ranges: list[tuple[int, int]] = field(default_factory=list)
    """The byte ranges written to the device, in order: a push maps the version only when they
    are all of it that it does not share (`complete`)."""
    writing: int = 0
    """Chunks being written to the device now."""
    at: float = field(default_factory=time.monotonic)

    def complete(self, expected: list[tuple[int, int]]) -> bool:
        """Are the bytes staged exactly `expected` (merged byte ranges), none still being written?"""
        merged: list[tuple[int, int]] = []
        for lo, hi in self.ranges:
            if lo == hi:
                continue
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return self.writing == 0 and merged == expected


class SiteService:
    def __init__(self, meta: MetaClient, data: FileData, ops: Operations, *, site: uuid.UUID, state_dir: Path,
                 listen: str, advertise: Callable[[], list[str]], batch_operations: int, batch_bytes: int,
                 mount: Path | None, applied: Callable[[object, object], None] = lambda command, result: None,
                 elsewhere: Callable[[], str | None] = lambda: None,
                 credentials: NodeCredentials | None = None) -> None:
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
        self.mount = mount
        self.credentials: NodeCredentials = credentials or load_or_create(state_dir, site)
        self.state = LinkState()
        self._nonces: dict[bytes, float] = {}
        self._staged: dict[Stamp, _Staged] = {}
        self._peer_takes_deltas = False
        """Did the peer's `Cursor` say it takes deltas (a build before them reads only whole versions)?"""
        self._shipped: dict[bytes, delta.ShippedVersion] = {}
        self._sending: set[int] = set()
        """The files whose versions the batch being pushed carries."""
        self._moves: dict[int, collections.deque[tuple[int, list[Extent], list[Extent]]]] = {}
        """Per file being sent, the compactor's latest copies (Compactor.moved), numbered: a
        version being sent is read before some of them and remembered after (`_caught_up`)."""
        self._moves_made = 0
        self._moves_dropped = 0  # the number of the latest copy no longer kept
        """Per object, the large content version the peer acknowledged last (the base of a delta),
        oldest first; forgotten at a restart or a restage (then versions go whole)."""
        self._apply_lock = trio.Lock()
        self._relink = trio.Event()
        self._peer_ca: x509.Certificate | None = None
        self._peer_revoked = Revocations()
        """The linked site's removed members, whose certificates its CA still signs (UpdateSiteLink)."""

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
                    await linked.start(lambda task_status, peer_ca=peer_ca: serve_grpc(
                        [Binding(generic_adder(LINK_SERVICE, ("Cursor", "Stage", "Push", "Digest")), _Link(self))],
                        self.listen, limits=BridgeLimits(max_message_bytes=MAX_MESSAGE_BYTES),
                        credentials=grpc.ssl_server_credentials(
                            [(self.credentials.key_pem, self.credentials.cert_pem + self.credentials.ca_pem)],
                            root_certificates=peer_ca, require_client_auth=True),
                        task_status=task_status))
                    linked.start_soon(self._ship_while_running_the_link, link)
                    linked.start_soon(self._expire_staged)
                    await self._link_changed(link)
                    linked.cancel_scope.cancel()
                self.state = LinkState()

    def relink(self) -> None:
        """The link changed (linked, unlinked): restart the listener and the shipper."""
        self._relink.set()

    async def _link_changed(self, link: dict[str, Any] | None) -> None:
        """Until the link is no longer `link`: this node changed it (`relink`), or, on a cluster,
        another member did (its LinkSite or UnlinkSite applied here too)."""
        while self.meta.site_link() == link:
            with trio.move_on_after(LINK_POLL_S):
                await self._relink.wait()
                return

    async def _ship_while_running_the_link(self, link: dict[str, Any]) -> None:
        """Ship while this node runs the link (a cluster's leader); stop when it no longer does."""
        while True:
            while self.elsewhere() is not None:
                await trio.sleep(ROLE_POLL_S)
            async with trio.open_nursery() as shipping:
                shipping.start_soon(self._ship_forever, link)
                while self.elsewhere() is None:
                    await trio.sleep(ROLE_POLL_S)
                shipping.cancel_scope.cancel()
            # What the peer holds was told to this node; another may have sent since.
            self._shipped.clear()
            self.state.up, self.state.last_error = False, self.elsewhere() or ""

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

    # -- pairing ---------------------------------------------------------------------------------
    def invite(self) -> str:
        """A new link token; the previous one no longer pairs."""
        if self.meta.site_link() is not None:
            raise ControlError("this site is linked already: `awsomefsd site unlink` first")
        if not self.meta.may_propose(c.LinkSite):
            raise ControlError(ROLLING_UPGRADE)
        token = LinkToken.generate(self.site, ca_fingerprint(self.credentials), tuple(self.addresses()))
        directory = site_dir(self.state_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (directory / INVITE_FILE).write_bytes(token.verifier().to_bytes())
        return token.encode()

    async def join(self, text: str) -> dict[str, Any]:
        """Pair with the site that printed `text`: prove the secret, learn its CA, link both."""
        try:
            token = LinkToken.parse(text)
        except TokenError as exc:
            raise ControlError(str(exc)) from None
        if token.cluster_id == self.site:
            raise ControlError("that token is this site's own: run `awsomefsd site link TOKEN` on the other site")
        current = self.meta.site_link()
        if current is not None:
            raise ControlError(f"this site is linked already (to site {uuid.UUID(current['peer'])}): "
                               "`awsomefsd site unlink` first")
        if not token.seeds:
            raise ControlError("the token names no address of the other site")
        if not self.meta.may_propose(c.LinkSite):  # before the other site links: both or neither
            raise ControlError(ROLLING_UPGRADE)
        errors = []
        for address in token.seeds:
            try:
                peer_ca = await trio.to_thread.run_sync(fetch_cluster_ca, _pairing_address(address),
                                                        token.ca_fingerprint)
                reply = await self._pair_with(address, token, peer_ca)
            except (JoinError, OSError, grpc.RpcError, wire.WireError) as exc:
                errors.append(f"{address}: {_why(exc)}")
                continue
            sent = await self._link(token.cluster_id.bytes, peer_ca, tuple(reply["addresses"]))
            return {"peer": str(token.cluster_id), "addresses": reply["addresses"], "initial_operations": sent,
                    "peer_initial_operations": int(reply.get("initial_operations", 0))}
        raise ControlError("could not pair: " + "; ".join(errors))

    async def _pair_with(self, address: str, token: LinkToken, peer_ca: x509.Certificate) -> dict[str, Any]:
        from cryptography.hazmat.primitives import serialization

        ca_pem = peer_ca.public_bytes(serialization.Encoding.PEM)
        options = [("grpc.ssl_target_name_override", cluster_dns_name(token.cluster_id)),
                   ("grpc.default_authority", cluster_dns_name(token.cluster_id))]
        with grpc.secure_channel(_pairing_address(address), grpc.ssl_channel_credentials(root_certificates=ca_pem),
                                 options=options) as channel:
            header, _ = wire.unframe(await unary_call(channel, f"/{PAIRING_SERVICE}/Challenge", wire.frame({}),
                                                      CALL_TIMEOUT_S))
            nonce = bytes.fromhex(header.get("nonce", ""))
            own_ca = self.credentials.ca_pem
            proof = token.prove(nonce, own_ca)
            request = {"site": str(self.site), "ca_pem": own_ca.decode(), "addresses": self.addresses(),
                       "nonce": nonce.hex(), "proof": proof.hex()}
            reply, _ = wire.unframe(await unary_call(channel, f"/{PAIRING_SERVICE}/Pair", wire.frame(request),
                                                     CALL_TIMEOUT_S))
        if "error" in reply:
            raise JoinError(str(reply["error"]))
        return reply

    async def accept_pairing(self, request: dict[str, Any]) -> dict[str, Any]:
        """The other side of `join`: check the proof against the invitation, then link."""
        invite = site_dir(self.state_dir) / INVITE_FILE
        try:
            verifier = TokenVerifier.from_bytes(invite.read_bytes(), LINK)
        except (FileNotFoundError, ValueError):
            return {"error": "this site has no open invitation: run `awsomefsd site link` on it for a token"}
        try:
            peer = uuid.UUID(request["site"])
            ca_pem = str(request["ca_pem"]).encode()
            peer_ca = x509.load_pem_x509_certificate(ca_pem)
            nonce = bytes.fromhex(request["nonce"])
            proof = bytes.fromhex(request["proof"])
            addresses = [str(a) for a in request["addresses"]][:16]
        except (KeyError, ValueError, TypeError):
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "a malformed pairing request") from None
        if self._nonces.pop(nonce, 0) < time.monotonic() or not verifier.verify(nonce, ca_pem, proof):
            log.warning("site pairing refused: a wrong or rotated link token (from site %s)", peer)
            return {"error": "the link token is wrong or was replaced by a newer one"}
        if self.meta.site_link() is not None:
            return {"error": "that site is linked already"}
        if not self.meta.may_propose(c.LinkSite):
            return {"error": ROLLING_UPGRADE}
        sent = await self._link(peer.bytes, peer_ca, tuple(addresses))
        invite.unlink(missing_ok=True)
        return {"addresses": self.addresses(), "initial_operations": sent}

    async def _link(self, peer: bytes, peer_ca: x509.Certificate, addresses: tuple[str, ...]) -> int:
        """Link to `peer`; returns how many operations this site's initial sync sends."""
        from cryptography.hazmat.primitives import serialization

        if not self.meta.may_propose(c.LinkSite):
            raise ControlError(ROLLING_UPGRADE)

        ca_pem = peer_ca.public_bytes(serialization.Encoding.PEM)
        sent = await self.meta.propose(c.LinkSite(peer, time.time_ns(), ca_pem, addresses))
        await self.meta.barrier()  # `site link` said linked: a crash now must not take it back
        log.info("linked to site %s at %s (fingerprint %s); %d operations to send for the initial sync",
                 uuid.UUID(bytes=peer), ", ".join(addresses), fingerprint(peer_ca).hex()[:16], sent)
        self.relink()
        return int(sent)

    async def unlink(self) -> None:
        if self.meta.site_link() is None:
            raise ControlError("this site is not linked")
        await self.meta.propose(c.UnlinkSite(time.time_ns()))
        await self.meta.barrier()
        log.info("unlinked from the other site")
        self.relink()

    def new_nonce(self) -> bytes:
        now = time.monotonic()
        self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        if len(self._nonces) > 1024:
            raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many pairings under way")
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._nonces[nonce] = now + 60
        return nonce

    # -- receiving -------------------------------------------------------------------------------
    def cursor(self) -> Stamp | None:
        return self.meta.site_applied_from_peer()

    def features(self) -> list[str]:
        """What this site takes beyond the first protocol now: a delta's block sharing only once
        every member of the cluster decodes its command (a rolling upgrade)."""
        return [f for f in FEATURES if f != DELTA or self.meta.may_propose(c.ApplyRemoteSharing)]

    async def stage(self, header: dict[str, Any], data: memoryview) -> None:
        """Bytes of a content version, before the push that maps them: one chunk (`offset`, `crc`),
        or a delta's changed ranges together (`pieces`: [[offset, length, crc], ...], in file
        order; one round trip for them all, not one each)."""
        stamp = wire.stamp_field(header, "stamp")
        if stamp is None:
            raise wire.WireError("a chunk needs its version's stamp")
        if "pieces" in header:
            pieces = _pieces(header, len(data))
        else:
            pieces = [(wire.int_field(header, "offset", limit=1 << 62), len(data),
                       wire.int_field(header, "crc", limit=1 << 32))]
        held = sum(s.held for s in self._staged.values())
        if held + len(data) > MAX_STAGED_BYTES:
            raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many bytes staged and not pushed")
        cut, at = [], 0
        for offset, length, crc in pieces:  # all checked before any is staged
            piece = data[at:at + length]
            at += length
            if offset % BLOCK_SIZE:
                raise wire.WireError(f"chunk at {offset} of version {stamp} is not block-aligned")
            if crc != crc32c(piece):
                raise wire.WireError(f"chunk at {offset} of version {stamp} arrived damaged (checksum mismatch)")
            cut.append((offset, piece))
        for i, (offset, piece) in enumerate(cut):
            await self._stage_piece(stamp, offset, piece, starts=offset == 0 or (i == 0 and header.get("first") is True))

    async def _stage_piece(self, stamp: Stamp, offset: int, data: memoryview, *, starts: bool) -> None:
        """`starts`: the version's first bytes (a sender before deltas always starts at 0)."""
        staged = self._staged.get(stamp)
        if starts and staged is not None:
            self.data.stager.release(staged.extents, None)  # a resend from the start: what was staged goes
            staged = None
        if staged is None:
            if not starts:  # its start was staged here and is gone (a restart, expiry): the rest is not the version
                raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               f"chunk at {offset} of version {stamp} continues a staging this site no longer "
                               "holds (restarted, or idle too long): send the version again from its start")
            staged = self._staged[stamp] = _Staged()
        if offset < staged.end:  # a delta sends only the changed ranges, but in file order
            raise wire.WireError(f"chunk at {offset} of version {stamp}, after one that ended at {staged.end}")
        staged.end = offset + len(data)
        staged.writing += 1
        try:
            extents = await self.data.stager.stage(offset // BLOCK_SIZE, data)
        except BaseException:  # the version has a gap now: nothing of this staging may be mapped
            if self._staged.get(stamp) is staged:
                self.data.stager.release(self._staged.pop(stamp).extents, None)
            raise
        finally:
            staged.writing -= 1
        if self._staged.get(stamp) is not staged:  # a resend started over meanwhile, or a chunk failed
            self.data.stager.release(extents, None)
            raise RpcAbort(grpc.StatusCode.ABORTED, f"version {stamp} was started over while its chunk at "
                                                    f"{offset} was written")
        staged.extents += extents
        staged.ranges.append((offset, offset + len(data)))
        staged.held += len(data)
        staged.at = time.monotonic()
        self.state.received_bytes += len(data)

    async def push(self, header: dict[str, Any], data: memoryview) -> dict[str, Any]:
        link = self.meta.site_link()
        if link is None:
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, "this site is not linked")
        after = wire.stamp_field(header, "after")
        raws = wire.hex_list(header, "ops", limit=4096)
        inline = header.get("inline", [])
        if not isinstance(inline, list) or len(inline) > len(raws):
            raise wire.WireError("a push's inline contents are not a list of its operations'")
        at = 0
        for item in inline:
            if not isinstance(item, list) or len(item) != 3:
                raise wire.WireError("an inline content is [stamp, length, crc]")
            described = {"stamp": item[0], "length": item[1], "crc": item[2], "offset": 0}
            length = wire.int_field(described, "length", limit=INLINE_BYTES + 1)
            if at + length > len(data):
                raise wire.WireError("a push shorter than its inline contents")
            await self.stage(described, data[at:at + length])
            at += length
        unchanged = _unchanged_ranges(header)
        if unchanged and not self.meta.may_propose(c.ApplyRemoteSharing):
            return self._restage("a delta arrived while this cluster cannot share blocks yet (an upgrade under way)")
        contents: list[o.ContentSet] = []
        for raw in raws:
            try:
                op = o.decode(raw)
            except o.BadOperation as exc:
                raise wire.WireError(str(exc)) from None
            if isinstance(op, o.ContentSet):
                contents.append(op)
            if isinstance(op, o.VolumeSet) and self.meta.log_level() < c.VOLUMES_LEVEL:
                raise RpcAbort(grpc.StatusCode.UNAVAILABLE, "a volume arrived while not every member of this "
                                                            "cluster takes volumes yet (an upgrade under way)")
        if len({op.stamp for op in contents}) != len(contents):
            raise wire.WireError("a push carries one content version twice")
        in_push = {wire.stamp_field({"s": item[0]}, "s") for item in inline}
        async with self._apply_lock:
            if after != self.cursor():
                self._drop_applied_stagings(contents)
                # `stale` tells the sender this push was not applied (an earlier send of it may
                # have been): what it just read and sent is not what this site holds.
                return {"applied": wire.stamp_text(self.cursor()), "head": wire.stamp_text(self.meta.site_head()),
                        "stale": True}
            # Only a version staged whole maps: a push of a connection that dropped, running on
            # here, may find the resend's staging half written (it would map zeros for the rest).
            for op in contents:
                staged = self._staged.get(op.stamp)
                if staged is None or staged.writing or \
                        (op.stamp not in in_push and not staged.complete(_sent_ranges(op, unchanged.get(op.stamp)))):
                    return self._restage(None)
            # The stagings are this push's from here on: a resend's first chunk, arriving while
            # the proposal below is under way, starts afresh instead of releasing its blocks.
            taken = {op.stamp: self._staged.pop(op.stamp) for op in contents}
            extents = [ext for staged in taken.values() for ext in staged.extents]
            counts = [len(staged.extents) for staged in taken.values()]
            shared: list[Extent] = []
            shared_counts: list[int] = []
            for op in contents:
                reused = self._shareable(op, *unchanged[op.stamp]) if op.stamp in unchanged else []
                if reused is None:
                    self._release_taken(taken, None)
                    return self._restage(f"the other site sent version {op.stamp} as changes to a version this "
                                         "site no longer shows")
                shared += reused
                shared_counts.append(len(reused))
            if raws:
                peer, start = bytes.fromhex(link["peer"]), b"" if after is None else after.pack()
                command: c.ApplyRemote | c.ApplyRemoteSharing = \
                    c.ApplyRemoteSharing(peer, start, tuple(raws), tuple(extents), tuple(counts), tuple(shared),
                                         tuple(shared_counts), time.time_ns()) if shared \
                    else c.ApplyRemote(peer, start, tuple(raws), tuple(extents), tuple(counts), time.time_ns())
                try:
                    applied = await self.ops.propose_holding(command, tries=MAX_DELEGATIONS_PER_BATCH,
                                                             inside=lambda: self._files_locked(contents))
                except Delegated as exc:  # refused, nothing applied: the stagings stay for the retry
                    self._staged.update(taken)
                    raise RpcAbort(grpc.StatusCode.UNAVAILABLE, f"the batch needs more of what other members "
                                                                f"hold than one push takes ({exc}): try again") from None
                except FsError as exc:
                    self._release_taken(taken, exc)
                    if exc.errno == errno.ESTALE:
                        return {"applied": wire.stamp_text(self.cursor()), "head": wire.stamp_text(self.meta.site_head()),
                                "stale": True}
                    if exc.errno == errno.EAGAIN:  # a write here moved blocks offered for sharing
                        return self._restage(str(exc))
                    log.error("refused a batch from the other site: %s", exc, exc_info=exc)
                    raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"refused: {exc}") from None
                except BaseException as exc:  # cancelled, say: the proposal may still commit
                    self._release_taken(taken, exc)
                    raise
                for op in contents:
                    self._remember_received(op)
                # Acknowledged means durable: the sender forgets what we acknowledge.
                await self.meta.barrier()
                self.applied(command, applied)
                self.state.received_ops += len(raws)
                if applied.conflicts:
                    self.state.conflicts_made += applied.conflicts
                    log.warning("%d conflict(s) with the other site: `awsomefsd site conflicts` lists them",
                                applied.conflicts)
            self.state.last_exchange_ns = time.time_ns()
            pending, lag_s = self.outbound_lag()
            return {"applied": wire.stamp_text(self.cursor()), "head": wire.stamp_text(self.meta.site_head()),
                    "pending": pending, "lag_ms": int(lag_s * 1000)}

    @contextlib.asynccontextmanager
    async def _files_locked(self, contents: list[o.ContentSet]) -> AsyncIterator[None]:
        """The files whose content a batch replaces, locked as a flush locks them: a compaction
        reading a file's blocks would otherwise commit its copy of the old bytes over the new."""
        inos = sorted({ino for op in contents if (ino := self.meta.site_inode_of(op.object)) is not None})
        async with contextlib.AsyncExitStack() as stack:
            for ino in inos:  # in order: two batches never wait on each other's files
                await stack.enter_async_context(self.data.buffer.locked(ino))
            yield

    def _drop_applied_stagings(self, contents: list[o.ContentSet]) -> None:
        """A stale push's stagings of versions applied already (by an earlier send) are of no use."""
        cursor = self.cursor()
        for op in contents:
            staged = self._staged.get(op.stamp)
            if cursor is not None and op.stamp <= cursor and staged is not None and not staged.writing:
                self.data.stager.release(self._staged.pop(op.stamp).extents, None)

    def _restage(self, why: str | None) -> dict[str, Any]:
        """The answer that has the sender stage the push's versions again, whole."""
        if why is not None:
            log.info("%s: asking the other site for the whole versions", why)
        return {"restage": True, "applied": wire.stamp_text(self.cursor())}

    def _release_taken(self, taken: dict[Stamp, _Staged], failure: BaseException | None) -> None:
        """Give back the blocks of stagings a push took (`failure`: the proposal that may still
        have mapped them, which withholds them instead)."""
        for staged in taken.values():
            self.data.stager.release(staged.extents, failure)
        taken.clear()

    def _shareable(self, op: o.ContentSet, base: Stamp, ranges: list[tuple[int, int, str]]) -> list[Extent] | None:
        """This site's blocks in the ranges a delta of `op` from version `base` leaves unchanged,
        or None when they cannot stand for them: the file no longer shows `base` (a write here,
        a conflict) or its blocks there are not the ones the sender's digest names."""
        found = self.meta.site_content_base(op.object)
        if found is None or found[1] != base:
            return None
        ino, _ = found
        inode = self.meta.inode(ino)
        if inode is None:
            return None
        blocks = (min(op.size, inode.size) + BLOCK_SIZE - 1) // BLOCK_SIZE  # both versions hold them
        out: list[Extent] = []
        for first, end, digest in ranges:
            if end > blocks:
                return None
            pieces = delta.clipped(self.meta.extents(ino, first, end), first, end)
            if delta.range_digest(pieces, first, end) != digest:
                return None
            out += [piece for piece in pieces if not piece.unwritten]
        return out

    async def _expire_staged(self) -> None:
        while True:
            await trio.sleep(STAGED_TTL_S / 4)
            old = [s for s, staged in self._staged.items()
                   if time.monotonic() - staged.at > STAGED_TTL_S and not staged.writing]
            for stamp in old:
                self.data.stager.release(self._staged.pop(stamp).extents, None)

    # -- shipping --------------------------------------------------------------------------------
    async def _ship_forever(self, link: dict[str, Any]) -> None:
        """Ship to whichever of the peer's addresses runs its link (a cluster's leader), starting
        with the one that did last; a member that does not says so and the next is tried."""
        delay = RETRY_MIN_S
        peer = uuid.UUID(link["peer"])
        addresses: list[str] = list(link["addresses"])
        while True:
            elsewhere = []
            for address in list(addresses):
                try:
                    with self._channel(link, address) as channel:
                        await self._ship(channel, link, address)
                # FsError: a proposal of the shipper's own (ForgetSite, UpdateSiteLink) or the
                # barrier failed, as they may while a cluster changes leader: tried again
                except (grpc.RpcError, OSError, wire.WireError, ValueError, FsError) as exc:
                    why = _why(exc)
                    if NOT_RUNNING_THE_LINK in why:
                        elsewhere.append(f"{address}: {why}")
                        continue
                    if self.state.up:  # it ran the link until now: first again next time, and soon
                        addresses.remove(address)
                        addresses.insert(0, address)
                        delay = RETRY_MIN_S
                    if self.state.up or self.state.last_error != why:
                        log.warning("link to site %s at %s is down: %s", peer, address, why)
                    self.state.up, self.state.last_error = False, why
            if len(elsewhere) == len(addresses):
                why = "no node of the other site runs its link (electing a leader?): " + "; ".join(elsewhere)
                if self.state.up or self.state.last_error != why:
                    log.warning("link to site %s is down: %s", peer, why)
                self.state.up, self.state.last_error = False, why
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _ship(self, channel: grpc.Channel, link: dict[str, Any], address: str) -> None:
        call = _caller(channel)
        header, _ = wire.unframe(await call("Cursor", wire.frame({})))
        await self._learn_peer(link, header, address)
        cursor = wire.stamp_field(header, "applied")
        features = header.get("features")
        self._peer_takes_deltas = isinstance(features, list) and DELTA in features
        horizon = Horizon()
        last_push = last_forget = 0.0
        restaged = 0
        if not self.state.up:
            log.info("link to the other site is up; it applied ours up to %s", cursor)
        self.state.up, self.state.last_error = True, ""
        while True:
            entries = self.meta.site_outbox(cursor, self.batch_operations)
            if not entries and time.monotonic() - last_push < HEARTBEAT_S:
                await trio.sleep(IDLE_POLL_S)
                continue
            if entries:
                # Only what is durable ships: an operation of a batch not yet committed would be
                # lost here by a crash after the peer applied it, and our clock, restarted from
                # what was committed, would stamp new operations the peer's cursor is already past.
                await self.meta.barrier()
            self._sending.clear()  # the last batch's are settled
            self._moves.clear()
            ops: list[bytes] = []
            inline: list[list[Any]] = []
            unchanged: list[list[Any]] = []
            # what the peer will have: per object, the version, and its inode and the compactor's
            # copies made before its map was read (`_caught_up` when the peer acknowledges it)
            shipped: dict[bytes, tuple[Stamp, delta.ShippedVersion | None, int, int]] = {}
            data = bytearray()
            budget = self.batch_bytes
            for _stamp, raw in entries:
                sent, ino = self.meta.site_shipping(raw)
                if ino is not None:
                    op = o.decode(sent)
                    assert isinstance(op, o.ContentSet)
                    if ops and op.size > budget:
                        break  # the next push takes it
                    if op.size <= INLINE_BYTES:  # small files travel in the push itself: no round trip each
                        content = await self._read_content(op, ino, 0, op.size)
                        inline.append([wire.stamp_text(op.stamp), len(content), crc32c(content)])
                        data += content
                        self.state.pushed_bytes += len(content)
                        shipped[op.object] = (op.stamp, None, ino, 0)
                    else:
                        self._sending.add(ino)
                        since = self._moves_made
                        version, kept = await self._send_content(call, op, ino)
                        shipped[op.object] = (op.stamp, version, ino, since)
                        if kept:
                            unchanged.append(kept)
                    budget -= max(op.size, 1)
                ops.append(sent)
                if budget <= 0:
                    break
            reply, _ = wire.unframe(await call("Push", wire.frame({"after": wire.stamp_text(cursor), "inline": inline,
                                                                    "unchanged": unchanged,
                                                                    "ops": [raw.hex() for raw in ops]}, data)))
            last_push = time.monotonic()
            log.debug("pushed %d operations after %s: %s", len(ops), cursor, reply)
            await self._learn_peer(link, reply, address)
            if reply.get("restage"):
                self._shipped.clear()  # a delta's base may be what the peer no longer shows: all whole
                restaged += 1
                if restaged > MAX_RESTAGES:  # not a restart of the peer: something is wrong, say so
                    raise wire.WireError(f"the other site asked {restaged} times in a row for the bytes of "
                                         f"operations after {cursor}, which were sent")
                continue  # the peer lost what was staged (a restart): send it again
            restaged = 0
            applied, head = wire.stamp_field(reply, "applied"), wire.stamp_field(reply, "head")
            if applied != cursor and ops:
                self.state.pushed_ops += len(ops)
            cursor = applied
            self.state.peer_applied = applied
            for obj, (stamp, version, ino, since) in shipped.items():
                if reply.get("stale"):  # not applied: the peer holds what an earlier send brought, unknown here
                    self._remember_shipped(obj, None)
                elif applied is not None and stamp <= applied:
                    self._remember_shipped(obj, version and self._caught_up(ino, version, since))
            if "pending" in reply:
                self.state.peer_pending = wire.int_field(reply, "pending")
                self.state.peer_lag_s = wire.int_field(reply, "lag_ms") / 1000
            self.state.last_exchange_ns = time.time_ns()
            horizon.on_ack(Ack(applied or EPOCH, head or EPOCH))
            stable = horizon.advance(self.meta.site_applied_from_peer() or EPOCH, self.meta.site_head() or EPOCH)
            if stable > self.state.forgotten and time.monotonic() - last_forget > FORGET_EVERY_S:
                await self.meta.propose(c.ForgetSite(stable.pack(), time.time_ns()))
                self.state.forgotten, last_forget = stable, time.monotonic()

    async def _read_content(self, op: o.ContentSet, ino: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a content version (the file, or its kept copy)."""
        inode = self.meta.inode(ino)
        if inode is None:
            return bytes(min(length, max(op.size - offset, 0)))
        size = min(op.size, self.data.effective_size(ino, inode.size))
        return bytes(await self.data.reader.read(inode, offset, max(0, min(length, size - offset))))

    async def _send_content(self, call: Callable[[str, bytes], Awaitable[bytes]], op: o.ContentSet,
                            ino: int) -> tuple[delta.ShippedVersion | None, list[Any] | None]:
        """Stage a large content version's bytes at the peer, chunk by chunk, from the committed
        blocks: only those changed since the version of the file the peer was last sent and
        acknowledged, if it still shows that one (design note 50). Returns what the peer will
        have of the file (None: a copy kept in /.conflicts, which the peer keeps apart too, or
        more pieces than are worth remembering) and the push's `unchanged` entry (None:
        everything was sent)."""
        nblocks = (op.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        found = self.meta.site_content_base(op.object)
        from_copy = found is None or found[0] != ino  # a version kept in /.conflicts: the peer keeps it apart
        base = None if from_copy or not self._peer_takes_deltas else self._shipped.get(op.object)
        with self.data.reader.holding_map():
            now = self.meta.extents(ino, 0, nblocks)
        kept = [] if base is None else delta.unchanged_ranges(base.extents, now, min(base.size, op.size) // BLOCK_SIZE)
        if len(kept) > delta.MAX_SHARED_RANGES:
            kept = []
        pieces = [piece for lo, hi in kept for piece in delta.clipped(now, lo, hi) if not piece.unwritten]
        batch: list[tuple[int, bytes]] = []  # a delta's changed ranges go together, a round trip for many
        batched = 0  # their bytes
        first = True

        async def stage() -> None:
            nonlocal first, batched
            if not batch:
                return
            if self._peer_takes_deltas:
                header: dict[str, Any] = {"stamp": wire.stamp_text(op.stamp), "first": first,
                                          "pieces": [[at, len(b), crc32c(b)] for at, b in batch]}
            else:  # the first protocol: one chunk a call
                (at, b), = batch
                header = {"stamp": wire.stamp_text(op.stamp), "offset": at, "crc": crc32c(b)}
            await call("Stage", wire.frame(header, b"".join(b for _, b in batch)))
            self.state.pushed_bytes += batched
            batch.clear()
            batched, first = 0, False

        for lo, hi in delta.complement(kept, nblocks) or [(0, 0)]:
            for chunk_lo in range(lo, max(hi, lo + 1), CHUNK_BYTES // BLOCK_SIZE):
                chunk_hi = min(hi, chunk_lo + CHUNK_BYTES // BLOCK_SIZE)
                chunk, read = await self._read_committed(ino, chunk_lo, chunk_hi, op.size)
                pieces += read
                if batch and (not self._peer_takes_deltas or len(batch) >= MAX_STAGE_PIECES
                              or batched + len(chunk) > CHUNK_BYTES):
                    await stage()
                batch.append((chunk_lo * BLOCK_SIZE, chunk))
                batched += len(chunk)
        await stage()
        version = None if from_copy or len(pieces) > MAX_REMEMBERED_PIECES else \
            delta.ShippedVersion(op.stamp, op.size, tuple(sorted(pieces, key=lambda piece: piece.file_block)))
        if not kept or base is None:
            return version, None
        self.state.unchanged_bytes += sum(min(hi * BLOCK_SIZE, op.size) - lo * BLOCK_SIZE for lo, hi in kept)
        return version, [wire.stamp_text(op.stamp), wire.stamp_text(base.stamp),
                         [[lo, hi, delta.range_digest(now, lo, hi)] for lo, hi in kept]]

    async def _read_committed(self, ino: int, first: int, end: int, size: int) -> tuple[bytes, list[Extent]]:
        """The committed bytes of file blocks [first, end), cut at `size` (zeros for holes), and
        the map's records they came from: what the peer will have there, exactly (the reader's
        view would add bytes buffered here and not yet committed)."""
        lo, hi = first * BLOCK_SIZE, min(end * BLOCK_SIZE, size)
        out = bytearray(max(0, hi - lo))
        with self.data.reader.holding_map():
            pieces = [p for p in delta.clipped(self.meta.extents(ino, first, end), first, end) if not p.unwritten]
            for piece in pieces:
                a, b = piece.file_block * BLOCK_SIZE, min(piece.end_block * BLOCK_SIZE, hi)
                if a < b:
                    out[a - lo:b - lo] = await self.data.reader.read_extent(piece, piece.file_block, piece.end_block,
                                                                            a, b)
        return bytes(out), pieces

    def _remember_received(self, op: o.ContentSet) -> None:
        """A large version of the peer's that this site now shows is on both sites alike: the base
        of a delta of this site's next change to the file (a file edited at both sites by turns
        goes as deltas both ways). Its map is read between two looks at the winner: a write here
        meanwhile makes another version the winner, for good."""
        found = self.meta.site_content_base(op.object)
        if found is None or found[1] != op.stamp:
            return
        nblocks = (op.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        pieces = [p for p in delta.clipped(self.meta.extents(found[0], 0, nblocks), 0, nblocks) if not p.unwritten]
        if self.meta.site_content_base(op.object) == found and len(pieces) <= MAX_REMEMBERED_PIECES:
            self._remember_shipped(op.object, delta.ShippedVersion(op.stamp, op.size, tuple(pieces)))

    def blocks_moved(self, ino: int, old: list[Extent], new: list[Extent]) -> None:
        """The compactor copied a file's blocks elsewhere (Compactor.moved): the version the peer
        holds, if it is a delta's base, now names the copy where it held the same blocks; so
        will a version being sent now, which may have read the map before (`_caught_up`)."""
        self._moves_made += 1
        if ino in self._sending:
            moves = self._moves.setdefault(ino, collections.deque(maxlen=MAX_MOVES_KEPT))
            if len(moves) == MAX_MOVES_KEPT:
                self._moves_dropped = max(self._moves_dropped, moves[0][0])
            moves.append((self._moves_made, old, new))
        obj = self.meta.site_object_of(ino)
        base = None if obj is None else self._shipped.get(obj)
        if obj is None or base is None:
            return
        after = delta.moved(base, old, new)
        if len(after.extents) > MAX_REMEMBERED_PIECES:
            self._shipped.pop(obj)
        else:
            self._shipped[obj] = after

    def _caught_up(self, ino: int, version: delta.ShippedVersion, since: int) -> delta.ShippedVersion | None:
        """`version`, read from the map of `ino` after copy number `since`, with the compactor's
        later copies applied; None when some of them are no longer known."""
        if self._moves_dropped > since:  # possibly one of this file's
            return None
        for number, old, new in self._moves.get(ino, ()):
            if number <= since:
                continue
            version = delta.moved(version, old, new)
        return version if len(version.extents) <= MAX_REMEMBERED_PIECES else None

    def _remember_shipped(self, obj: bytes, version: delta.ShippedVersion | None) -> None:
        """The peer acknowledged a content version of `obj`: the base of its next delta (None:
        no base; a small version went whole, or its pieces were too many to keep)."""
        self._shipped.pop(obj, None)
        if version is not None:
            self._shipped[obj] = version
            while len(self._shipped) > MAX_REMEMBERED_FILES:
                self._shipped.pop(next(iter(self._shipped)))

    # -- what the CLI asks -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        link = self.meta.site_link()
        open_conflicts, conflicts_total = self.meta.site_conflict_counts()
        pending = self.meta.site_outbox(self.state.peer_applied, 1) if link else []
        now = time.time_ns()
        return {
            "site": str(self.site),
            "listen": self.listen,
            "linked": link is not None,
            "elsewhere": self.elsewhere(),  # on a cluster: None on the member that runs the link
            "peer": None if link is None else str(uuid.UUID(link["peer"])),
            "peer_addresses": [] if link is None else link["addresses"],
            "link_up": self.state.up,
            "last_error": self.state.last_error,
            "last_exchange_ns": self.state.last_exchange_ns,
            "outbound": {"pending_operations": self.meta.site_pending(self.state.peer_applied) if link else 0,
                         "lag_s": round(max(0, now - pending[0][0].wall_ns) / 1e9, 3) if pending else 0.0,
                         "operations": self.state.pushed_ops, "bytes": self.state.pushed_bytes,
                         "bytes_unchanged": self.state.unchanged_bytes},
            "inbound": {"pending_operations": self.state.peer_pending, "lag_s": self.state.peer_lag_s,
                        "operations": self.state.received_ops, "bytes": self.state.received_bytes},
            "open_conflicts": open_conflicts,
            "conflicts_total": conflicts_total,
        }

    def collect_metrics(self) -> Iterator[Metric]:
        info = self.status()
        yield counter("awsomefs_site_conflicts", "conflicts with the other site, ever", info["conflicts_total"])
        yield gauge("awsomefs_site_open_conflicts", "conflicts whose loser no later write replaced",
                    info["open_conflicts"])
        if info["elsewhere"] is not None or not info["linked"]:
            return  # the link's figures are the member's that runs it (a cluster's leader), once linked
        yield gauge("awsomefs_site_link_up", "1 when the link to the other site is up", int(info["link_up"]))
        for direction in ("outbound", "inbound"):
            yield gauge(f"awsomefs_site_{direction}_pending_operations",
                        f"operations not yet applied by the receiving site ({direction})",
                        info[direction]["pending_operations"])
            yield gauge(f"awsomefs_site_{direction}_lag_seconds",
                        f"how long the oldest operation not yet applied has waited ({direction})",
                        info[direction]["lag_s"])
            yield counter(f"awsomefs_site_{direction}_operations", f"operations replicated ({direction})",
                          info[direction]["operations"])
            yield counter(f"awsomefs_site_{direction}_bytes", f"file bytes replicated ({direction})",
                          info[direction]["bytes"])
        yield counter("awsomefs_site_outbound_unchanged_bytes",
                      "bytes of large files not sent because the other site had them (delta transfer)",
                      info["outbound"]["bytes_unchanged"])

    def outbound_lag(self) -> tuple[int, float]:
        """(operations the peer has not acknowledged, seconds the oldest of them has waited)."""
        pending = self.meta.site_outbox(self.state.peer_applied, 1)
        count = self.meta.site_pending(self.state.peer_applied)
        return count, (max(0, time.time_ns() - pending[0][0].wall_ns) / 1e9 if pending else 0.0)

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]]:
        async def invite(_body: dict[str, Any]) -> dict[str, Any]:
            return {"token": self.invite()}

        async def join(body: dict[str, Any]) -> dict[str, Any]:
            return await self.join(str(body.get("token", "")))

        async def unlink(_body: dict[str, Any]) -> dict[str, Any]:
            await self.unlink()
            return {}

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

    async def resolve(self, ident: str, keep: str) -> dict[str, Any]:
        """An operator's choice for one open conflict: what keeping it takes is written through
        the mount (repl/resolve.py), then `ResolveConflict` closes the record on both sites."""
        from awsomefsd.repl.resolve import ResolveError, write_back

        if keep not in o.KEEPS:
            raise ControlError(f"keep one of {', '.join(o.KEEPS)}, not {keep!r}")
        if self.meta.site_link() is None:
            raise ControlError("this site is not linked: what /.conflicts keeps is plain files now")
        record = next((r for r in self.meta.site_conflicts() if r["id"] == ident), None)
        if record is None:
            raise ControlError(f"no conflict {ident!r} (`awsomefsd site conflicts` lists them)")
        if not record["open"]:
            raise ControlError(f"conflict {ident} is settled already: {record.get('resolved', 'a later change saw both')}")
        if self.mount is None:
            raise ControlError("this site serves no mount to write the kept version through")
        try:
            done = await trio.to_thread.run_sync(write_back, self.mount, record, keep)
            command = c.ResolveConflict(bytes.fromhex(record["key"]), keep, time.time_ns())
            result = await self.ops.propose_holding(command, tries=MAX_DELEGATIONS_PER_BATCH)
        except (ResolveError, OSError, FsError) as exc:
            raise ControlError(f"conflict {ident}: {exc}") from None
        self.applied(command, result)
        log.info("conflict %s (%s at %s) resolved: %s", ident, record["kind"], record["path"], done)
        return {"id": ident, "kept": keep, "done": done}

    async def verify(self) -> dict[str, Any]:
        """Both trees' digests compared: this site's, and the peer's over the link."""
        from awsomefsd.repl.verify import DigestError, compare, decode_site, local_digest

        link = self.meta.site_link()
        if link is None:
            raise ControlError("this site is not linked")
        try:
            mine = decode_site(await local_digest(self.mount, self.meta.site_volumes()))
            errors = []
            for address in link["addresses"]:
                try:
                    with self._channel(link, address) as channel:
                        header, _ = wire.unframe(await unary_call(channel, f"/{LINK_SERVICE}/Digest", wire.frame({}),
                                                                  VERIFY_TIMEOUT_S))
                    break
                except (grpc.RpcError, OSError, wire.WireError) as exc:
                    errors.append(f"{address}: {_why(exc)}")
            else:
                raise ControlError("cannot reach the other site: " + "; ".join(errors))
            theirs = decode_site(header)
        except (DigestError, OSError) as exc:
            raise ControlError(str(exc)) from None
        found = compare(mine, theirs)
        return {"identical": not found, "differences": found, "entries": len(mine.root.records),
                "root_hash": mine.root.root_hash, "peer_root_hash": theirs.root.root_hash}

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

    async def Push(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.service.check_caller(context)
        self.service.check_running_the_link()
        try:
            header, data = wire.unframe(request)
            return wire.frame({**await self.service.push(header, data), **self.service.describe_self()})
        except wire.WireError as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    async def Digest(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        from awsomefsd.repl.verify import local_digest

        self.service.check_caller(context)
        return wire.frame(await local_digest(self.service.mount, self.service.meta.site_volumes()))


def _caller(channel: grpc.Channel) -> Callable[[str, bytes], Awaitable[bytes]]:
    async def call(method: str, request: bytes) -> bytes:
        return await unary_call(channel, f"/{LINK_SERVICE}/{method}", request,
                                CALL_TIMEOUT_S + len(request) / SLOWEST_LINK_BYTES_S)
    return call


def _sent_ranges(op: o.ContentSet, unchanged: tuple[Stamp, list[tuple[int, int, str]]] | None) -> list[tuple[int, int]]:
    """The byte ranges of a content version its sender stages: all of it but the block ranges
    the push names unchanged (the last block cut at the size)."""
    kept = [] if unchanged is None else [(lo, hi) for lo, hi, _ in unchanged[1]]
    nblocks = (op.size + BLOCK_SIZE - 1) // BLOCK_SIZE
    return [(lo * BLOCK_SIZE, min(hi * BLOCK_SIZE, op.size)) for lo, hi in delta.complement(kept, nblocks)]


def _pieces(header: dict[str, Any], total: int) -> list[tuple[int, int, int]]:
    """A `Stage` message's pieces, [[offset, length, crc], ...]: their lengths add up to its data,
    and all but the last are whole blocks (only a file's last block is partial)."""
    items = header.get("pieces")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_STAGE_PIECES:
        raise wire.WireError(f"a chunk's pieces are a list of 1 to {MAX_STAGE_PIECES}")
    out: list[tuple[int, int, int]] = []
    for item in items:
        if not isinstance(item, list) or len(item) != 3:
            raise wire.WireError("a piece is [offset, length, crc]")
        described = {"offset": item[0], "length": item[1], "crc": item[2]}
        out.append((wire.int_field(described, "offset", limit=1 << 62), wire.int_field(described, "length", limit=1 << 30),
                    wire.int_field(described, "crc", limit=1 << 32)))
    if sum(length for _, length, _ in out) != total or any(length % BLOCK_SIZE for _, length, _ in out[:-1]):
        raise wire.WireError("a chunk's pieces do not add up to its bytes in whole blocks")
    if any(a[0] + a[1] > b[0] for a, b in itertools.pairwise(out)):
        raise wire.WireError("a chunk's pieces are not in file order")
    return out


def _unchanged_ranges(header: dict[str, Any]) -> dict[Stamp, tuple[Stamp, list[tuple[int, int, str]]]]:
    """A push's `unchanged`: for a content version sent as a delta, the version it changes (one
    this site showed when it was acknowledged) and the block ranges it keeps, with their digest:
    [[stamp, base, [[first, end, digest], ...]], ...]."""
    items = header.get("unchanged", [])
    if not isinstance(items, list) or len(items) > 4096:
        raise wire.WireError("a push's unchanged ranges are not a list")
    out: dict[Stamp, tuple[Stamp, list[tuple[int, int, str]]]] = {}
    for item in items:
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[2], list) \
                or len(item[2]) > delta.MAX_SHARED_RANGES:
            raise wire.WireError("an unchanged-ranges entry is [stamp, base, [[first, end, digest], ...]]")
        stamp, base = wire.stamp_field({"s": item[0]}, "s"), wire.stamp_field({"b": item[1]}, "b")
        if stamp is None or base is None:
            raise wire.WireError("an unchanged-ranges entry needs the version's stamp and its base's")
        ranges: list[tuple[int, int, str]] = []
        for entry in item[2]:
            if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[2], str):
                raise wire.WireError("an unchanged range is [first block, end block, digest]")
            first = wire.int_field({"first": entry[0]}, "first", limit=1 << 52)
            end = wire.int_field({"end": entry[1]}, "end", limit=1 << 52)
            if end <= first or (ranges and first < ranges[-1][1]):
                raise wire.WireError("unchanged ranges must be non-empty, in order and disjoint")
            ranges.append((first, end, entry[2]))
        out[stamp] = (base, ranges)
    return out


def _pairing_address(address: str) -> str:
    host, port = split_host_port(address)
    return join_host_port(host, port + 1)


def _why(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details()  # type: ignore[attr-defined]
        return f"{code.name}: {details}" if details else code.name
    return str(exc) or type(exc).__name__

