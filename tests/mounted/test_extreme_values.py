"""Extreme values in metadata calls: each gets a sane errno (or is stored as ext4 would store it),
and none undoes another process's acknowledged work (issue 41, item 1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.meta.records import MAX_TIME_NS, MIN_TIME_NS
from tests.support.daemon import Daemon

pytestmark = pytest.mark.mounted

ONE_BATCH = {"AWSOMEFS_DATA__COMMIT_INTERVAL_MS": "60000"}
"""Every change of a test in one uncommitted group commit, whatever the machine's speed."""


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="awsomefs-extreme-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_time_past_2262_loses_no_other_change(base: Path) -> None:
    """The issue's reproduction: `touch -d 2300-01-01` on one file, after other files were created
    in the same commit interval. ext4 stores the time; it must not cost the other files."""
    d = Daemon(base / "state", base / "mnt", size="256M", env=ONE_BATCH).start()
    try:
        top = d.mount / "d"
        top.mkdir()
        (top / "report.txt").write_text("important\n")
        (top / "project").mkdir()
        (top / "project" / "main.c").write_text("data\n")
        (top / "x").touch()
        with open(top / "report.txt", "rb") as held:
            r = subprocess.run(["touch", "-d", "2300-01-01", str(top / "x")], capture_output=True, text=True,
                               check=False)
            assert r.returncode == 0, r.stderr
            assert os.pread(held.fileno(), 100, 0) == b"important\n"
        assert (top / "report.txt").read_text() == "important\n"
        assert (top / "project" / "main.c").read_text() == "data\n"
        assert os.stat(top / "x").st_mtime_ns == MAX_TIME_NS, "stored as the latest time an inode holds"
        r = subprocess.run(["touch", "-d", "1600-01-01", str(top / "project")], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, r.stderr
        assert d.stop() == 0, d.logs()
        d.start()
        assert (top / "report.txt").read_text() == "important\n"
        assert (top / "project" / "main.c").read_text() == "data\n"
        assert sorted(os.listdir(top)) == ["project", "report.txt", "x"]
        assert os.stat(top / "x").st_mtime_ns == os.stat(top / "x").st_atime_ns == MAX_TIME_NS
        assert os.stat(top / "project").st_mtime_ns == MIN_TIME_NS
    finally:
        d.stop_hard()
