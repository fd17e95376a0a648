"""A real AwsomeFS cluster on one machine: `awsomefsd init` / `join` / `run` as separate processes, one
per namespace of a PrivateNetwork, all on one shared image file, each with its own FUSE mount
(visible outside: namespaces are entered with nsenter --net only, never a mount namespace).

`awsomefsd dev --nodes N` (cli/devcluster/session.py) runs one for a developer; the cluster tests and
benchmarks use the same classes (tests/support/cluster.py sets their lease timings and interpreter).
Every daemon's output is drained into `<root>/node<K>.log` while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from awsomefsd.cli.devcluster.network import Namespace, PrivateNetwork
from awsomefsd.program import own_command, own_environment

PORT = 7470
"""Every node's cluster port: each node has an address (and ports) of its own in its namespace."""
START_DEADLINE_S = 90.0
STOP_DEADLINE_S = 60.0
UNMOUNT_DEADLINE_S = 20.0


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Poll `condition` until true or fail after `timeout_s` (never a bare sleep-and-hope)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def is_mounted(path: Path) -> bool:
    """Whether an AwsomeFS mount sits at `path` (also a dead one, which a stat could not tell)."""
    # The parent resolved, not the mount point: a stat of a mount nobody serves (while its daemon
    # is replaced) waits for the next daemon.
    target = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return any(line.split()[1] == target and line.split()[2] == "fuse.awsomefs" for line in fh)


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


class DevNode:
    """One member: its namespace, state directory, mount point and daemon process."""

    def __init__(self, ns: Namespace, root: Path, index: int, command: Sequence[str], env: dict[str, str],
                 *, mounts: Path | None = None) -> None:
        self.ns = ns
        self.command = list(command)
        self.index = index
        self.state = root / f"state{index}"
        self.mount = (mounts / f"node{index}") if mounts is not None else root / f"mnt{index}"
        self.log_path = root / f"node{index}.log"
        """Every line the daemon printed, across its restarts: kept for a failed run's post-mortem."""
        self.listen = f"{ns.address}:{PORT}"
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.node_id = 0
        self.metrics_port = -1
        """Prometheus port inside the namespace: -1 off, 0 any free port."""
        self.csi_socket: Path | None = None
        self._mounted = threading.Event()

    def start(self, *args: str, wait: bool = True) -> DevNode:
        """Run `awsomefsd ARGS` in the namespace; wait for its mount unless told not to."""
        self._mounted.clear()
        self.output = []
        argv = [*self.command, *args, "--state", str(self.state), "--metrics-port", str(self.metrics_port)]
        if self.csi_socket is not None:
            argv += ["--csi-socket", str(self.csi_socket)]
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
                raise RuntimeError(f"node {self.index} did not mount (log: {self.log_path}):\n" + self.logs(80))

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
        return self.ns.run([*self.command, *args, "--state", str(self.state)], capture_output=True, text=True,
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
                self.proc.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self.wait_unmounted()

    def wait_unmounted(self) -> None:
        wait_for(lambda: not is_mounted(self.mount), UNMOUNT_DEADLINE_S, f"unmount of node {self.index}")

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


class DevCluster:
    """The members of one cluster on `network` (on `namespaces` of it: default all), its shared
    image `<root>/shared.img` and their state under `root`; mounts under `mounts` (default: `root`)."""

    def __init__(self, network: PrivateNetwork, root: Path, *, size: str = "2G", command: Sequence[str] | None = None,
                 env: dict[str, str] | None = None, mounts: Path | None = None,
                 namespaces: Sequence[Namespace] | None = None) -> None:
        self.network = network
        self.root = root
        self.device = root / "shared.img"
        self.size = size
        self.env = env if env is not None else own_environment()
        command = command or own_command()
        self.nodes = [DevNode(ns, root, k, command, self.env, mounts=mounts)
                      for k, ns in enumerate(network.nodes if namespaces is None else namespaces, start=1)]
        self.token = ""

    def init(self, node: DevNode | None = None) -> DevNode:
        node = node or self.nodes[0]
        node.start("init", "--device", str(self.device), "--size", self.size, "--mount", str(node.mount),
                   "--listen", node.listen)
        node.node_id = 1
        self.token = node.token()
        return node

    def join(self, node: DevNode, *, peer: DevNode | None = None, token: str | None = None, wait: bool = True) -> DevNode:
        args = ["join", token or self.token, "--device", str(self.device), "--mount", str(node.mount),
                "--listen", node.listen]
        if peer is not None:
            args += ["--peer", peer.listen]
        return node.start(*args, wait=wait)

    def form(self, n: int = 3, *, by_peer: bool = False) -> list[DevNode]:
        """init on the first node, join the others; returns once all are voters."""
        first = self.init()
        for node in self.nodes[1:n]:
            self.join(node, peer=first if by_peer else None)
        self.wait_voters(self.nodes[:n])
        return self.nodes[:n]

    def wait_voters(self, nodes: list[DevNode], timeout_s: float = 60.0) -> None:
        want = {n.node_id for n in nodes}

        def all_voters() -> bool:
            st = nodes[0].status()
            return want <= set(st.get("cluster", {}).get("raft", {}).get("voters", []))

        wait_for(all_voters, timeout_s, f"voters {sorted(want)}", interval_s=0.2)

    def leader(self, among: list[DevNode] | None = None) -> DevNode:
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
def cluster_in(network: PrivateNetwork, root: Path, **kwargs: Any) -> Iterator[DevCluster]:
    """A DevCluster that is always closed (every mount detached, every daemon killed)."""
    cluster = DevCluster(network, root, **kwargs)
    try:
        yield cluster
    finally:
        cluster.close()
