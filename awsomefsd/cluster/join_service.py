"""The bootstrap join service: token in, node certificate out (protocol in docs/cluster-security.md).

Server side, `JoinService` is an async servicer for `awsomefsd.rpc.bridge.serve_grpc`, served on a
node's join listener with `tls.join_server_credentials` (server-authenticated TLS: the joiner has no
certificate yet). Its handlers run on the daemon's trio loop, one at a time between awaits, so the
nonce table needs no lock. Every refusal is logged at WARNING with the peer address.

Client side, `join_cluster` (blocking; call it through `trio.to_thread.run_sync`):
1. fetches the certificate chain the join listener presents *without* trusting it and keeps the CA
   certificate whose SHA-256 equals the fingerprint in the token — the CA cert is public, the pin
   is what makes it authentic;
2. dials gRPC with that CA as the only root, so the server must hold a certificate of this cluster;
3. asks for a nonce, makes a new key and CSR locally, signs the proof (`JoinToken.prove`), and
   sends CSR + proof; the secret itself never leaves the joiner;
4. checks the returned certificate (issued by the pinned CA, for our key, in this cluster).
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from awsomefsd.cluster.ca import (
    CertificateError,
    ClusterCA,
    NodeIdentity,
    check_csr,
    fingerprint,
    make_csr,
    new_node_key,
    verify_node_cert,
)
from awsomefsd.cluster.generated import join_pb2, join_pb2_grpc
from awsomefsd.cluster.tls import NodeCredentials, channel_options
from awsomefsd.cluster.token import NONCE_BYTES, JoinToken, TokenVerifier
from awsomefsd.config.addresses import split_host_port
from awsomefsd.meta.levels import BASE_LOG_LEVEL, LOG_LEVEL
from awsomefsd.rpc.bridge import Binding, RpcAbort

log = logging.getLogger(__name__)

NONCE_TTL_S = 30.0
MAX_OUTSTANDING_NONCES = 1024
MAX_CSR_BYTES = 4096
FETCH_CA_TIMEOUT_S = 5.0
MAX_CHAIN_CERTS = 8


class JoinError(Exception):
    """Joining failed; the message is meant for the user running `awsomefsd join`."""


class JoinRefused(JoinError):
    """The cluster answered and said no (wrong or rotated token, wrong cluster)."""


AssignNodeId = Callable[[join_pb2.JoinRequest], Awaitable[int]]
"""Admit the joiner (its name and address are in the request) and return its new node id."""
RecordIssued = Callable[[NodeIdentity, str], Awaitable[None]]


class JoinService:
    """Issues node certificates to callers that prove they hold the current join token."""

    def __init__(
        self,
        ca: ClusterCA,
        verifier: TokenVerifier,
        assign_node_id: AssignNodeId,
        record_issued: RecordIssued | None = None,
        *,
        peers: Callable[[], dict[int, str]] = dict,
        clock: Callable[[], float] = time.monotonic,
        log_level: Callable[[], int] = lambda: BASE_LOG_LEVEL,
    ) -> None:
        if verifier.cluster_id != ca.cluster_id:
            raise ValueError("token verifier and CA belong to different clusters")
        self._ca = ca
        self._verifier = verifier
        self._assign_node_id = assign_node_id
        self._record_issued = record_issued
        self._peers = peers
        self._clock = clock
        self._log_level = log_level
        """The cluster's log level now (MetaClient.log_level): a joiner's build must decode it."""
        self._nonces: dict[bytes, float] = {}

    def binding(self) -> Binding:
        """What to pass to `serve_grpc` on the join listener (with `tls.join_server_credentials`)."""
        return Binding(join_pb2_grpc.add_JoinServicer_to_server, self)

    def rotate(self, verifier: TokenVerifier) -> None:
        """Accept only the new token from now on; outstanding nonces stay valid (they carry no trust)."""
        if verifier.cluster_id != self._ca.cluster_id:
            raise ValueError("token verifier belongs to another cluster")
        self._verifier = verifier
        log.info("join token rotated; the previous token is no longer accepted")

    def _check_cluster(self, raw: bytes, context: grpc.ServicerContext) -> None:
        if raw != self._ca.cluster_id.bytes:
            log.warning("refused join from %s: it asked for another cluster", context.peer())
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, "this node belongs to another cluster")

    async def Challenge(self, request: join_pb2.ChallengeRequest, context: grpc.ServicerContext) -> join_pb2.ChallengeReply:
        self._check_cluster(request.cluster_id, context)
        now = self._clock()
        for nonce in [n for n, expiry in self._nonces.items() if expiry <= now]:
            del self._nonces[nonce]
        if len(self._nonces) >= MAX_OUTSTANDING_NONCES:
            log.warning("refused join challenge from %s: %d challenges outstanding", context.peer(), len(self._nonces))
            raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many joins in progress; retry shortly")
        nonce = secrets.token_bytes(NONCE_BYTES)
        self._nonces[nonce] = now + NONCE_TTL_S
        return join_pb2.ChallengeReply(nonce=nonce)

    async def Join(self, request: join_pb2.JoinRequest, context: grpc.ServicerContext) -> join_pb2.JoinReply:
        peer = context.peer()
        self._check_cluster(request.cluster_id, context)
        expiry = self._nonces.pop(request.nonce, None)  # single use, even when the proof fails
        if expiry is None or expiry <= self._clock():
            log.warning("refused join from %s: unknown or expired challenge", peer)
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, "unknown or expired challenge; start again")
        if len(request.csr_der) > MAX_CSR_BYTES:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "CSR too large")
        if not self._verifier.verify(request.nonce, request.csr_der, request.proof):
            log.warning("refused join from %s: the join token proof does not verify (wrong or rotated token)", peer)
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, "join token refused")
        joiner, cluster = request.log_level or BASE_LOG_LEVEL, self._log_level()
        if joiner < cluster:
            log.warning("refused join from %s: its build decodes log level %d, the cluster's is %d", peer, joiner, cluster)
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                           f"this build decodes log commands up to level {joiner}, and the cluster is at level "
                           f"{cluster}: install the awsomefsd the other members run")
        try:
            csr = x509.load_der_x509_csr(request.csr_der)
            check_csr(csr)  # before a node id is spent on it
        except (ValueError, CertificateError) as exc:
            log.warning("refused join from %s: bad CSR: %s", peer, exc)
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"bad CSR: {exc}") from None
        node_id = await self._assign_node_id(request)
        cert = self._ca.issue(csr, node_id)
        identity = NodeIdentity(self._ca.cluster_id, node_id, cert.serial_number)
        if self._record_issued is not None:
            await self._record_issued(identity, peer)
        log.info("issued node certificate serial %x to node %d at %s", cert.serial_number, node_id, peer)
        return join_pb2.JoinReply(
            node_id=node_id,
            certificate_der=cert.public_bytes(serialization.Encoding.DER),
            ca_certificate_der=self._ca.cert.public_bytes(serialization.Encoding.DER),
            peers=self._peers(),
        )


def fetch_cluster_ca(address: str, ca_fingerprint: bytes, timeout_s: float = FETCH_CA_TIMEOUT_S, *,
                     listener: str = "the join listener") -> x509.Certificate:
    """The CA certificate presented by the join listener at `address` whose fingerprint is pinned
    (`listener` names it in errors: a site's pairing listener is asked the same way).

    The handshake here deliberately verifies nothing: the only thing taken from it is a certificate
    that must hash to `ca_fingerprint`, and everything after is verified against that certificate.
    """
    host, port = split_host_port(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=None) as tls:
            chain = _unverified_chain(tls)
    except OSError as exc:
        raise JoinError(f"cannot reach {listener} at {address}: {exc}") from exc
    for der in chain[:MAX_CHAIN_CERTS]:
        cert = x509.load_der_x509_certificate(der)
        if secrets.compare_digest(fingerprint(cert), ca_fingerprint):
            return cert
    raise JoinRefused(f"{address} does not present the cluster CA pinned by the token (another cluster?)")


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """DER certificates the server sent. Python 3.13 has this as a public method; 3.11 and 3.12 have it
    on the underlying `_ssl` object (same OpenSSL call, SSL_get_peer_cert_chain)."""
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:  # pragma: no cover - Python >= 3.13
        return list(public())
    certs = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in certs or ()]  # type: ignore[attr-defined]


def join_cluster(
    token: JoinToken,
    address: str,
    *,
    timeout_s: float = 10.0,
    key: ec.EllipticCurvePrivateKey | None = None,
    name: str = "",
    listen_address: str = "",
    peers_out: dict[int, str] | None = None,
) -> NodeCredentials:
    """Join through the join listener at `address`; the caller saves the returned credentials.
    `name` and `listen_address` tell the cluster who we are and where members reach us; the
    current members' addresses are put into `peers_out`.

    Raises JoinRefused when the cluster says no and JoinError when it cannot be reached or answers
    with something that does not check out.
    """
    ca_cert = fetch_cluster_ca(address, token.ca_fingerprint, min(timeout_s, FETCH_CA_TIMEOUT_S))
    key = key or new_node_key()
    csr_der = make_csr(key).public_bytes(serialization.Encoding.DER)
    creds = grpc.ssl_channel_credentials(root_certificates=ca_cert.public_bytes(serialization.Encoding.PEM))
    options = channel_options(token.cluster_id)  # any member of the token's cluster
    deadline = time.monotonic() + timeout_s
    with grpc.secure_channel(address, creds, options=options) as channel:
        stub = join_pb2_grpc.JoinStub(channel)
        try:
            challenge = stub.Challenge(
                join_pb2.ChallengeRequest(cluster_id=token.cluster_id.bytes),
                timeout=max(deadline - time.monotonic(), 0.1),
            )
            reply = stub.Join(
                join_pb2.JoinRequest(
                    cluster_id=token.cluster_id.bytes,
                    nonce=challenge.nonce,
                    csr_der=csr_der,
                    proof=token.prove(challenge.nonce, csr_der),
                    name=name,
                    address=listen_address,
                    log_level=LOG_LEVEL,
                ),
                timeout=max(deadline - time.monotonic(), 0.1),
            )
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION):
                raise JoinRefused(f"the cluster refused to join us: {details}") from None
            raise JoinError(f"join via {address} failed: {code.name}: {details}") from None
    if peers_out is not None:
        peers_out.update(dict(reply.peers))
    return _accept_reply(token, reply, key, ca_cert)


def _accept_reply(
    token: JoinToken, reply: join_pb2.JoinReply, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> NodeCredentials:
    try:
        cert = x509.load_der_x509_certificate(reply.certificate_der)
        if reply.ca_certificate_der != ca_cert.public_bytes(serialization.Encoding.DER):
            raise CertificateError("the returned CA is not the pinned one")
        identity = verify_node_cert(cert, ca_cert)
        if identity.cluster_id != token.cluster_id or identity.node_id != reply.node_id:
            raise CertificateError("the certificate names another cluster or node")
        return NodeCredentials(key, cert, ca_cert)
    except (ValueError, CertificateError) as exc:
        raise JoinError(f"the cluster returned an unusable certificate: {exc}") from exc

