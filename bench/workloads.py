"""The workloads: fio sequential and random I/O, an mdtest-like metadata run, untar + git status,
SQLite in WAL mode from two processes.

Every workload takes a `Target` and the shared `Params` and returns `{metric: value}` for one run,
so that the driver can repeat it, interleave targets, and compare like with like. Choices that
decide fairness (direct vs buffered, engine, cache drops) are made here, once, for all targets;
bench/README.md explains them.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

from targets import Target, drop_caches

# The SQLite WAL checker is a test harness (tests/support/), outside the package: the benchmarks
# run from bench/, so the checkout itself goes on the path for it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.sqlite_wal import run_wal_writers

FIO = shutil.which("fio") or "/usr/bin/fio"
MIB = 1 << 20


class WorkloadError(Exception):
    """A workload failed on one target; reported in the table instead of aborting the others."""


@dataclass(frozen=True)
class Params:
    """Workload sizes; identical for every target so the ratios mean something."""

    file_size: int = 1 << 30
    rand_size: int = 1 << 30
    rand_runtime_s: int = 15
    rand_jobs: int = 16
    meta_files: int = 12_000
    meta_procs: int = 4
    meta_dirs: int = 16
    tree_files: int = 4_000
    sqlite_txns: int = 2_000  # per process
    seed: int = 20240601
    timeout_s: float = 900


@dataclass(frozen=True)
class Metric:
    """How to print and compare one number."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    raw: bool = False  # also measured on the raw block device


META_PHASES = ("create", "stat", "stat_hot", "readdir", "readdir_hot", "unlink")
"""`readdir` is each directory's first listing since its files were made; `readdir_hot` lists them again
(what the kernel's directory cache may answer)."""
LISTING_PHASES = ("readdir", "readdir_hot")
META_LAYOUTS = ("single", "spread")

METRICS: dict[str, list[Metric]] = {
    "seq": [
        Metric("seq_write", "seq write 1M", "MiB/s", True, raw=True),
        Metric("seq_read", "seq read 1M (cold)", "MiB/s", True, raw=True),
    ],
    "rand": [
        Metric("rand_read", "rand read 4K x16 direct", "IOPS", True, raw=True),
        Metric("rand_write_direct", "rand write 4K x16 direct", "IOPS", True, raw=True),
        Metric("rand_write_buffered", "rand write 4K x16 buffered+fsync", "IOPS", True),
    ],
    "sqlite": [Metric("sqlite_tps", "sqlite WAL 2 procs", "tx/s", True)],
    "meta": [
        Metric(
            f"meta_{layout}_{phase}",
            f"{phase.replace('_', ' ')} ({layout} dir{'s' if layout == 'spread' else ''})",
            "ops/s",
            True,
        )
        for layout in META_LAYOUTS
        for phase in META_PHASES
    ],
    "untar": [
        Metric("untar", "untar", "s", False),
        Metric("untar_sync", "untar + syncfs", "s", False),
        Metric("git_add", "git init, add -A, commit", "s", False),
        Metric("git_status_cold", "git status (cold)", "s", False),
        Metric("git_status", "git status (warm)", "s", False),
        Metric("untar_git", "untar + git status", "s", False),
    ],
}


# ---------------------------------------------------------------------------------------------
# fio


def _fio(args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one fio job with JSON output; the numbers come from fio, not from our wall clock."""
    cmd = [FIO, "--output-format=json", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise WorkloadError(f"fio timed out after {timeout_s:.0f}s") from err
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise WorkloadError(f"fio failed ({proc.returncode}): {lines[-1] if lines else ''}")
    # fio may print warnings before the JSON document.
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def _fio_file(target: Target, name: str) -> tuple[str, bool]:
    """The file fio works on and whether it uses O_DIRECT.

    Filesystems are measured buffered (direct=0): that is the path applications take, and it lets
    each filesystem use its page cache, read-ahead and write-back the way it would in production.
    Fairness comes from `end_fsync=1` (writes count until the data is on the device) and from
    dropping caches before reads. The raw device has no page cache worth measuring, so it is
    always direct=1: the device ceiling.
    """
    if target.is_block_device:
        return str(target.path), True
    return str(target.path / name), False


def _seq_write(target: Target, name: str, size: int, timeout_s: float) -> float:
    """Write a fresh file sequentially in 1 MiB blocks with end_fsync; returns MiB/s."""
    filename, direct = _fio_file(target, name)
    if not direct:
        Path(filename).unlink(missing_ok=True)
        os.sync()
    out = _fio(
        [
            "--name=seqwrite",
            f"--filename={filename}",
            "--rw=write",
            "--bs=1M",
            f"--size={size}",
            "--ioengine=psync",
            f"--direct={int(direct)}",
            "--end_fsync=1",
            "--fallocate=none",
        ],
        timeout_s,
    )
    return out["jobs"][0]["write"]["bw_bytes"] / MIB


def _seq_read(target: Target, name: str, size: int, timeout_s: float) -> float:
    """Read the file back sequentially in 1 MiB blocks after dropping caches; returns MiB/s."""
    filename, direct = _fio_file(target, name)
    drop_caches()
    out = _fio(
        [
            "--name=seqread",
            f"--filename={filename}",
            "--rw=read",
            "--bs=1M",
            f"--size={size}",
            "--ioengine=psync",
            f"--direct={int(direct)}",
        ],
        timeout_s,
    )
    return out["jobs"][0]["read"]["bw_bytes"] / MIB


def prepare_seq(target: Target, params: Params) -> None:
    """One untimed write of the seq file so that timed runs do not pay first-touch costs.

    The images are sparse files: the first write to any block makes the host filesystem allocate
    it, which measured here cost 4-5x in write throughput and would penalise whichever run or
    target touches a block first. ext4 and the raw device reuse the same blocks on later runs.
    """
    _seq_write(target, "fsbench-seq", params.file_size, params.timeout_s)


def run_seq(target: Target, params: Params, run_index: int) -> dict[str, float]:
    """Sequential write then cold read of `file_size` bytes."""
    write = _seq_write(target, "fsbench-seq", params.file_size, params.timeout_s)
    read = _seq_read(target, "fsbench-seq", params.file_size, params.timeout_s)
    return {"seq_write": write, "seq_read": read}


def prepare_rand(target: Target, params: Params) -> None:
    """Lay out the random-read file once (not timed); holes in a sparse image would read as free zeros."""
    _seq_write(target, "fsbench-rand", params.rand_size, params.timeout_s)


def run_rand(target: Target, params: Params, run_index: int) -> dict[str, float]:
    """4 KiB random reads, then writes, at queue depth 16: 16 psync jobs, on every target.

    FUSE has no asynchronous direct I/O path for libaio (it completes synchronously), so queue
    depth comes from 16 threads doing pread/pwrite; the same engine everywhere keeps ext4 and raw
    honest. O_DIRECT keeps the page cache out of reads (a warm cache would measure memory, not the
    filesystem) and out of the direct writes; buffered writes end with an fsync, so every target
    has put the data on its device when the clock stops.
    """
    filename, _ = _fio_file(target, "fsbench-rand")
    drop_caches()
    out = {"rand_read": _fio_rand(filename, "randread", True, params)["read"]["iops"]}
    out["rand_write_direct"] = _fio_rand(filename, "randwrite", True, params)["write"]["iops"]
    if not target.is_block_device:
        out["rand_write_buffered"] = _fio_rand(filename, "randwrite", False, params)["write"]["iops"]
    return out


def _fio_rand(filename: str, rw: str, direct: bool, params: Params) -> dict[str, Any]:
    out = _fio(
        [
            f"--name={rw}",
            f"--filename={filename}",
            f"--rw={rw}",
            "--bs=4k",
            f"--size={params.rand_size}",
            "--ioengine=psync",
            f"--direct={int(direct)}",
            "--thread",
            f"--numjobs={params.rand_jobs}",
            "--group_reporting=1",
            "--time_based=1",
            f"--runtime={params.rand_runtime_s}",
            "--ramp_time=1",
            "--norandommap",
            "--randrepeat=1",
            "--invalidate=1",
            *([] if direct else ["--end_fsync=1"]),
        ],
        params.timeout_s + params.rand_runtime_s,
    )
    return out["jobs"][0]  # type: ignore[no-any-return]


def cleanup_fio_files(target: Target) -> None:
    """Remove fio files so later workloads start with the same free space on each target."""
    if target.is_block_device:
        return
    for name in ("fsbench-seq", "fsbench-rand"):
        (target.path / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# metadata (mdtest-like)

_barrier: Any = None


def _init_worker(barrier: Any) -> None:
    """Pool initializer: Ctrl-C is handled by the parent, which terminates the pool with SIGTERM.

    The parent's SIGTERM/SIGHUP handlers (raise KeyboardInterrupt for cleanup) are inherited by
    fork; workers get the defaults back so `terminate()` ends them quietly.
    """
    global _barrier
    _barrier = barrier
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def create_file(path: str) -> None:
    """An empty file, made the way every create workload makes one: O_CREAT|O_EXCL, then close."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))


def _readdir(path: str) -> int:
    with os.scandir(path) as entries:
        return sum(1 for _ in entries)


def _meta_task(phase: str, items: Sequence[str]) -> tuple[float, float, int]:
    """One worker's share of a phase, started together with the others at the barrier."""
    actions: dict[str, Callable[[str], Any]] = {
        "create": create_file,
        "stat": os.stat,
        "stat_hot": os.stat,
        "unlink": os.unlink,
    }
    action = _readdir if phase in LISTING_PHASES else actions[phase]
    _barrier.wait(timeout=120)
    start = time.monotonic()
    ops = 0
    for item in items:
        result = action(item)
        ops += result if phase in LISTING_PHASES else 1
    return start, time.monotonic(), ops


def _meta_plan(root: Path, layout: str, params: Params) -> tuple[list[list[str]], list[list[str]]]:
    """Per-process file lists and directory lists for one layout.

    `single`: every process creates in one shared directory (contended directory lock).
    `spread`: each process owns its own directories, like `mdtest -u`.
    """
    procs, per_proc = params.meta_procs, params.meta_files // params.meta_procs
    if layout == "single":
        dirs = [[str(root)] for _ in range(procs)]
        files = [[str(root / f"f{p}.{i}") for i in range(per_proc)] for p in range(procs)]
        return files, dirs
    ndirs = max(params.meta_dirs, procs)
    owned = [[str(root / f"d{d:03d}") for d in range(ndirs) if d % procs == p] for p in range(procs)]
    files = [[f"{mine[i % len(mine)]}/f{p}.{i}" for i in range(per_proc)] for p, mine in enumerate(owned)]
    return files, owned


def _meta_phase(pool: Pool, phase: str, work: list[list[str]], timeout_s: float) -> float:
    """Run one phase on all workers; ops/s over the wall time from first start to last end."""
    pending = [pool.apply_async(_meta_task, (phase, items)) for items in work]
    results = [p.get(timeout=timeout_s) for p in pending]
    elapsed = max(r[1] for r in results) - min(r[0] for r in results)
    return sum(r[2] for r in results) / max(elapsed, 1e-9)


def _meta_layout(pool: Pool, root: Path, layout: str, params: Params) -> dict[str, float]:
    """create, stat (cold: caches dropped), stat again (hot), readdir, readdir again, unlink for one
    layout."""
    files, dirs = _meta_plan(root, layout, params)
    root.mkdir()
    for d in {d for mine in dirs for d in mine}:
        Path(d).mkdir(exist_ok=True)
    os.sync()
    out: dict[str, float] = {}
    for phase in META_PHASES:
        if phase == "stat":
            drop_caches()
        work = dirs if phase in LISTING_PHASES else files
        out[f"meta_{layout}_{phase}"] = _meta_phase(pool, phase, work, params.timeout_s)
    shutil.rmtree(root)
    return out


def run_meta(target: Target, params: Params, run_index: int) -> dict[str, float]:
    """mdtest-like run with `meta_procs` processes over `meta_files` empty files per layout."""
    base = target.path / f"fsbench-meta-{run_index}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(params.meta_procs)
    out: dict[str, float] = {}
    try:
        with ctx.Pool(params.meta_procs, initializer=_init_worker, initargs=(barrier,)) as pool:
            for layout in META_LAYOUTS:
                out.update(_meta_layout(pool, base / layout, layout, params))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# untar + git status

_WORDS = [
    "alloc",
    "block",
    "buffer",
    "cache",
    "client",
    "cluster",
    "commit",
    "config",
    "device",
    "dir",
    "entry",
    "extent",
    "file",
    "flush",
    "handle",
    "inode",
    "journal",
    "lease",
    "lock",
    "log",
    "map",
    "meta",
    "mount",
    "node",
    "offset",
    "page",
    "path",
    "raft",
    "read",
    "record",
    "replica",
    "request",
    "segment",
    "size",
    "state",
    "sync",
    "table",
    "term",
    "txn",
    "update",
    "volume",
    "write",
]
_EXTS = (".py", ".py", ".c", ".h", ".go", ".rs", ".md", ".txt", ".json", ".yaml")
_MTIME = 1_700_000_000  # fixed, so git never sees "racily clean" files and re-hashes them


def _text_lines(rng: random.Random, count: int) -> list[bytes]:
    """A pool of source-like lines: indentation, identifiers, punctuation, comments."""
    lines = []
    for _ in range(count):
        indent = " " * (4 * rng.randrange(4))
        words = rng.choices(_WORDS, k=rng.randrange(2, 10))
        shape = rng.randrange(4)
        if shape == 0:
            body = f"def {'_'.join(words[:2])}({', '.join(words[2:])}):"
        elif shape == 1:
            body = f"{words[0]} = {words[1]}({', '.join(words[2:])})"
        elif shape == 2:
            body = "# " + " ".join(words)
        else:
            body = f"return {' + '.join(words)}"
        lines.append((indent + body + "\n").encode())
    return lines


def _tree_layout(rng: random.Random, nfiles: int) -> tuple[list[str], list[str]]:
    """Nested directories (depth up to 6) and file paths spread over them."""
    dirs = ["src"]
    for _ in range(max(nfiles // 15, 1)):
        parent = rng.choice(dirs)
        if parent.count("/") < 6:
            dirs.append(f"{parent}/{rng.choice(_WORDS)}_{len(dirs)}")
    files = [f"{rng.choice(dirs)}/{rng.choice(_WORDS)}_{i}{rng.choice(_EXTS)}" for i in range(nfiles)]
    return dirs, files


def _file_body(rng: random.Random, pool: list[bytes]) -> bytes:
    """Text of a log-uniform size between 200 B and 40 KiB."""
    size = int(200 * (40 * 1024 / 200) ** rng.random())
    chunks, total = [], 0
    while total < size:
        line = rng.choice(pool)
        chunks.append(line)
        total += len(line)
    return b"".join(chunks)[:size]


def ensure_tarball(workdir: Path, nfiles: int, seed: int) -> Path:
    """Generate the source-like tarball once per (files, seed); same bytes on every run and machine."""
    path = workdir / f"srctree-{nfiles}-{seed}.tar"
    if path.exists():
        return path
    rng = random.Random(seed)
    pool = _text_lines(rng, 4000)
    dirs, files = _tree_layout(rng, nfiles)
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _MTIME
            tar.addfile(info)
        for f in files:
            body = _file_body(rng, pool)
            info = tarfile.TarInfo(f)
            info.size, info.mode, info.mtime = len(body), 0o644, _MTIME
            tar.addfile(info, io.BytesIO(body))
    tmp.rename(path)
    return path


def _git(tree: Path, *args: str, timeout_s: float) -> None:
    """git with no user or system config, so hooks, fsmonitor or untracked caches cannot skew it."""
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }
    cmd = ["git", "-C", str(tree), "-c", "core.fsmonitor=false", "-c", "core.untrackedCache=false", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise WorkloadError(f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()[-200:]}")


def _timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def _untar(data: bytes, dest: Path, timeout_s: float) -> None:
    """tar reads from memory (stdin) so the source disk is not part of the measurement."""
    cmd = ["tar", "-x", "--no-same-owner", "-f", "-", "-C", str(dest)]
    proc = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise WorkloadError(f"tar failed: {proc.stderr.decode(errors='replace').strip()[-200:]}")


def run_untar(target: Target, params: Params, run_index: int, tarball: Path) -> dict[str, float]:
    """Untar the tree, commit it (every file read and hashed, a few files written), then time
    `git status` cold and warm."""
    data = tarball.read_bytes()
    dest = target.path / f"fsbench-tree-{run_index}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    t = params.timeout_s
    try:
        drop_caches()
        untar = _timed(lambda: _untar(data, dest, t))
        sync = _timed(lambda: subprocess.run(["sync", "-f", str(dest)], check=True, timeout=t))
        def commit() -> None:
            _git(dest, "init", "-q", timeout_s=t)
            _git(dest, "add", "-A", timeout_s=t)
            _git(dest, "commit", "-q", "-m", "tree", timeout_s=t)

        git_add = _timed(commit)
        drop_caches()
        cold = _timed(lambda: _git(dest, "status", timeout_s=t))
        warm = _timed(lambda: _git(dest, "status", timeout_s=t))
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return {
        "untar": untar,
        "untar_sync": untar + sync,
        "git_add": git_add,
        "git_status_cold": cold,
        "git_status": warm,
        "untar_git": untar + warm,
    }


# ---------------------------------------------------------------------------------------------
# SQLite in WAL mode from two processes (what corrupted databases before the read/flush fix)


def run_sqlite(target: Target, params: Params, run_index: int) -> dict[str, float]:
    """Two processes each commit `sqlite_txns` transactions to one WAL database (SQLite's defaults:
    synchronous=FULL, automatic checkpoints); tests/support/sqlite_wal.py checks the result,
    and a wrong database is a failed run, not a number."""
    db = target.path / f"fsbench-sqlite-{run_index}.db"
    outcome = run_wal_writers(db, params.sqlite_txns, timeout_s=params.timeout_s)
    if not outcome.ok:
        raise WorkloadError(f"sqlite database wrong: {outcome.describe()}")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return {"sqlite_tps": outcome.expected / outcome.seconds}
