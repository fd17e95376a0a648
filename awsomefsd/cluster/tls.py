"""Mutual TLS between nodes: gRPC credentials from a node's key, certificate and the cluster CA.

What each side relies on:

- A node's cluster listener uses `server_credentials`: TLS that *requires* a client certificate
  chaining to the cluster CA. A client with no certificate, a self-signed one or one from another CA
  fails the handshake inside gRPC; no RPC handler ever runs (gRPC core logs the failed handshake).
- gRPC's TLS has no CRL hook, so revocation is checked right after the handshake, before any handler
  code: `RevocationGuard` wraps a servicer for `awsomefsd.rpc.bridge.serve_grpc` and refuses
  (PERMISSION_DENIED, logged with the peer address and serial) a certificate whose serial is revoked
  or that names another cluster. `authenticated_peer` gives handlers the verified node id, so a
  transport can check that a message claiming to be from node N came over N's certificate.
- A client dials with `channel_credentials` and `channel_options(cluster_id, node_id)`: the
  server's certificate must chain to the cluster CA *and* carry node N's DNS name, so dialling node
  3 cannot end up talking to node 5 with 5's valid certificate.
- The Raft wire (awsomefsd.rpc.wire, trio's own TLS) holds to the same: `wire_server_context`
  requires a client certificate of the cluster CA, `wire_client_context` dialled with
  `server_hostname=node_dns_name(cluster, N)` accepts only node N, and `certificate_identity`
  gives the verified node (revocation and validity checked on every call, like the guard).
"""

from __future__ import annotations

import functools
import inspect
import logging
import ssl
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from awsomefsd.cluster.ca import (
    CertificateError,
    NodeIdentity,
    Revocations,
    ca_cluster_id,
    check_current,
    cluster_dns_name,
    identity_of,
    issued_node_identity,
    node_dns_name,
    write_private,
)
from awsomefsd.rpc.bridge import RpcAbort
from awsomefsd.rpc.wire import WireSecurity

log = logging.getLogger(__name__)

CLIENT_STREAM_MARK = "__awsomefs_client_stream__"  # set by awsomefsd.rpc.bridge.client_stream

KEY_FILE = "node.key"
CERT_FILE = "node.crt"
CA_FILE = "ca.crt"


@dataclass(frozen=True)
class NodeCredentials:
    """A node's private key, its certificate and the cluster CA certificate: all it needs for mTLS."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    ca_cert: x509.Certificate

    def __post_init__(self) -> None:
        if self.key.public_key() != self.cert.public_key():
            raise CertificateError("node key does not belong to the node certificate")

    @property
    def identity(self) -> NodeIdentity:
        return identity_of(self.cert)

    @property
    def cluster_id(self) -> uuid.UUID:
        return ca_cluster_id(self.ca_cert)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def save(self, directory: Path) -> None:
        """Write node.key (0600), node.crt and ca.crt into `directory` (the node's state dir)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(directory / KEY_FILE, self.key_pem)
        write_private(directory / CERT_FILE, self.cert_pem)
        write_private(directory / CA_FILE, self.ca_pem)

    @classmethod
    def load(cls, directory: Path) -> NodeCredentials:
        key = serialization.load_pem_private_key((directory / KEY_FILE).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{directory / KEY_FILE} is not an EC key")
        cert = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
        ca_cert = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
        return cls(key, cert, ca_cert)


def server_credentials(node: NodeCredentials) -> grpc.ServerCredentials:
    """Credentials for the cluster listener: TLS with a required, CA-verified client certificate."""
    return grpc.ssl_server_credentials(
        [(node.key_pem, node.cert_pem + node.ca_pem)], root_certificates=node.ca_pem, require_client_auth=True
    )


def join_server_credentials(node: NodeCredentials) -> grpc.ServerCredentials:
    """Credentials for the join listener: server-authenticated TLS only (the joiner has no certificate
    yet). The chain includes the CA certificate so a joiner can find the CA its token pins."""
    return grpc.ssl_server_credentials(
        [(node.key_pem, node.cert_pem + node.ca_pem)], root_certificates=None, require_client_auth=False
    )


def channel_credentials(node: NodeCredentials) -> grpc.ChannelCredentials:
    """Credentials to dial another node: present our certificate, trust only the cluster CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=node.ca_pem, private_key=node.key_pem, certificate_chain=node.cert_pem
    )


def channel_options(cluster_id: uuid.UUID, node_id: int | None = None) -> list[tuple[str, str]]:
    """Channel options that make the server certificate name node `node_id` (or, with None, any
    node of the cluster): peers are dialled by address, their certificates carry names."""
    name = cluster_dns_name(cluster_id) if node_id is None else node_dns_name(cluster_id, node_id)
    return [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]


def secure_channel(target: str, node: NodeCredentials, peer_node_id: int | None = None) -> grpc.Channel:
    """A gRPC channel to `target` (host:port) that only talks to node `peer_node_id` of our cluster."""
    return grpc.secure_channel(target, channel_credentials(node), options=channel_options(node.cluster_id, peer_node_id))


def wire_server_context(node: NodeCredentials) -> ssl.SSLContext:
    """The Raft wire's listener: TLS that requires a client certificate of the cluster CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    return _with_node_keys(context, node)


def wire_client_context(node: NodeCredentials) -> ssl.SSLContext:
    """Dialling the Raft wire: present our certificate, trust only the cluster CA, and (with
    `server_hostname=node_dns_name(...)`) accept only the node dialled."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    return _with_node_keys(context, node)


def wire_security(node: NodeCredentials, revocations: Revocations) -> WireSecurity:
    """What the Raft transport needs for mutual TLS on its wire, from this node's credentials."""
    cluster_id = node.cluster_id
    return WireSecurity(
        server=wire_server_context(node), client=wire_client_context(node),
        name_of=lambda peer: node_dns_name(cluster_id, peer),
        identify=lambda der: certificate_identity(der, node.ca_cert, revocations).node_id,
    )


def _with_node_keys(context: ssl.SSLContext, node: NodeCredentials) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=node.ca_pem.decode())
    with tempfile.TemporaryDirectory(prefix="awsomefs-tls-") as private:  # 0700; ssl reads files only
        key, chain = Path(private) / KEY_FILE, Path(private) / CERT_FILE
        write_private(key, node.key_pem)
        write_private(chain, node.cert_pem + node.ca_pem)
        context.load_cert_chain(chain, key)
    return context


def certificate_identity(der: bytes | None, ca_cert: x509.Certificate, revocations: Revocations) -> NodeIdentity:
    """The node a connection's verified certificate (DER, from the Raft wire) names; CertificateError
    when there is none, or it is revoked, expired or of another cluster."""
    if not der:
        raise CertificateError("no client certificate")
    return _current_identity(der, ca_cert, revocations, x509.load_der_x509_certificate)


def authenticated_peer(
    context: grpc.ServicerContext, ca_cert: x509.Certificate, revocations: Revocations
) -> NodeIdentity:
    """The node on the other end of a call, after the handshake verified its chain.

    Raises CertificateError when the call carries no client certificate (a listener configured
    without client auth), or the certificate is revoked, expired or of another cluster.
    """
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        raise CertificateError("no client certificate")
    return _current_identity(pem[0], ca_cert, revocations, x509.load_pem_x509_certificate)


def _current_identity(encoded: bytes, ca_cert: x509.Certificate, revocations: Revocations,
                      load: Callable[[bytes], x509.Certificate]) -> NodeIdentity:
    key = (encoded, ca_cert.signature)
    known = _issued.get(key)
    if known is None:
        cert = load(encoded)
        known = cert, issued_node_identity(cert, ca_cert)
        if len(_issued) >= MAX_CERTS_REMEMBERED:
            _issued.clear()
        _issued[key] = known
    cert, identity = known
    check_current(cert, revocations)
    return identity


MAX_CERTS_REMEMBERED = 1024
_issued: dict[tuple[bytes, bytes], tuple[x509.Certificate, NodeIdentity]] = {}
"""Callers' certificates whose signature and cluster were checked, by (PEM or DER, CA signature): every
forwarded proposal is a call, and checking the signature each time took 6% of a leader's loop.
Validity dates and revocation are checked on every call still (`check_current`)."""


class RevocationGuard:
    """Wraps an async servicer so that each call first checks the caller's certificate.

    Pass the guard to `Binding(add_to_server, RevocationGuard(servicer, ...))`; the bridge sees the
    same `async def` methods (`functools.wraps` carries markers such as `bridge.client_stream`).
    Refusals end the RPC with PERMISSION_DENIED and are logged at WARNING. A client stream is
    checked when it opens and again before every request it delivers, so revoking a node also cuts
    a long-lived stream it already has open (the Raft transport keeps one per peer).
    `ca_cert` is read through a callable so a CA rotation does not need new guards.
    """

    def __init__(
        self,
        servicer: object,
        ca_cert: Callable[[], x509.Certificate],
        revocations: Revocations,
    ) -> None:
        self._servicer = servicer
        self._ca_cert = ca_cert
        self._revocations = revocations

    def check(self, method: str, context: grpc.ServicerContext) -> NodeIdentity:
        """The verified caller, or RpcAbort(PERMISSION_DENIED) after logging who was refused."""
        try:
            return authenticated_peer(context, self._ca_cert(), self._revocations)
        except CertificateError as exc:
            log.warning("refused %s from %s: %s", method, context.peer(), exc)
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED, f"certificate refused: {exc}") from None

    def __getattr__(self, name: str) -> Callable[[Any, grpc.ServicerContext], Awaitable[Any]]:
        method = getattr(self._servicer, name)
        if not inspect.iscoroutinefunction(method):
            raise TypeError(f"{type(self._servicer).__name__}.{name} must be `async def`")
        guard = self
        streaming = bool(getattr(method, CLIENT_STREAM_MARK, False))

        @functools.wraps(method)
        async def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            caller = guard.check(name, context)
            if streaming:
                request = _RevocableStream(request, caller, guard, name, context)
            return await method(request, context)

        return guarded


class _RevocableStream:
    """A client stream's receive channel that stops delivering once the caller is revoked."""

    def __init__(
        self, inner: Any, caller: NodeIdentity, guard: RevocationGuard, method: str, context: grpc.ServicerContext
    ) -> None:
        self._inner = inner
        self._caller = caller
        self._guard = guard
        self._method = method
        self._context = context

    async def receive(self) -> Any:
        item = await self._inner.receive()
        if self._guard._revocations.is_revoked(self._caller.serial):
            self._guard.check(self._method, self._context)  # logs and raises PERMISSION_DENIED
        return item

    def __aiter__(self) -> _RevocableStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
