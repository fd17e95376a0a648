"""Pairing with another site (design note 48): `awsomefsd site link` here prints a token,
`awsomefsd site link TOKEN` on the other site pairs with it.

The pairing listener (port + 1 of `[site] listen`) is server-authenticated TLS only, since the
other site has no certificate we trust yet. The joining site fetches our CA and checks it against
the fingerprint in the token, asks for a nonce (`Challenge`) and proves it knows the token's
secret over its own CA certificate (`Pair`, cluster/token.py's proof with the site-link purpose).
Then both sides propose `LinkSite`, each pinning the other's CA. The secret is never stored: only
its verifier, in `<state>/site/invite`, which a pairing consumes. Unlinking is here too: it ends
what pairing began.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
import uuid
from typing import Any

import grpc
import trio
from cryptography import x509

from awsomefsd.cluster.ca import cluster_dns_name, fingerprint
from awsomefsd.cluster.join_service import JoinError, fetch_cluster_ca
from awsomefsd.cluster.rpc import ControlError
from awsomefsd.cluster.token import LINK, NONCE_BYTES, LinkToken, TokenError, TokenVerifier
from awsomefsd.config.addresses import join_host_port, split_host_port
from awsomefsd.crdt import wire
from awsomefsd.meta import commands as c
from awsomefsd.repl.endpoint import CALL_TIMEOUT_S, LINK_SERVICE, Endpoint, why_failed
from awsomefsd.repl.identity import ca_fingerprint, site_dir
from awsomefsd.rpc.bridge import RpcAbort, unary_call

log = logging.getLogger(__name__)

PAIRING_SERVICE = "awsomefs.site.v1.Pairing"
UNLINK_TIMEOUT_S = 5.0
"""How long `site unlink` tries each of the other site's addresses to tell it."""
INVITE_FILE = "invite"
ROLLING_UPGRADE = ("a member of this site runs a build that cannot take part in cross-site replication yet "
                   "(a rolling upgrade under way): upgrade every member first")


class Pairing(Endpoint):
    """Pairing and unlinking, a job of `SiteService`."""

    _nonces: dict[bytes, float]
    """The nonces handed out by `Challenge` and not yet used, with when they expire."""

    def invite(self) -> str:
        """A new link token; the previous one no longer pairs."""
        if self.meta.site_link() is not None:
            raise ControlError("this site is linked already: `awsomefsd site unlink` first")
        if not self.meta.may_propose(c.LinkSite):
            raise ControlError(ROLLING_UPGRADE)
        token = LinkToken.generate(self.site, ca_fingerprint(self.credentials), tuple(self._reachable_addresses()))
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
        self._reachable_addresses()
        errors = []
        for address in token.seeds:
            try:
                peer_ca = await trio.to_thread.run_sync(
                    functools.partial(fetch_cluster_ca, _pairing_address(address), token.ca_fingerprint,
                                      listener="the other site's pairing listener"))
                reply = await self._pair_with(address, token, peer_ca)
            except (JoinError, OSError, grpc.RpcError, wire.WireError) as exc:
                errors.append(f"{address}: {why_failed(exc)}")
                continue
            sent = await self._link(token.cluster_id.bytes, peer_ca, tuple(reply["addresses"]),
                                    resume=reply.get("resume") is True)
            return {"peer": str(token.cluster_id), "addresses": reply["addresses"], "initial_operations": sent,
                    "peer_initial_operations": int(reply.get("initial_operations", 0)),
                    "relinked": reply.get("resume") is True}
        raise ControlError("could not pair: " + "; ".join(errors))

    def _reachable_addresses(self) -> list[str]:
        """The addresses the other site is told to reach this one at; a wildcard listen address
        (0.0.0.0, ::) given without `[site] advertise` reaches nothing there (the other site
        would connect to itself), so linking is refused with what to set."""
        addresses = self.addresses()
        for address in addresses:
            host, _ = split_host_port(address)
            if host in WILDCARD_HOSTS:
                raise ControlError(f"this site would be reached at {address}, a wildcard address: set [site] advertise "
                                   "to the host:port the other site reaches this one at")
        return addresses

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
                       "nonce": nonce.hex(), "proof": proof.hex(),
                       "kept": self.meta.site_kept_peer() == token.cluster_id.bytes}
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
            peer, ca_pem, nonce, proof, addresses, kept = _pairing_request(request)
            peer_ca = x509.load_pem_x509_certificate(ca_pem)
        except ValueError as exc:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"a malformed pairing request: {exc}") from None
        if self._nonces.pop(nonce, 0) < time.monotonic() or not verifier.verify(nonce, ca_pem, proof):
            log.warning("site pairing refused: a wrong or rotated link token (from site %s)", peer)
            return {"error": "the link token is wrong or was replaced by a newer one"}
        if self.meta.site_link() is not None:
            return {"error": "that site is linked already"}
        if not self.meta.may_propose(c.LinkSite):
            return {"error": ROLLING_UPGRADE}
        resume = kept and self.meta.site_kept_peer() == peer.bytes
        sent = await self._link(peer.bytes, peer_ca, tuple(addresses), resume=resume)
        invite.unlink(missing_ok=True)
        return {"addresses": self.addresses(), "initial_operations": sent, "resume": resume}

    async def _link(self, peer: bytes, peer_ca: x509.Certificate, addresses: tuple[str, ...], *,
                    resume: bool) -> int:
        """Link to `peer`; returns how many operations this site's initial sync sends. `resume`:
        both sites kept their tables from an earlier link with each other (each says so when
        pairing), and the link takes up where it stopped (meta/sites/relink.py). Otherwise
        what this site kept goes first, so that both start over alike: one side resuming
        against a peer that starts afresh would pair nothing and collide entry ids."""
        from cryptography.hazmat.primitives import serialization

        if not self.meta.may_propose(c.LinkSite):
            raise ControlError(ROLLING_UPGRADE)

        ca_pem = peer_ca.public_bytes(serialization.Encoding.PEM)
        kept = self.meta.site_kept_peer()
        if kept is not None and not (resume and kept == peer):
            await self.meta.propose(c.UnlinkSite(time.time_ns()))  # unlinked already: drops what was kept
        sent = await self.meta.propose(c.LinkSite(peer, time.time_ns(), ca_pem, addresses))
        await self.meta.barrier(report=False)  # `site link` said linked: a crash now must not take it back
        log.info("%s site %s at %s (fingerprint %s); %d operations to send for the %s",
                 "linked again to" if resume else "linked to", uuid.UUID(bytes=peer), ", ".join(addresses),
                 fingerprint(peer_ca).hex()[:16], sent,
                 "changes made while unlinked" if resume else "initial sync")
        self.relink()
        return int(sent)

    async def unlink(self, *, forget: bool = False) -> str:
        """Unlink here, then tell the other site, which unlinks too (`unlinked_by_peer`). Returns
        "" once it was told, else why it could not be: it then stays linked, its link down,
        until it is unlinked there as well (an operator's `site unlink` on it). Both keep the
        link's tables for a relink (meta/sites/relink.py); `forget`: this site drops them
        (and may be unlinked already), and the next link is a first link on both sides."""
        link = self.meta.site_link()
        if link is None:
            if forget and self.meta.site_kept_peer() is not None:
                await self._forget_kept()
                return ""
            raise ControlError("this site is not linked" + (" and keeps nothing of a link" if forget else ""))
        await self._unlink_here()
        log.info("unlinked from the other site; its ids and tree are kept for a relink")
        untold = await self._tell_unlinked(link)
        if untold:
            log.warning("the other site could not be told of the unlink (%s): unlink it there too", untold)
        if forget:
            await self._forget_kept()
        return untold

    async def _forget_kept(self) -> None:
        """UnlinkSite on an unlinked site: what it kept for a relink goes (deleted files' space too)."""
        await self.meta.propose(c.UnlinkSite(time.time_ns()))
        await self.meta.barrier(report=False)
        log.info("dropped what was kept of the link for a relink")

    async def _tell_unlinked(self, link: dict[str, Any]) -> str:
        """Call `Unlink` on whichever of the other site's addresses runs its link."""
        failures = []
        for address in link["addresses"]:
            try:
                with self._channel(link, address) as channel:
                    await unary_call(channel, f"/{LINK_SERVICE}/Unlink", wire.frame({}), UNLINK_TIMEOUT_S)
                return ""
            except (grpc.RpcError, OSError, ValueError) as exc:
                failures.append(f"{address}: {why_failed(exc)}")
        return "; ".join(failures) or "it has no address"

    async def unlinked_by_peer(self) -> None:
        """The other site unlinked and says so (its `site unlink`): unlink here too, so that this
        site neither keeps sending into a link that is gone nor refuses a new one."""
        if self.meta.site_link() is None:
            return
        await self._unlink_here()
        log.warning("the other site unlinked (its `site unlink`): this site is unlinked too; "
                    "what it had not sent yet is no longer sent")

    async def _unlink_here(self) -> None:
        """UnlinkSite, durable before anyone is told (a crash must not take it back), and the
        listener and shipper restarted without the link."""
        await self.meta.propose(c.UnlinkSite(time.time_ns()))
        await self.meta.barrier(report=False)
        self.relink()

    def new_nonce(self) -> bytes:
        now = time.monotonic()
        self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        if len(self._nonces) > 1024:
            raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many pairings under way")
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._nonces[nonce] = now + 60
        return nonce


MAX_PAIRING_ADDRESSES = 16
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})


def _pairing_request(request: dict[str, Any]) -> tuple[uuid.UUID, bytes, bytes, bytes, list[str], bool]:
    """(site, CA PEM, nonce, proof, addresses, kept) of a `Pair` call, each checked for its type
    before use: the caller is not authenticated yet, so anything may come (ValueError names
    what is wrong). `kept`: the caller kept its tables from a link with this site (absent: an
    older build, which never does)."""
    def text(key: str) -> str:
        value = request.get(key)
        if not isinstance(value, str):
            raise ValueError(f"{key!r} is not a string")
        return value

    addresses = request.get("addresses")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise ValueError("'addresses' is not a list of strings")
    if len(addresses) > MAX_PAIRING_ADDRESSES:
        raise ValueError(f"more than {MAX_PAIRING_ADDRESSES} addresses")
    for address in addresses:
        split_host_port(address)  # ValueError: not host:port
    kept = request.get("kept", False)
    if not isinstance(kept, bool):
        raise ValueError("'kept' is not a boolean")
    return (uuid.UUID(text("site")), text("ca_pem").encode(), bytes.fromhex(text("nonce")),
            bytes.fromhex(text("proof")), addresses, kept)


def _pairing_address(address: str) -> str:
    host, port = split_host_port(address)
    return join_host_port(host, port + 1)
