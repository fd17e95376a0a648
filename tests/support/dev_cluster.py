"""Run `awsomefsd dev --nodes N` as a developer does (a separate process, stopped with SIGINT as
Ctrl-C stops it) and read what it describes; for tests/cluster/test_dev_cluster.py and the compiled
binary's check in tests/packaging."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from awsomefsd.cli.actions import state_in_use
from awsomefsd.cli.devcluster import network as netns
from awsomefsd.cli.devcluster.members import is_mounted
from awsomefsd.cli.devcluster.network import SUBNET
from awsomefsd.cli.devcluster.session import DESCRIPTION
from awsomefsd.csi.generated import csi_pb2, csi_pb2_grpc
from tests.support.daemon import AWSOMEFSD, REPO, wait_for

READY_DEADLINE_S = 180.0
STOP_DEADLINE_S = 90.0
RPC_TIMEOUT_S = 20.0
Mode = csi_pb2.VolumeCapability.AccessMode.Mode


@dataclass
class DevSession:
    """One `awsomefsd dev --nodes N` process and everything it printed."""

    proc: subprocess.Popen[str]
    state: Path
    output: list[str] = field(default_factory=list)

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def text(self) -> str:
        return "".join(self.output)

    def wait_ready(self) -> DevSession:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"awsomefsd dev exited with {self.proc.returncode}:\n{self.text()}")
            return any("dev cluster ready" in line for line in self.output)

        wait_for(ready, READY_DEADLINE_S, "the dev cluster ready", interval_s=0.1)
        return self

    def description(self) -> dict[str, Any]:
        return dict(json.loads((self.state / DESCRIPTION).read_text()))

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the session (its daemons run in sessions of their own)."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(STOP_DEADLINE_S)


def start_dev_cluster(nodes: int, state: Path, mount: Path, *, command: Sequence[str] = AWSOMEFSD,
                      size: str = "1G") -> DevSession:
    argv = [*command, "dev", "--nodes", str(nodes), "--size", size, "--state", str(state), "--mount", str(mount)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/",
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    session = DevSession(proc, state)
    threading.Thread(target=session.pump, daemon=True).start()
    return session


def daemon_pids(state: Path) -> list[int]:
    """The daemons running on the node state directories under `state` (from their locks)."""
    return [int((s / "daemon.lock").read_text().split()[0]) for s in state.glob("state[0-9]*") if state_in_use(s)]


def kill_leftovers(sessions: Sequence[DevSession]) -> None:
    """After a failed check: no session or daemon may outlive the test."""
    for session in sessions:
        if session.proc.poll() is None:
            session.interrupt()
    for session in sessions:
        for pid in daemon_pids(session.state):
            os.kill(pid, signal.SIGKILL)


def _run_printed(command: str) -> subprocess.CompletedProcess[str]:
    """A command the session printed for the user, run as printed (in this checkout)."""
    return subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60, cwd="/",
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)


def check_running(info: dict[str, Any], session: DevSession) -> None:
    nodes = info["nodes"]
    assert all(is_mounted(Path(n["mount"])) for n in nodes), nodes
    for node in nodes:  # what the session prints is what it describes
        assert node["mount"] in session.text() and node["status"] in session.text()

    # one namespace: written on the first node, read on the last
    payload = os.urandom(100_000)
    name = f"from-node-1-{time.monotonic_ns()}"
    Path(nodes[0]["mount"], name).write_bytes(payload)
    assert Path(nodes[-1]["mount"], name).read_bytes() == payload

    # each node's status, as printed; each a different member, all healthy
    ids = set()
    for node in nodes:
        status = _run_printed(node["status"] + " --json")
        assert status.returncode == 0, status.stdout + status.stderr
        view = json.loads(status.stdout)
        assert view["healthy"] and view["mounts"] == [node["mount"]], view
        ids.add(node["node_id"])
    assert len(ids) == len(nodes) and 0 not in ids

    # each node's CSI endpoint answers with its own node id; a volume made on one is seen on another
    node_ids = set()
    for node in nodes:
        with grpc.insecure_channel(node["csi_socket"]) as channel:
            probe = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=RPC_TIMEOUT_S)
            assert probe.ready.value
            node_ids.add(csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(),
                                                                     timeout=RPC_TIMEOUT_S).node_id)
    assert len(node_ids) == len(nodes), node_ids
    capability = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                          access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.MULTI_NODE_MULTI_WRITER))
    with grpc.insecure_channel(nodes[0]["csi_socket"]) as channel:
        made = csi_pb2_grpc.ControllerStub(channel).CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 20), volume_capabilities=[capability]),
            timeout=RPC_TIMEOUT_S)
    with grpc.insecure_channel(nodes[1]["csi_socket"]) as channel:
        listed = csi_pb2_grpc.ControllerStub(channel).ListVolumes(csi_pb2.ListVolumesRequest(), timeout=RPC_TIMEOUT_S)
    assert made.volume.volume_id in {e.volume.volume_id for e in listed.entries}

    # metrics inside each node's namespace, on the port printed (curl is for the user; the same
    # request from this interpreter, in the same namespace)
    for node in nodes:
        url = node["metrics"].split()[-1]
        enter = node["metrics"].split(" -- ")[0]
        got = subprocess.run([*shlex.split(enter), "--", sys.executable, "-c",
                              f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert "awsomefs_fuse_request_seconds" in got

    # private: the root namespace has no address or route on the nodes' network
    assert f"{SUBNET}." not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert not subprocess.run(["ip", "route", "show", f"{SUBNET}.0/24"], capture_output=True, text=True,
                              check=True).stdout.strip()
    namespaces = {n["namespace"] for n in nodes}
    assert namespaces <= set(netns.existing())


def check_gone(info: dict[str, Any], state: Path) -> None:
    """After Ctrl-C: no daemon, mount, namespace or description left; every daemon was stopped, not
    killed: it flushed its data and unmounted (the last ones may find no leader left to take back
    their write leases, which is harmless when the whole cluster stops)."""
    assert not daemon_pids(state)
    for node in info["nodes"]:
        assert not is_mounted(Path(node["mount"])), node["mount"]
        with pytest.raises(ProcessLookupError):
            os.kill(node["pid"], 0)
        log = Path(node["log"]).read_text()
        stopped = "stopped cleanly: data flushed" in log or "stopped: data flushed" in log
        assert stopped and log.rstrip().endswith("awsomefsd: unmounted"), log[-2000:]
    base = info["network"].removesuffix("*")
    assert not [name for name in netns.existing() if name.startswith(base)]
    assert not (state / DESCRIPTION).exists()
