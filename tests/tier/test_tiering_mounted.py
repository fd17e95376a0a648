"""Tiering through a real mount: `awsomefsd dev` (a separate process) with [tier] pointing at the
S3 test server, and the CLI as an operator runs it. A file evicted reads back byte for byte from
the store with the kernel's page cache dropped, `tier status` counts it, recall brings it back, and
the moves keep the file's times (what `cp -p`, tar and make rely on)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.fs.xattr_ops import TIER_XATTR
from tests.mounted.conftest import running_daemon
from tests.support.daemon import Daemon, run_cli, wait_for
from tests.support.s3 import TEST_KEY_ID, TEST_SECRET, S3Server

TIER_ENV = {"AWSOMEFS_TIER__PREFIX": "mounted/", "AWSOMEFS_TIER__OBJECT_BYTES": "4M",
            "AWSOMEFS_TIER__MEMORY_CACHE_BYTES": "0", "AWSOMEFS_TIER__RECALL_READS": "0",
            "AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET}
"""The daemon's [tier] (and the CLI's, as an operator's configuration file gives both)."""


@pytest.fixture(scope="module")
def daemon(s3: S3Server) -> Iterator[Daemon]:
    TIER_ENV.update({"AWSOMEFS_TIER__ENDPOINT": s3.endpoint, "AWSOMEFS_TIER__BUCKET": s3.bucket})
    with running_daemon("awsomefs-tier-", env=TIER_ENV) as d:
        yield d


def drop_page_cache() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def placement(path: Path) -> dict[str, int]:
    state: dict[str, int] = json.loads(os.getxattr(path, TIER_XATTR.decode()))
    return state


def test_evict_and_recall_move_a_file_and_keep_its_bytes_and_times(daemon: Daemon, s3: S3Server) -> None:
    data = random.Random(7).randbytes(10 * (1 << 20) + 1234)  # three objects of 4 MiB
    path = daemon.mount / "cold.bin"
    path.write_bytes(data)
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    before = path.stat()
    evicted = run_cli("tier", "evict", str(path), "--state", str(daemon.state))
    assert evicted.returncode == 0, evicted.stderr
    assert "10.0 MiB in the object store, 0.0 MiB on the device" in evicted.stdout
    assert placement(path)["device_bytes"] == 0
    assert len([k for k in s3.stored() if k.startswith("mounted/")]) == 3
    drop_page_cache()
    assert path.read_bytes() == data
    after = path.stat()
    assert (after.st_mtime_ns, after.st_atime_ns, after.st_size, after.st_blocks) == (
        before.st_mtime_ns, before.st_atime_ns, before.st_size, before.st_blocks)
    def tier_status() -> dict[str, Any]:
        info: dict[str, Any] = json.loads(run_cli("tier", "status", "--json", "--state", str(daemon.state),
                                                  env=TIER_ENV).stdout)
        return info

    # status reads the metadata as committed: the local log commits once a second
    wait_for(lambda: tier_status()["objects"] == 3, 10, "the evict committed")
    info = tier_status()
    assert info["objects"] == 3 and info["tiered_bytes"] == len(data) // 4096 * 4096 + 4096
    assert info["device_size_bytes"] == 8 << 30 and 0 < info["device_free_bytes"] < 8 << 30
    text = run_cli("tier", "status", "--state", str(daemon.state), env=TIER_ENV).stdout
    rows = {line[:31].strip(): line[31:].strip() for line in text.splitlines()}
    assert rows["file data in the store"] == "10.0 MiB" and rows["store reachable"] == "yes", text
    assert rows["this node uploaded"] == "10.0 MiB in 3 objects", text
    overview = run_cli("status", "--state", str(daemon.state), env=TIER_ENV).stdout
    assert "of file data in 3 objects" in overview, overview
    recalled = run_cli("tier", "recall", str(daemon.mount), "--state", str(daemon.state))
    assert recalled.returncode == 0, recalled.stderr
    assert f"{path}: 0.0 MiB in the object store, 10.0 MiB on the device" in recalled.stdout
    drop_page_cache()
    assert path.read_bytes() == data and path.stat().st_mtime_ns == before.st_mtime_ns


def test_the_tier_attribute_is_not_listed_and_bad_requests_get_one_line(daemon: Daemon) -> None:
    path = daemon.mount / "plain"
    path.write_bytes(b"x" * 5000)
    assert TIER_XATTR.decode() not in os.listxattr(path)
    with pytest.raises(OSError) as refused:
        os.setxattr(path, TIER_XATTR.decode(), b"shred")
    assert refused.value.errno == 22
    missing = run_cli("tier", "evict", str(daemon.mount / "nope"), "--state", str(daemon.state))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and len(missing.stderr.splitlines()) == 1
    usage = run_cli("tier", "evict", "--state", str(daemon.state))
    assert usage.returncode == 1 and "needs the files" in usage.stderr


@pytest.mark.parametrize(("env", "expected"), [
    ({"AWSOMEFS_TIER__ENDPOINT": "http://127.0.0.1:9", "AWSOMEFS_TIER__BUCKET": "b"}, "no object store credentials"),
    ({"AWSOMEFS_TIER__ENDPOINT": "ftp://store", "AWSOMEFS_TIER__BUCKET": "b",
      "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}, "expected http(s)://host[:port]"),
    ({"AWSOMEFS_TIER__ENDPOINT": "http://127.0.0.1:9", "AWSOMEFS_TIER__BUCKET": "b",
      "AWSOMEFS_TIER__OBJECT_BYTES": "1G"}, "object_bytes"),
])
def test_a_tier_configuration_that_cannot_work_stops_the_start_in_one_line(
        tmp_path: Path, env: dict[str, str], expected: str) -> None:
    clean = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    d = Daemon(tmp_path / "state", tmp_path / "mnt", size="1G", env={**clean, **env})
    with pytest.raises(RuntimeError) as failed:
        d.start()
    output = d.logs()
    assert expected in output and "Traceback" not in output, output
    assert "did not mount" in str(failed.value) and d.proc is not None and d.proc.returncode not in (0, None)
    error_lines = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and error_lines[0].startswith("awsomefsd: error: "), output
    assert not (tmp_path / "state" / "device.img").exists(), "bad settings formatted an image"


def test_real_programs_on_tiered_data_see_the_same_bytes_and_times(daemon: Daemon, tmp_path: Path) -> None:
    """tar, sqlite3 and rsync on a tree whose data is in the object store (page cache dropped):
    tar compares every byte and mtime with its archive, sqlite3 checks and changes a database in
    place (writes that land inside tiered blocks), rsync --checksum finds nothing to copy."""
    source = tmp_path / "src"
    rng = random.Random(11)
    for k in range(12):
        sub = source / f"d{k % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{k}").write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
        os.utime(sub / f"f{k}", ns=(1_400_000_000_000_000_000 + k, 1_400_000_000_000_000_000 + k * 1000))
    with sqlite3.connect(source / "db.sqlite") as db:
        db.execute("create table t (k integer primary key, v blob)")
        db.executemany("insert into t values (?, ?)", [(i, rng.randbytes(500)) for i in range(2000)])
    archive = tmp_path / "tree.tar"
    subprocess.run(["tar", "-C", str(source), "-cf", str(archive), "."], check=True)
    tree = daemon.mount / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "-xpf", str(archive)], check=True)
    moved = run_cli("tier", "evict", str(tree), "--state", str(daemon.state))
    assert moved.returncode == 0 and moved.stdout.count("\n") == 13, moved.stdout + moved.stderr
    assert all(placement(p)["device_bytes"] == 0 for p in tree.rglob("*") if p.is_file())
    drop_page_cache()
    compared = subprocess.run(["tar", "-C", str(tree), "--compare", "-f", str(archive)], capture_output=True,
                              text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    checked = subprocess.run(["sqlite3", str(tree / "db.sqlite"), "pragma integrity_check;"], capture_output=True,
                             text=True, check=True)
    assert checked.stdout.strip() == "ok"
    subprocess.run(["sqlite3", str(tree / "db.sqlite"), "update t set v = zeroblob(500) where k % 7 = 0;"],
                   check=True)
    with sqlite3.connect(source / "db.sqlite") as db:
        db.execute("update t set v = zeroblob(500) where k % 7 = 0")
    drop_page_cache()
    synced = subprocess.run(["rsync", "-a", "--checksum", "--dry-run", "--itemize-changes", f"{source}/", f"{tree}/"],
                            capture_output=True, text=True, check=True)
    transfers = [line for line in synced.stdout.splitlines() if line.startswith(">")]
    assert transfers == [], synced.stdout  # same contents everywhere (the database's mtime may differ)
    with sqlite3.connect(tree / "db.sqlite") as db:
        assert db.execute("select count(*) from t where v = zeroblob(500)").fetchone()[0] == 286


@pytest.mark.parametrize("action", ["evict", "recall"])
def test_tier_commands_on_another_file_system_say_so_and_store_nothing(tmp_path: Path, action: str) -> None:
    """ext4 takes trusted.* attributes from root: the command must not leave one there (a later
    `cp -a` onto AwsomeFS would carry it), nor fall over on what it reads back."""
    elsewhere = Path("/var/tmp") / f"awsomefs-not-a-mount-{os.getpid()}-{action}"
    elsewhere.write_bytes(b"data")
    try:
        done = run_cli("tier", action, str(elsewhere))
        assert done.returncode == 1
        assert done.stderr.strip() == f"{elsewhere}: not on an awsomefs mount, or no object store configured ([tier])"
        assert "Traceback" not in done.stderr
        assert TIER_XATTR.decode() not in os.listxattr(elsewhere)
    finally:
        elsewhere.unlink()
