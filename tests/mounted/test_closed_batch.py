"""Closed small files' data written together (fs/batch.py, issue 40): a close is answered before
the file's data is written, and what that must not change.

A crash (kill -9) right after a commit must find every file closed before it whole: the commit
writes the closed files first, whether an fsync of another file made it (the log's barrier) or
the group commit did when changes stopped. The replace pattern (write a temporary file, close,
rename it over the name) must never leave the name empty. The daemon's own metrics tell when
its log has committed (`awsomefs_meta_committed_index`) and that the closes were batched.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import seeds
from tests.support.daemon import Daemon, wait_for

pytestmark = pytest.mark.mounted
MTIME = 1_600_000_000_000_000_000
METRIC = re.compile(r"^(awsomefs_\w+) ([0-9.e+]+)$", re.M)


class Metered:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        found = re.search(r"metrics on http://[^:]+:(\d+)/", daemon.logs())
        assert found, daemon.logs()
        self.port = int(found.group(1))

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        return {name: float(value) for name, value in METRIC.findall(text)}


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-batch-", dir="/var/tmp"))
    d = Daemon(base / "state", base / "mnt", size="1G", extra=["--metrics-port", "0"],
               env={"AWSOMEFS_DATA__BATCH_CLOSED_FILES": "true"})  # (the default: said, as these tests need it)
    try:
        yield d
    finally:
        d.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


def write_tree(mnt: Path, rng: random.Random, count: int) -> dict[str, tuple[bytes, int]]:
    """Small files as an untar makes them (create, write, futimens, close), the last ones each
    written to a temporary name and renamed over a file of the tree (rsync's replace)."""
    (mnt / "d").mkdir()
    want: dict[str, tuple[bytes, int]] = {}
    for i in range(count):
        data = rng.randbytes(rng.choice((1, 100, 4095, 4096, 5000, 30_000)))
        name = f"d/f{i}"
        path = mnt / (f"d/.f{i}.tmp" if i >= count - 20 else name)
        mtime = MTIME + i * 1_000_000_007
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        if path.name.endswith(".tmp"):
            os.rename(path, mnt / f"d/f{i - 20}")
            want[f"d/f{i - 20}"] = data, mtime
        else:
            want[name] = data, mtime
    return want


def check_tree(mnt: Path, want: dict[str, tuple[bytes, int]]) -> None:
    for name, (data, mtime) in want.items():
        got = (mnt / name).read_bytes()
        assert got == data, f"{name}: {len(got)} bytes after the crash, {len(data)} written and closed before the commit"
        assert (mnt / name).stat().st_mtime_ns == mtime, f"{name}: not the time set before the close"


def test_files_closed_before_an_fsync_of_another_file_are_whole_after_a_crash(daemon: Daemon) -> None:
    rng = random.Random(seeds.fresh_one("closed-batch-fsync"))
    daemon.start()
    want = write_tree(daemon.mount, rng, 150)
    fd = os.open(daemon.mount / "marker", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"m")
        os.fsync(fd)  # commits every change before it, and the data of every file closed before it
    finally:
        os.close(fd)
    daemon.kill()  # at once: a group commit 20 ms later would write them anyway
    daemon.start()
    check_tree(daemon.mount, want)
    assert daemon.stop() == 0, daemon.logs()


def test_files_closed_before_a_group_commit_are_whole_after_a_crash(daemon: Daemon) -> None:
    rng = random.Random(seeds.fresh_one("closed-batch-idle"))
    metered = Metered(daemon.start())
    want = write_tree(daemon.mount, rng, 150)
    applied = metered.metrics()["awsomefs_meta_applied_index"]  # every change above is applied
    wait_for(lambda: metered.metrics()["awsomefs_meta_committed_index"] >= applied, 30,
             "the group commit after the changes stopped")
    batched = metered.metrics()["awsomefs_closed_batch_files_total"]
    daemon.kill()
    daemon.start()
    check_tree(daemon.mount, want)
    assert batched > 0, "no close was batched: the test tested nothing"
    assert daemon.stop() == 0, daemon.logs()


def test_a_write_after_futimens_stamps_its_own_time(daemon: Daemon) -> None:
    """The time futimens set over buffered data rides their flush; a write after it wins."""
    daemon.start()
    path = daemon.mount / "f"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"a" * 5000)
        os.utime(fd, ns=(MTIME, MTIME))
        assert os.fstat(fd).st_mtime_ns == MTIME
        before = time.time_ns()
        os.write(fd, b"b" * 5000)
    finally:
        os.close(fd)
    assert path.stat().st_mtime_ns >= before - 10_000_000  # the kernel's clock may be coarser
    fd = os.open(daemon.mount / "g", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.fsync(fd)  # commits f's data, closed before it
    finally:
        os.close(fd)
    daemon.kill()
    daemon.start()
    assert path.read_bytes() == b"a" * 5000 + b"b" * 5000
    assert path.stat().st_mtime_ns >= before - 10_000_000
    assert daemon.stop() == 0, daemon.logs()
