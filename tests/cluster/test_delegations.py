"""Directory delegations on a real three-node cluster (docs/delegations.md): a node that is the only
one changing a directory answers at once, and what it acknowledged is what others see and what
survives: another node that looks finds every acknowledged change, an fsync'd change survives the
creator's SIGKILL, and two nodes taking turns in one directory each see the other's changes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, Node, cluster_in
from tests.support.daemon import wait_for
from tests.support.netns import TestNetwork


@pytest.fixture
def cluster3(netns_network: Callable[[int], TestNetwork], tmp_path: Path) -> Iterator[Cluster]:
    with cluster_in(netns_network(3), tmp_path) as cluster:
        for node in cluster.nodes:
            node.metrics = True
        yield cluster


def metric(node: Node, name: str) -> float:
    for line in node.scrape().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"node {node.index} exports no {name}")


def create(path: Path, content: bytes = b"") -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)


def followers(cluster: Cluster, nodes: list[Node]) -> list[Node]:
    leader = cluster.leader(nodes)
    return [n for n in nodes if n is not leader]


def test_a_lone_creator_runs_ahead_and_others_see_every_acknowledged_change(cluster3: Cluster) -> None:
    nodes = cluster3.form(3)
    creator, other = followers(cluster3, nodes)
    (creator.mount / "lone").mkdir()
    names = [f"f{i:03d}" for i in range(400)]
    for name in names:
        create(creator.mount / "lone" / name, name.encode())
    os.rename(creator.mount / "lone" / "f000", creator.mount / "lone" / "renamed")
    os.unlink(creator.mount / "lone" / "f001")
    os.chmod(creator.mount / "lone" / "f002", 0o600)
    # No fsync: a look from another node must still find every change acknowledged before it.
    assert (other.mount / "lone" / "renamed").read_bytes() == b"f000"
    assert not (other.mount / "lone" / "f001").exists()
    assert (other.mount / "lone" / "f002").stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(other.mount / "lone")) == sorted(["renamed", *names[2:]])
    for name in names[2::37]:
        assert (other.mount / "lone" / name).read_bytes() == name.encode()
    assert metric(creator, "awsomefs_meta_ran_ahead_total") >= len(names)
    assert metric(creator, "awsomefs_meta_ahead_lost_total") == 0
    assert metric(creator, "awsomefs_meta_pipeline_proposals_total") < len(names), "changes were not batched"
    ahead = creator.status()["cluster"]["ahead"]
    assert ahead["acknowledged"] >= len(names) and ahead["lost"] == 0, ahead
    assert " 0 lost" in creator.cli("status").stdout


def test_fsync_makes_what_ran_ahead_survive_the_creator_being_killed(cluster3: Cluster) -> None:
    nodes = cluster3.form(3)
    creator, other = followers(cluster3, nodes)
    directory = creator.mount / "durable"
    directory.mkdir()
    names = [f"d{i}" for i in range(300)]
    for name in names:
        create(directory / name, b"x" * 100)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # fsyncdir: everything acknowledged before it is committed on a majority
    finally:
        os.close(fd)
    creator.kill()
    # The lookups wait until the dead creator's delegation expires, then find every synced name.
    assert sorted(os.listdir(other.mount / "durable")) == sorted(names)
    assert all((other.mount / "durable" / name).read_bytes() == b"x" * 100 for name in names[::29])


def test_two_nodes_taking_turns_in_one_directory_see_each_others_changes(cluster3: Cluster) -> None:
    a, b, _c = cluster3.form(3)
    (a.mount / "shared").mkdir()
    wait_for(lambda: (b.mount / "shared").is_dir(), 10, "the directory on the other node")
    for i in range(25):
        create(a.mount / "shared" / f"a{i}", b"a")
        assert (b.mount / "shared" / f"a{i}").read_bytes() == b"a", i
        create(b.mount / "shared" / f"b{i}", b"b")
        assert (a.mount / "shared" / f"b{i}").read_bytes() == b"b", i
        if i % 5 == 4:
            os.unlink(a.mount / "shared" / f"b{i - 1}")
            assert not (b.mount / "shared" / f"b{i - 1}").exists(), i
    expected = sorted([f"a{i}" for i in range(25)] + [f"b{i}" for i in range(25) if i % 5 != 3])
    assert sorted(os.listdir(a.mount / "shared")) == expected
    assert sorted(os.listdir(b.mount / "shared")) == expected
    for node in (a, b):
        assert metric(node, "awsomefs_meta_ahead_lost_total") == 0
