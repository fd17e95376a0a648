"""Joining across namespaces with real processes: found by zeroconf or by `--peer`, refused when
the token is wrong (and the member logs who it refused)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.network import Namespace, PrivateNetwork
from awsomefsd.cluster.ca import ClusterCA, verify_node_cert
from awsomefsd.cluster.tls import NodeCredentials
from awsomefsd.cluster.token import JoinToken
from tests.cluster.conftest import Agent, issue_node

pytestmark = pytest.mark.netns
CLUSTER_PORT = 7700


def start_member(ns: Namespace, ca: ClusterCA, token: JoinToken, state: Path) -> Agent:
    """A member (node 1) serving the join listener in `ns` and advertising itself."""
    ca.save(state / "ca")
    issue_node(ca, 1).save(state / "node")
    (state / "verifier").write_bytes(token.verifier().to_bytes())
    member = Agent(ns, "serve-join", "--state", str(state), "--listen", f"{ns.address}:{CLUSTER_PORT}", "--advertise")
    member.ready()
    return member


def joined(agent: Agent, state: Path, ca: ClusterCA) -> int:
    code, out = agent.result()
    assert code == 0, json.dumps(out) + "\n" + "\n".join(agent.stderr)
    creds = NodeCredentials.load(state)
    assert verify_node_cert(creds.cert, ca.cert).node_id == out["node_id"]
    return int(out["node_id"])


def test_join_by_zeroconf_and_by_peer(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> None:
    net = netns_network(3)
    ns_member, ns_a, ns_b = net.nodes
    ca = ClusterCA.create(uuid.uuid4())
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    member = start_member(ns_member, ca, token, tmp_path / "member")
    by_zeroconf = Agent(ns_a, "join", "--token", token.encode(), "--state", str(tmp_path / "a"))
    by_peer = Agent(
        ns_b, "join", "--token", token.encode(), "--state", str(tmp_path / "b"),
        "--peer", f"{ns_member.address}:{CLUSTER_PORT}",
    )
    ids = {joined(by_zeroconf, tmp_path / "a", ca), joined(by_peer, tmp_path / "b", ca)}
    assert ids == {2, 3}
    member.stop()


def test_wrong_token_is_refused_and_logged_by_the_member(
    netns_network: Callable[[int], PrivateNetwork], tmp_path: Path
) -> None:
    net = netns_network(2)
    ns_member, ns_joiner = net.nodes
    ca = ClusterCA.create(uuid.uuid4())
    token = JoinToken.generate(ca.cluster_id, ca.fingerprint)
    member = start_member(ns_member, ca, token, tmp_path / "member")
    wrong = JoinToken.generate(ca.cluster_id, ca.fingerprint, (f"{ns_member.address}:{CLUSTER_PORT}",))
    code, out = Agent(ns_joiner, "join", "--token", wrong.encode(), "--state", str(tmp_path / "j")).result()
    assert code == 3 and "refused" in out
    assert not (tmp_path / "j" / "node.crt").exists()
    line = member.wait_for_log(f"refused join from ipv4:{ns_joiner.address}:")
    assert "wrong or rotated token" in line
    member.stop()
