"""Prometheus metrics: one registry per daemon, served over HTTP when enabled.

Counters that live elsewhere (device byte counts, commit batch sizes) are read at scrape time by a
collector, so the hot paths pay nothing for them.
"""

from __future__ import annotations

import errno as errno_mod
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from awsomefsd.meta.errors import CAUSES, UNEXPLAINED

LATENCY_BUCKETS_S = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class RequestLatency:
    """The latency histogram of FUSE requests by operation, counted in plain lists and turned into
    the Prometheus histogram at scrape time. Every request is observed: prometheus_client's
    Histogram takes a lock per counter and walks its buckets (4.5 us a request on this machine
    loaded, against 0.6 us here), which was a tenth of a create's daemon time. Observed on the
    trio thread only; a scrape (the HTTP thread) may see a request in its count and not yet in its
    sum, which the next scrape settles."""

    NAME = "awsomefs_fuse_request_seconds"

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._by_op: dict[str, tuple[list[int], list[float], float]] = {}
        """op -> (requests per bucket, the last one past every bound; [sum of seconds]; created)."""

    def observe(self, op: str, seconds: float) -> None:
        found = self._by_op.get(op)
        if found is None:
            found = self._by_op[op] = ([0] * (len(self.bounds) + 1), [0.0], time.time())
        counts, total, _ = found
        counts[bisect_left(self.bounds, seconds)] += 1  # a bucket counts what is <= its bound
        total[0] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.NAME, "FUSE request latency by operation", labels=["op"])
        for op, (counts, total, created) in list(self._by_op.items()):
            buckets, seen = [], 0
            for bound, count in zip((*self.bounds, float("inf")), list(counts), strict=True):
                seen += count
                buckets.append((floatToGoString(bound), float(seen)))
            family.add_metric([op], buckets, total[0])
            family.samples.append(Sample(f"{self.NAME}_created", {"op": op}, created))
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.fuse_latency = RequestLatency(LATENCY_BUCKETS_S)
        self.add_collector(self.fuse_latency.collect)
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

    def observe_fuse(self, op: str, seconds: float, err: int) -> None:
        self.fuse_latency.observe(op, seconds)
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
