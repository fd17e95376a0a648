"""The FUSE latency histogram, counted by hand (awsomefsd/metrics.py RequestLatency), reads on
/metrics exactly as prometheus_client's own Histogram would."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from awsomefsd.metrics import LATENCY_BUCKETS_S, Metrics


def _fuse_lines(text: str) -> list[str]:
    """The request histogram's lines, creation times left out (they differ by when each began)."""
    return sorted(re.sub(r"(_created\{.*\}) .*", r"\1", line) for line in text.splitlines()
                  if "awsomefs_fuse_request_seconds" in line)


def test_request_latency_reads_as_the_prometheus_histogram() -> None:
    registry = CollectorRegistry()
    reference = Histogram("awsomefs_fuse_request_seconds", "FUSE request latency by operation", ["op"],
                          buckets=LATENCY_BUCKETS_S, registry=registry)
    metrics = Metrics()
    # on a bound (a bucket counts what is <= its bound), between bounds, past the last, zero
    for op, seconds in (("read", 0.00002), ("read", 0.000021), ("create", 7.0), ("create", 0.001), ("read", 0.0)):
        reference.labels(op).observe(seconds)
        metrics.observe_fuse(op, seconds, 0)
    assert _fuse_lines(generate_latest(metrics.registry).decode()) == _fuse_lines(generate_latest(registry).decode())
