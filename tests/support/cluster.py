"""A real AwsomeFS cluster for tests: `awsomefsd init` / `join` / `run` as separate processes, one
per network namespace of a TestNetwork, all on one shared image file, each with its own FUSE mount
(visible to the test: namespaces are entered with nsenter --net only).

Lease timings are shortened through the environment (AWSOMEFS_CLUSTER__*) so fencing tests take
seconds; everything else is the daemon's default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.daemon import AWSOMEFSD, REPO, is_mounted, wait_for
from tests.support.netns import Namespace, TestNetwork

PORT = 7470
START_DEADLINE_S = 90.0
FAST_LEASES = {"AWSOMEFS_CLUSTER__LEASE_S": "3", "AWSOMEFS_CLUSTER__RENEW_S": "0.5", "AWSOMEFS_CLUSTER__STALL_S": "8",
               "AWSOMEFS_CLUSTER__LEASE_MARGIN_S": "1"}


FUSECTL = Path("/sys/fs/fuse/connections")


def _fusectl_mounted() -> None:
    """The FUSE control filesystem (where connections are aborted) is not mounted everywhere."""
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        mounted = any(line.split()[2] == "fusectl" for line in fh)
    if not mounted and FUSECTL.is_dir():
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True, check=False)


def detach(mount: Path) -> None:
    """Abort the mount's FUSE connection (requests still waiting fail with ENOTCONN instead of
    blocking forever in the kernel), then detach it. Never touches the mount itself, which may hang."""
    target = os.path.abspath(mount)  # realpath would lstat the mount, which may hang
    _fusectl_mounted()
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == target and " - fuse.awsomefs " in line:
                minor = fields[2].split(":")[1]
                try:
                    Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
                except OSError:
                    pass
    subprocess.run(["umount", "-l", target], capture_output=True, check=False)


class Node:
    """One member: its namespace, state directory, mount point and daemon process."""

    def __init__(self, ns: Namespace, root: Path, index: int, env: dict[str, str]) -> None:
        self.ns = ns
        self.index = index
        self.state = root / f"state{index}"
        self.mount = root / f"mnt{index}"
        self.log_path = root / f"node{index}.log"
        """Every line the daemon printed, across its restarts: kept for a failed run's post-mortem."""
        self.listen = f"{ns.address}:{PORT}"
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.node_id = 0
        self.metrics = False  # serve Prometheus metrics (on a free port inside the namespace)
        self._mounted = threading.Event()

    def start(self, *args: str, wait: bool = True) -> Node:
        """Run `awsomefsd ARGS` in the namespace; wait for its mount unless told not to."""
        self._mounted.clear()
        self.output = []
        argv = [*AWSOMEFSD, *args, "--state", str(self.state), "--metrics-port", "0" if self.metrics else "-1"]
        self.proc = self.ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", env=self.env, cwd="/")
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        if wait:
            self.wait_mounted()
        return self

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        """Drain the daemon's output for as long as it runs: a daemon whose pipe fills up blocks
        on its next log line, and with it every request its mount holds."""
        assert proc.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as log_file:
            log_file.write(f"--- awsomefsd started (pid {proc.pid}) at monotonic {time.monotonic():.3f}\n")
            for line in proc.stdout:
                self.output.append(line)
                log_file.write(line)
                log_file.flush()
                self._note(line)

    def _note(self, line: str) -> None:
        if line.startswith("awsomefsd: mounted"):
            self._mounted.set()
        elif line.startswith("awsomefsd: joined cluster"):
            self.node_id = int(line.split()[-1])

    def wait_mounted(self, timeout_s: float = START_DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._mounted.wait(0.05):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.index} did not mount:\n" + self.logs(80))

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def scrape(self) -> str:
        """The node's Prometheus metrics, fetched from inside its namespace."""
        url = next(line.split("metrics on ")[1].strip() for line in self.output if "metrics on http" in line)
        proc = self.ns.run([sys.executable, "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"],
                           capture_output=True, text=True, check=True)
        return str(proc.stdout)

    def token(self) -> str:
        return next(line.strip() for line in self.output if line.startswith("awfs1_"))

    def cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A CLI command against this node's state (in its namespace)."""
        return self.ns.run([*AWSOMEFSD, *args, "--state", str(self.state)], capture_output=True, text=True,
                           env=self.env, cwd="/", timeout=timeout_s, check=False)

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json")
        return dict(json.loads(proc.stdout))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL (a crash); the stale mount is lazily detached so the test can go on."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # a thread stuck in the kernel on its own mount
                detach(self.mount)
                self.proc.wait(30)
        detach(self.mount)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        wait_for(lambda: not is_mounted(self.mount), 20, f"unmount of node {self.index}")

    def logs(self, last: int = 200) -> str:
        return "".join(self.output[-last:])

    def blocked_threads(self) -> list[str]:
        """The daemon's threads in uninterruptible sleep, as "name@kernel function" (a hint where it hangs)."""
        if self.proc is None:
            return []
        found = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "D":
                    found.append(f"{(task / 'comm').read_text().strip()}@{(task / 'wchan').read_text().strip()}")
            except (OSError, IndexError):
                continue
        return found


class Cluster:
    def __init__(self, network: TestNetwork, root: Path, *, size: str = "2G",
                 env: dict[str, str] | None = None) -> None:
        self.network = network
        self.root = root
        self.device = root / "shared.img"
        self.size = size
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **FAST_LEASES, **(env or {})}
        self.nodes = [Node(ns, root, k, self.env) for k, ns in enumerate(network.nodes, start=1)]
        self.token = ""

    def init(self, node: Node | None = None) -> Node:
        node = node or self.nodes[0]
        node.start("init", "--device", str(self.device), "--size", self.size, "--mount", str(node.mount),
                   "--listen", node.listen)
        node.node_id = 1
        self.token = node.token()
        return node

    def join(self, node: Node, *, peer: Node | None = None, token: str | None = None, wait: bool = True) -> Node:
        args = ["join", token or self.token, "--device", str(self.device), "--mount", str(node.mount),
                "--listen", node.listen]
        if peer is not None:
            args += ["--peer", peer.listen]
        return node.start(*args, wait=wait)

    def form(self, n: int = 3, *, by_peer: bool = False) -> list[Node]:
        """init on the first node, join the others; returns once all are voters."""
        first = self.init()
        for node in self.nodes[1:n]:
            self.join(node, peer=first if by_peer else None)
        self.wait_voters(self.nodes[:n])
        return self.nodes[:n]

    def wait_voters(self, nodes: list[Node], timeout_s: float = 60.0) -> None:
        want = {n.node_id for n in nodes}

        def all_voters() -> bool:
            st = nodes[0].status()
            return want <= set(st.get("cluster", {}).get("raft", {}).get("voters", []))

        wait_for(all_voters, timeout_s, f"voters {sorted(want)}", interval_s=0.2)

    def leader(self, among: list[Node] | None = None) -> Node:
        among = among or [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        for node in among:
            st = node.status().get("cluster") or {}
            lead = st.get("raft", {}).get("leader", 0)
            for candidate in among:
                if candidate.node_id == lead:
                    return candidate
        raise LookupError("no leader among the running nodes")

    def close(self) -> None:
        for node in self.nodes:
            detach(node.mount)  # first: no request of the test may stay blocked on a daemon
            if node.proc is not None and node.proc.poll() is None:
                node.kill()


@contextmanager
def cluster_in(network: TestNetwork, root: Path, **kwargs: Any) -> Iterator[Cluster]:
    cluster = Cluster(network, root, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()
