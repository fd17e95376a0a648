"""The test network itself: private (no way out, nothing in the root namespace), torn down always,
leftovers of a crashed run removed."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from awsomefsd.cli.devcluster import network as netns
from awsomefsd.cli.devcluster.network import SUBNET, TEST_PREFIX, PrivateNetwork

pytestmark = pytest.mark.netns


def test_network_is_private_and_removed_on_close(netns_network: Callable[[int], PrivateNetwork]) -> None:
    net = netns_network(2)
    a, b = net.nodes
    names = set(netns.existing())
    assert {a.name, b.name, net.bridge} <= names
    out = a.run(["ip", "route", "get", "1.1.1.1"], capture_output=True, text=True)
    assert out.returncode != 0 and "unreachable" in out.stderr, "a node namespace must have no way out"
    root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert f"{SUBNET}." not in root, "the root namespace must not be on the test network"
    reach = a.run(["ip", "route", "get", b.address], capture_output=True, text=True, check=True).stdout
    assert "dev eth0" in reach
    net.close()
    assert not {a.name, b.name, net.bridge} & set(netns.existing())


def test_leftovers_of_a_dead_run_are_removed() -> None:
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    dead_pid = 2**22 + 1  # above the default pid_max: no such process
    stale = f"{TEST_PREFIX}{dead_pid}.1-br"
    netns.ip("netns", "add", stale)
    try:
        assert stale in netns.remove_leftovers()
        assert stale not in netns.existing()
    finally:
        netns.ip("netns", "del", stale, check=False)
