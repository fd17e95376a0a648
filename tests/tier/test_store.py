"""The object store client against a real S3 API server (moto's, a separate process), directly
and through a proxy that injects what slow and unreliable stores do: every answer is checked,
what may succeed later is retried within a deadline, nothing hangs, wrong bytes never pass."""

from __future__ import annotations

import os
import random
import time

import pytest

from awsomefsd.tier.store import ObjectMissing, Retry, StoreError, with_retries
from tests.support.s3 import FaultProxy, S3Server
from tests.tier.conftest import make_store

QUICK = Retry(attempts=4, base_s=0.01, max_s=0.05, deadline_s=10.0)


def test_put_get_ranges_delete(s3: S3Server) -> None:
    store = make_store(s3.endpoint, s3.bucket)
    data = os.urandom(3 * 1024 * 1024 + 17)
    store.put("objects/a b+c", data)
    assert s3.stored() == ["cluster-a/objects/a b+c"], "one object, under the prefix, the key as given"
    rng = random.Random(5)
    for _ in range(20):
        start = rng.randrange(len(data))
        length = rng.randrange(1, len(data) - start + 1)
        assert store.get("objects/a b+c", start, length) == data[start : start + length]
    assert store.get("objects/a b+c", len(data) - 1, 1) == data[-1:]
    store.delete("objects/a b+c")
    store.delete("objects/a b+c")  # again: deletes are retried, so a missing object is not an error
    with pytest.raises(ObjectMissing):
        store.get("objects/a b+c", 0, 1)
    assert s3.stored() == []


def test_a_read_past_the_end_is_an_error_not_short_data(s3: S3Server) -> None:
    store = make_store(s3.endpoint, s3.bucket)
    store.put("short", b"0123456789")
    with pytest.raises(StoreError):
        store.get("short", 5, 10)
    store.delete("short")


def test_a_wrong_bucket_is_a_clear_error(s3: S3Server) -> None:
    store = make_store(s3.endpoint, "no-such-bucket")
    with pytest.raises(StoreError) as caught:
        store.put("x", b"x")
    assert not caught.value.retryable and "NoSuchBucket" in str(caught.value)


def test_no_store_at_all_is_retryable_and_bounded() -> None:
    store = make_store("http://127.0.0.1:9", "b", timeout_s=2.0)  # the discard port: nothing listens
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        with_retries(lambda: store.get("x", 0, 1), QUICK, "GET x")
    assert caught.value.retryable and time.monotonic() - started < QUICK.deadline_s


@pytest.mark.parametrize(("kind", "method", "kwargs"), [
    ("status", "PUT", {"status": 503, "code": "SlowDown"}),
    ("status", "GET", {"status": 500}),
    ("drop", "PUT", {}),
    ("drop", "GET", {}),
    ("truncate", "GET", {}),
    ("corrupt_request", "PUT", {}),  # the body damaged on the way: Content-MD5 makes the store refuse it
    ("status", "DELETE", {"status": 502}),
])
def test_transient_faults_are_retried_to_success(proxy: FaultProxy, s3: S3Server, kind: str, method: str,
                                                 kwargs: dict[str, object]) -> None:
    store = make_store(proxy.endpoint, s3.bucket)
    data = os.urandom(256 * 1024)
    proxy.plan(kind, times=2, method=method, **kwargs)  # type: ignore[arg-type]
    with_retries(lambda: store.put("obj", data), QUICK, "PUT obj")
    assert with_retries(lambda: store.get("obj", 1000, 5000), QUICK, "GET obj") == data[1000:6000]
    with_retries(lambda: store.delete("obj"), QUICK, "DELETE obj")
    assert proxy.injected == {kind: 2}, proxy.injected
    assert s3.stored() == []


def test_each_fault_alone_is_seen(proxy: FaultProxy, s3: S3Server) -> None:
    """What each fault does to one attempt: an error (retryable) or, for a corrupted GET body,
    different bytes of the right length, which the caller's block checksums catch (EIO)."""
    store = make_store(proxy.endpoint, s3.bucket)
    data = os.urandom(64 * 1024)
    store.put("one", data)
    for kind in ("drop", "truncate"):
        proxy.plan(kind, method="GET")
        with pytest.raises(StoreError) as caught:
            store.get("one", 0, len(data))
        assert caught.value.retryable, kind
    proxy.plan("corrupt_request", method="PUT")
    with pytest.raises(StoreError) as refused:
        store.put("two", data)
    # a store that checks Content-MD5 refuses the body (400 BadDigest); one that does not (moto)
    # keeps it, and the ETag it answers gives it away: either way the PUT is not confirmed
    assert refused.value.retryable
    assert refused.value.status == 400 or "kept other bytes" in str(refused.value), refused.value
    with_retries(lambda: store.put("two", data), QUICK, "PUT two")
    assert store.get("two", 0, len(data)) == data
    proxy.plan("ignore_range", method="GET")
    with pytest.raises(StoreError) as ignored:
        store.get("one", 100, 100)
    assert not ignored.value.retryable and "ignored the range" in str(ignored.value)
    proxy.plan("corrupt_response", method="GET")
    damaged = store.get("one", 0, 4096)
    assert len(damaged) == 4096 and damaged != data[:4096]
    store.delete("one")
    store.delete("two")


def test_a_persistent_fault_gives_up_within_the_deadline(proxy: FaultProxy, s3: S3Server) -> None:
    store = make_store(proxy.endpoint, s3.bucket)
    proxy.plan("status", times=1000, status=503, code="SlowDown")
    retry = Retry(attempts=50, base_s=0.05, max_s=0.5, deadline_s=2.0)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        with_retries(lambda: store.put("never", b"x"), retry, "PUT never")
    assert caught.value.retryable and caught.value.status == 503
    assert time.monotonic() - started < retry.deadline_s + 1.0


def test_a_hung_store_times_out(proxy: FaultProxy, s3: S3Server) -> None:
    store = make_store(proxy.endpoint, s3.bucket, timeout_s=0.5)
    store.put("slow", b"slow bytes")
    proxy.plan("delay", method="GET", delay_s=3.0)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        store.get("slow", 0, 4)
    assert caught.value.retryable and time.monotonic() - started < 2.0
    assert with_retries(lambda: store.get("slow", 0, 4), QUICK, "GET slow") == b"slow"
    store.delete("slow")


def test_a_non_retryable_error_is_not_retried() -> None:
    calls = []

    def refuse() -> None:
        calls.append(1)
        raise StoreError("HTTP 403 AccessDenied", retryable=False, status=403)

    with pytest.raises(StoreError):
        with_retries(refuse, QUICK, "PUT x", sleep=lambda s: None)
    assert len(calls) == 1
