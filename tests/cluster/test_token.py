"""The join token: it survives printing and pasting, and every damaged form is refused by name.

Also the proof of the secret: it verifies for exactly the nonce and CSR it was made for, not for a
rotated token, and the cluster side keeps only a verifier that cannot make proofs.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid

import pytest

from awsomefsd.cluster.token import SECRET_BYTES, JoinToken, TokenError, TokenVerifier

NONCE = bytes(range(32))
CSR = b"a CSR in DER"


def token(seeds: tuple[str, ...] = ()) -> JoinToken:
    return JoinToken.generate(uuid.uuid4(), hashlib.sha256(b"ca").digest(), seeds)


def reencode(header: str, body: bytes, *, fix_checksum: bool = True) -> str:
    """A token with `body` (without checksum) under `header`, checksummed as a writer would."""
    if fix_checksum:
        body += hashlib.sha256(header.encode() + body).digest()[:4]
    return header + base64.urlsafe_b64encode(body).rstrip(b"=").decode()


def body_of(text: str) -> bytes:
    encoded = text.split("_", 1)[1]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))[:-4]


@pytest.mark.parametrize("seeds", [(), ("10.77.0.1:7700",), ("node-a.example:1", "[fd00::1]:65535")])
def test_round_trip(seeds: tuple[str, ...]) -> None:
    t = token(seeds)
    text = t.encode()
    assert re.fullmatch(r"awfs1_[A-Za-z0-9_-]+", text), "printable and shell-safe, one word"
    assert JoinToken.parse(f"  {text}\n") == t
    assert len(t.secret) == SECRET_BYTES >= 32


def test_secret_is_fresh_and_not_in_repr() -> None:
    a, b = token(), token()
    assert a.secret != b.secret
    assert a.secret.hex() not in repr(a)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not an AwsomeFS join token"),
        ("hello", "not an AwsomeFS join token"),
        ("awfs_abc", "not an AwsomeFS join token"),
        ("awfs2_AAAA", "version 2 is not supported"),
        ("awfs0_AAAA", "version 0 is not supported"),
        ("awfs1_", "too short"),
        ("awfs1_AAAA", "too short"),
        ("awfs1_ab+c/", "characters that cannot be part of a token"),
        ("awfs1_" + "A" * 9000, "longer than"),
    ],
)
def test_malformed_tokens_are_refused_by_name(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message):
        JoinToken.parse(text)


def test_truncated_token_is_refused() -> None:
    text = token(("10.77.0.1:7700",)).encode()
    for cut in (1, 2, 5, 20, len(text) - 7):
        with pytest.raises(TokenError, match=r"truncated|damaged|too short"):
            JoinToken.parse(text[:-cut])


def test_single_character_damage_is_refused() -> None:
    text = token().encode()
    for i in range(6, len(text)):
        swapped = "B" if text[i] != "B" else "C"
        damaged = text[:i] + swapped + text[i + 1 :]
        with pytest.raises(TokenError):
            JoinToken.parse(damaged)


def test_invalid_base64_length_is_refused() -> None:
    with pytest.raises(TokenError, match=r"bad encoding|too short|truncated"):
        JoinToken.parse("awfs1_" + "A" * 129)  # 129 base64 characters cannot be decoded


def test_version_in_prefix_is_covered_by_the_checksum() -> None:
    text = token().encode()
    with pytest.raises(TokenError, match="version 3"):
        JoinToken.parse("awfs3" + text[5:])


@pytest.mark.parametrize(
    ("seed_bytes", "message"),
    [
        (b"\x01\x0ahost:7700", "truncated"),  # claims 10 bytes, has 9
        (b"\x01\x20abc", "truncated"),
        (b"\x02\x0410.1\x00", "not host:port|truncated"),
        (b"\x00junk", "trailing bytes"),
        (b"\x11", "at most 16"),
        (b"\x01\x06no_port", "not host:port|trailing"),
        (b"\x01\x07h:99999", "not host:port"),
        (b"\x01\x06\xff\xfe:123", "not ASCII"),
    ],
)
def test_malformed_seed_lists_are_refused(seed_bytes: bytes, message: str) -> None:
    t = token()
    fixed = t.cluster_id.bytes + t.ca_fingerprint + t.secret
    with pytest.raises(TokenError, match=message):
        JoinToken.parse(reencode("awfs1_", fixed + seed_bytes))


def test_invalid_fields_are_refused_when_building() -> None:
    with pytest.raises(TokenError):
        JoinToken(uuid.uuid4(), b"short", bytes(32))
    with pytest.raises(TokenError):
        JoinToken(uuid.uuid4(), bytes(32), bytes(16))
    with pytest.raises(TokenError):
        JoinToken(uuid.uuid4(), bytes(32), bytes(32), ("not a seed",))


def test_proof_verifies_only_for_its_nonce_csr_and_secret() -> None:
    t = token()
    verifier = t.verifier()
    proof = t.prove(NONCE, CSR)
    assert verifier.verify(NONCE, CSR, proof)
    assert not verifier.verify(bytes(32), CSR, proof), "another nonce (a replay)"
    assert not verifier.verify(NONCE, CSR + b"!", proof), "another CSR (a substituted key)"
    assert not verifier.verify(NONCE, CSR, proof[:-1] + bytes([proof[-1] ^ 1])), "a damaged proof"
    assert not verifier.verify(NONCE[:5], CSR, proof), "a malformed nonce"


def test_rotation_refuses_the_old_secret() -> None:
    old = token()
    new = JoinToken.generate(old.cluster_id, old.ca_fingerprint)
    assert not new.verifier().verify(NONCE, CSR, old.prove(NONCE, CSR))
    assert new.verifier().verify(NONCE, CSR, new.prove(NONCE, CSR))


def test_verifier_does_not_contain_the_secret_and_round_trips() -> None:
    t = token()
    stored = t.verifier().to_bytes()
    assert t.secret not in stored
    assert TokenVerifier.from_bytes(stored) == t.verifier()
    with pytest.raises(ValueError):
        TokenVerifier.from_bytes(stored[:-1])


def test_same_secret_in_another_cluster_gives_another_verifier() -> None:
    t = token()
    elsewhere = JoinToken(uuid.uuid4(), t.ca_fingerprint, t.secret)
    assert elsewhere.verifier().public_key != t.verifier().public_key
