"""The MooseFS target and the real-program workloads of bench/fsbench.py (issue 40).

Default tier: the MooseFS configuration a run generates (addresses, paths, nothing in /etc), that a
machine without MooseFS skips the target with how to install it (not a failed run), and a tiny
`--quick` run of rsync, SQLite VACUUM and fsx on ext4. Slow tier: MooseFS end to end, then nothing
of it left (mount, processes, namespace, loop device).
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
sys.path.insert(0, str(REPO / "bench"))

import fsbench  # noqa: E402
import moosefs  # noqa: E402
import targets  # noqa: E402

REAL = ("rsync", "vacuum", "fsx")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """The benchmark's images: on /var/tmp (not tmpfs, as fsbench asks), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="awsomefs-bench-real-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _leftovers(workdir: Path) -> list[str]:
    """Mounts, loop devices or a network namespace of this work dir that teardown should have removed."""
    found = [line for line in Path("/proc/mounts").read_text().splitlines() if str(workdir) in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [line for line in loops.splitlines() if str(workdir) in line]
    if Path("/run/netns", moosefs.netns_name(workdir)).exists():
        found.append(f"netns {moosefs.netns_name(workdir)}")
    return found


def _fsbench(workdir: Path, out_json: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(FSBENCH), "--quick", "--workdir", str(workdir), "--json", str(out_json), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_moosefs_config_stays_in_its_directory_and_on_the_private_address(tmp_path: Path) -> None:
    files = moosefs.config_files(tmp_path, tmp_path / "hdd", "mfs")
    assert set(files) == {"mfsmaster.cfg", "mfsexports.cfg", "mfstopology.cfg", "mfschunkserver.cfg", "mfshdd.cfg"}
    settings = {
        name: dict(line.split(" = ", 1) for line in text.splitlines())
        for name, text in files.items() if name in ("mfsmaster.cfg", "mfschunkserver.cfg")
    }
    master, chunkserver = settings["mfsmaster.cfg"], settings["mfschunkserver.cfg"]
    for key in ("MATOML_LISTEN_HOST", "MATOCS_LISTEN_HOST", "MATOCL_LISTEN_HOST"):
        assert master[key] == moosefs.ADDRESS
    for key in ("MASTER_HOST", "BIND_HOST", "CSSERV_LISTEN_HOST"):
        assert chunkserver[key] == moosefs.ADDRESS
    paths = [v for cfg in settings.values() for k, v in cfg.items() if k.endswith(("_PATH", "_FILENAME"))]
    assert paths and all(Path(p).is_relative_to(tmp_path) for p in paths)
    assert master["NICE_LEVEL"] == chunkserver["NICE_LEVEL"] == "0", "at our daemon's priority, not -19"
    assert files["mfshdd.cfg"].strip() == str(tmp_path / "hdd")
    assert files["mfsexports.cfg"].split()[0] == moosefs.ADDRESS  # no other client may mount it
    assert moosefs.netns_name(tmp_path) == moosefs.netns_name(tmp_path)
    assert moosefs.netns_name(tmp_path) != moosefs.netns_name(tmp_path / "other")


def test_moosefs_without_its_packages_is_skipped_with_how_to_install(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no mfsmaster, mfsmount, ... on it
    with (pytest.raises(targets.TargetSkipped, match="apt-get install moosefs-master"),
          moosefs.moosefs_target(tmp_path, 1 << 30, 5)):
        pass
    assert not list(tmp_path.iterdir())  # nothing set up, nothing to tear down
    skipped = fsbench.TargetResult("moosefs", error="not installed", skipped=True)
    assert fsbench.exit_status({"moosefs": skipped, "ext4": fsbench.TargetResult("ext4")}) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (losetup, mount, drop_caches)")
@pytest.mark.budget(60)
def test_real_programs_quick_on_ext4(tmp_path: Path, workdir: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = _fsbench(workdir, out_json, "--targets", "ext4", "--only", ",".join(REAL), "--size", "256M",
                    "--rsync-entries", "400", "--vacuum-mb", "4", "--fsx-ops", "150", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _leftovers(workdir)
    labels = [line.split("  ")[0] for line in proc.stdout.splitlines()]
    assert {"rsync -a tree", "sqlite delete + VACUUM", "fsx 1 process"} <= set(labels)
    rows = json.loads(out_json.read_text())["comparison"]
    assert {row["workload"] for row in rows} == set(REAL)
    assert all(row["median"]["ext4"] > 0 for row in rows), rows


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(bool(moosefs.missing_tools()), reason="MooseFS not installed: " + moosefs.INSTALL_HINT)
def test_moosefs_end_to_end(tmp_path: Path, workdir: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = _fsbench(workdir, out_json, "--targets", "ext4,moosefs", "--only", "meta,untar," + ",".join(REAL),
                    "--meta-files", "300", "--tree-files", "200", timeout=850)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _leftovers(workdir)
    assert not subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True).stdout
    rows = json.loads(out_json.read_text())["comparison"]
    assert {row["workload"] for row in rows} == {"meta", "untar", *REAL}
    assert all(row["median"]["moosefs"] > 0 for row in rows), rows
