"""A rolling upgrade of a real cluster, from the last build before the cluster log level existed
(meta/levels.py, LOG_LEVEL): members on the old build decode commands up to tag 32, the new build
adds PunchHole and CloneRange. While any member runs the old build no member may propose them (it
would stop applying the log at the first), so punching a hole answers EOPNOTSUPP and
copy_file_range leaves the copy to the kernel; once every member runs the new build, the leader
raises the level and both share and unmap blocks again. (fallocate's reservations, Preallocate at
the next level, wait the same way: the space is checked, not reserved, until then.) The old build is this repository's own
commit BEFORE_GATE, taken from its history (`git archive`): a test of two real builds."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.network import PrivateNetwork
from awsomefsd.meta import commands as c
from awsomefsd.meta.bootstrap import open_metadata
from awsomefsd.meta.levels import LOG_LEVEL
from tests.support.cluster import Cluster, Node, cluster_in
from tests.support.daemon import REPO, wait_for
from tests.support.fsx import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from tests.support.monitoring import counter_value

BEFORE_GATE = "0acc6e3eab267727e5d28958169ae689e965626f"
LEVEL_RAISED_S = 60.0


@pytest.fixture(scope="module")
def old_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", BEFORE_GATE, "awsomefsd"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE_GATE[:12]} is not in this checkout's history (a shallow clone?): "
                    f"{archive.stderr.decode(errors='replace').strip()[:200]}")
    dest = tmp_path_factory.mktemp("build-before-gate")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def on_build(node: Node, tree: Path | None, base: dict[str, str]) -> None:
    """Run `node`'s next start from `tree` (None: this checkout)."""
    node.env = dict(base) if tree is None else {**base, "PYTHONPATH": str(tree)}


def levels(node: Node) -> tuple[int, int, int]:
    """(the cluster's log level, this node's build's, rounds its leader duty asked the members)."""
    level = node.status()["cluster"]["log_level"]
    return int(level["cluster"]), int(level["this_build"]), int(level["rounds_asked"] or 0)


def lease_reads(node: Node) -> float:
    """Read barriers the node answered from its Raft lease (design note 123)."""
    return counter_value(node.scrape(), "awsomefs_raft_lease_reads")


def read_points_asked(node: Node) -> float:
    """Read barriers the node asked the leader's lease for on the wire (design note 153)."""
    return counter_value(node.scrape(), "awsomefs_raft_read_points_asked")


def punch(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        fallocate(f.fileno(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def copy_range(src: Path, dst: Path, length: int) -> int:
    with open(src, "rb") as s, open(dst, "wb") as d:
        return os.copy_file_range(s.fileno(), d.fileno(), length)


def blocks_of(path: Path) -> int:
    return os.stat(path).st_blocks


def test_a_rolling_upgrade_gates_the_new_commands_until_every_member_runs_the_new_build(
        netns_network: Callable[[int], PrivateNetwork], tmp_path: Path, old_build: Path) -> None:
    with cluster_in(netns_network(3), tmp_path) as cluster:
        base = dict(cluster.env)
        for node in cluster.nodes:
            on_build(node, old_build, base)
        nodes = cluster.form(3)
        payload = os.urandom(1 << 20)
        (nodes[0].mount / "f").write_bytes(payload)

        # Upgrade two members, the leader among them; the third stays on the old build.
        leader = cluster.leader()
        old = next(n for n in nodes if n is not leader)
        for node in (n for n in nodes if n is not old):
            node.stop()
            on_build(node, None, base)
            node.metrics_port = 0  # any free port in its namespace: the lease-read counter
            node.start("run")
        lead_from_a_new_build(cluster, old)
        new = cluster.leader()
        rounds = levels(new)[2]

        def asked_twice_or_raised() -> bool:
            level, _, asked = levels(new)
            return asked >= rounds + 2 or level > 3

        wait_for(asked_twice_or_raised, LEVEL_RAISED_S, "the leader asking every member twice")
        assert levels(new)[:2] == (3, LOG_LEVEL), "the log level rose while a member ran the old build"

        with pytest.raises(OSError) as err:
            punch(new.mount / "f", 4096, 8192)
        assert err.value.errno == errno.EOPNOTSUPP
        with open(new.mount / "reserved", "wb") as fh:
            fallocate(fh.fileno(), 0, 0, 1 << 20)
        assert blocks_of(new.mount / "reserved") == 0, "checked, not reserved (Preallocate needs the new level)"
        assert copy_range(new.mount / "f", new.mount / "copy", len(payload)) == len(payload)  # the kernel copies
        with pytest.raises(OSError) as err:
            os.close(os.open(new.mount, os.O_TMPFILE | os.O_RDWR, 0o600))
        assert err.value.errno == errno.EOPNOTSUPP, "O_TMPFILE (level 13): callers use a named file"
        for node in nodes:
            assert (node.mount / "copy").read_bytes() == payload  # the old member still applies the log
        assert old.proc is not None and old.proc.poll() is None
        assert lease_reads(new) == 0, "a read answered from the lease while a member's build breaks the promise"
        follower = next(n for n in nodes if n is not old and n is not new)
        assert read_points_asked(follower) == 0, "a read point asked before level 26"
        # The old build has no Raft wire (design note 125): the new ones send to it over gRPC, to each
        # other over the wire, and their status says so.
        upgraded = [n for n in nodes if n is not old]
        wait_for(lambda: all(links(n) == {old.node_id: "grpc", **{m.node_id: "wire" for m in upgraded if m is not n}}
                             for n in upgraded), LEVEL_RAISED_S, "the upgraded members' links")

        old.stop()
        on_build(old, None, base)
        old.start("run")
        wait_for(lambda: levels(new)[0] == LOG_LEVEL, LEVEL_RAISED_S, "the leader raising the cluster's log level")
        wait_for(lambda: all(set(links(n).values()) == {"wire"} for n in nodes), LEVEL_RAISED_S,
                 "every member on the wire once the last is upgraded")

        punch(new.mount / "f", 4096, 8192)
        expected = payload[:4096] + bytes(8192) + payload[12288:]
        assert copy_range(new.mount / "f", new.mount / "clone", len(payload)) == len(payload)
        for node in nodes:
            assert (node.mount / "f").read_bytes() == expected
            assert (node.mount / "clone").read_bytes() == expected
        assert blocks_of(new.mount / "f") * 512 == len(payload) - 8192
        assert lease_reads(new) > 0, "every member keeps the lease's promise now: opens read from the lease"
        assert read_points_asked(follower) > 0, "a follower's opens ask the leader's lease"
        with open(new.mount / "reserved", "r+b") as fh:
            fallocate(fh.fileno(), 0, 0, 2 << 20)
        assert blocks_of(new.mount / "reserved") * 512 == 2 << 20, "reserved now"
        fd = os.open(new.mount, os.O_TMPFILE | os.O_RDWR, 0o600)  # EOPNOTSUPP was not cached by the kernel
        try:
            os.write(fd, b"nameless")
            subprocess.run(["ln", "-L", f"/proc/{os.getpid()}/fd/{fd}", str(new.mount / "tmp")], check=True, timeout=30)
        finally:
            os.close(fd)
        assert (old.mount / "tmp").read_bytes() == b"nameless", "the upgraded member applies LinkTmpfile"
        for node in nodes:
            assert (node.mount / "reserved").read_bytes() == bytes(2 << 20)


def links(node: Node) -> dict[int, str]:
    """How `node` sends Raft's messages to each other member, as its status says."""
    return {int(m["id"]): m["link"] for m in node.status()["cluster"]["nodes"] if m["link"] is not None}


def lead_from_a_new_build(cluster: Cluster, old: Node) -> None:
    """If the member left on the old build leads (it has no duty that raises the level), pause it
    until an upgraded member leads."""
    if cluster.leader() is not old:
        return
    old.signal(signal.SIGSTOP)
    try:
        others = [n for n in cluster.nodes if n is not old]
        wait_for(lambda: _leads_among(cluster, others), LEVEL_RAISED_S, "an upgraded member leading")
    finally:
        old.signal(signal.SIGCONT)
    wait_for(lambda: _leads_among(cluster, cluster.nodes, exclude=old), LEVEL_RAISED_S,
             "the old member following again")


def _leads_among(cluster: Cluster, nodes: list[Node], exclude: Node | None = None) -> bool:
    try:
        leader = cluster.leader(nodes)
    except LookupError:
        return False
    return leader is not exclude


def test_a_member_does_not_start_on_a_build_older_than_the_clusters_log(
        netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> None:
    """A downgrade is refused at start with one line that says what to do, and loses nothing: the
    same state starts again on a build that decodes its log. The cluster's recorded level is raised
    above this build's (as a newer build's cluster would have it) in a copy of the node's state."""
    with cluster_in(netns_network(1), tmp_path) as cluster:
        node = cluster.init()
        payload = os.urandom(1 << 16)
        (node.mount / "f").write_bytes(payload)
        node.stop()
        kept = tmp_path / "meta-at-this-level"
        shutil.copytree(node.state / "meta", kept)
        record_log_level(node.state / "meta", LOG_LEVEL + 1)

        node.start("run", wait=False)
        assert node.wait_exit() != 0
        output = node.logs()
        assert "Traceback" not in output
        refusal = [line for line in output.splitlines() if "downgrades are not supported" in line]
        assert refusal and f"at level {LOG_LEVEL + 1}" in refusal[0], output

        shutil.rmtree(node.state / "meta")
        shutil.copytree(kept, node.state / "meta")
        node.start("run")
        assert (node.mount / "f").read_bytes() == payload


def record_log_level(meta: Path, level: int) -> None:
    """Apply SetLogLevel(level) to a stopped node's metadata store, as its log would have."""
    store, sm = open_metadata(meta, delayed_free_ns=0)
    try:
        with store.env.begin(write=True) as txn:
            members = sm.cluster.active_members(txn)
            assert sm.cluster.set_log_level(txn, c.SetLogLevel(level, tuple(members))) == level
    finally:
        store.close()
