"""Two sites as users run them: two `awsomefsd` daemons, each on its own image, each in a network
namespace of its own, with the WAN proxy between them in a third (tests/support/sites.py); every
byte between the sites goes through it. The link is paired with the real CLI (`site link`), and
both trees are compared with `site verify` and, file by file, through the two mounts.

Covered here: pairing and the initial sync both ways; a partition with writes on both sides, then
the heal; kill -9 of a site while it is sent to, and its restart; a site paused (SIGSTOP) while
it is sent to; edit against edit (the loser kept
in /.conflicts on both sites and listed); concurrent moves that would make a cycle; a wrong or
replaced token, and a second link, refused in one line; an operator resolving a content conflict
and a move conflict for the loser, and a skipped move (a cycle) for the winner (`site conflicts
resolve`), seen on both sites; real programs (tar, cp -a, git, sqlite3) on both sites at once,
their results on the other site compared with the same program's on ext4.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.cli.devcluster.network import available
from awsomefsd.repl.digest import differences, digest_tree
from tests.support import seeds
from tests.support.daemon import REPO, run_cli, wait_for
from tests.support.sites import SYNC_DEADLINE_S, Site, Wan, create_volume, link, two_sites, wait_converged
from tests.support.trees import make_source_tree

pytestmark = pytest.mark.skipif(available() is not None, reason=f"network namespaces: {available()}")
SEED = seeds.fresh_one("sites-daemons")  # the source tree's shape, fresh each run (tests/support/seeds.py)
PAUSE_S = 5.0
"""How long a site stays stopped: past the link's heartbeat (2 s), well inside a call's time-out."""
GIT = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@example.invalid", "GIT_COMMITTER_NAME": "a",
       "GIT_COMMITTER_EMAIL": "a@example.invalid", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Site, Site, Wan]]:
    with two_sites(tmp_path) as made:
        yield made


def standing(site: Site) -> list[dict[str, Any]]:
    """The site's conflicts (`conflicts --json`) but those closed as their loser's own site's later
    version superseded it (a truncate's, say, by the write after it)."""
    return [r for r in json.loads(site.cli("conflicts", "--json").stdout)
            if r["open"] or "superseded_by" not in r]


def test_two_sites_pair_sync_both_ways_and_keep_every_conflict(sites: tuple[Site, Site, Wan]) -> None:
    a, b, wan = sites
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

    # edit against edit: the later write shows on both sites, the other is kept and listed. The
    # link is cut meanwhile, so neither site hears of the other's truncate before its own write
    # (a write_text is two versions, and which of a's arrive before b's write is timing). A
    # truncate that ships apart from the write after it (likelier since a small file's close may
    # leave its data to the next batch, fs/batch.py) is a conflict for a moment: listed, closed,
    # as superseded by that write. The conflicts that stand are the ones looked at.
    wan.cut()
    (a.mount / "docs" / "plan.txt").write_text("edited on a\n")
    (b.mount / "docs" / "plan.txt").write_text("edited on b, later\n")
    wan.heal()
    wait_converged(a, b)
    assert (a.mount / "docs" / "plan.txt").read_text() == "edited on b, later\n"
    for site in (a, b):
        kept = [p.read_text() for p in (site.mount / ".conflicts").iterdir()]
        assert kept == ["edited on a\n"], (site.name, kept)
        listed = standing(site)
        assert [(r["kind"], r["open"], r["path"]) for r in listed] == [("content", True, "/docs/plan.txt")]
    # the operator on a keeps the loser: it is the file's content on both sites, the copies go
    (content,) = standing(a)
    assert content["loser_size"] == len("edited on a\n") and content["winner_size"] == len("edited on b, later\n")
    assert content["id"] in a.cli("conflicts").stdout
    missing = a.cli("conflicts", "resolve", "0123456789ab", "--keep", "loser")
    assert missing.returncode != 0 and "no conflict" in missing.stderr and "Traceback" not in missing.stderr
    done = a.cli("conflicts", "resolve", content["id"], "--keep", "loser")
    assert done.returncode == 0, done.stderr
    wait_converged(a, b)
    for site in (a, b):
        assert (site.mount / "docs" / "plan.txt").read_text() == "edited on a\n", site.name
        assert list((site.mount / ".conflicts").iterdir()) == [], site.name
        (record,) = [r for r in json.loads(site.cli("conflicts", "--json").stdout) if r["id"] == content["id"]]
        assert not record["open"] and record["kept"] == "loser", (site.name, record)
    again = b.cli("conflicts", "resolve", content["id"], "--keep", "winner")
    assert again.returncode != 0 and "settled already" in again.stderr, again.stderr
    # moves that would make a cycle: one of them stands, the same on both sites
    (a.mount / "x").mkdir()
    (a.mount / "y").mkdir()
    wait_converged(a, b)
    os.rename(a.mount / "x", a.mount / "y" / "x")
    os.rename(b.mount / "y", b.mount / "x" / "y")
    wait_converged(a, b)
    assert sorted(p.name for p in a.mount.iterdir() if p.name in ("x", "y")) in (["x"], ["y"])
    (skipped,) = [r for r in json.loads(a.cli("conflicts", "--json").stdout) if r["open"]]
    assert skipped["kind"] == "skipped-move"
    assert [r["id"] for r in json.loads(b.cli("conflicts", "--json").stdout) if r["open"]] == [skipped["id"]]
    cycle = a.cli("conflicts", "resolve", skipped["id"], "--keep", "loser")
    assert cycle.returncode != 0 and "inside itself" in cycle.stderr, cycle.stderr
    assert a.cli("conflicts", "resolve", skipped["id"], "--keep", "winner").returncode == 0
    # rename against rename of one file: the later stands; the operator on b keeps the other
    wan.cut()
    os.rename(a.mount / "notes.txt", a.mount / "notes-a.txt")
    os.rename(b.mount / "notes.txt", b.mount / "notes-b.txt")
    wan.heal()
    wait_converged(a, b)
    status = a.status()
    assert status["link_up"] is True and status["open_conflicts"] == 1, status
    (move,) = [r for r in json.loads(b.cli("conflicts", "--json").stdout) if r["open"]]
    assert move["kind"] == "move" and {move["path"], move["loser_path"]} == {"/notes-a.txt", "/notes-b.txt"}
    both = b.cli("conflicts", "resolve", move["id"], "--keep", "both")
    assert both.returncode != 0 and "one outcome" in both.stderr, both.stderr
    assert b.cli("conflicts", "resolve", move["id"], "--keep", "loser").returncode == 0
    wait_converged(a, b)
    for site in (a, b):
        assert (site.mount / move["loser_path"].lstrip("/")).read_text() == "from b\n", site.name
        assert not (site.mount / move["path"].lstrip("/")).exists(), site.name
    assert a.status()["open_conflicts"] == b.status()["open_conflicts"] == 0
    overall = run_cli("status", "--state", str(a.daemon.state))
    assert "site link" in overall.stdout and "up;" in overall.stdout, overall.stdout


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
    # a paused site (SIGSTOP: a VM frozen, a process stopped) wakes up and goes on: the push that
    # hung on it completes, nothing is applied twice, and its own writes after it woke travel
    assert b.daemon.proc is not None
    b.daemon.proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(100):
            (a.mount / f"p{i}").write_text(f"p{i}\n")
        wait_for(lambda: a.status()["outbound"]["pending_operations"] > 0, 10,  # type: ignore[index]
                 "a to have operations the paused site has not taken")
        time.sleep(PAUSE_S)  # the pause itself: nothing to wait for
    finally:
        b.daemon.proc.send_signal(signal.SIGCONT)
    (b.mount / "after-the-pause").write_text("b woke up\n")
    wait_converged(a, b)
    assert b.daemon.proc.poll() is None, b.daemon.logs()[-3000:]
    assert (a.mount / "after-the-pause").read_text() == "b woke up\n"
    assert all((b.mount / f"p{i}").read_text() == f"p{i}\n" for i in range(100))
    for site in (a, b):  # what the replicated tree keeps of deleted files is no fsck finding
        site.daemon.stop()
        checked = run_cli("fsck", "--state", str(site.daemon.state), "--device", str(site.daemon.state / "device.img"))
        assert checked.returncode == 0, checked.stdout + checked.stderr


_PAIR_HOSTILE = """
import json, sys, grpc
from awsomefsd.cluster.ca import cluster_dns_name
from awsomefsd.cluster.join_service import fetch_cluster_ca
from awsomefsd.config.addresses import join_host_port, split_host_port
from awsomefsd.cluster.token import LinkToken
from awsomefsd.crdt import wire
token = LinkToken.parse(sys.argv[1])
host, port = split_host_port(token.seeds[0])
address = join_host_port(host, port + 1)
ca = fetch_cluster_ca(address, token.ca_fingerprint)
from cryptography.hazmat.primitives import serialization
name = cluster_dns_name(token.cluster_id)
channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.public_bytes(serialization.Encoding.PEM)),
                              options=[("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)])
pair = channel.unary_unary("/awsomefs.site.v1.Pairing/Pair")
for header in json.loads(sys.argv[2]):
    try:
        pair(wire.frame(header), timeout=20)
        print("OK")
    except grpc.RpcError as exc:
        print(exc.code().name)
"""
_SQUAT = """
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
sock = socket.socket()
sock.bind((host, int(port)))
sock.listen()
print("bound", flush=True)
sys.stdin.read()
"""


HOSTILE_PAIRINGS = [
    {"site": 123, "ca_pem": "x", "nonce": "00", "proof": "00", "addresses": []},
    {"site": "not a uuid", "ca_pem": "x", "nonce": "00", "proof": "00", "addresses": []},
    {"site": "8c4f1b52-3e8e-4a3c-9d4e-0c8a7f3b2a11", "ca_pem": ["x"], "nonce": "00", "proof": "00", "addresses": []},
    {"site": "8c4f1b52-3e8e-4a3c-9d4e-0c8a7f3b2a11", "ca_pem": "x", "nonce": 7, "proof": "00", "addresses": []},
    {"site": "8c4f1b52-3e8e-4a3c-9d4e-0c8a7f3b2a11", "ca_pem": "x", "nonce": "zz", "proof": "00", "addresses": []},
    {"site": "8c4f1b52-3e8e-4a3c-9d4e-0c8a7f3b2a11", "ca_pem": "x", "nonce": "00", "proof": "00",
     "addresses": "10.0.0.1:9450"},
    {"site": "8c4f1b52-3e8e-4a3c-9d4e-0c8a7f3b2a11", "ca_pem": "x", "nonce": "00", "proof": "00",
     "addresses": [{"host": "x"}]},
    {"site": "8c4f1b52-3e8e-4a3c-9d4e-0c8a7f3b2a11", "ca_pem": "not a certificate", "nonce": "00", "proof": "00",
     "addresses": ["10.0.0.1:9450"]},
    {},
]


def test_a_wrong_or_replaced_token_and_a_second_link_are_refused(sites: tuple[Site, Site, Wan]) -> None:
    """And an unlink tells the other site, which unlinks too; one that cannot be told is named."""
    a, b, wan = sites
    first = a.cli("link").stdout.strip()
    # hostile pairing calls while the invitation is open: each is refused as malformed (never
    # INTERNAL, never a traceback), and the invitation still pairs afterwards
    answers = b.namespace.run([sys.executable, "-c", _PAIR_HOSTILE, first, json.dumps(HOSTILE_PAIRINGS)],
                              capture_output=True, text=True, cwd=str(REPO), timeout=120, check=False,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert answers.returncode == 0, answers.stderr
    assert answers.stdout.split() == ["INVALID_ARGUMENT"] * len(HOSTILE_PAIRINGS), answers.stdout
    assert "Traceback" not in a.daemon.logs()
    second = a.cli("link").stdout.strip()  # replaces the first
    refused = b.cli("link", first)
    assert refused.returncode == 1 and "wrong or was replaced" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    damaged = b.cli("link", second[:-3] + "AAA")
    assert damaged.returncode == 1 and "damaged" in damaged.stderr, damaged.stderr
    # a's link port taken by another process after a started (checked free then): linking still
    # works, a says why it cannot listen, and listens once the port is free again
    listen = a.daemon.env["AWSOMEFS_SITE__LISTEN"]
    squatter = a.namespace.popen([sys.executable, "-c", _SQUAT, listen], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "bound"
        assert b.cli("link", second).returncode == 0
        wait_for(lambda: "cannot listen on" in a.daemon.logs(), 60, "a to say its link port is taken")
    finally:
        squatter.communicate("", timeout=30)
    (b.mount / "to-a").write_text("arrives once a listens")
    wait_for(lambda: (a.mount / "to-a").exists(), 120, "b's file to reach a once a's link port is free")
    assert "Traceback" not in a.daemon.logs()
    again = b.cli("link", second)
    assert again.returncode == 1 and "linked already" in again.stderr, again.stderr
    told = a.cli("unlink")
    assert told.returncode == 0 and "the other site was told" in told.stdout, told.stdout + told.stderr
    assert a.status()["linked"] is False
    wait_for(lambda: b.status()["linked"] is False, 60, "b to unlink when a tells it")
    assert "the other site unlinked" in b.daemon.logs()
    # b can pair again at once, without an unlink of its own; with the link cut, a's unlink
    # cannot tell b, says so, and b stays linked until it is unlinked there too
    assert b.cli("link", a.cli("link").stdout.strip()).returncode == 0
    wan.cut()
    try:
        untold = a.cli("unlink")
        assert untold.returncode == 0 and "could not be told" in untold.stdout, untold.stdout + untold.stderr
        assert "Traceback" not in untold.stdout + untold.stderr
        assert b.status()["linked"] is True
    finally:
        wan.heal()
    assert b.cli("unlink").returncode == 0 and b.status()["linked"] is False


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **GIT})
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def test_real_programs_on_both_sites_arrive_as_they_left(sites: tuple[Site, Site, Wan], tmp_path: Path) -> None:
    """tar -xp on one site while cp -a runs on the other, then a git repository and an SQLite
    database (WAL mode) made on the first: on both sites each tree is what the same program made
    on ext4 (content, modes, hard links, symlinks, xattrs; times to the nanosecond where the
    program keeps them), and git fsck and SQLite's integrity check pass on the site that did not
    write them. Replication applies a tree of operations; a program's result is what users see."""
    a, b, _wan = sites
    link(a, b)
    wait_converged(a, b)
    source = tmp_path / "src"
    source.mkdir()
    make_source_tree(source, 200, SEED)
    tarball = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], check=True, capture_output=True).stdout
    on_ext4 = {"tar": tmp_path / "tar", "copy": tmp_path / "copy"}
    for where in on_ext4.values():
        where.mkdir()
    subprocess.run(["tar", "-C", str(on_ext4["tar"]), "-xpf", "-"], input=tarball, check=True)
    _run("cp", "-a", f"{source}/.", on_ext4["copy"])
    (a.mount / "tar").mkdir()
    (b.mount / "copy").mkdir()
    untar = subprocess.Popen(["tar", "-C", str(a.mount / "tar"), "-xpf", "-"], stdin=subprocess.PIPE)
    copy = subprocess.Popen(["cp", "-a", f"{source}/.", str(b.mount / "copy")])
    untar.communicate(tarball, timeout=300)
    assert untar.returncode == 0 and copy.wait(timeout=300) == 0

    repo = a.mount / "repo"
    _run("git", "init", "-q", repo)
    for i in range(5):
        (repo / f"file{i}.txt").write_text(f"revision {i}\n" * (i + 1) * 100)
        _run("git", "add", "-A", cwd=repo)
        _run("git", "commit", "-q", "-m", f"change {i}", cwd=repo)
    _run("git", "gc", "-q", cwd=repo)  # packs, deletes loose objects, rewrites refs: renames and unlinks
    head = _run("git", "rev-parse", "HEAD", cwd=repo)
    _run("sqlite3", a.mount / "data.db", "PRAGMA journal_mode=WAL; CREATE TABLE t(x INTEGER, y TEXT);"
         " WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)"
         " INSERT INTO t SELECT i, hex(randomblob(40)) FROM n; UPDATE t SET x = -x WHERE x % 7 = 0;")
    want_rows = _run("sqlite3", a.mount / "data.db", "SELECT count(*), sum(x), sum(length(y)) FROM t;")
    wait_converged(a, b)

    for site in (a, b):
        assert differences(digest_tree(on_ext4["tar"], mtime_resolution_ns=10**9),
                           digest_tree(site.mount / "tar", mtime_resolution_ns=10**9)) == [], site.name
        assert differences(digest_tree(on_ext4["copy"]), digest_tree(site.mount / "copy")) == [], site.name
    assert _run("git", "-C", b.mount / "repo", "rev-parse", "HEAD") == head
    _run("git", "-C", b.mount / "repo", "fsck", "--strict", "--no-progress")
    assert len(_run("git", "-C", b.mount / "repo", "log", "--oneline").splitlines()) == 5
    assert _run("sqlite3", b.mount / "data.db", "PRAGMA integrity_check;") == "ok\n"
    assert _run("sqlite3", b.mount / "data.db", "SELECT count(*), sum(x), sum(length(y)) FROM t;") == want_rows


def test_a_name_given_back_after_a_conflict_is_what_the_kernel_shows(sites: tuple[Site, Site, Wan]) -> None:
    """Two creates of one name: both sites show one under the name, the other under a conflict
    name. Renaming the one that holds the name gives the other its name back, a change the
    rename's caller did not ask for: the mount's kernel, which caches names for a minute on a
    single node, must drop the conflict name at once."""
    a, b, wan = sites
    link(a, b)
    wait_converged(a, b)
    wan.cut()
    (a.mount / "same").write_text("made on a\n")
    (b.mount / "same").write_text("made on b\n")
    wan.heal()
    wait_converged(a, b)
    (conflict,) = [p for p in a.mount.iterdir() if p.name.startswith("same.conflict-")]
    os.stat(conflict)  # now in a's kernel cache
    held = (a.mount / "same").read_text()
    os.rename(a.mount / "same", a.mount / "renamed")
    wait_for(lambda: not conflict.exists(), 5, f"{conflict.name} gone from a's kernel cache (it caches names 60 s)")
    assert {(a.mount / "same").read_text(), (a.mount / "renamed").read_text()} == {"made on a\n", "made on b\n"}
    assert (a.mount / "renamed").read_text() == held
    wait_converged(a, b)
    assert sorted(p.name for p in b.mount.iterdir() if not p.name.startswith(".")) == ["renamed", "same"]


def test_a_large_file_changed_in_a_few_places_travels_as_its_changes(sites: tuple[Site, Site, Wan]) -> None:
    """Delta transfer (design note 50): a 16 MiB file, then 4 KiB rewritten in its middle and
    100 KB appended, reaches the other site as little more than the change, whichever site
    changes it (edited by turns at both sites, each change goes as a delta), and both sites hold
    the same bytes. A change at each site at once (an edit conflict) still keeps both versions
    whole. Small writes that have the file compacted still travel as themselves."""
    a, b, _ = sites
    link(a, b)
    data = bytearray(os.urandom(16 << 20))
    (a.mount / "disk.img").write_bytes(data)
    wait_converged(a, b)

    def change(site: Site, offset: int, appended: int) -> None:
        patch = os.urandom(4096)
        tail = os.urandom(appended)
        with open(site.mount / "disk.img", "r+b") as f:
            f.seek(offset)
            f.write(patch)
            f.seek(0, os.SEEK_END)
            f.write(tail)
        data[offset:offset + len(patch)] = patch
        data.extend(tail)

    def shipped(site: Site) -> tuple[int, int]:
        """(bytes sent, bytes of large files named unchanged) so far."""
        outbound = site.status()["outbound"]
        assert isinstance(outbound, dict)
        return outbound["bytes"], outbound["bytes_unchanged"]

    for site, other, offset in ((a, b, 5 << 20), (b, a, (9 << 20) + 123), (a, b, 100)):
        sent, unchanged = shipped(site)
        change(site, offset, 100_000)
        wait_converged(a, b)
        assert (other.mount / "disk.img").read_bytes() == bytes(data), f"{other.name} holds other bytes"
        now_sent, now_unchanged = shipped(site)
        step, kept = now_sent - sent, now_unchanged - unchanged
        assert step < 1 << 20, f"{site.name} sent {step} bytes for a 104 KB change of a 16 MiB file"
        assert kept >= 15 << 20, f"{site.name} named only {kept} bytes as unchanged"

    # small writes at odd offsets: closing the file has it compacted (fs/compactor.py), which
    # copies each MiB around them to fresh blocks; only the writes themselves travel
    # (twice: the first compaction may come before its version ships or after; either way, one
    # of the two versions would differ from the peer's in every compacted MiB)
    sent, _ = shipped(a)
    for round_ in range(2):
        with open(a.mount / "disk.img", "r+b") as f:
            for i in range(16):
                patch = os.urandom(4096)
                offset = i * (1 << 20) + 12_345 + round_ * 300_000
                f.seek(offset)
                f.write(patch)
                data[offset:offset + len(patch)] = patch
        wait_converged(a, b)
        assert (b.mount / "disk.img").read_bytes() == bytes(data), "b holds other bytes"
    step = shipped(a)[0] - sent
    assert step < 1 << 20, f"a sent {step} bytes for 32 writes of 4 KiB (compaction's copies went as changes)"

    # both sites change it at once: the later version wins on both, the other is kept whole
    with open(a.mount / "disk.img", "r+b") as f:
        f.write(b"a" * 4096)
    with open(b.mount / "disk.img", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"b" * 4096)
    wait_converged(a, b)
    shown = (a.mount / "disk.img").read_bytes()
    assert shown == (b.mount / "disk.img").read_bytes()
    assert shown[1 << 20:(1 << 20) + 4096] == b"b" * 4096 and shown[:4096] == bytes(data[:4096]), "b's write won"
    for site in (a, b):
        (kept,) = [p.read_bytes() for p in (site.mount / ".conflicts").iterdir()]
        assert kept[:4096] == b"a" * 4096 and kept[4096:] == bytes(data[4096:]), f"{site.name} kept a's version whole"


def test_a_volume_made_through_csi_replicates_with_its_files_and_its_delete(tmp_path: Path) -> None:
    """Kubernetes' view: a volume created through one site's CSI endpoint appears on the other
    site (its quota, its files both ways, `site verify` comparing it), its snapshot does not, and
    deleting it through CSI removes it on both."""
    import grpc

    from awsomefsd.csi.generated import csi_pb2, csi_pb2_grpc

    def controller(site: Site) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(grpc.insecure_channel(f"unix://{site.csi_socket}"))

    def volume_dirs(site: Site) -> list[Path]:
        return sorted((site.mount / ".volumes").iterdir())

    with two_sites(tmp_path, csi=True) as (a, b, _wan):
        link(a, b)
        volume_id = create_volume(a.csi_socket, "pvc-replicated", 64 << 20)
        (at_a,) = volume_dirs(a)
        payload = os.urandom(3 << 20)
        (at_a / "data.bin").write_bytes(payload)
        wait_for(lambda: len(volume_dirs(b)) == 1 and (volume_dirs(b)[0] / "data.bin").exists()
                 and (volume_dirs(b)[0] / "data.bin").read_bytes() == payload, SYNC_DEADLINE_S,
                 "the volume and its file on the other site")
        (at_b,) = volume_dirs(b)
        listed = controller(b).ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30).entries
        assert [entry.volume.capacity_bytes for entry in listed] == [64 << 20], "its quota came along"
        (at_b / "from-b.txt").write_text("written on b\n")
        wait_for(lambda: (at_a / "from-b.txt").exists() and (at_a / "from-b.txt").read_text() == "written on b\n",
                 SYNC_DEADLINE_S, "b's file in the volume on a")
        controller(a).CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            source_volume_id=volume_id, name="snap-stays-here"), timeout=30)
        wait_converged(a, b)
        assert list((b.mount / ".snapshots").iterdir()) == [], "a snapshot is per site"

        controller(a).DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
            snapshot_id=controller(a).ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=30)
            .entries[0].snapshot.snapshot_id), timeout=30)
        controller(a).DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=30)
        # the kernel's cached listing of /.volumes is invalidated after the reply (daemon/volumes.py)
        wait_for(lambda: volume_dirs(a) == [], 10, "the volume gone here")
        wait_for(lambda: volume_dirs(b) == [], SYNC_DEADLINE_S, "the volume gone on the other site")
        assert list(controller(b).ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30).entries) == []
        wait_converged(a, b)
