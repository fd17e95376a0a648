"""Shared pieces for the cluster tests: a cluster CA, node credentials, and a real gRPC server on
the trio loop (through the daemon's own bridge) for the duration of a test."""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
import trio

from awsomefsd.cli.devcluster import network as netns
from awsomefsd.cli.devcluster.network import Namespace, PrivateNetwork
from awsomefsd.cluster.ca import ClusterCA, make_csr, new_node_key
from awsomefsd.cluster.tls import NodeCredentials
from awsomefsd.rpc.bridge import Binding, serve_grpc
from tests.support.cluster import Cluster, cluster_in


@pytest.fixture(scope="session")
def ca() -> ClusterCA:
    return ClusterCA.create(uuid.uuid4())


@pytest.fixture(scope="session")
def other_ca() -> ClusterCA:
    return ClusterCA.create(uuid.uuid4())


def issue_node(ca: ClusterCA, node_id: int) -> NodeCredentials:
    """A node key and a certificate for it, as the join service would issue."""
    key = new_node_key()
    return NodeCredentials(key, ca.issue(make_csr(key), node_id), ca.cert)


@pytest.fixture
def node_factory(ca: ClusterCA) -> Callable[[], NodeCredentials]:
    ids = itertools.count(1)
    return lambda: issue_node(ca, next(ids))


@asynccontextmanager
async def served(bindings: list[Binding], credentials: grpc.ServerCredentials) -> AsyncIterator[str]:
    """Serve `bindings` on a fresh loopback port with `credentials`; yields the bound address."""
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: serve_grpc(bindings, "127.0.0.1:0", credentials=credentials, task_status=task_status)
        )
        try:
            yield address
        finally:
            nursery.cancel_scope.cancel()


AGENT = Path(__file__).with_name("agent.py")
REPO = Path(__file__).resolve().parents[2]
AGENT_READY_S = 30.0


class Agent:
    """`agent.py` running in a namespace; stdout lines arrive on a queue, stderr is kept for asserts."""

    def __init__(self, ns: Namespace, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = ns.popen(
            [sys.executable, str(AGENT), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/",
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str], sink: Callable[[str], None]) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def line(self, timeout_s: float = AGENT_READY_S) -> str:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no output within {timeout_s}s; stderr:\n" + "\n".join(self.stderr)) from None

    def ready(self) -> str:
        line = self.line()
        assert line.startswith("ready"), f"{line!r}; stderr:\n" + "\n".join(self.stderr)
        return line

    def result(self, timeout_s: float = AGENT_READY_S) -> tuple[int, dict[str, Any]]:
        """(exit code, the JSON line) of a command that ends by itself."""
        out = json.loads(self.line(timeout_s))
        return self.proc.wait(timeout_s), out

    def wait_for_log(self, needle: str, timeout_s: float = 10.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.stderr):
                if needle in line:
                    return line
            time.sleep(0.02)
        raise TimeoutError(f"{needle!r} not logged within {timeout_s}s; stderr:\n" + "\n".join(self.stderr))

    def stop(self) -> None:
        """Close stdin (the agent's signal to finish) and wait for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(AGENT_READY_S)


@pytest.fixture
def netns_network() -> Iterator[Callable[[int], PrivateNetwork]]:
    """Make private test networks (skips where namespaces cannot be made); all torn down after."""
    reason = netns.available()
    if reason is not None:
        pytest.skip(f"network namespaces: {reason}")
    made: list[PrivateNetwork] = []

    def make(n_nodes: int) -> PrivateNetwork:
        net = PrivateNetwork(n_nodes).__enter__()
        made.append(net)
        return net

    try:
        yield make
    finally:
        for net in made:
            net.close()


@pytest.fixture
def cluster3(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> Iterator[Cluster]:
    """Three members, each in a network namespace of its own, each exporting its metrics on a free
    port there (the tests that count requests read them)."""
    with cluster_in(netns_network(3), tmp_path) as cluster:
        for node in cluster.nodes:
            node.metrics_port = 0
        yield cluster
