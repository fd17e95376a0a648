"""Two sites as users run them: two `awsomefsd` daemons, each on its own image, each in a network
namespace of its own, with the WAN proxy (tests/support/wan.py) between them in a third; every
byte between the sites goes through it (each site advertises the proxy's address). The link is
paired with the real CLI (`site link`), and both trees are compared with `site verify` and, file
by file, through the two mounts.

Covered here: pairing and the initial sync both ways; a partition with writes on both sides, then
the heal; kill -9 of a site while it is sent to, and its restart; edit against edit (the loser kept
in /.conflicts on both sites and listed); concurrent moves that would make a cycle; a wrong or
replaced token, and a second link, refused in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from awsomefsd.devcluster.members import wait_for
from awsomefsd.devcluster.network import Namespace, PrivateNetwork, available
from tests.support.daemon import REPO, Daemon, run_cli

pytestmark = pytest.mark.skipif(available() is not None, reason=f"network namespaces: {available()}")

PORT_A, PORT_B = 19450, 19460
DELAY_MS = 25
SYNC_DEADLINE_S = 60.0


@dataclass
class Site:
    name: str
    daemon: Daemon
    namespace: Namespace

    @property
    def mount(self) -> Path:
        return self.daemon.mount

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_cli("site", *args, "--state", str(self.daemon.state), timeout_s=timeout_s)

    def status(self) -> dict[str, object]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        result: dict[str, object] = json.loads(done.stdout)
        return result


class Wan:
    """The proxies between the sites, one per listener, in their own namespace."""

    def __init__(self, namespace: Namespace, targets: list[tuple[int, str]]) -> None:
        self.procs = []
        for port, upstream in targets:
            proc = namespace.popen([sys.executable, "-m", "tests.support.wan", namespace.address, upstream,
                                    "--port", str(port), "--delay-ms", str(DELAY_MS)],
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


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Site, Site, Wan]]:
    with PrivateNetwork(3) as network:
        ns_a, ns_b, ns_wan = network.nodes
        wan = Wan(ns_wan, [(PORT_A, f"{ns_a.address}:{PORT_A}"), (PORT_A + 1, f"{ns_a.address}:{PORT_A + 1}"),
                           (PORT_B, f"{ns_b.address}:{PORT_B}"), (PORT_B + 1, f"{ns_b.address}:{PORT_B + 1}")])
        made = []
        try:
            for name, ns, port in (("a", ns_a, PORT_A), ("b", ns_b, PORT_B)):
                env = {"AWSOMEFS_SITE__LISTEN": f"{ns.address}:{port}",
                       "AWSOMEFS_SITE__ADVERTISE": json.dumps([f"{ns_wan.address}:{port}"])}
                (tmp_path / f"m{name}").mkdir()
                daemon = Daemon(tmp_path / f"s{name}", tmp_path / f"m{name}", env=env,
                                prefix=["nsenter", f"--net=/run/netns/{ns.name}", "--"])
                made.append(Site(name, daemon.start(), ns))
            yield made[0], made[1], wan
        finally:
            for site in made:
                site.daemon.stop_hard()


def link(a: Site, b: Site) -> None:
    token = a.cli("link")
    assert token.returncode == 0, token.stderr
    linked = b.cli("link", token.stdout.strip())
    assert linked.returncode == 0, linked.stderr + a.daemon.logs()[-3000:]


def converged(a: Site, b: Site) -> bool:
    done = a.cli("verify")
    return done.returncode == 0


def wait_converged(a: Site, b: Site) -> None:
    try:
        wait_for(lambda: converged(a, b), SYNC_DEADLINE_S, "both sites to hold the same tree", interval_s=0.5)
    except TimeoutError:
        for site in (a, b):
            (site.daemon.state / "daemon.log").write_text(site.daemon.logs())
        raise AssertionError(a.cli("verify").stdout[:3000] + "\n--- a ---\n" + a.daemon.logs()[-3000:]
                             + "\n--- b ---\n" + b.daemon.logs()[-3000:]
                             + f"\n(whole logs: {a.daemon.state}/daemon.log, {b.daemon.state}/daemon.log)") from None


def test_two_sites_pair_sync_both_ways_and_keep_every_conflict(sites: tuple[Site, Site, Wan]) -> None:
    a, b, _wan = sites
    (a.mount / "docs").mkdir()
    (a.mount / "docs" / "plan.txt").write_text("from a\n")
    (a.mount / "big.bin").write_bytes(os.urandom(5 << 20))  # more than one chunk of a push
    os.setxattr(a.mount / "docs" / "plan.txt", "user.owner", b"team-a")
    (b.mount / "notes.txt").write_text("from b\n")
    link(a, b)
    wait_converged(a, b)
    assert (b.mount / "big.bin").read_bytes() == (a.mount / "big.bin").read_bytes()
    assert os.getxattr(b.mount / "docs" / "plan.txt", "user.owner") == b"team-a"
    assert (a.mount / "notes.txt").read_text() == "from b\n"

    # edit against edit: the later write shows on both sites, the other is kept and listed
    (a.mount / "docs" / "plan.txt").write_text("edited on a\n")
    (b.mount / "docs" / "plan.txt").write_text("edited on b, later\n")
    wait_converged(a, b)
    assert (a.mount / "docs" / "plan.txt").read_text() == "edited on b, later\n"
    for site in (a, b):
        kept = [p.read_text() for p in (site.mount / ".conflicts").iterdir()]
        assert kept == ["edited on a\n"], (site.name, kept)
        listed = json.loads(site.cli("conflicts", "--json").stdout)
        assert [(r["kind"], r["open"]) for r in listed] == [("content", True)]
    # moves that would make a cycle: one of them stands, the same on both sites
    (a.mount / "x").mkdir()
    (a.mount / "y").mkdir()
    wait_converged(a, b)
    os.rename(a.mount / "x", a.mount / "y" / "x")
    os.rename(b.mount / "y", b.mount / "x" / "y")
    wait_converged(a, b)
    status = a.status()
    assert status["link_up"] is True and status["open_conflicts"] == 1, status


def test_a_partition_and_a_killed_site_lose_nothing(sites: tuple[Site, Site, Wan]) -> None:
    a, b, wan = sites
    link(a, b)
    wait_converged(a, b)
    wan.cut()
    for i in range(50):
        (a.mount / f"a{i}").write_text(f"a{i}\n")
        (b.mount / f"b{i}").write_text(f"b{i}\n")
    os.rename(a.mount / "a1", a.mount / "a1-renamed")
    os.unlink(b.mount / "b2")
    assert a.cli("verify").returncode != 0, "verify saw no difference during the partition"
    wan.heal()
    wait_converged(a, b)
    # kill -9 of the receiving site while it is sent to; its restart resumes from its cursor
    for i in range(200):
        (a.mount / f"c{i}").write_text(f"c{i}\n")
    b.daemon.kill()
    for i in range(200, 260):
        (a.mount / f"c{i}").write_text(f"c{i}\n")
    b.daemon.stop_hard()
    b.daemon.start()
    wait_converged(a, b)
    names = sorted(p.name for p in b.mount.iterdir() if not p.name.startswith("."))
    assert len(names) == 50 + 49 + 260 and "a1-renamed" in names and "b2" not in names
    assert all((b.mount / f"c{i}").read_text() == f"c{i}\n" for i in range(260))


def test_a_wrong_or_replaced_token_and_a_second_link_are_refused(sites: tuple[Site, Site, Wan]) -> None:
    a, b, _wan = sites
    first = a.cli("link").stdout.strip()
    second = a.cli("link").stdout.strip()  # replaces the first
    refused = b.cli("link", first)
    assert refused.returncode == 1 and "wrong or was replaced" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    damaged = b.cli("link", second[:-3] + "AAA")
    assert damaged.returncode == 1 and "damaged" in damaged.stderr, damaged.stderr
    assert b.cli("link", second).returncode == 0
    again = b.cli("link", second)
    assert again.returncode == 1 and "linked already" in again.stderr, again.stderr
    assert a.cli("unlink").returncode == 0
    assert a.status()["linked"] is False
