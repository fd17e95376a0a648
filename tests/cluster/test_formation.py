"""One token, the same command on every node: the cluster forms itself on a blank shared device
with exactly one founder, whatever the start order, and a node whose state directory was wiped
joins again as a new member (design note 53). Real daemons in network namespaces on one image."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from awsomefsd.devcluster.network import PrivateNetwork
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.founding import FoundingRecord, read_founding
from tests.support.cluster import Cluster, Node, cluster_in
from tests.support.daemon import AWSOMEFSD, REPO, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.mounted]
IMAGE_BYTES = 1 << 30
FOUNDED = "awsomefsd: founding cluster"


def new_token() -> str:
    out = subprocess.run([*AWSOMEFSD, "token", "new"], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.stdout.strip()


@pytest.fixture
def formed(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> Iterator[tuple[Cluster, str]]:
    net = netns_network(3)
    with cluster_in(net, tmp_path) as cluster:
        with open(cluster.device, "wb") as image:  # a blank LUN: the founder formats it
            image.truncate(IMAGE_BYTES)
        token = new_token()
        for node in cluster.nodes:
            node.env = {**node.env, "AWSOMEFS_CLUSTER__TOKEN": token, "AWSOMEFS_NODE__NAME": f"pod{node.index}"}
        yield cluster, token


def run_same_command(node: Node, cluster: Cluster) -> None:
    node.start("run", "--device", str(cluster.device), "--mount", str(node.mount), "--listen", node.listen, wait=False)


def start_all_at_once(nodes: list[Node], cluster: Cluster) -> None:
    barrier = threading.Barrier(len(nodes))

    def go(node: Node) -> None:
        barrier.wait()
        run_same_command(node, cluster)

    threads = [threading.Thread(target=go, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for node in nodes:
        node.wait_mounted(timeout_s=180)


def record_of(cluster: Cluster) -> FoundingRecord:
    with BlockDevice.open(cluster.device, shared=True) as device:
        record = read_founding(device)
    assert record is not None and record.founded
    return record


def founders(nodes: list[Node]) -> list[Node]:
    return [node for node in nodes if any(line.startswith(FOUNDED) for line in node.output)]


def one_cluster(nodes: list[Node]) -> set[int]:
    """Every running node sees the same cluster and the same active members; their ids."""
    views = []
    for node in nodes:
        cluster = node.status()["cluster"]
        views.append((cluster["cluster_id"], frozenset(n["id"] for n in cluster["nodes"] if n["state"] == "active")))
    assert len(set(views)) == 1, views
    return set(views[0][1])


@pytest.mark.budget(150)  # three daemons formed at once, one of them started again with no state
def test_the_same_command_everywhere_forms_one_cluster_and_a_wiped_node_rejoins(formed: tuple[Cluster, str]) -> None:
    cluster, _token = formed
    nodes = cluster.nodes
    start_all_at_once(nodes, cluster)
    assert len(founders(nodes)) == 1, [n.logs(20) for n in nodes]
    assert len(one_cluster(nodes)) == 3
    # The device's record names every member to join through, not only the founder.
    wait_for(lambda: set(record_of(cluster).seeds) == {n.listen for n in nodes}, 30, "the members on the record")
    payload = random.randbytes(3 << 20)
    (nodes[0].mount / "kept").write_bytes(payload)
    with open(nodes[0].mount / "kept", "rb") as f:
        os.fsync(f.fileno())
    digest = hashlib.sha256(payload).hexdigest()
    wait_for(lambda: (nodes[2].mount / "kept").exists(), 30, "the file on another node")
    assert hashlib.sha256((nodes[2].mount / "kept").read_bytes()).hexdigest() == digest

    # The hostPath of one pod is wiped: it comes back with the same command and joins as a new member.
    wiped = next(n for n in nodes if n not in founders(nodes))
    old_id = wiped.status()["cluster"]["node_id"]
    wiped.kill()
    shutil.rmtree(wiped.state)
    run_same_command(wiped, cluster)
    wiped.wait_mounted(timeout_s=180)
    assert not any(line.startswith(FOUNDED) for line in wiped.output)
    new_id = wiped.status()["cluster"]["node_id"]
    assert new_id != old_id
    wait_for(lambda: old_id not in one_cluster(nodes), 60, f"the old member {old_id} removed")
    assert len(one_cluster(nodes)) == 3
    assert hashlib.sha256((wiped.mount / "kept").read_bytes()).hexdigest() == digest



@pytest.mark.slow
def test_a_random_schedule_of_starts_restarts_and_wiped_states_keeps_one_cluster(formed: tuple[Cluster, str]) -> None:
    """Seeded and replayable (AWSOMEFS_FORMATION_SEED): the pods start in a random order with
    random delays (or at one instant), then restart, crash or lose their state directory one at a
    time while files are written through random members; always one cluster, with one founder,
    every acknowledged file intact, fsck clean at the end."""
    seed = int(os.environ.get("AWSOMEFS_FORMATION_SEED") or random.randrange(1 << 31))
    print(f"formation schedule seed {seed} (replay: AWSOMEFS_FORMATION_SEED={seed})")
    rng = random.Random(seed)
    cluster, _token = formed
    nodes = cluster.nodes
    if rng.random() < 0.5:
        start_all_at_once(nodes, cluster)
    else:
        for node in rng.sample(nodes, len(nodes)):
            threading.Event().wait(rng.random() * 2)
            run_same_command(node, cluster)
        for node in nodes:
            node.wait_mounted(timeout_s=180)
    assert len(founders(nodes)) == 1, f"seed {seed}"
    files: dict[str, str] = {}
    for step in range(8):
        node = rng.choice(nodes)
        action = rng.choice(["write", "write", "restart", "crash", "wipe"])
        if action == "write":
            name, payload = f"f{step}", rng.randbytes(rng.randrange(1, 2 << 20))
            with open(node.mount / name, "wb") as f:
                f.write(payload)
                os.fsync(f.fileno())
            files[name] = hashlib.sha256(payload).hexdigest()
            continue
        if action == "restart":
            node.stop()
        else:
            node.kill()
            if action == "wipe":
                shutil.rmtree(node.state)
        run_same_command(node, cluster)
        node.wait_mounted(timeout_s=180)
        active = one_cluster(nodes)
        assert len(active) >= 3, f"seed {seed}: step {step} {action}: members {active}"
    wait_for(lambda: len(one_cluster(nodes)) == 3, 60, f"seed {seed}: the replaced members removed")
    for name, digest in files.items():
        reader = rng.choice(nodes)
        assert hashlib.sha256((reader.mount / name).read_bytes()).hexdigest() == digest, f"seed {seed}: {name}"
    for node in nodes:
        node.stop()
    check = node.cli("fsck")
    assert check.returncode == 0 and "fsck: clean" in check.stdout, f"seed {seed}: {check.stdout}{check.stderr}"
