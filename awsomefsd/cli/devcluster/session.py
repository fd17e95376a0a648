"""`awsomefsd dev --nodes N`: a whole cluster on this machine in one command, for development and demos.

N daemons, each in a network namespace of its own on a private bridge (cli/devcluster/network.py: no
route in or out, nothing reachable from outside the machine), all on one sparse image file, each
with its own mount, CSI socket, metrics and log. It prints where everything is, writes the same as
JSON to `<state>/dev-cluster.json` for scripts, and runs until Ctrl-C (or SIGTERM, or the terminal
closing), which stops every daemon cleanly, unmounts, and removes the namespaces. The state stays:
the next start with the same `--state` runs the same cluster again (same addresses, same data);
removing the directory gives a new one.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from awsomefsd.cli.devcluster import network as netns
from awsomefsd.cli.devcluster.members import (
    STOP_DEADLINE_S,
    DevCluster,
    DevNode,
    detach,
    is_mounted,
    own_command,
    wait_for,
)
from awsomefsd.cli.devcluster.network import DEV_PREFIX, PrivateNetwork
from awsomefsd.config import ClusterSettings
from awsomefsd.errors import OperatorError

METRICS_PORT = 9337
"""Every node serves metrics on its own namespace's loopback, so all can use the default port."""
MAX_DEV_NODES = 9
VOTERS_DEADLINE_S = 60.0
DEFAULT_VOTERS: int = ClusterSettings.model_fields["voters"].default
"""The voters a dev cluster waits for: what its nodes aim for, `[cluster] voters` as it defaults."""
WATCH_INTERVAL_S = 0.5
STOP_POLL_S = 0.05
DESCRIPTION = "dev-cluster.json"


class Stop(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: stop the cluster cleanly."""


class StopSignals:
    """The first SIGINT, SIGTERM or SIGHUP raises Stop (a clean stop of every daemon follows); a
    second one, while that runs, only asks it to hurry (the daemons still running are killed):
    no signal leaves the teardown half done or prints a traceback."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.stopping = False
        self.hurry = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            self.hurry = True
            return
        self.stopping = True
        raise Stop(signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_dev_cluster(n_nodes: int, root: Path, mounts: Path, size: str) -> int:
    """Start (or restart) the dev cluster under `root`, serve until told to stop, tear it all down."""
    from awsomefsd.cli.actions import dev_image_size, state_lock

    if not 2 <= n_nodes <= MAX_DEV_NODES:
        raise OperatorError(f"--nodes {n_nodes}: a dev cluster has 2 to {MAX_DEV_NODES} nodes (1 is plain `awsomefsd dev`)")
    dev_image_size(size)  # each node's image: whole blocks, at least the minimum
    reason = netns.available() or (None if os.path.exists("/dev/fuse") else "needs /dev/fuse")
    if reason is not None:
        raise OperatorError(f"a dev cluster {reason} (it runs its nodes in network namespaces)")
    root, mounts = root.absolute(), mounts.absolute()
    with state_lock(root), StopSignals().installed() as signals:
        try:
            _run(n_nodes, root, mounts, size, signals)
        except Stop:  # before the cluster ran (its own teardown takes Stop itself)
            pass
    print(f"awsomefsd: dev cluster stopped; its state stays in {root} (remove it for a new cluster)", flush=True)
    return 0


def _run(n_nodes: int, root: Path, mounts: Path, size: str, signals: StopSignals) -> None:
    _stop_orphans(root)
    members = _existing_members(root)
    if members and max(members) > n_nodes:
        raise OperatorError(f"{root} holds a dev cluster of {max(members)} nodes: start it with --nodes {max(members)}, "
                            f"or remove {root} for a new cluster")
    with PrivateNetwork(n_nodes, prefix=DEV_PREFIX) as network:
        cluster = DevCluster(network, root, size=size, mounts=mounts)
        try:
            _prepare(cluster)
            _start(cluster, members)
            _describe(cluster, root / DESCRIPTION)
            _serve(cluster)
        except Stop:
            pass
        except (RuntimeError, TimeoutError) as exc:  # a node that did not start: its log says why
            raise OperatorError(str(exc).splitlines()[0].rstrip(":")) from None
        finally:
            signals.stopping = True
            print("awsomefsd: stopping the dev cluster", flush=True)
            _stop_all(cluster, signals)
            cluster.close()
            (root / DESCRIPTION).unlink(missing_ok=True)


def _existing_members(root: Path) -> list[int]:
    """Indices of the nodes under `root` that already belong to the cluster."""
    from awsomefsd.cluster.state import MemberState

    return [_index(state) for state in sorted(root.glob("state[0-9]*")) if MemberState.load(state) is not None]


def _index(state: Path) -> int:
    return int(state.name.removeprefix("state"))


def _stop_orphans(root: Path) -> None:
    """Daemons an earlier session left running (it was killed and could not stop them; it held the
    lock on `root` we hold now, so they are ours): stopped as Ctrl-C would have."""
    from awsomefsd.cli.actions import state_in_use

    for state in sorted(root.glob("state[0-9]*")):
        if not state_in_use(state):
            continue
        pid = int((state / "daemon.lock").read_text().split()[0])
        print(f"awsomefsd: node {_index(state)} of an earlier session still runs (pid {pid}): stopping it", flush=True)
        _signal(pid, signal.SIGINT)
        try:
            wait_for(lambda: not state_in_use(state), STOP_DEADLINE_S, f"pid {pid} to stop")  # noqa: B023 (used at once)
        except TimeoutError:
            _signal(pid, signal.SIGKILL)
            wait_for(lambda: not state_in_use(state), STOP_DEADLINE_S, f"pid {pid} to die")  # noqa: B023


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _prepare(cluster: DevCluster) -> None:
    host = os.uname().nodename
    for node in cluster.nodes:
        if is_mounted(node.mount):  # a dead mount left by a killed session
            detach(node.mount)
        node.mount.mkdir(parents=True, exist_ok=True)
        node.metrics_port = METRICS_PORT
        node.csi_socket = node.state / "csi.sock"
        node.env = {**cluster.env, "AWSOMEFS_CSI__NODE_ID": f"{host}-node{node.index}"}


def _start(cluster: DevCluster, members: list[int]) -> None:
    """A new cluster: init on node 1, the others join it. An existing one: every member runs again
    at once (they need each other's votes to elect a leader), then any added node joins."""
    if members:
        print(f"awsomefsd: starting the dev cluster in {cluster.root} again", flush=True)
        old = [n for n in cluster.nodes if n.index in members]
        for node in old:
            node.start("run", wait=False)
        for node in old:
            node.wait_mounted()
        first = old[0]
        cluster.token = _token(first)
    else:
        print(f"awsomefsd: creating a dev cluster of {len(cluster.nodes)} nodes on {cluster.device}", flush=True)
        first = cluster.init()
    for node in cluster.nodes:
        if node.proc is None:
            print(f"awsomefsd: node {node.index} joining", flush=True)
            cluster.join(node, peer=first)
    for node in cluster.nodes:
        node.node_id = node_id(node)
    _wait_formed(cluster)


def _wait_formed(cluster: DevCluster) -> None:
    """Until every node is a member and as many are voters as the cluster aims for (a fourth node
    is a learner), so that "ready" means the cluster has its final shape."""
    want = {n.node_id for n in cluster.nodes}
    voters = min(len(want), DEFAULT_VOTERS)

    def formed() -> bool:
        view = cluster.nodes[0].status().get("cluster") or {}
        return (want <= {n["id"] for n in view.get("nodes", [])}
                and len(view.get("raft", {}).get("voters", [])) >= voters)

    wait_for(formed, VOTERS_DEADLINE_S, f"{len(want)} members, {voters} of them voters", interval_s=0.2)


def _token(node: DevNode) -> str:
    proc = node.cli("token")
    if proc.returncode != 0:
        raise OperatorError(f"node {node.index} gave no join token: {proc.stderr.strip()}")
    return str(proc.stdout.strip())


def node_id(node: DevNode) -> int:
    from awsomefsd.cluster.state import MemberState

    member = MemberState.load(node.state)
    return member.node_id if member is not None else 0


def describe(cluster: DevCluster) -> dict[str, Any]:
    """Where everything is, as `<state>/dev-cluster.json` holds it."""
    me = shlex.join(own_command())
    nodes = []
    for node in cluster.nodes:
        enter = f"nsenter --net=/run/netns/{node.ns.name} --"
        nodes.append({
            "index": node.index, "node_id": node.node_id, "namespace": node.ns.name, "address": node.ns.address,
            "listen": node.listen, "mount": str(node.mount), "state": str(node.state),
            "csi_socket": f"unix://{node.csi_socket}", "log": str(node.log_path), "pid": node.proc.pid if node.proc else 0,
            "status": f"{me} status --state {node.state}",
            "metrics": f"{enter} curl -s http://127.0.0.1:{METRICS_PORT}/metrics",
            "shell": f"{enter} bash",
        })
    return {"device": str(cluster.device), "size": cluster.size, "token": cluster.token,
            "network": f"{cluster.network.base}-*", "nodes": nodes}


def _describe(cluster: DevCluster, path: Path) -> None:
    info = describe(cluster)
    path.write_text(json.dumps(info, indent=2) + "\n")
    lines = [f"awsomefsd: dev cluster of {len(info['nodes'])} nodes running on {info['device']} ({info['size']})"]
    for node in info["nodes"]:
        lines += [f"  node {node['index']} (id {node['node_id']}) at {node['address']}, namespace {node['namespace']}",
                  f"    mount    {node['mount']}",
                  f"    csi      {node['csi_socket']}",
                  f"    status   {node['status']}",
                  f"    metrics  {node['metrics']}",
                  f"    log      {node['log']}"]
    lines += [f"  join token {info['token']}",
              f"  described in {path}",
              "  the nodes' network exists only inside this machine: no route in or out",
              "awsomefsd: dev cluster ready; Ctrl-C stops it (daemons, mounts, namespaces)"]
    print("\n".join(lines), flush=True)


def _serve(cluster: DevCluster) -> None:
    """Run until a signal; say so once when a daemon exits on its own (the others go on)."""
    reported: set[int] = set()
    while True:
        for node in cluster.nodes:
            if node.index not in reported and node.proc is not None and node.proc.poll() is not None:
                reported.add(node.index)
                print(f"awsomefsd: node {node.index} exited with status {node.proc.returncode}; see {node.log_path}",
                      flush=True)
        time.sleep(WATCH_INTERVAL_S)


def _stop_all(cluster: DevCluster, signals: StopSignals) -> None:
    """SIGINT to every daemon at once (each unmounts, flushes and leaves cleanly), then wait; kill
    those still running after STOP_DEADLINE_S, or at once when told to stop a second time."""
    running = [n for n in cluster.nodes if n.proc is not None and n.proc.poll() is None]
    for node in running:
        node.signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_DEADLINE_S
    while any(n.proc is not None and n.proc.poll() is None for n in running):
        if signals.hurry or time.monotonic() > deadline:
            break
        time.sleep(STOP_POLL_S)
    for node in running:
        assert node.proc is not None
        if node.proc.poll() is None:
            print(f"awsomefsd: node {node.index} did not stop {'yet' if signals.hurry else 'in time'}: killing it",
                  flush=True)
            node.kill()
        else:
            try:
                node.wait_unmounted()
            except TimeoutError:
                detach(node.mount)
