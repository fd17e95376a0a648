"""One token, the same command on every node: the node DaemonSet's own container (its command,
environment, ConfigMap and Secret, resolved as the kubelet does: tests/support/k8s_pods.py), run as
pods in network namespaces on one blank image, forms one cluster with exactly one founder whatever
the start order; a pod whose hostPath state was wiped joins again as a new member (design note 53).

Each pod runs under `ip netns exec`, which binds /etc/netns/NS/hosts over /etc/hosts: there the
headless peers Service's name resolves to every pod's address, as cluster DNS would (the one
stand-in: no Kubernetes API server or DNS runs here). Its FUSE mount lives in its own mount
namespace and is reached through /proc/PID/root."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.network import Namespace, PrivateNetwork
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.founding import FoundingRecord, read_founding
from tests.support import k8s_pods
from tests.support.daemon import AWSOMEFSD, REPO, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.mounted]
IMAGE_BYTES = 1 << 30
FOUNDED = "awsomefsd: founding cluster"
STATE_PATH = "/var/lib/awsomefs"
START_S = 240.0


def new_token() -> str:
    out = subprocess.run([*AWSOMEFSD, "token", "new"], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.stdout.strip()


class Pod:
    """Pod K of the DaemonSet: its container's argv and environment, its hostPath directories under
    `base/podK`, and the daemon process (the keeper sidecar beside it)."""

    def __init__(self, k: int, ns: Namespace, base: Path, token: str, device: Path, ips: list[str]) -> None:
        self.k, self.ns, self.root = k, ns, base / f"pod{k}"
        plain = k8s_pods.daemon_run(k, ns.address, token=token, device=device)
        self.state = self.root / next(v.name for v in plain.volumes if v.mount_path == STATE_PATH)
        self.run = plain.localized(self.root)
        self.keeper_run = k8s_pods.keeper_run(k, ns.address).localized(self.root)
        hosts = Path(f"/etc/netns/{ns.name}")
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "hosts").write_text(k8s_pods.peer_hosts(self.run, ips))
        self.listen = f"{ns.address}:7470"
        self.proc: subprocess.Popen[str] | None = None
        self.keeper: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.mounted = threading.Event()
        self.mount = ""

    def _popen(self, run: k8s_pods.ContainerRun) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO), **run.env}
        return subprocess.Popen(["ip", "netns", "exec", self.ns.name, *AWSOMEFSD, *run.argv[1:]], env=env, cwd="/",
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)

    def start(self) -> None:
        if self.keeper is None or self.keeper.poll() is not None:
            self.keeper = self._popen(self.keeper_run)
            threading.Thread(target=self.keeper.communicate, daemon=True).start()
        self.output, self.mounted = [], threading.Event()
        self.proc = self._popen(self.run)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with (self.root / "daemon.log").open("a") as log:
            for line in proc.stdout:
                self.output.append(line)
                log.write(line)
                if line.startswith("awsomefsd: mounted "):
                    self.mount = line.split(" ", 2)[2].strip()
                    self.mounted.set()

    def wait_mounted(self) -> None:
        deadline = time.monotonic() + START_S
        while not self.mounted.wait(0.1):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"pod {self.k} did not mount:\n" + "".join(self.output[-40:]))

    def path(self, name: str) -> Path:
        """A file of the mount, as the pod's mount namespace shows it."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root{self.mount}") / name

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A command in the pod (kubectl exec): the container's environment and configuration."""
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.run.env}
        return subprocess.run(["ip", "netns", "exec", self.ns.name, *AWSOMEFSD, *args, *self.run.argv[2:]],
                              env=env, cwd="/", capture_output=True, text=True, timeout=120, check=False)

    def cluster_view(self) -> tuple[str, frozenset[int], int]:
        import json

        cluster = json.loads(self.cli("status", "--json").stdout)["cluster"]
        active = frozenset(n["id"] for n in cluster["nodes"] if n["state"] == "active")
        return cluster["cluster_id"], active, int(cluster["node_id"])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(120)

    def lose_node(self, *, wipe: bool) -> None:
        """The node goes down hard (both pods killed: a power cut, a reinstall), its hostPath
        state wiped when `wipe`. Its mount lived in the daemon's mount namespace and is gone."""
        self.stop(signal.SIGKILL)
        if self.keeper is not None and self.keeper.poll() is None:
            os.killpg(self.keeper.pid, signal.SIGKILL)
            self.keeper.wait(30)
        if wipe:
            shutil.rmtree(self.state)

    def close(self) -> None:
        self.lose_node(wipe=False)
        shutil.rmtree(Path(f"/etc/netns/{self.ns.name}"), ignore_errors=True)


@pytest.fixture
def pods(netns_network: Callable[[int], PrivateNetwork], tmp_path: Path) -> Iterator[list[Pod]]:
    net = netns_network(3)
    device = tmp_path / "shared.img"
    with open(device, "wb") as image:  # a blank LUN: the founder formats it
        image.truncate(IMAGE_BYTES)
    token = new_token()
    ips = [ns.address for ns in net.nodes]
    made = [Pod(k, ns, tmp_path, token, device, ips) for k, ns in enumerate(net.nodes, start=1)]
    try:
        yield made
    finally:
        for pod in made:
            pod.close()


def start_all_at_once(pods: list[Pod]) -> None:
    barrier = threading.Barrier(len(pods))

    def go(pod: Pod) -> None:
        barrier.wait()
        pod.start()

    threads = [threading.Thread(target=go, args=(pod,)) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for pod in pods:
        pod.wait_mounted()


def founders(pods: list[Pod]) -> list[Pod]:
    return [pod for pod in pods if any(line.startswith(FOUNDED) for line in pod.output)]


def one_cluster(pods: list[Pod], timeout_s: float = 30) -> frozenset[int]:
    """Every pod sees the same cluster and, once the last change applied everywhere, the same
    active members: their node ids. Two cluster ids are a failure at once."""
    views: set[tuple[str, frozenset[int]]] = set()

    def agreed() -> bool:
        views.clear()
        views.update(view[:2] for view in (pod.cluster_view() for pod in pods))
        assert len({cluster for cluster, _ in views}) == 1, f"more than one cluster: {views}"
        return len(views) == 1

    wait_for(agreed, timeout_s, "the pods to agree on the members", interval_s=0.5)
    return next(iter(views))[1]


def record_of(device: Path) -> FoundingRecord:
    with BlockDevice.open(device, shared=True) as dev:
        record = read_founding(dev)
    assert record is not None and record.founded
    return record


def write_synced(path: Path, payload: bytes) -> str:
    with open(path, "wb") as f:
        f.write(payload)
        os.fsync(f.fileno())
    return hashlib.sha256(payload).hexdigest()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.budget(180)  # three pods formed at once, one of them started again with its state wiped
def test_the_daemonsets_pods_form_one_cluster_and_a_wiped_pod_rejoins(pods: list[Pod], tmp_path: Path) -> None:
    start_all_at_once(pods)
    assert len(founders(pods)) == 1, [pod.output[-10:] for pod in pods]
    assert len(one_cluster(pods)) == 3
    # The device's record names every member to join through, not only the founder.
    device = tmp_path / "shared.img"
    wait_for(lambda: set(record_of(device).seeds) == {p.listen for p in pods}, 30, "the members on the record")
    kept = write_synced(pods[0].path("kept"), random.randbytes(3 << 20))
    wait_for(lambda: pods[2].path("kept").exists(), 30, "the file on another pod")
    assert digest(pods[2].path("kept")) == kept

    wiped = next(pod for pod in pods if pod not in founders(pods))
    old_id = wiped.cluster_view()[2]
    wiped.lose_node(wipe=True)
    wiped.start()
    wiped.wait_mounted()
    assert not any(line.startswith(FOUNDED) for line in wiped.output)
    assert wiped.cluster_view()[2] != old_id
    wait_for(lambda: old_id not in one_cluster(pods, 90), 90, f"the old member {old_id} removed")
    assert len(one_cluster(pods)) == 3
    assert digest(wiped.path("kept")) == kept


@pytest.mark.slow
def test_a_random_schedule_of_starts_restarts_and_wiped_states_keeps_one_cluster(pods: list[Pod]) -> None:
    """Seeded and replayable (AWSOMEFS_FORMATION_SEED): the pods start in a random order with
    random delays (or at one instant), then restart, crash or lose their hostPath state one at a
    time while files are written through random pods; always one cluster with one founder, every
    acknowledged file intact, fsck clean at the end."""
    seed = int(os.environ.get("AWSOMEFS_FORMATION_SEED") or random.randrange(1 << 31))
    print(f"formation schedule seed {seed} (replay: AWSOMEFS_FORMATION_SEED={seed})")
    rng = random.Random(seed)
    if rng.random() < 0.5:
        start_all_at_once(pods)
    else:
        for pod in rng.sample(pods, len(pods)):
            threading.Event().wait(rng.random() * 2)
            pod.start()
        for pod in pods:
            pod.wait_mounted()
    assert len(founders(pods)) == 1, f"seed {seed}"
    files: dict[str, str] = {}
    for step in range(8):
        pod = rng.choice(pods)
        action = rng.choice(["write", "write", "restart", "crash", "wipe"])
        if action == "write":
            files[f"f{step}"] = write_synced(pod.path(f"f{step}"), rng.randbytes(rng.randrange(1, 2 << 20)))
            continue
        if action == "restart":
            pod.stop()
        else:
            pod.lose_node(wipe=action == "wipe")
        pod.start()
        pod.wait_mounted()
        assert len(one_cluster(pods)) >= 3, f"seed {seed}: step {step} {action}"
    wait_for(lambda: len(one_cluster(pods)) == 3, 90, f"seed {seed}: the replaced members removed")
    for name, want in files.items():
        assert digest(rng.choice(pods).path(name)) == want, f"seed {seed}: {name}"
    for pod in pods:
        pod.stop()
    check = pods[0].cli("fsck")
    assert check.returncode == 0 and "fsck: clean" in check.stdout, f"seed {seed}: {check.stdout}{check.stderr}"


def test_the_pods_command_is_what_the_manifest_says() -> None:
    """The test runs the DaemonSet's container command itself, not a copy of it."""
    run = k8s_pods.daemon_run(1, "10.77.0.2", token="awfs1_x", device="/dev/sdz")
    assert run.argv[:2] == ["/usr/bin/awsomefsd", "run"]
    assert run.env["AWSOMEFS_CLUSTER__LISTEN"] == "10.77.0.2:7470"
    assert Path(run.env["AWSOMEFS_CLUSTER__TOKEN_FILE"]).name == "token"

