"""Prometheus metrics: one registry per daemon, served over HTTP when enabled.

Counters that live elsewhere (device byte counts, commit batch sizes) are read at scrape time by a
collector, so the hot paths pay nothing for them.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from awsomefsd.meta.errors import CAUSES, UNEXPLAINED

LATENCY_BUCKETS_S = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.fuse_latency = Histogram(
            "awsomefs_fuse_request_seconds", "FUSE request latency by operation", ["op"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.fuse_errors = Counter(
            "awsomefs_fuse_errors_total", "FUSE requests answered with an error", ["op", "errno"],
            registry=self.registry,
        )
        self.eio = Counter(
            "awsomefs_eio_total", "EIO answers a fault explains, by cause (the log names node, file and reason)",
            ["cause"], registry=self.registry,
        )
        for cause in (*CAUSES, UNEXPLAINED):  # each at 0 from the start: `increase` sees the first EIO
            self.eio.labels(cause)
        self.checksum_failures = Counter(
            "awsomefs_checksum_failures_total", "blocks whose CRC32C did not match on read", registry=self.registry
        )
        self.commit_batch = Histogram(
            "awsomefs_meta_commit_batch_commands", "metadata commands per group commit",
            buckets=(1, 2, 4, 8, 16, 64, 256, 1024, 4096, 16384, 65536), registry=self.registry,
        )
        self._latency_children: dict[str, Any] = {}

    def observe_fuse(self, op: str, seconds: float, err: int) -> None:
        child = self._latency_children.get(op)
        if child is None:
            child = self._latency_children[op] = self.fuse_latency.labels(op)
        child.observe(seconds)
        if err and err not in (errno_mod.ENOENT, errno_mod.ENODATA):  # answers, not failures
            self.fuse_errors.labels(op, errno_mod.errorcode.get(err, str(err))).inc()

    def count_eio(self, cause: str) -> None:
        self.eio.labels(cause).inc()

    def add_collector(self, collect: Callable[[], Iterator[Metric]]) -> None:
        class _Adapter(Collector):
            def collect(self) -> Iterator[Metric]:
                return collect()

        self.registry.register(_Adapter())

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
