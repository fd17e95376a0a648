"""Smoke test of the filesystem benchmark harness (bench/fsbench.py).

It runs `--quick` against every target (ext4, the raw loop device, an AwsomeFS dev mount and the
pyfuse3 floor of bench/nullfs.py), so it checks the harness itself (setup, workloads, table, ratios,
JSON, teardown) and that the figures the closing notes quote can be produced from a fresh clone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FSBENCH = REPO / "bench" / "fsbench.py"


def _can_run() -> str | None:
    """Why the smoke test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (losetup, mount, drop_caches)"
    missing = [tool for tool in ("fio", "losetup", "mkfs.ext4", "git", "tar") if not shutil.which(tool)]
    return f"missing {', '.join(missing)}" if missing else None


def _leftovers(workdir: Path) -> list[str]:
    """Loop devices or mounts of the smoke work dir that teardown should have removed."""
    found = [line for line in Path("/proc/mounts").read_text().splitlines() if str(workdir) in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return found + [line for line in loops.splitlines() if str(workdir) in line]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """The benchmark's images: on /var/tmp (not tmpfs, as fsbench asks), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="awsomefs-bench-smoke-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run_reports_numbers_for_every_target(tmp_path: Path, workdir: Path) -> None:
    if reason := _can_run():
        pytest.skip(reason)
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, str(FSBENCH), "--quick", "--targets", "ext4,raw,awsomefs,awsomefs-pyfuse3,kernelfloor",
           "--only", "seq,rand,meta,untar,sqlite", "--workdir", str(workdir)]
    proc = subprocess.run([*cmd, "--json", str(out_json)], capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _leftovers(workdir)

    table = proc.stdout.splitlines()
    header = next(line for line in table if line.startswith("metric")).split()
    assert {"ext4", "raw", "awsomefs", "awsomefs-pyfuse3", "kernelfloor", "aws/ext4", "aws/floor", "aws/pyfuse3"} <= set(header)
    assert any(line.startswith("seq write") and any(ch.isdigit() for ch in line) for line in table)

    doc = json.loads(out_json.read_text())
    rows = doc["comparison"]
    assert {row["workload"] for row in rows} == {"seq", "rand", "meta", "untar", "sqlite"}
    for row in rows:
        for target in ("ext4", "awsomefs", "awsomefs-pyfuse3", "kernelfloor"):
            assert row["median"][target] > 0, row
        assert row["awsomefs_vs_ext4"] > 0 and row["awsomefs_vs_floor"] > 0 and row["awsomefs_vs_pyfuse3"] > 0, row
        if row["workload"] in ("seq", "rand") and row["metric"] != "rand_write_buffered":  # raw: direct only
            assert row["median"]["raw"] > 0, row
            assert row["ext4_vs_raw"] > 0, row
