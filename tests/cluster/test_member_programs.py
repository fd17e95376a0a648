"""Real programs on a cluster member, their results compared with the same program's on ext4 (the
host filesystem under the test's tmp_path) and read back on another member: tar -x, rsync -a and
cp -a of a source-like tree, SQLite in WAL mode from two processes, git init/add/commit. What one
member's programs closed is what the other member's open reads (close-to-open), byte for byte,
with modes and times, through the paths a member takes for a directory another node holds (a
look or a hand-over) and for one nobody holds any more (a read point from the leader's lease,
design note 153)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from awsomefsd.repl.digest import TreeDigest, differences, digest_tree
from tests.support import seeds
from tests.support.cluster import Cluster
from tests.support.daemon import wait_for
from tests.support.monitoring import counter_value
from tests.support.sqlite_wal import run_wal_writers
from tests.support.trees import make_source_tree

SEED = seeds.fresh_one("member-programs")
FILES = 120
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1"}


def listing(root: Path, *, ns: bool) -> TreeDigest:
    """Every entry's type, mode, owner, mtime, size, content, link target, xattrs and hard links."""
    return digest_tree(root, mtime_resolution_ns=1 if ns else 10**9)


def git(where: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(where), *args], check=True, capture_output=True, text=True,
                          env=GIT_ENV, timeout=120).stdout


def test_real_programs_on_a_member_match_ext4_and_read_the_same_on_another(cluster3: Cluster,
                                                                           tmp_path: Path) -> None:
    for tool in ("tar", "rsync", "git"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (scripts/install.sh test installs it)")
    nodes = cluster3.form(3)
    leader = cluster3.leader(nodes)
    a, b = [n for n in nodes if n is not leader]
    source = tmp_path / "src"
    source.mkdir()
    make_source_tree(source, FILES, SEED)
    tarball = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], check=True, capture_output=True).stdout

    want: dict[str, TreeDigest] = {}
    for name, command in (("tar", ["tar", "-xpf", "-", "-C"]), ("rsync", ["rsync", "-a", f"{source}/."]),
                          ("cp", ["cp", "-a", f"{source}/."])):
        on_ext4 = tmp_path / f"ext4-{name}"
        on_ext4.mkdir()
        on_a = a.mount / name
        on_a.mkdir()
        for target in (on_ext4, on_a):
            subprocess.run([*command, str(target)], input=tarball if name == "tar" else None, check=True,
                           capture_output=True, timeout=300)
        ns = name != "tar"  # tar's archive keeps whole seconds
        want[name] = listing(on_ext4, ns=ns)
        assert differences(want[name], listing(on_a, ns=ns)) == [], f"{name} on member {a.node_id}"

    outcome = run_wal_writers(a.mount / "wal.db", 300, autocheckpoint=16, timeout_s=300)
    assert outcome.ok, outcome.describe()
    # The other member: what a's programs closed, whether a still holds its directories (b's
    # looks and listings go to a, or take them over) or gave them back after being idle (b reads
    # at the leader's read point).
    asked = counter_value(b.scrape(), "awsomefs_raft_read_points_asked")
    for name, digest in want.items():
        assert differences(digest, listing(b.mount / name, ns=name != "tar")) == [], f"{name} read on {b.node_id}"
    db = sqlite3.connect(b.mount / "wal.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT n FROM counter").fetchone()[0] == outcome.expected
        assert db.execute("SELECT count(*) FROM rows").fetchone()[0] == outcome.expected
    finally:
        db.close()
    git(a.mount / "tar", "init", "-q")
    git(a.mount / "tar", "add", "-A")
    git(a.mount / "tar", "commit", "-q", "-m", "the tree")
    git(b.mount / "tar", "fsck", "--strict", "--no-progress")
    assert git(b.mount / "tar", "log", "--format=%s") == "the tree\n"
    assert git(b.mount / "tar", "status", "--porcelain") == "", "b sees a's tree as a's commit left it"
    if b is not cluster3.leader(nodes):  # (a leader reads from its own lease)
        wait_for(lambda: counter_value(b.scrape(), "awsomefs_raft_read_points_asked") > asked, 30,
                 "b's reads asking the leader's read point")
