"""Real clusters: `awsomefsd init` and `join` as separate processes, each in its own network
namespace, all on one shared image file, each with its own FUSE mount.

What is checked here is what a user does and sees (docs/cluster.md): forming a cluster from one
token by zeroconf and by --peer, the same namespace and bytes on every node, refusals of a wrong
token, the status an operator reads, restart with the state on disk, node removal.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import monitoring
from tests.support.cluster import Cluster
from tests.support.daemon import wait_for
from tests.support.fsx import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_three_nodes_by_zeroconf_share_one_namespace(cluster3: Cluster) -> None:
    cluster3.nodes[0].metrics_port = 0  # any free port in its namespace
    a, b, c = cluster3.form(3)
    # The founder went from one voter to three in one change: never two, which one wiped disk
    # leaves without a quorum for good (design note 146).
    voters = [line for line in a.logs(10_000).splitlines() if "voters are now" in line]
    assert any(line.endswith("voters are now [1, 2, 3] (learners [])") for line in voters), voters
    assert not any("voters are now [1, 2] " in line for line in voters), voters
    payload = os.urandom(3 * 1024 * 1024 + 123)
    (a.mount / "dir").mkdir()
    with open(a.mount / "dir" / "f", "wb") as f:
        f.write(payload)
    for node in (b, c):
        assert read(node.mount / "dir" / "f") == payload, f"node {node.index} reads other bytes"
    # a hole punched and a clone made on one node: the others, which cached the file, read them
    with open(a.mount / "dir" / "f", "rb+") as f:
        fallocate(f.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5000, 1 << 20)
    payload = payload[:5000] + bytes(1 << 20) + payload[5000 + (1 << 20):]
    with open(a.mount / "dir" / "f", "rb") as src, open(a.mount / "dir" / "copy", "wb") as dst:
        assert os.copy_file_range(src.fileno(), dst.fileno(), 2 << 20, 4096, 4096) == 2 << 20
    for node in (b, c):
        assert read(node.mount / "dir" / "f") == payload, f"node {node.index} misses the hole"
        assert read(node.mount / "dir" / "copy") == bytes(4096) + payload[4096:4096 + (2 << 20)]
    # and the other way round, through a follower (forwarded to the leader)
    (c.mount / "dir" / "from-c").write_bytes(b"hello from c")
    assert read(a.mount / "dir" / "from-c") == b"hello from c"
    assert sorted(os.listdir(b.mount / "dir")) == ["copy", "f", "from-c"]
    # O_TMPFILE on a follower: nameless until linked, then every node sees it; one closed unnamed
    # is deleted (its only holder released it)
    fd = os.open(c.mount / "dir", os.O_TMPFILE | os.O_RDWR, 0o640)
    os.write(fd, b"made without a name")
    assert os.fstat(fd).st_nlink == 0
    subprocess.run(["ln", "-L", f"/proc/{os.getpid()}/fd/{fd}", str(c.mount / "dir" / "tmp")], check=True, timeout=30)
    os.close(fd)
    assert read(a.mount / "dir" / "tmp") == b"made without a name"
    before = os.statvfs(b.mount).f_bfree
    fd = os.open(b.mount / "dir", os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, bytes(8 << 20))
    os.fsync(fd)
    os.close(fd)
    wait_for(lambda: os.statvfs(b.mount).f_bfree >= before, 30, "the unnamed file's space back")
    assert b.status()["metadata"]["orphans"] == 0
    status = a.status()
    cluster = status["cluster"]
    assert sorted(cluster["raft"]["voters"]) == [1, 2, 3]
    assert {n["role"] for n in cluster["nodes"]} == {"leader", "voter"}
    assert all(not n["expired"] and n["groups"] >= 1 for n in cluster["nodes"])
    text = a.cli("status").stdout
    assert "node 3" in text and "lease ok" in text, text
    metrics = a.scrape()
    assert "awsomefs_raft_is_leader 1.0" in metrics or "awsomefs_raft_is_leader 0.0" in metrics
    assert "awsomefs_lease_fenced 0.0" in metrics, "a live member's writes are not fenced"
    assert 'awsomefs_eio_total{cause="lease"} 0.0' in metrics, "EIO causes start at 0 (the alert's increase)"
    renewals = next(line for line in metrics.splitlines() if line.startswith("awsomefs_lease_renewals_total"))
    assert float(renewals.split()[1]) >= 1
    unknown = {name for name in monitoring.metric_names_used() - monitoring.exported_metric_names(metrics)
               if not name.startswith(("awsomefs_tier_", "awsomefs_site_"))}  # only with [tier], [site]: their tests
    assert not unknown, f"the shipped dashboard or alerts read metrics this daemon does not export: {unknown}"


def test_three_nodes_by_peer_address(cluster3: Cluster) -> None:
    cluster3.env["AWSOMEFS_CLUSTER__ADVERTISE"] = "false"  # no zeroconf at all: --peer only
    for node in cluster3.nodes:
        node.env = cluster3.env
    a, b, c = cluster3.form(3, by_peer=True)
    (b.mount / "x").write_bytes(b"1" * 10_000)
    assert read(c.mount / "x") == b"1" * 10_000
    assert read(a.mount / "x") == b"1" * 10_000


def test_wrong_token_is_refused_and_logged(cluster3: Cluster) -> None:
    a = cluster3.init()
    forged = a.token()[:-12] + ("A" if a.token()[-12] != "A" else "B") + a.token()[-11:]
    b = cluster3.nodes[1]
    bad = cluster3.join(b, peer=a, token=forged, wait=False)
    assert bad.wait_exit() == 1
    assert "token" in bad.logs()  # damaged token: refused before anything is sent
    # a well-formed token of the same cluster with another secret: the cluster says no
    rotated = a.cli("token", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    stale = cluster3.join(b, peer=a, wait=False)  # cluster3.token is the one printed by init
    assert stale.wait_exit() == 1
    assert "refused" in stale.logs(), stale.logs()
    wait_for(lambda: "refused join" in a.logs(), 10, "the refusal in the member's log")
    assert not (b.state / "cluster.json").exists(), "a refused node must keep no cluster state"
    new_token = rotated.stdout.strip().splitlines()[-1]
    assert a.cli("token").stdout.strip().splitlines()[-1] == new_token
    cluster3.join(b, peer=a, token=new_token)
    (b.mount / "ok").write_bytes(b"joined with the rotated token")
    assert read(a.mount / "ok") == b"joined with the rotated token"


def test_restarted_member_rejoins_with_its_state(cluster3: Cluster) -> None:
    a, b, c = cluster3.form(3)
    (a.mount / "before").write_bytes(b"b" * 5000)
    c.stop()
    (a.mount / "while-down").write_bytes(b"w" * 5000)
    c.start("run")  # everything else comes from its state directory
    assert read(c.mount / "while-down") == b"w" * 5000
    assert read(c.mount / "before") == b"b" * 5000
    (c.mount / "after").write_bytes(b"a")
    assert read(b.mount / "after") == b"a"


@pytest.mark.parametrize("which", ["joiner", "founder"])
def test_removed_node_cannot_reconnect(cluster3: Cluster, which: str) -> None:
    """The founder too: its certificate was issued before there was a cluster to record its
    serial in, and `node remove 1` revoked nothing until it records it at its start."""
    nodes = cluster3.form(3)
    c = nodes[2] if which == "joiner" else nodes[0]
    a, b = (n for n in nodes if n is not c)

    def serials() -> dict[int, str]:
        return {n["id"]: n["certificate_serial"] for n in a.status()["cluster"]["nodes"]}

    wait_for(lambda: all(serials().values()), 30, "every member's certificate serial recorded")
    removed = a.cli("node", "remove", str(c.node_id))
    assert removed.returncode == 0, removed.stderr

    def gone() -> bool:
        nodes = {n["id"]: n for n in a.status()["cluster"]["nodes"]}
        return nodes[c.node_id]["state"] == "removed" and c.node_id not in a.status()["cluster"]["raft"]["voters"]

    wait_for(gone, 30, f"node {c.node_id} out of the configuration")
    c.kill()
    c.start("run", wait=False)
    wait_for(lambda: "is revoked" in a.logs() + b.logs(), 30, "the removed node's certificate refused")
    (a.mount / "still").write_bytes(b"fine")
    assert read(b.mount / "still") == b"fine"


def test_status_on_a_follower_shows_every_lag_and_changes_are_logged(cluster3: Cluster) -> None:
    """Only the leader tracks how far each member's log matches: a follower's `status` asks it. A
    change of leader (every member) and a clean stop (the member itself) are logged at INFO."""
    nodes = cluster3.form(3)
    leader = cluster3.leader(nodes)
    follower, other = (n for n in nodes if n is not leader)
    for node in (leader, follower):
        view = node.status()["cluster"]
        assert all(n["lag"] is not None for n in view["nodes"]), (node.index, view["nodes"])
        assert view["lag_error"] is None
    assert follower.status()["cluster"]["lag_from"] == f"node {leader.node_id}"
    assert "as the leader (node" in follower.cli("status").stdout
    # every node runs on this one host, so all have its host name: status must tell them apart,
    # and show each node its own mount only
    names = [n["name"] for n in leader.status()["cluster"]["nodes"]]
    assert len(set(names)) == 3, names
    for node in nodes:
        shown = node.status()["mounts"]
        assert shown == [str(node.mount.resolve())], (node.index, shown)

    leader.stop()  # a clean stop
    assert "stopped cleanly" in leader.logs(), leader.logs(20)
    stopped = leader.cli("status")  # a member whose daemon is stopped is not healthy
    health = next(line for line in stopped.stdout.splitlines() if line.startswith("health"))
    assert stopped.returncode == 1 and "the daemon is not running" in health, stopped.stdout
    wait_for(lambda: any("leads now" in line for line in follower.output + other.output), 30,
             "a survivor logging the new leader", interval_s=0.2)
    changed = next(line for line in follower.output + other.output if "leads now" in line)
    assert " INFO " in changed and f"was node {leader.node_id}" in changed, changed
