"""Two linked sites on one machine, for tests and benchmarks: two `awsomefsd dev` daemons, each on
its own image in a network namespace of its own, and the WAN proxy (tests/support/wan.py) in a
third, in front of both sites' listeners; each site advertises the proxy's address, so every byte
between the sites goes through it (one-way delay, bandwidth cap, cut and heal).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from awsomefsd.cli.devcluster.members import DevCluster, DevNode, wait_for
from awsomefsd.cli.devcluster.network import Namespace, PrivateNetwork
from tests.support.daemon import REPO, Daemon, run_cli

PORT_A, PORT_B = 19450, 19460
"""Fixed ports are safe here: nothing else lives in a test's own namespaces."""
SYNC_DEADLINE_S = 60.0
ELECTION_WAIT_S = 60.0
"""How long `ClusterSite.status` waits for a leader to answer (a nemesis may have killed the last one)."""
VERIFY_CLI_S = 600.0
"""`site verify` digests both whole trees: 50,000 files a site take minutes on a loaded machine."""


@dataclass
class Site:
    name: str
    daemon: Daemon
    namespace: Namespace

    @property
    def mount(self) -> Path:
        return self.daemon.mount

    @property
    def csi_socket(self) -> Path:
        """Where `two_sites(csi=True)` has this site serve CSI."""
        return self.daemon.state.parent / f"csi-{self.name}.sock"

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_cli("site", *args, "--state", str(self.daemon.state), timeout_s=timeout_s)

    def status(self) -> dict[str, object]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result

    def logs(self) -> str:
        return self.daemon.logs()[-3000:]

    def save_logs(self) -> str:
        path = self.daemon.state / "daemon.log"
        path.write_text(self.daemon.logs())
        return str(path)


@dataclass
class ClusterSite:
    """A site of several nodes: `site` commands go to the member that leads (the one that runs
    the link and knows its figures)."""

    name: str
    cluster: DevCluster
    members: list[DevNode]
    _asked: DevNode | None = None
    """The member `leader` last found leading, asked again until it dies or says the link runs
    elsewhere: finding the leader costs a CLI process per member, and the waits that poll
    `site status` spent most of a two-site test's CPU starting them."""

    def running(self) -> list[DevNode]:
        return [n for n in self.members if n.proc is not None and n.proc.poll() is None]

    @property
    def mount(self) -> Path:
        """The leader's mount (every member's shows the same tree)."""
        return self._leading().mount

    def leader(self) -> DevNode:
        """The member that leads now (each running member asked)."""
        self._asked = self.cluster.leader(self.running())
        return self._asked

    def _leading(self) -> DevNode:
        """The member last found leading while it runs, else the one that leads now."""
        asked = self._asked
        if asked is not None and asked.proc is not None and asked.proc.poll() is None:
            return asked
        return self.leader()

    def followers(self) -> list[DevNode]:
        leader = self.leader()
        return [n for n in self.running() if n is not leader]

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """A `site` command on the member last found leading (`status` finds a new one when it
        no longer does)."""
        return self._leading().cli("site", *args, timeout_s=timeout_s)

    def status(self) -> dict[str, object]:
        """`site status` of the member that leads, once one does: during an election there is no
        leader to ask, or the one asked has just lost the lead (it says where the link runs now).
        A hand-rolled wait, not `wait_for`: its failure is the test's (AssertionError), saying
        what the last answer was."""
        deadline = time.monotonic() + ELECTION_WAIT_S
        while True:
            try:
                done = self.cli("status", "--json")
                last = done.stderr or done.stdout
                if done.returncode == 0:
                    result: dict[str, object] = json.loads(done.stdout)
                    if result["elsewhere"] is None:  # asked the leader
                        return result
                self._asked = None  # it no longer leads: the next try finds who does
            except LookupError as exc:  # no leader among the running members
                last = str(exc)
            if time.monotonic() > deadline:
                raise AssertionError(f"no member led the site for {ELECTION_WAIT_S:.0f} s: {last[-2000:]}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "".join(f"--- node {n.index} ---\n{n.logs(40)}" for n in self.members)

    def save_logs(self) -> str:
        return ", ".join(str(n.log_path) for n in self.members)


class Wan:
    """The proxies between the sites, one per listener, in their own namespace."""

    def __init__(self, namespace: Namespace, targets: list[tuple[int, str]], delay_ms: float,
                 rate_kib_s: float = 0) -> None:
        self.procs = []
        for port, upstream in targets:
            proc = namespace.popen([sys.executable, "-m", "tests.support.wan", namespace.address, upstream,
                                    "--port", str(port), "--delay-ms", str(delay_ms), "--rate-kib-s", str(rate_kib_s)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(REPO),
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == str(port)
            self.procs.append(proc)

    def _say(self, command: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == f"ok {command}"

    def cut(self) -> None:
        self._say("cut")

    def heal(self) -> None:
        self._say("heal")


@contextmanager
def two_sites(root: Path, *, delay_ms: float = 25, rate_kib_s: float = 0, size: str = "1G",
              extra_env: dict[str, str] | None = None, csi: bool = False) -> Iterator[tuple[Site, Site, Wan]]:
    """Two unlinked sites under `root` and the WAN between them; everything stops on the way out.
    `csi`: each serves the CSI endpoint on `Site.csi_socket` (a unix socket: reachable from here)."""
    with PrivateNetwork(3) as network:
        ns_a, ns_b, ns_wan = network.nodes
        wan = Wan(ns_wan, [(PORT_A, f"{ns_a.address}:{PORT_A}"), (PORT_A + 1, f"{ns_a.address}:{PORT_A + 1}"),
                           (PORT_B, f"{ns_b.address}:{PORT_B}"), (PORT_B + 1, f"{ns_b.address}:{PORT_B + 1}")],
                  delay_ms, rate_kib_s)
        made: list[Site] = []
        try:
            for name, ns, port in (("a", ns_a, PORT_A), ("b", ns_b, PORT_B)):
                env = {"AWSOMEFS_SITE__LISTEN": f"{ns.address}:{port}",
                       "AWSOMEFS_SITE__ADVERTISE": json.dumps([f"{ns_wan.address}:{port}"]), **(extra_env or {})}
                (root / f"m{name}").mkdir(parents=True, exist_ok=True)
                extra = ["--csi-socket", str(root / f"csi-{name}.sock")] if csi else []
                daemon = Daemon(root / f"s{name}", root / f"m{name}", size=size, env=env, extra=extra,
                                prefix=["nsenter", f"--net=/run/netns/{ns.name}", "--"])
                made.append(Site(name, daemon.start(), ns))
            yield made[0], made[1], wan
        finally:
            for site in made:
                site.daemon.stop_hard()


CLUSTER_PORTS = {"a": 19450, "b": 19470}
"""Every member's site listener (each in its own namespace); the proxy's port for member k is
the site's port + 2k (pairing: + 1)."""


@contextmanager
def cluster_and_site(root: Path, *, members: int = 3, other_members: int = 1,
                     delay_ms: float = 25) -> Iterator[tuple[ClusterSite, Site | ClusterSite, Wan]]:
    """Site a of `members` cluster nodes and site b of `other_members` (1: a single node),
    unlinked, with the WAN between them: on a cluster every member listens on the same port in
    its namespace and advertises all of them through the proxy (the same [site] settings on
    every member)."""
    with PrivateNetwork(members + other_members + 1) as network:
        ns_a, ns_b = network.nodes[:members], network.nodes[members:members + other_members]
        ns_wan = network.nodes[-1]
        targets = []
        for name, namespaces in (("a", ns_a), ("b", ns_b)):
            port = CLUSTER_PORTS[name] if len(namespaces) > 1 else PORT_B
            for k, ns in enumerate(namespaces):
                targets += [(port + 2 * k + extra, f"{ns.address}:{port + extra}") for extra in (0, 1)]
        wan = Wan(ns_wan, targets, delay_ms)
        with contextlib.ExitStack() as stack:
            a = stack.enter_context(_cluster_site("a", root, network, ns_a, ns_wan.address))
            if other_members > 1:
                b: Site | ClusterSite = stack.enter_context(_cluster_site("b", root, network, ns_b, ns_wan.address))
            else:
                (ns,) = ns_b
                (root / "mb").mkdir(parents=True, exist_ok=True)
                daemon = Daemon(root / "sb", root / "mb", env={"AWSOMEFS_SITE__LISTEN": f"{ns.address}:{PORT_B}",
                                                               "AWSOMEFS_SITE__ADVERTISE": json.dumps([f"{ns_wan.address}:{PORT_B}"])},
                                extra=["--csi-socket", str(root / "csi-b.sock")],  # Site.csi_socket
                                prefix=["nsenter", f"--net=/run/netns/{ns.name}", "--"])
                stack.callback(daemon.stop_hard)
                b = Site("b", daemon.start(), ns)
            yield a, b, wan


@contextmanager
def _cluster_site(name: str, root: Path, network: PrivateNetwork, namespaces: list[Namespace],
                  wan_address: str) -> Iterator[ClusterSite]:
    """A cluster of these namespaces' nodes under root/<name>, linked to nothing yet."""
    from tests.support.cluster import cluster_in

    port = CLUSTER_PORTS[name]
    advertise = [f"{wan_address}:{port + 2 * k}" for k in range(len(namespaces))]
    env = {"AWSOMEFS_SITE__LISTEN": f"0.0.0.0:{port}", "AWSOMEFS_SITE__ADVERTISE": json.dumps(advertise)}
    (root / name).mkdir(parents=True, exist_ok=True)
    with cluster_in(network, root / name, env=env, namespaces=namespaces) as cluster:
        for node in cluster.nodes:
            node.metrics_port = 0  # any free port in its namespace
            node.csi_socket = node.state / "csi.sock"
        yield ClusterSite(name, cluster, cluster.form(len(namespaces)))


_CALL_AS = """
import sys, grpc
from pathlib import Path
from awsomefsd.cluster.ca import cluster_dns_name
from awsomefsd.cluster.tls import NodeCredentials
from awsomefsd.crdt import wire
import uuid
credentials_dir, address, site, ca_file = sys.argv[1:]
me = NodeCredentials.load(Path(credentials_dir))
name = cluster_dns_name(uuid.UUID(site))
channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
    root_certificates=Path(ca_file).read_bytes(), private_key=me.key_pem, certificate_chain=me.cert_pem),
    options=[("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)])
try:
    channel.unary_unary("/awsomefs.site.v1.Link/Cursor")(wire.frame({}), timeout=20)
    print("OK")
except grpc.RpcError as exc:
    print(exc.code().name, exc.details())
"""


def link_call_as(namespace: Namespace, credentials: Path, address: str, site: str, ca_file: Path) -> str:
    """Call the link listener at `address` (of `site`, whose CA is in `ca_file`) from
    `namespace` with the node credentials in `credentials` (a member's TLS directory): "OK",
    or the status code and details it was refused with."""
    done = namespace.run([sys.executable, "-c", _CALL_AS, str(credentials), address, site, str(ca_file)],
                         capture_output=True, text=True, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)},
                         timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def create_volume(csi_socket: Path, name: str, capacity_bytes: int) -> str:
    """CreateVolume through a CSI endpoint, as Kubernetes' provisioner calls it: the volume id."""
    import grpc

    from awsomefsd.csi.generated import csi_pb2, csi_pb2_grpc

    capability = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.Mode.MULTI_NODE_MULTI_WRITER))
    capability.mount.SetInParent()
    with grpc.insecure_channel(f"unix://{csi_socket}") as channel:
        made = csi_pb2_grpc.ControllerStub(channel).CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=capacity_bytes),
            volume_capabilities=[capability]), timeout=30)
    return str(made.volume.volume_id)


def link(a: Site | ClusterSite, b: Site | ClusterSite) -> None:
    """`site link` on a, its token to `site link TOKEN` on b."""
    token = a.cli("link")
    assert token.returncode == 0, token.stderr
    linked = b.cli("link", token.stdout.strip())
    assert linked.returncode == 0, linked.stderr + a.logs()


def pending(site: Site | ClusterSite) -> int:
    """Operations the site has still to send (`site status`)."""
    outbound = site.status()["outbound"]
    assert isinstance(outbound, dict)
    return int(outbound["pending_operations"])


def make_backlog(root: Path, files: int, text: str) -> None:
    """`files` empty files created in `root` (made here), one in ten renamed (`f{i}` to `r{i}`),
    one in fifty given `text` and its number: about 2.2 operations a file for the other site."""
    root.mkdir()
    for i in range(files):
        os.close(os.open(root / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    for i in range(0, files, 10):
        os.rename(root / f"f{i}", root / f"r{i}")
    for i in range(1, files, 50):
        (root / f"f{i}").write_bytes(f"{text} {i}\n".encode())


def wait_converged(a: Site | ClusterSite, b: Site | ClusterSite, deadline_s: float = SYNC_DEADLINE_S) -> None:
    """Until each site has applied all the other sent (nothing pending either way: a tree can
    match before the last operations, those that settle conflicts, are in) and `site verify`
    says both trees are the same; on time-out, the logs are saved and quoted."""
    try:
        wait_for(lambda: pending(a) == 0 and pending(b) == 0 and _verify(a).returncode == 0, deadline_s,
                 "both sites to have applied all the other sent, and to hold the same tree", interval_s=0.5)
    except TimeoutError:
        saved = [site.save_logs() for site in (a, b)]
        verified = _verify(a)
        raise AssertionError(f"still to send: a {pending(a)}, b {pending(b)}; site verify exited "
                             f"{verified.returncode}: {verified.stderr.strip()[-500:]}\n" + verified.stdout[:3000]
                             + "\n--- a ---\n" + a.logs() + "\n--- b ---\n" + b.logs()
                             + f"\n(whole logs: {', '.join(saved)})") from None


def _verify(site: Site | ClusterSite) -> subprocess.CompletedProcess[str]:
    """`site verify`; one that outlasts VERIFY_CLI_S is a failed verify, not an error of the harness."""
    try:
        return site.cli("verify", timeout_s=VERIFY_CLI_S)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, 124, "", f"site verify did not end in {VERIFY_CLI_S:.0f} s")
