"""Real programs as workloads (issue 40): `rsync -a` of a 70,000-entry tree, SQLite delete + VACUUM
of a 200 MB database, and fsx of 20,000 operations.

The synthetic workloads (workloads.py) measure one kind of request at a time; these measure what a
user waits for, where every kind of request mixes. Each returns seconds of wall time for one run;
fsbench puts them next to ext4 (and MooseFS), with the ratio.

The inputs are generated once per (size, seed) in the work dir, on the local disk, like the untar
tarball: the same bytes on every run and machine. /usr/share is not used: it has ~59,000 entries
on this machine's image and a different count on the next one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from targets import Target, drop_caches
from workloads import Metric, WorkloadError, _text_lines

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("rsync", "vacuum", "fsx")
METRICS: dict[str, list[Metric]] = {
    "rsync": [Metric("rsync", "rsync -a tree", "s", False)],
    "vacuum": [Metric("sqlite_vacuum", "sqlite delete + VACUUM", "s", False)],
    "fsx": [Metric("fsx", "fsx 1 process", "s", False)],
}
MTIME = 1_700_000_000
# fsx checks that a target is known to fail by design, counted but not failed on, so its time can
# still be measured (data, size, mode and xattr checks stay): MooseFS 3.0 keeps whole-second
# timestamps, and an open file that was unlinked (renamed over) still reports nlink 1.
FSX_SKIP = {"moosefs": "mtime_write,mtime_utime,mtime_backwards,nlink"}


@dataclass(frozen=True)
class RealParams:
    """Sizes of the real-program workloads (full defaults; fsbench --quick uses QUICK)."""

    rsync_entries: int = 70_000
    vacuum_mb: int = 200
    fsx_ops: int = 20_000
    seed: int = 20240601
    timeout_s: float = 3600


QUICK = RealParams(rsync_entries=3_000, vacuum_mb=20, fsx_ops=2_000, timeout_s=600)


def _run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run a program and return its output; a non-zero exit is a failed run with its last output
    line as the reason."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        # fsx's report starts with the verdict and ends with how to replay it: keep the verdict.
        lines = [line for line in lines if line.startswith("fsx FAILED")][:1] or lines
        raise WorkloadError(f"{Path(cmd[0]).name} exited {proc.returncode}: {lines[-1][-300:] if lines else ''}")
    return proc.stdout


def _timed_run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    _run(cmd, timeout_s, env)
    return time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# rsync -a of a tree shaped like /usr/share: 86 % files, 7 % directories, 7 % symlinks


def ensure_tree(workdir: Path, entries: int, seed: int) -> Path:
    """Generate the source tree once per (entries, seed): `entries` entries below its root.

    Sizes are log-uniform from 0 to 32 KiB (median ~1 KiB, as in /usr/share); modes vary; every
    mtime is fixed, so rsync -a has the same metadata to carry on every target.
    """
    root = workdir / f"rsync-tree-{entries}-{seed}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    pool = _text_lines(rng, 2000)
    ndirs = max(entries * 7 // 100, 1)
    nlinks = entries * 7 // 100
    nfiles = entries - ndirs - nlinks
    tree = root / "share"
    dirs = [tree]
    tree.mkdir(parents=True)
    for i in range(ndirs - 1):  # the top directory counts as one entry
        parent = rng.choice(dirs[-50:]) if rng.random() < 0.7 else rng.choice(dirs)
        dirs.append(parent / f"d{i}")
        dirs[-1].mkdir()
    files = []
    for i in range(nfiles):
        path = rng.choice(dirs) / f"f{i}.{rng.choice(('txt', 'gz', 'png', 'html', 'py'))}"
        size = int(2 ** (rng.random() * 15)) - 1
        body = b"".join(rng.choice(pool) for _ in range(size // 40 + 1))[:size]
        path.write_bytes(body)
        os.chmod(path, rng.choice((0o644, 0o644, 0o644, 0o755, 0o600)))
        files.append(path)
    for i in range(nlinks):
        link = rng.choice(dirs) / f"l{i}"
        link.symlink_to(os.path.relpath(rng.choice(files), link.parent))
    for path in [*files, *dirs]:
        os.utime(path, (MTIME, MTIME))
    (root / ".complete").touch()
    return root


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _wait_for_space(path: Path, want: int, deadline_s: float) -> None:
    """Wait (untimed) until the target has `want` bytes free: MooseFS frees the chunks of deleted
    files in the background (a few per second), and the next run must not fail for lack of space."""
    end = time.monotonic() + deadline_s
    while _free_bytes(path) < want and time.monotonic() < end:
        time.sleep(0.5)


def run_rsync(target: Target, params: RealParams, run_index: int, source: Path) -> dict[str, float]:
    """`rsync -a` of the generated tree onto the target after dropping caches, then syncfs (both
    timed: rsync's work is not done until it is on the device); the copy is removed afterwards."""
    dest = target.path / f"fsbench-rsync-{run_index}"
    shutil.rmtree(dest, ignore_errors=True)
    free_before = _free_bytes(target.path)
    used = 0
    t = params.timeout_s
    try:
        drop_caches()
        start = time.monotonic()
        _run(["rsync", "-a", f"{source}/share/", f"{dest}/"], t)
        _run(["sync", "-f", str(dest)], t)
        seconds = time.monotonic() - start
        used = max(free_before - _free_bytes(target.path), 0)
        copied = sum(len(d) + len(f) for _, d, f in os.walk(dest))
        if copied != params.rsync_entries - 1:  # the top directory is dest itself
            raise WorkloadError(f"rsync copied {copied} entries below the top, expected {params.rsync_entries - 1}")
    finally:
        shutil.rmtree(dest, ignore_errors=True)
        _wait_for_space(target.path, min(2 * used, free_before), 600)
    return {"rsync": seconds}


# ---------------------------------------------------------------------------------------------
# SQLite: delete half the rows of a 200 MB database, then VACUUM (the sqlite3 program)

ROW_BYTES = 1000


def ensure_database(workdir: Path, megabytes: int, seed: int) -> Path:
    """A database of `megabytes` MB (1,000-byte rows of seeded random bytes), made once."""
    path = workdir / f"vacuum-{megabytes}mb-{seed}.db"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    rng = random.Random(seed)
    with sqlite3.connect(tmp) as db:
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        rows = megabytes * 1_000_000 // ROW_BYTES
        db.executemany("INSERT INTO t (v) VALUES (?)", ((rng.randbytes(ROW_BYTES),) for _ in range(rows)))
    db.close()
    tmp.rename(path)
    return path


def run_vacuum(target: Target, params: RealParams, run_index: int, database: Path) -> dict[str, float]:
    """Copy the database onto the target (untimed), drop caches, then time the sqlite3 program
    deleting every other row and running VACUUM with SQLite's defaults (rollback journal,
    synchronous=FULL). SQLITE_TMPDIR points at the target, so VACUUM's temporary copy is written
    to the filesystem under test, not to the host's /var/tmp. Checked afterwards: integrity and
    the row count."""
    work = target.path / f"fsbench-vacuum-{run_index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    db = work / "db.sqlite"
    t = params.timeout_s
    try:
        shutil.copyfile(database, db)
        os.sync()
        drop_caches()
        sql = "DELETE FROM t WHERE id % 2 = 0; VACUUM;"
        seconds = _timed_run(["sqlite3", str(db), sql], t, env={"SQLITE_TMPDIR": str(work)})
        with sqlite3.connect(db) as conn:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            count = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        conn.close()
        rows = params.vacuum_mb * 1_000_000 // ROW_BYTES
        if check != "ok" or count != rows - rows // 2:
            raise WorkloadError(f"database wrong after VACUUM: integrity {check!r}, {count} rows")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"sqlite_vacuum": seconds}


# ---------------------------------------------------------------------------------------------
# fsx: tests/support/fsx.py, one model worker (like xfstests' fsx, one process on its files)


def run_fsx(target: Target, params: RealParams, run_index: int) -> dict[str, float]:
    """`fsx_ops` operations of one model worker, every read and stat checked against its model;
    a mismatch fails the run (its report is the reason) instead of giving a number."""
    work = target.path / f"fsbench-fsx-{run_index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = {"FSX_SEED": str(params.seed + run_index), "FSX_OPS": str(params.fsx_ops), "FSX_MODEL": "1",
           "FSX_TRUNC": "0", "FSX_PAIRS": "0", "FSX_DURATION": str(params.timeout_s),
           "FSX_SKIP": FSX_SKIP.get(target.name, ""), "PYTHONPATH": str(REPO)}
    try:
        start = time.monotonic()
        out = _run([sys.executable, "-m", "tests.support.fsx", str(work)], params.timeout_s + 120, env)
        seconds = time.monotonic() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    done = re.search(r"\bops=(\d+)", out)
    if done is None or int(done[1]) != params.fsx_ops:
        raise WorkloadError(f"fsx did {done[1] if done else 'no'} of {params.fsx_ops} operations within "
                            f"{params.timeout_s:.0f} s")
    return {"fsx": seconds}
