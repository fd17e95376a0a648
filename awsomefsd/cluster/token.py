"""The join token, and the proof that a joining node knows its secret.

A token is one printable, shell-safe word: `awfs1_` followed by unpadded base64url of

    cluster id (16) | CA fingerprint (32) | secret (32) | seed count (1) | seeds | checksum (4)

where each seed is a length byte and an ASCII `host:port`, and the checksum is the first 4 bytes of
SHA-256 over the prefix and the body (it catches a token cut short by a terminal or mistyped; it is
not a security feature — the secret is). The `1` in the prefix is the format version; a reader
refuses any other version by name rather than misreading it. A *formation* token
(`awsomefsd token new`, for a cluster that forms itself) carries 32 zero bytes as its CA
fingerprint: the cluster's CA does not exist when it is made.

The cluster never stores the secret. It stores a *verifier*: the Ed25519 public key whose private
key is derived from the secret with HKDF-SHA256 (salt: the cluster id). A joiner proves knowledge of
the secret by signing a transcript (cluster id, a fresh server nonce, the SHA-256 of its CSR) with
the derived key; a stolen verifier lets nobody forge a proof, a captured proof is useless for any
other nonce or CSR, and the secret itself never crosses the network. Rotation is a new secret and so
a new verifier; proofs made with the old secret no longer verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass, field, replace
from typing import ClassVar, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TOKEN_PREFIX = "awfs"
TOKEN_VERSION = 1
SECRET_BYTES = 32  # 256 bits
FINGERPRINT_BYTES = 32
CHECKSUM_BYTES = 4
NONCE_BYTES = 32
MAX_SEEDS = 16
MAX_SEED_LEN = 255
MAX_TOKEN_CHARS = 8192
UNPINNED = bytes(FINGERPRINT_BYTES)
"""The CA fingerprint of a formation token (`JoinToken.formation`): the cluster has no CA yet."""
_FIXED = 16 + FINGERPRINT_BYTES + SECRET_BYTES + 1
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*$")
_SEED_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


@dataclass(frozen=True)
class Purpose:
    """What a token admits to. Each purpose has its own prefix, proof key and transcript tag, so a
    token, a verifier or a proof made for one is worthless for another (a cluster join token
    cannot link a site, nor the reverse)."""

    prefix: str
    what: str
    proof_key_info: bytes
    transcript_tag: bytes

    @property
    def header_re(self) -> re.Pattern[str]:
        return re.compile(rf"^{self.prefix}([0-9]{{1,4}})_(.*)$", re.DOTALL)


JOIN = Purpose(TOKEN_PREFIX, "AwsomeFS join token", b"awsomefs join proof key v1", b"awsomefs/join/v1\x00")
LINK = Purpose("awsite", "AwsomeFS site link token", b"awsomefs site link proof key v1", b"awsomefs/site-link/v1\x00")


class TokenError(ValueError):
    """A token that cannot be used; the message tells the user what is wrong with it."""


def check_seed(seed: str) -> str:
    """Validate a `host:port` seed address (IPv6 in brackets) and return it unchanged."""
    m = _SEED_RE.match(seed)
    if m is None or len(seed) > MAX_SEED_LEN or not 1 <= int(m.group(2)) <= 65535:
        raise TokenError(f"seed address {seed!r} is not host:port")
    return seed


@dataclass(frozen=True)
class JoinToken:
    """What `awsomefsd join` needs: which cluster, how to recognise it, and the shared secret."""

    purpose: ClassVar[Purpose] = JOIN
    cluster_id: uuid.UUID
    ca_fingerprint: bytes
    secret: bytes = field(repr=False)
    seeds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.ca_fingerprint) != FINGERPRINT_BYTES:
            raise TokenError(f"CA fingerprint must be {FINGERPRINT_BYTES} bytes")
        if len(self.secret) != SECRET_BYTES:
            raise TokenError(f"secret must be {SECRET_BYTES} bytes")
        if len(self.seeds) > MAX_SEEDS:
            raise TokenError(f"at most {MAX_SEEDS} seed addresses")
        for seed in self.seeds:
            check_seed(seed)

    @classmethod
    def generate(cls, cluster_id: uuid.UUID, ca_fingerprint: bytes, seeds: tuple[str, ...] = ()) -> Self:
        """A token with a fresh secret from the OS CSPRNG (a rotation is just another call)."""
        return cls(cluster_id, ca_fingerprint, secrets.token_bytes(SECRET_BYTES), tuple(seeds))

    def encode(self) -> str:
        body = bytearray(self.cluster_id.bytes + self.ca_fingerprint + self.secret)
        body.append(len(self.seeds))
        for seed in self.seeds:
            raw = seed.encode("ascii")
            body.append(len(raw))
            body += raw
        header = f"{self.purpose.prefix}{TOKEN_VERSION}_"
        body += _checksum(header, bytes(body))
        return header + base64.urlsafe_b64encode(bytes(body)).rstrip(b"=").decode("ascii")

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse `encode`'s output; surrounding whitespace is ignored, everything else is checked."""
        text = text.strip()
        if len(text) > MAX_TOKEN_CHARS:
            raise TokenError(f"token longer than {MAX_TOKEN_CHARS} characters")
        m = cls.purpose.header_re.match(text)
        if m is None:
            raise TokenError(f"not an {cls.purpose.what} (it should start with {cls.purpose.prefix}{TOKEN_VERSION}_)")
        version = int(m.group(1))
        if version != TOKEN_VERSION:
            raise TokenError(
                f"token format version {version} is not supported (this awsomefsd reads version {TOKEN_VERSION})"
            )
        encoded = m.group(2)
        if not _B64URL_RE.match(encoded):
            raise TokenError("token contains characters that cannot be part of a token (copy-paste damage?)")
        try:
            body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError) as exc:
            raise TokenError("token is truncated or damaged (bad encoding)") from exc
        if base64.urlsafe_b64encode(body).rstrip(b"=").decode("ascii") != encoded:
            raise TokenError("token is truncated or damaged (non-canonical encoding)")  # e.g. a changed last char
        if len(body) < _FIXED + CHECKSUM_BYTES:
            raise TokenError("token is truncated (too short)")
        payload, check = body[:-CHECKSUM_BYTES], body[-CHECKSUM_BYTES:]
        if not hmac.compare_digest(check, _checksum(text[: m.start(2)], payload)):
            raise TokenError("token is truncated or damaged (checksum mismatch)")
        try:
            cluster_id = uuid.UUID(bytes=payload[:16])
        except ValueError as exc:  # pragma: no cover - 16 bytes always make a UUID
            raise TokenError("token carries a malformed cluster id") from exc
        fp = payload[16 : 16 + FINGERPRINT_BYTES]
        secret = payload[16 + FINGERPRINT_BYTES : _FIXED - 1]
        seeds = _parse_seeds(payload[_FIXED - 1 :])
        return cls(cluster_id, fp, secret, seeds)

    @classmethod
    def formation(cls, seeds: tuple[str, ...] = ()) -> Self:
        """A token for a cluster that does not exist yet (`awsomefsd token new`): a new cluster id, a
        fresh secret and no CA pin (the CA is made by whichever node founds the cluster; a joiner
        takes its fingerprint from the device's founding record, where `record_proof` binds it to
        this secret)."""
        return cls(uuid.uuid4(), UNPINNED, secrets.token_bytes(SECRET_BYTES), tuple(seeds))

    @property
    def pins_ca(self) -> bool:
        return self.ca_fingerprint != UNPINNED

    def pinned(self, ca_fingerprint: bytes) -> Self:
        """This token with the CA pinned (what a formation token becomes once the cluster exists)."""
        return replace(self, ca_fingerprint=ca_fingerprint)

    def record_proof(self, ca_fingerprint: bytes) -> bytes:
        """What the founder writes beside the CA fingerprint in the device's founding record: an
        HMAC with a key derived from the secret, so that a joiner holding the token trusts that
        fingerprint and nobody without the token can make a record it would trust."""
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=self.cluster_id.bytes,
                   info=b"awsomefs founding record key v1").derive(self.secret)
        return hmac.new(key, b"awsomefs/founding/v1\x00" + self.cluster_id.bytes + ca_fingerprint,
                        hashlib.sha256).digest()

    def verifier(self) -> TokenVerifier:
        return TokenVerifier.from_secret(self.cluster_id, self.secret, self.purpose)

    def prove(self, nonce: bytes, csr_der: bytes) -> bytes:
        """The joiner's proof: a signature over the transcript with the secret-derived key."""
        return _proof_key(self.cluster_id, self.secret, self.purpose).sign(
            transcript(self.cluster_id, nonce, csr_der, self.purpose))


@dataclass(frozen=True)
class LinkToken(JoinToken):
    """What `awsomefsd site link TOKEN` needs: the other site's id (its cluster id), how to
    recognise it (its CA), the shared secret, and where its site listener is (`seeds`). What is
    proved with it is the linking site's CA certificate, in place of a CSR."""

    purpose: ClassVar[Purpose] = LINK


def _checksum(header: str, payload: bytes) -> bytes:
    return hashlib.sha256(header.encode("ascii") + payload).digest()[:CHECKSUM_BYTES]


def _parse_seeds(data: bytes) -> tuple[str, ...]:
    count, pos, seeds = data[0], 1, []
    if count > MAX_SEEDS:
        raise TokenError(f"token lists {count} seed addresses (at most {MAX_SEEDS})")
    for _ in range(count):
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            raise TokenError("token seed list is truncated")
        raw = data[pos + 1 : pos + 1 + data[pos]]
        pos += 1 + data[pos]
        try:
            seeds.append(check_seed(raw.decode("ascii")))
        except UnicodeDecodeError as exc:
            raise TokenError("token seed address is not ASCII") from exc
    if pos != len(data):
        raise TokenError("token has trailing bytes after its seed list")
    return tuple(seeds)


def _proof_key(cluster_id: uuid.UUID, secret: bytes, purpose: Purpose) -> Ed25519PrivateKey:
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=cluster_id.bytes, info=purpose.proof_key_info).derive(secret)
    return Ed25519PrivateKey.from_private_bytes(seed)


def transcript(cluster_id: uuid.UUID, nonce: bytes, csr_der: bytes, purpose: Purpose = JOIN) -> bytes:
    """What a proof signs: fixed-length fields only, so no two transcripts can be confused."""
    if len(nonce) != NONCE_BYTES:
        raise TokenError(f"nonce must be {NONCE_BYTES} bytes")
    return purpose.transcript_tag + cluster_id.bytes + nonce + hashlib.sha256(csr_der).digest()


@dataclass(frozen=True)
class TokenVerifier:
    """What the cluster stores instead of the secret: the secret-derived Ed25519 public key."""

    cluster_id: uuid.UUID
    public_key: bytes  # 32 raw bytes
    purpose: Purpose = JOIN

    @classmethod
    def from_secret(cls, cluster_id: uuid.UUID, secret: bytes, purpose: Purpose = JOIN) -> TokenVerifier:
        pub = _proof_key(cluster_id, secret, purpose).public_key()
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(cluster_id, raw, purpose)

    def verify(self, nonce: bytes, csr_der: bytes, proof: bytes) -> bool:
        """True only for a proof made with this verifier's secret over exactly this nonce and CSR."""
        try:
            message = transcript(self.cluster_id, nonce, csr_der, self.purpose)
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(proof, message)
        except (InvalidSignature, TokenError, ValueError):
            return False
        return True

    def to_bytes(self) -> bytes:
        return self.cluster_id.bytes + self.public_key

    @classmethod
    def from_bytes(cls, data: bytes, purpose: Purpose = JOIN) -> TokenVerifier:
        if len(data) != 48:
            raise ValueError("a token verifier is 48 bytes")
        return cls(uuid.UUID(bytes=data[:16]), data[16:], purpose)
