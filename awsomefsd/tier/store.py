"""The object store: GET (ranged), PUT and DELETE of whole objects on any S3-compatible service.

Nothing else is used (no listing, no multipart, no HEAD), so the slowest and least complete store
works, and every answer is checked rather than trusted (`probe`, whether the store answers, is a
GET of a key that is never written):
- PUT sends Content-MD5 (the store refuses a body that arrived damaged) and the body's SHA-256 in
  the signature, and checks the ETag it answers when that is the MD5, as it is for one-part PUTs;
- GET asks for an exact byte range and refuses an answer of another length or range (a truncated
  body, a proxy that ignored the Range header); the caller checks the blocks' CRC32C;
- DELETE of an object that is already gone succeeds (deletes are retried).

Errors are `StoreError`, `retryable` when a later attempt may succeed (a timeout, a dropped
connection, a 5xx, a throttling 503/429, a short body); `with_retries` retries those with
exponential backoff and jitter within a deadline. Blocking calls, one HTTP connection per thread:
callers on the event loop run them with `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import logging
import random
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from awsomefsd.tier.sigv4 import EMPTY_SHA256, Credentials, canonical_uri, sign

log = logging.getLogger(__name__)
T = TypeVar("T")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRYABLE_CODES = frozenset({"BadDigest", "IncompleteBody", "RequestTimeout", "SlowDown", "InternalError"})
"""Errors a store answers with a 4xx that a second attempt cures: the body was damaged or cut short
on the way (Content-MD5 caught it), or the store asked us to slow down."""


PROBE_KEY = "awsomefs-probe-never-written"
CODE_MEANING = {
    "NoSuchBucket": "no such bucket",
    "InvalidAccessKeyId": "the store does not know the access key",
    "SignatureDoesNotMatch": "the store refused the secret key",
    "AccessDenied": "the credentials may not do this",
    "InvalidBucketName": "the bucket name is not valid",
    "PermanentRedirect": "the bucket is in another region or endpoint",
    "AuthorizationHeaderMalformed": "the region does not match the bucket's",
}
"""What an operator should read for the error codes a misconfiguration gives."""


class StoreError(Exception):
    """A request the store did not carry out. `retryable`: a later attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool, status: int = 0) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class ObjectMissing(StoreError):
    """GET of an object the store does not have (404 NoSuchKey)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no object {key!r} in the store", retryable=False, status=404)


@dataclass(frozen=True)
class Retry:
    """How often and how long to try: `attempts` in all, waits growing from `base_s` to `max_s`
    (full jitter), never past `deadline_s` after the first attempt began."""

    attempts: int = 6
    base_s: float = 0.1
    max_s: float = 5.0
    deadline_s: float = 60.0


def with_retries(call: Callable[[], T], retry: Retry, what: str, *, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> T:
    """`call()`, retried while its StoreError is retryable, attempts and the deadline allow."""
    rng = rng or random.Random()
    deadline = time.monotonic() + retry.deadline_s
    for attempt in range(1, retry.attempts + 1):
        try:
            return call()
        except StoreError as exc:
            wait = rng.uniform(0, min(retry.max_s, retry.base_s * 2 ** (attempt - 1)))
            if not exc.retryable or attempt == retry.attempts or time.monotonic() + wait > deadline:
                raise
            log.info("%s failed (%s), attempt %d of %d: again in %.2fs", what, exc, attempt, retry.attempts, wait)
            sleep(wait)
    raise AssertionError("unreachable")


class ObjectStore:
    """One bucket (and key prefix) of an S3-compatible store."""

    def __init__(self, endpoint: str, bucket: str, credentials: Credentials, *, region: str = "us-east-1",
                 prefix: str = "", path_style: bool = True, timeout_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"endpoint {endpoint!r}: expected http(s)://host[:port]")
        if not bucket:
            raise ValueError("a bucket is needed")
        self.scheme = url.scheme
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.bucket = bucket
        self.prefix = prefix
        self.region = region
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context or (ssl.create_default_context() if url.scheme == "https" else None)
        default_port = self.port == (443 if url.scheme == "https" else 80)
        host = url.hostname if path_style else f"{bucket}.{url.hostname}"
        self.connect_host = url.hostname if path_style else host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.base_path = (url.path.rstrip("/") + f"/{bucket}") if path_style else url.path.rstrip("/")
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"ObjectStore({self.scheme}://{self.host_header}{self.base_path}/{self.prefix})"

    # --- the three operations --------------------------------------------------------------------
    def put(self, key: str, data: bytes | bytearray) -> None:
        md5 = hashlib.md5(data, usedforsecurity=False)
        headers = {"Content-MD5": base64.b64encode(md5.digest()).decode(), "Content-Length": str(len(data))}
        status, answer, body = self._request("PUT", key, headers, data, hashlib.sha256(data).hexdigest())
        if status != 200:
            raise _error("PUT", key, status, body, self.bucket)
        etag = answer.get("etag", "").strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag) and etag != md5.hexdigest():
            raise StoreError(f"PUT {key}: the store kept other bytes (ETag {etag}, sent {md5.hexdigest()})",
                             retryable=True)

    def get(self, key: str, start: int, length: int) -> bytes:
        """Exactly `length` bytes at `start` of the object, or a StoreError."""
        assert start >= 0 and length > 0, (start, length)
        end = start + length - 1
        status, answer, body = self._request("GET", key, {"Range": f"bytes={start}-{end}"}, b"", EMPTY_SHA256)
        if status == 404 and _code(body) in ("NoSuchKey", ""):
            raise ObjectMissing(key)
        if status not in (200, 206):
            raise _error("GET", key, status, body, self.bucket)
        if status == 206:
            got = _CONTENT_RANGE.match(answer.get("content-range", ""))
            if got is None or (int(got.group(1)), int(got.group(2))) != (start, end):
                raise StoreError(f"GET {key}: asked bytes {start}-{end}, the store answered "
                                 f"{answer.get('content-range', 'no range')!r}", retryable=True)
        elif start != 0 or len(body) < length:  # 200: the whole object (a store that ignores Range)
            raise StoreError(f"GET {key}: the store ignored the range {start}-{end}", retryable=False)
        else:
            body = body[:length]
        if len(body) != length:
            raise StoreError(f"GET {key}: {len(body)} of {length} bytes arrived", retryable=True)
        return body

    def probe(self) -> None:
        """Does the store answer for this bucket, with these credentials? A GET of a key never
        written (the cheapest request every S3-compatible store serves): NoSuchKey, or AccessDenied
        (S3's answer to a missing key for a client not allowed to list), means yes. A StoreError
        with the reason otherwise: no such bucket, credentials refused, no answer."""
        status, _, body = self._request("GET", PROBE_KEY, {"Range": "bytes=0-0"}, b"", EMPTY_SHA256)
        if status in (200, 206, 416) or (status in (403, 404) and _code(body) in ("NoSuchKey", "AccessDenied", "")):
            return
        raise _error("GET", PROBE_KEY, status, body, self.bucket)

    def delete(self, key: str) -> None:
        status, _, body = self._request("DELETE", key, {}, b"", EMPTY_SHA256)
        if status not in (200, 204, 404):
            raise _error("DELETE", key, status, body, self.bucket)

    # --- one request -----------------------------------------------------------------------------
    def object_path(self, key: str) -> str:
        return f"{self.base_path}/{self.prefix}{key}"

    def _request(self, method: str, key: str, headers: dict[str, str], body: bytes | bytearray,
                 payload_sha256: str) -> tuple[int, dict[str, str], bytes]:
        path = self.object_path(key)
        signed = {"host": self.host_header}
        headers = {**headers, **sign(method, path, signed, payload_sha256, datetime.datetime.now(datetime.UTC),
                                     self.region, self.credentials), "Host": self.host_header}
        conn = self._connection()
        try:
            conn.request(method, canonical_uri(path), body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            answer = {k.lower(): v for k, v in response.getheaders()}
            if response.will_close:
                self._drop()
            return response.status, answer, data
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
            self._drop()
            raise StoreError(f"{method} {key}: {type(exc).__name__}: {exc}", retryable=True) from None

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(self.connect_host, self.port, timeout=self.timeout_s,
                                                   context=self.ssl_context)
            else:
                conn = http.client.HTTPConnection(self.connect_host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()


def _code(body: bytes) -> str:
    found = _ERROR_CODE.search(body)
    return found.group(1).decode(errors="replace") if found else ""


def _error(method: str, key: str, status: int, body: bytes, bucket: str) -> StoreError:
    code = _code(body)
    meaning = f" ({CODE_MEANING[code]}: bucket {bucket!r})" if code in CODE_MEANING else ""
    return StoreError(f"{method} {key}: HTTP {status}{' ' + code if code else ''}{meaning}",
                      retryable=status in RETRYABLE_STATUS or code in RETRYABLE_CODES, status=status)
