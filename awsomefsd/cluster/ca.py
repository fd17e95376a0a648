"""The cluster certificate authority: who may speak to whom inside one AwsomeFS cluster.

Every cluster has its own CA (EC P-256, ECDSA-SHA256, all through the `cryptography` package). The CA
signs one certificate per node; mutual TLS between nodes then proves both ends hold a certificate of
*this* cluster. What a node certificate says, and what callers may rely on:

- subject CN `n<node_id>`, O `AwsomeFS`, OU the cluster id;
- DNS SANs `n<node_id>.<cluster_id>.awsomefs` (a client dialling node N pins exactly N) and
  `<cluster_id>.awsomefs` (a client that only wants "some node of this cluster", e.g. a joiner);
- a URI SAN `awsomefs://<cluster_id>/node/<node_id>`, the machine-readable identity `identity_of`
  parses; the cluster id is bound into the signed certificate, not inferred from the connection;
- EKU serverAuth + clientAuth (the same certificate serves and dials), BasicConstraints CA=false.

The CA is identified by the SHA-256 of its DER encoding (`fingerprint`); the join token carries it so
a joining node can authenticate the cluster before sending anything secret. Revocation is a set of
certificate serials (`Revocations`) that the TLS layer consults on every call: gRPC's TLS stack has no
CRL hook, so the check runs right after the handshake (see `tls.py`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
NODE_VALIDITY = datetime.timedelta(days=825)
CLOCK_SKEW = datetime.timedelta(minutes=5)  # certificates start this far in the past
DNS_SUFFIX = "awsomefs"
URI_SCHEME = "awsomefs"
ORGANIZATION = "AwsomeFS"
MAX_NODE_ID = (1 << 63) - 1
MAX_REVOCATIONS = 100_000
_URI_RE = re.compile(r"^awsomefs://([0-9a-f-]{36})/node/([0-9]{1,19})$")


class CertificateError(Exception):
    """A certificate or CSR that this cluster must not accept; the message says why."""


@dataclass(frozen=True)
class NodeIdentity:
    """Who a verified node certificate names."""

    cluster_id: uuid.UUID
    node_id: int
    serial: int


def node_dns_name(cluster_id: uuid.UUID, node_id: int) -> str:
    """The DNS SAN that names exactly one node; dial it with `grpc.ssl_target_name_override`."""
    return f"n{node_id}.{cluster_id.hex}.{DNS_SUFFIX}"


def cluster_dns_name(cluster_id: uuid.UUID) -> str:
    """The DNS SAN every node of the cluster carries (for clients that accept any member)."""
    return f"{cluster_id.hex}.{DNS_SUFFIX}"


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding: what a join token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_node_key() -> ec.EllipticCurvePrivateKey:
    """A fresh node key (P-256). It never leaves the node: only its CSR does."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A CSR proving possession of `key`. The subject is left for the CA to fill in: the node id is
    assigned by the cluster, not chosen by the joiner."""
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())


def check_csr(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    """The CSR's key, if the CSR is one the CA will sign: its self-signature verifies (the requester
    holds the key) and the key is P-256 (one key type keeps the TLS configuration simple)."""
    if not csr.is_signature_valid:
        raise CertificateError("CSR signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise CertificateError("CSR key must be EC P-256")
    return public_key


@dataclass(frozen=True)
class ClusterCA:
    """The CA certificate and, on nodes that may issue certificates, its private key."""

    cluster_id: uuid.UUID
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, cluster_id: uuid.UUID, validity: datetime.timedelta = CA_VALIDITY) -> ClusterCA:
        """A new self-signed CA for `cluster_id` (done once, by `awsomefsd init`)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(cluster_id)),
            x509.NameAttribute(NameOID.COMMON_NAME, f"AwsomeFS cluster CA {cluster_id}"),
        ])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{URI_SCHEME}://{cluster_id}/ca")]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cluster_id, cert, key)

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        node_id: int,
        validity: datetime.timedelta = NODE_VALIDITY,
    ) -> x509.Certificate:
        """Sign a node certificate for `node_id` over the CSR's public key (see `check_csr`)."""
        if not 1 <= node_id <= MAX_NODE_ID:
            raise CertificateError(f"node id {node_id} out of range 1..{MAX_NODE_ID}")
        public_key = check_csr(csr)
        now = _now()
        not_after = min(now + validity, self.cert.not_valid_after_utc)
        cid = self.cluster_id
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(cid)),
                x509.NameAttribute(NameOID.COMMON_NAME, f"n{node_id}"),
            ]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([
                    x509.DNSName(node_dns_name(cid, node_id)),
                    x509.DNSName(cluster_dns_name(cid)),
                    x509.UniformResourceIdentifier(f"{URI_SCHEME}://{cid}/node/{node_id}"),
                ]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def save(self, directory: Path) -> None:
        """Write `ca.crt` and `ca.key` (mode 0600, created without a window of wider mode)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(directory / "ca.key", key_pem)
        write_private(directory / "ca.crt", self.cert_pem)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> ClusterCA:
        """The CA as the cluster's replicated state holds it (`InitCluster`)."""
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CertificateError("the CA key does not belong to the CA certificate")
        return cls(ca_cluster_id(cert), cert, key)

    @classmethod
    def load(cls, directory: Path) -> ClusterCA:
        """Read what `save` wrote; the cluster id comes from the certificate itself."""
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{directory / 'ca.key'} is not an EC key")
        if key.public_key() != cert.public_key():
            raise CertificateError(f"{directory}: ca.key does not belong to ca.crt")
        return cls(ca_cluster_id(cert), cert, key)


def ca_cluster_id(cert: x509.Certificate) -> uuid.UUID:
    """The cluster id a CA certificate was made for (from its OU)."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(values) != 1:
        raise CertificateError("CA certificate carries no cluster id")
    try:
        return uuid.UUID(str(values[0].value))
    except ValueError as exc:
        raise CertificateError("CA certificate carries a malformed cluster id") from exc


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the first byte on (atomically replaced)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def identity_of(cert: x509.Certificate) -> NodeIdentity:
    """The node a certificate names, from its URI SAN; raises CertificateError if it names none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise CertificateError("certificate has no subject alternative name") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    matches = [m for m in (_URI_RE.match(u) for u in uris) if m is not None]
    if len(matches) != 1:
        raise CertificateError("certificate does not name exactly one AwsomeFS node")
    cluster_id, node_id = uuid.UUID(matches[0].group(1)), int(matches[0].group(2))
    if not 1 <= node_id <= MAX_NODE_ID:
        raise CertificateError(f"node id {node_id} out of range")
    return NodeIdentity(cluster_id, node_id, cert.serial_number)


class Revocations:
    """The serials of node certificates the cluster no longer accepts.

    Thread-safe: gRPC worker threads consult it while the daemon's loop updates it. Bounded to
    `MAX_REVOCATIONS` serials (a cluster that removes more nodes than that should re-key its CA).
    The Raft state machine is the source of truth; `replace` installs its latest view.
    """

    def __init__(self, serials: Iterable[int] = ()) -> None:
        self._lock = threading.Lock()
        self._serials: frozenset[int] = frozenset()
        self.replace(serials)

    def revoke(self, serial: int) -> None:
        with self._lock:
            if serial not in self._serials and len(self._serials) >= MAX_REVOCATIONS:
                raise OverflowError(f"more than {MAX_REVOCATIONS} revoked certificates")
            self._serials = self._serials | {serial}

    def replace(self, serials: Iterable[int]) -> None:
        new = frozenset(serials)
        if len(new) > MAX_REVOCATIONS:
            raise OverflowError(f"more than {MAX_REVOCATIONS} revoked certificates")
        with self._lock:
            self._serials = new

    def is_revoked(self, serial: int) -> bool:
        return serial in self._serials  # a frozenset swap is atomic; no lock needed to read

    def snapshot(self) -> frozenset[int]:
        return self._serials

    def to_json(self) -> bytes:
        return json.dumps(sorted(self._serials)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Revocations:
        serials = json.loads(data)
        if not isinstance(serials, list) or not all(isinstance(s, int) and s > 0 for s in serials):
            raise ValueError("revocations must be a JSON list of positive integers")
        return cls(serials)


def verify_node_cert(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    revocations: Revocations | None = None,
    *,
    now: datetime.datetime | None = None,
) -> NodeIdentity:
    """Check that `cert` is a current, unrevoked node certificate of `ca_cert`'s cluster.

    The TLS handshake already checks the chain; this is the same judgement for callers that hold a
    certificate outside a handshake (tests, `awsomefsd status`, the revocation guard).
    """
    identity = issued_node_identity(cert, ca_cert)
    check_current(cert, revocations, now=now)
    return identity


def issued_node_identity(cert: x509.Certificate, ca_cert: x509.Certificate) -> NodeIdentity:
    """The node `cert` names, once its signature is `ca_cert`'s and it names that CA's cluster:
    the part of `verify_node_cert` that never changes for one certificate and one CA (a caller
    may remember it; see tls.authenticated_peer)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(f"not issued by this cluster's CA ({type(exc).__name__})") from exc
    identity = identity_of(cert)
    if identity.cluster_id != ca_cluster_id(ca_cert):
        raise CertificateError(f"certificate names cluster {identity.cluster_id}, not this one")
    return identity


def check_current(cert: x509.Certificate, revocations: Revocations | None = None, *,
                  now: datetime.datetime | None = None) -> None:
    """The part of `verify_node_cert` that changes with time: valid now, and not revoked."""
    at = now or _now()
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise CertificateError("certificate is not valid at this time")
    if revocations is not None and revocations.is_revoked(cert.serial_number):
        raise CertificateError(f"certificate serial {cert.serial_number:x} is revoked")
