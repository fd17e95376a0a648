"""AWS Signature Version 4 for S3 requests (the only signature S3-compatible stores all accept).

Pure functions over (method, path, headers, payload hash, time, credentials): no I/O, so the
signature can be checked byte for byte against botocore's signer in the tests. Only what tiering
sends is covered: GET (ranged), PUT and DELETE of one object, no query string, path-style or
virtual-hosted addressing. See https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SAFE = "-_.~/"  # S3 keys are encoded once, '/' kept (no double encoding, unlike other services)


@dataclass(frozen=True)
class Credentials:
    """An access key pair. `repr` hides the secret: settings and errors may be logged."""

    access_key_id: str
    secret_access_key: str
    session_token: str = ""

    def __repr__(self) -> str:
        return f"Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"


def amz_date(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def canonical_uri(path: str) -> str:
    """The request path percent-encoded as S3 expects it (RFC 3986 unreserved characters and '/')."""
    return urllib.parse.quote(path, safe=_SAFE)


def sign(method: str, path: str, headers: Mapping[str, str], payload_sha256: str, now: datetime.datetime,
         region: str, credentials: Credentials) -> dict[str, str]:
    """The headers to add to a request: x-amz-date, x-amz-content-sha256, the session token if any,
    and Authorization over every header given (they must include `host`) and those."""
    stamp = amz_date(now)
    day = stamp[:8]
    signed = {k.lower(): " ".join(str(v).strip().split()) for k, v in headers.items()}
    added = {"x-amz-date": stamp, "x-amz-content-sha256": payload_sha256}
    if credentials.session_token:
        added["x-amz-security-token"] = credentials.session_token
    signed.update(added)
    assert "host" in signed, "the Host header is always signed"
    names = sorted(signed)
    canonical_headers = "".join(f"{name}:{signed[name]}\n" for name in names)
    signed_headers = ";".join(names)
    canonical_request = "\n".join([method, canonical_uri(path), "", canonical_headers, signed_headers, payload_sha256])
    scope = f"{day}/{region}/{SERVICE}/aws4_request"
    string_to_sign = "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = _signing_key(credentials.secret_access_key, day, region)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    added["Authorization"] = (f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
                              f"SignedHeaders={signed_headers}, Signature={signature}")
    return added


def _signing_key(secret: str, day: str, region: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, SERVICE, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key
