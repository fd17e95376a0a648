"""Real programs on the mount, their results compared with the archive or source they came from and
with the same program's result on ext4 (the host filesystem under /var/tmp): SQLite in WAL mode
from two processes, tar, cp -p and rsync -a. Each comparison is made again after the daemon was
stopped and started, so that what is checked is what the daemon committed, not the kernel's cache.
"""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.repl.digest import TreeDigest, differences, digest_tree
from tests.mounted.conftest import running_daemon
from tests.support import seeds
from tests.support.daemon import Daemon
from tests.support.sqlite_wal import run_wal_writers
from tests.support.trees import make_source_tree

pytestmark = pytest.mark.mounted
SEED = seeds.fresh_one("workloads")  # the source tree's shape, fresh each run (tests/support/seeds.py)


@pytest.fixture(scope="module")
def restartable() -> Iterator[Daemon]:
    """A daemon of this module's own: the tests stop and start it."""
    with running_daemon("awsomefs-workloads-") as d:
        yield d


def _restart(d: Daemon) -> None:
    assert d.stop() == 0, d.logs()
    d.start()


def _fresh_dir(d: Daemon, name: str) -> Path:
    path = d.mount / name
    path.mkdir()
    return path


@pytest.mark.parametrize("txns", [400])
def test_sqlite_wal_two_processes_with_checkpoints(restartable: Daemon, txns: int, tmp_path: Path) -> None:
    """Checkpoints read and rewrite the database while the other process commits: a read that
    returned a page older than a completed write corrupted it ("Rowid out of order", lost updates)."""
    control = run_wal_writers(tmp_path / "ext4.db", txns, autocheckpoint=16)
    assert control.ok, f"the control on ext4 failed, so the test is wrong: {control.describe()}"
    outcome = run_wal_writers(_fresh_dir(restartable, "sqlite") / "wal.db", txns, autocheckpoint=16,
                              evict_every_s=0.002)
    assert outcome.ok, outcome.describe()


@pytest.mark.slow
def test_sqlite_wal_repeated(restartable: Daemon) -> None:
    where = _fresh_dir(restartable, "sqlite-repeated")
    for run in range(6):
        outcome = run_wal_writers(where / f"wal{run}.db", 1500, autocheckpoint=16, evict_every_s=0.002)
        assert outcome.ok, f"run {run}: {outcome.describe()}"


def _listing(root: Path, *, ns: bool) -> TreeDigest:
    """What `site verify` compares (awsomefsd/repl/digest.py): every entry's type, mode, owner,
    mtime (whole seconds unless `ns`), size, content, link target, xattrs and hard links."""
    return digest_tree(root, mtime_resolution_ns=1 if ns else 10**9)


def _archive_listing(tarball: bytes) -> dict[str, tuple[int, int]]:
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        return {m.name.removeprefix("./"): (m.mode & 0o7777, int(m.mtime)) for m in tar.getmembers() if m.name != "."}


def test_tar_extract_keeps_content_modes_and_times(restartable: Daemon, tmp_path: Path) -> None:
    """tar sets each file's time with futimens after writing it: the time must survive the flush."""
    source = tmp_path / "src"
    source.mkdir()
    make_source_tree(source, 600, SEED)
    tarball = subprocess.run(["tar", "-C", str(source), "-cf", "-", "."], check=True, capture_output=True).stdout
    archive = _archive_listing(tarball)
    on_ext4 = tmp_path / "x"
    on_ext4.mkdir()
    subprocess.run(["tar", "-C", str(on_ext4), "-xpf", "-"], input=tarball, check=True)
    on_mount = _fresh_dir(restartable, "tar")
    subprocess.run(["tar", "-C", str(on_mount), "-xpf", "-"], input=tarball, check=True)
    want = _listing(on_ext4, ns=False)
    assert differences(want, _listing(on_mount, ns=False)) == []
    _restart(restartable)
    got = _listing(on_mount, ns=False)
    assert differences(want, got) == []
    for name, (mode, mtime) in archive.items():
        record = dict(got.records[name])
        assert record["mode"] == mode, name
        if record["type"] != stat.S_IFDIR:
            assert record["mtime"] == mtime, name


@pytest.mark.parametrize("tool", [["cp", "-a"], ["rsync", "-a"]], ids=["cp-p", "rsync-a"])
def test_copies_keep_times(restartable: Daemon, tmp_path: Path, tool: list[str]) -> None:
    """cp -p and rsync -t set the times after writing (futimens or utimensat); nanoseconds are
    kept where the tool keeps them, exactly as on ext4."""
    if not shutil.which(tool[0]):
        pytest.skip(f"{tool[0]} is not installed (scripts/install.sh test installs it)")
    source = tmp_path / "src"
    source.mkdir()
    make_source_tree(source, 200, SEED)
    on_ext4, on_mount = tmp_path / "copy", _fresh_dir(restartable, f"copy-{tool[0]}")
    on_ext4.mkdir()
    subprocess.run([*tool, f"{source}/.", str(on_ext4)], check=True)
    subprocess.run([*tool, f"{source}/.", str(on_mount)], check=True)
    want = _listing(on_ext4, ns=True)
    assert differences(want, _listing(on_mount, ns=True)) == []
    _restart(restartable)
    assert differences(want, _listing(on_mount, ns=True)) == []
