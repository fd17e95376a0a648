"""Tiering in a real 3-node cluster: the S3 test server runs in a fourth network namespace on the
nodes' private network (the root namespace cannot reach it, as DESIGN §10 asks). Every node reads
what any node tiered; the cold-data engine runs on the leader only, and follows the lead when the
leader is killed; no two nodes upload the same data."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.network import PrivateNetwork
from awsomefsd.fs.xattr_ops import TIER_XATTR
from tests.support import monitoring
from tests.support.cluster import Cluster, Node, cluster_in
from tests.support.daemon import wait_for
from tests.support.s3 import TEST_KEY_ID, TEST_SECRET, S3Server, s3_server

pytest.importorskip("moto", reason="the S3 test server needs moto (scripts/install.sh test)")


@pytest.fixture
def tiered_cluster(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> Iterator[tuple[Cluster, S3Server]]:
    network = netns_network(4)
    with s3_server(network.nodes[3]) as s3:
        env = {"AWSOMEFS_TIER__ENDPOINT": s3.endpoint, "AWSOMEFS_TIER__BUCKET": s3.bucket,
               "AWSOMEFS_TIER__OBJECT_BYTES": "2M", "AWSOMEFS_TIER__COLD_AFTER_S": "2",
               "AWSOMEFS_TIER__SCAN_INTERVAL_S": "0.5", "AWSOMEFS_TIER__GC_GRACE_S": "0",
               "AWSOMEFS_TIER__RECALL_READS": "0", "AWSOMEFS_TIER__MEMORY_CACHE_BYTES": "0",
               "AWSOMEFS_TIER__CACHE_BYTES": "0", "AWSOMEFS_TIER__MIN_FILE_BYTES": "0",
               "AWSOMEFS_TIER__PARTIAL_OBJECT_AFTER_S": "0",
               "AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET}
        with cluster_in(network, tmp_path, env=env) as cluster:
            yield cluster, s3


def placement(path: Path) -> dict[str, int]:
    state: dict[str, int] = json.loads(os.getxattr(path, TIER_XATTR.decode()))
    return state


def tiered(path: Path) -> bool:
    state = placement(path)
    return state["device_bytes"] == 0 and state["tiered_bytes"] > 0


def drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def has_leader(cluster: Cluster, among: list[Node]) -> bool:
    try:
        return cluster.leader(among) is not None
    except LookupError:
        return False


def uploads(cluster: Cluster) -> int:
    """Objects every node's engine uploaded (from the status each writes after a pass)."""
    total = 0
    for node in cluster.nodes[:3]:
        status = node.state / "tier-status.json"
        if status.exists():
            total += json.loads(status.read_text())["engine"]["objects_put"]
    return total


def test_every_node_reads_tiered_data_and_only_the_leader_tiers_cold_files(
        tiered_cluster: tuple[Cluster, S3Server]) -> None:
    cluster, _s3 = tiered_cluster
    cluster.nodes[0].metrics_port = 0
    a, b, c = cluster.form(3)
    tier_metrics = {name for name in monitoring.metric_names_used() if name.startswith("awsomefs_tier_")}
    assert tier_metrics and not tier_metrics - monitoring.exported_metric_names(a.scrape())
    leader = cluster.leader()
    follower = next(n for n in (a, b, c) if n is not leader)
    data = {name: random.Random(name).randbytes(size) for name, size in (("one", 3 << 20), ("two", 700_000))}
    for name, payload in data.items():
        (follower.mount / name).write_bytes(payload)
    for name in data:
        wait_for(lambda name=name: tiered(a.mount / name), 60, f"{name} tiered by the engine")
    drop_page_cache()
    for node in (a, b, c):
        for name, payload in data.items():
            assert (node.mount / name).read_bytes() == payload, f"node {node.index} reads other bytes of {name}"
    leader_status = json.loads((leader.state / "tier-status.json").read_text())
    assert leader_status["engine"]["objects_put"] >= 2
    assert not (follower.state / "tier-status.json").exists(), "a follower ran the engine"

    # an operator's evict on a follower, then the leader killed: the engine follows the lead
    hot = random.Random(3).randbytes(1 << 20)
    (follower.mount / "hot").write_bytes(hot)
    done = follower.cli("tier", "evict", str(follower.mount / "hot"))
    assert done.returncode == 0, done.stderr
    assert tiered(follower.mount / "hot")
    leader.signal(signal.SIGKILL)
    survivors = [n for n in (a, b, c) if n is not leader]
    wait_for(lambda: has_leader(cluster, survivors), 60, "a new leader")
    late = random.Random(4).randbytes(1 << 20)
    (survivors[0].mount / "late").write_bytes(late)
    wait_for(lambda: tiered(survivors[1].mount / "late"), 60, "late tiered by the new leader")
    drop_page_cache()
    for node in survivors:
        assert (node.mount / "late").read_bytes() == late
        assert (node.mount / "hot").read_bytes() == hot
        assert (node.mount / "one").read_bytes() == data["one"]
    status = json.loads(survivors[0].cli("tier", "status", "--json").stdout)
    assert status["pending_uploads"] == 0
    # no data was uploaded twice: every upload is a live object (gc_grace 0 deletes dead ones at once)
    wait_for(lambda: json.loads(survivors[0].cli("tier", "status", "--json").stdout)["dead_objects"] == 0, 30,
             "dead objects deleted")
    live = json.loads(survivors[0].cli("tier", "status", "--json").stdout)["objects"]
    assert uploads(cluster) == live, "an object uploaded twice, or one lost"  # the follower's evict included
