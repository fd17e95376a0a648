"""Finding members: zeroconf across real network namespaces, and seed addresses without multicast.

Each zeroconf test runs separate processes in separate namespaces joined by a private bridge, so
the multicast really crosses a (virtual) link and never leaves the machine.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from awsomefsd.cli.devcluster.network import PrivateNetwork
from awsomefsd.cluster.discovery import JOIN_PORT_OFFSET, Peer, find_join_peers
from tests.cluster.conftest import Agent

CLUSTER_PORT = 7700


@pytest.mark.netns
def test_member_is_found_by_cluster_id_and_another_cluster_is_ignored(
    netns_network: Callable[[int], PrivateNetwork],
) -> None:
    net = netns_network(3)
    ours, theirs, joiner = net.nodes
    cluster, other = uuid.uuid4(), uuid.uuid4()
    a = Agent(ours, "advertise", "--cluster", str(cluster), "--instance", "ours", "--port", str(CLUSTER_PORT))
    b = Agent(theirs, "advertise", "--cluster", str(other), "--instance", "theirs", "--port", str(CLUSTER_PORT))
    a.ready()
    b.ready()
    # Asking for two members of our cluster when there is one: the browse sees both advertisements
    # before its deadline and must keep the other cluster's out of the members.
    code, found = Agent(joiner, "browse", "--cluster", str(cluster), "--timeout", "2", "--min", "2").result()
    assert code == 0
    assert found["members"] == [[ours.address, CLUSTER_PORT, CLUSTER_PORT + JOIN_PORT_OFFSET]]
    assert any(name.startswith("theirs.") for name in found["others"])
    code, found = Agent(joiner, "browse", "--cluster", str(other), "--timeout", "5").result()
    assert found["members"] == [[theirs.address, CLUSTER_PORT, CLUSTER_PORT + JOIN_PORT_OFFSET]]
    a.stop()
    b.stop()


@pytest.mark.netns
def test_nothing_is_found_for_a_cluster_nobody_advertises(netns_network: Callable[[int], PrivateNetwork]) -> None:
    net = netns_network(2)
    advertiser, joiner = net.nodes
    a = Agent(advertiser, "advertise", "--cluster", str(uuid.uuid4()), "--instance", "x", "--port", "7700")
    a.ready()
    code, found = Agent(joiner, "browse", "--cluster", str(uuid.uuid4()), "--timeout", "2").result()
    assert (code, found["members"]) == (0, [])
    a.stop()


def test_seeds_are_used_as_given_without_multicast() -> None:
    peers = find_join_peers(uuid.uuid4(), ["10.9.8.7:7700", "[fd00::2]:9000"], timeout_s=0.01)
    assert peers == [Peer("10.9.8.7", 7700, 7701), Peer("fd00::2", 9000, 9001)]
    assert peers[1].address == "[fd00::2]:9000" and peers[1].join_address == "[fd00::2]:9001"


@pytest.mark.parametrize("seed", ["nohost", "host:", ":7700", "host:http", "host:65535"])
def test_bad_seed_is_refused(seed: str) -> None:
    with pytest.raises(ValueError):
        Peer.from_seed(seed)
