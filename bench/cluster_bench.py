"""Cluster benchmarks: a real 3-node cluster (separate processes, one network namespace each, one
shared image file), next to ext4 and the raw loop device measured in the same run.

As root (from another user: sudo in front), from the repository root:

    .venv/bin/python bench/cluster_bench.py [--seconds 5] [--workers 4] [--seq-mib 256] [--json F]

Figures (issue "The cluster"): creates per second from one node and from three nodes at once
(target: >= 4,000/s in total), cross-node read-after-close latency, time to a new leader after the
leader is killed (and how long a writer on a surviving node stalls), sequential write throughput
from two nodes at once compared with one node. The machine is shared and noisy: compare ratios
within one run, not absolute figures across runs.

    .venv/bin/python bench/cluster_bench.py --metadata [--seconds 5] [--meta-rounds 3] [--json F]

Only the figures of issue 13 ("cluster metadata at local speed"), each next to a single-node
AwsomeFS and ext4 measured in the same run: creates per second of a lone creator on a follower and
of three creators on three nodes (own directories, one directory; the longest create), renames by
three nodes between two directories (the longest), untar of the 4,000-file tree and git status on a
follower, fsync latency after 1,000 creates, and (issue 42) the names figure: creates, stats, the
first listing and the unlinks of 10,000 files in one directory on a follower, each with the
daemon's FUSE requests and CPU per file. See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]  # bench's modules import each other by bare name

import fsbench  # noqa: E402
import targets as tg  # noqa: E402
import workloads as wl  # noqa: E402

from awsomefsd.cli.devcluster.network import PrivateNetwork  # noqa: E402
from tests.support.cluster import Cluster, Node, cluster_in  # noqa: E402
from tests.support.daemon import AWSOMEFSD  # noqa: E402

MiB = 1 << 20


# --- workloads (run in worker processes: the kernel, not the GIL, is what is measured) -------------
MAX_CREATES_PER_WORKER = 40_000  # ext4 would run out of inodes long before the clock
RENAMED_FILES = 50  # per rename worker


def _create_worker(args: tuple[str, str, float, int, Any]) -> tuple[int, float, float]:
    """Empty files `<directory>/<name>.<n>` (O_CREAT|O_EXCL, then close) until `seconds` have
    passed or `max_files` are made; returns (files made, seconds taken, the longest single create
    in seconds: in a contended directory, what a create waits for a hand-over)."""
    directory, name, seconds, max_files, start = args
    os.makedirs(directory, exist_ok=True)
    start.wait()
    t0 = now = time.monotonic()
    n, longest = 0, 0.0
    while n < max_files and now < t0 + seconds:
        wl.create_file(f"{directory}/{name}.{n}")
        n, began, now = n + 1, now, time.monotonic()
        longest = max(longest, now - began)
    return n, now - t0, longest


def _rename_worker(args: tuple[str, str, str, float, Any]) -> tuple[int, float, float]:
    """Move its own files from `a` to `b` one by one, then back, until `seconds` have passed (each
    rename needs both directories' delegations); returns like `_create_worker`."""
    a, b, name, seconds, start = args
    for k in range(RENAMED_FILES):
        wl.create_file(f"{a}/{name}.{k}")
    start.wait()
    t0 = now = time.monotonic()
    n, longest = 0, 0.0
    while now < t0 + seconds:
        source, target = (a, b) if n // RENAMED_FILES % 2 == 0 else (b, a)
        os.rename(f"{source}/{name}.{n % RENAMED_FILES}", f"{target}/{name}.{n % RENAMED_FILES}")
        n, began, now = n + 1, now, time.monotonic()
        longest = max(longest, now - began)
    return n, now - t0, longest


def measure_renames(args: argparse.Namespace, name: str, roots: list[Path], round_index: int) -> dict[str, float]:
    """Renames per second of three workers (one per node on the cluster) moving files between the
    same two directories, and the longest single rename (issue 42: one waited 1.4 s)."""
    base = Path(f"renames-{round_index}")
    (roots[0] / base / "a").mkdir(parents=True)
    (roots[0] / base / "b").mkdir()
    rate, longest = at_once(_rename_worker, [(str(root / base / "a"), str(root / base / "b"), f"w{k}", args.seconds)
                                             for k, root in enumerate(roots)], args.seconds)
    return {"renames_shared": rate, "renames_shared_max_ms": longest * 1000}


def creates_per_s(dirs: list[Path], seconds: float, max_files: int = MAX_CREATES_PER_WORKER) -> float:
    """All `dirs` at once, one worker process each (distinct names); total creates per second."""
    return at_once(_create_worker, [(str(d), f"w{k}", seconds, max_files) for k, d in enumerate(dirs)], seconds)[0]


def at_once(worker: Callable[..., tuple[int, float, float]], work: list[tuple[Any, ...]],
            seconds: float) -> tuple[float, float]:
    """One process per `work` item, started together: the sum of their rates, the longest single op (s)."""
    with multiprocessing.Manager() as manager:
        start = manager.Event()
        with multiprocessing.Pool(len(work)) as pool:
            result = pool.map_async(worker, [(*w, start) for w in work])
            time.sleep(0.5)  # workers are up and waiting
            start.set()
            try:
                done = result.get(seconds * 10 + 120)
            except multiprocessing.TimeoutError as err:
                raise wl.WorkloadError(f"workers not done {seconds * 10 + 120:.0f}s after the start") from err
    return sum(n / elapsed for n, elapsed, _ in done), max(longest for _, _, longest in done)


def _seq_worker(args: tuple[str, int]) -> float:
    path, size = args
    block = os.urandom(MiB)
    t0 = time.monotonic()
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // MiB):
            f.write(block)
        os.fsync(f.fileno())
    return time.monotonic() - t0


def seq_write_mib_s(paths: list[Path], size: int) -> float:
    """Each path written by its own process at once; aggregate MiB/s (data fsynced)."""
    with multiprocessing.Pool(len(paths)) as pool:
        t0 = time.monotonic()
        pool.map(_seq_worker, [(str(p), size) for p in paths])
        elapsed = time.monotonic() - t0
    return len(paths) * size / MiB / elapsed


def raw_seq_write_mib_s(device: Path, size: int) -> float:
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={device}", "bs=1M", f"count={size // MiB}", "oflag=direct",
                    "conv=fsync", "status=none"], check=True, timeout=600)
    return size / MiB / (time.monotonic() - t0)


def read_after_close_ms(writer: Node, reader: Node, rounds: int) -> dict[str, float]:
    """Write + close a 4 KiB file on one node; then open + read it on another: how long that read
    takes (it includes catching up with the leader: the close-to-open guarantee)."""
    samples = []
    (writer.mount / "rac").mkdir(exist_ok=True)
    for i in range(rounds):
        payload = os.urandom(4096)
        (writer.mount / "rac" / f"f{i}").write_bytes(payload)
        t0 = time.perf_counter()
        got = (reader.mount / "rac" / f"f{i}").read_bytes()
        samples.append((time.perf_counter() - t0) * 1000)
        assert got == payload, "read-after-close returned other bytes"
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1],
            "max_ms": samples[-1]}


def failover(cluster: Cluster, nodes: list[Node]) -> dict[str, float]:
    """Kill -9 the leader while a survivor creates files: the longest gap between two successful
    creates on the survivor, and when a new leader was reported."""
    leader = cluster.leader(nodes)
    survivor = next(n for n in nodes if n is not leader)
    stamps: list[float] = []
    stop = threading.Event()

    def creator() -> None:
        (survivor.mount / "failover").mkdir(exist_ok=True)
        i = 0
        while not stop.is_set():
            try:
                fd = os.open(survivor.mount / "failover" / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
                os.close(fd)
                stamps.append(time.monotonic())
                i += 1
            except OSError:
                time.sleep(0.01)

    t = threading.Thread(target=creator, daemon=True)
    t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    leader.kill()
    new_leader_s = None
    deadline = killed_at + 60
    while time.monotonic() < deadline:
        try:
            st = survivor.status().get("cluster") or {}
            lead = st.get("raft", {}).get("leader", 0)
            if lead and lead != leader.node_id:
                new_leader_s = time.monotonic() - killed_at
                break
        except Exception:
            pass
        time.sleep(0.05)
    time.sleep(2.0)
    stop.set()
    t.join(30)
    after = [s for s in stamps if s >= killed_at - 1]
    gaps = [b - a for a, b in itertools.pairwise(after)]
    return {"new_leader_s": new_leader_s or float("nan"), "writer_stall_s": max(gaps) if gaps else float("nan")}


# --- --metadata: issue 13, "cluster metadata at local speed" ---------------------------------------
# Each figure is measured on ext4 (a loop device), on a single-node AwsomeFS (`awsomefsd dev`, started
# as fsbench starts it) and on the cluster, the three taking turns within each round (fsbench's order)
# so that drift on the shared machine hits all alike. On the cluster the lone creator, the untar and
# the fsync run on a follower: its metadata goes through the leader, which is what issue 13 is about.

META_PLACES = ("ext4", "single", "cluster")
META_ARGS = ("only", "seconds", "max_creates", "meta_rounds", "untar_rounds", "tree_files", "fsync_rounds",
             "fsync_files", "names_files")
NAMES_PHASES = ("create", "stat", "stat_hot", "listing", "unlink")
CREATE_MEASUREMENTS = ("creates_lone", "creates_spread", "creates_shared")  # see creator_dirs
META_METRICS: dict[str, list[wl.Metric]] = {  # figure (--only) -> its rows
    "creates": [
        wl.Metric("creates_lone", "creates, 1 creator (cluster: a follower)", "1/s", True),
        wl.Metric("creates_lone_max_ms", "  longest single create", "ms", False),
        wl.Metric("creates_spread", "creates, 3 creators, own dirs", "1/s", True),
        wl.Metric("creates_spread_max_ms", "  longest single create", "ms", False),
        wl.Metric("creates_shared", "creates, 3 creators, one dir", "1/s", True),
        wl.Metric("creates_shared_max_ms", "  longest single create", "ms", False),
    ],
    "renames": [
        wl.Metric("renames_shared", "renames, 3 workers, between two dirs", "1/s", True),
        wl.Metric("renames_shared_max_ms", "  longest single rename", "ms", False),
    ],
    "untar": wl.METRICS["untar"],
    "fsync": [wl.Metric(f"fsync_{what}_{q}_ms", f"fsync({what}) after creates, {q}", "ms", False)
              for what in ("file", "dir") for q in ("p50", "p99")],
    "names": [m for phase in NAMES_PHASES for m in (
        wl.Metric(f"names_{phase}", f"{phase}, 1 dir (cluster: a follower)", "1/s", True),
        wl.Metric(f"names_{phase}_requests", "  FUSE requests per file", "req", False),
        wl.Metric(f"names_{phase}_cpu_us", "  daemon CPU per file", "us", False))],
}
META_GOALS: dict[str, tuple[fsbench.Goal, ...]] = {  # judged on the cluster; ratios are cluster/single
    "creates_lone": (fsbench.Goal(">=2000/s", min_value=2000), fsbench.Goal(">=0.8x single", min_ratio=0.8)),
    "creates_spread": (fsbench.Goal(">=4000/s", min_value=4000),),
    "creates_shared": (fsbench.Goal(">=1000/s", min_value=1000),),
    "untar": (fsbench.Goal("<=1.5x single", max_ratio=1.5),),
    "git_status": (fsbench.Goal("<=1.5x single", max_ratio=1.5),),
    "untar_git": (fsbench.Goal("<=1.5x single", max_ratio=1.5),),
    **{f"names_{phase}": (fsbench.Goal(">=0.8x single", min_ratio=0.8),) for phase in NAMES_PHASES},
}


def creator_dirs(measurement: str, round_index: int) -> list[Path]:
    """Each creator's directory, relative to its mount: one creator alone, three in their own
    directories, three in one shared directory."""
    base = Path(f"{measurement}-{round_index}")
    if measurement == "creates_lone":
        return [base]
    if measurement == "creates_spread":
        return [base / f"c{k}" for k in range(3)]
    return [base] * 3  # creates_shared


def measure_creates(measurement: str, args: argparse.Namespace, name: str, roots: list[Path],
                    round_index: int) -> dict[str, float]:
    """Creates per second of one layout. `roots` holds one mount per creator: the same one thrice on
    ext4 and the single node, the three nodes' mounts (a follower's first) on the cluster. The
    directories are made first, untimed, through the first mount: creators on other nodes meet an
    existing directory."""
    relative = creator_dirs(measurement, round_index)
    for d in relative:
        (roots[0] / d).mkdir(parents=True, exist_ok=True)
    work = [(str(root / d), f"w{k}", args.seconds, args.max_creates) for k, (root, d) in enumerate(zip(roots, relative))]
    rate, longest = at_once(_create_worker, work, args.seconds)
    if name == "ext4":  # it would run out of inodes: its creators reach --max-creates within seconds
        shutil.rmtree(roots[0] / relative[0].parts[0])
    return {measurement: rate, f"{measurement}_max_ms": longest * 1000}


def fsync_after_creates_ms(directory: Path, files: int) -> dict[str, float]:
    """Create `files` empty files in a fresh directory, then time fsync() of the last one; again in
    a second fresh directory, timing fsync() of the directory instead (each fsync finds the creates
    still to make durable, not what the other fsync left)."""
    out = {}
    for what in ("file", "dir"):
        d = directory / what
        d.mkdir(parents=True)
        for i in range(files):
            wl.create_file(f"{d}/f{i}")
        fd = os.open(d / f"f{files - 1}", os.O_WRONLY) if what == "file" else os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            t0 = time.perf_counter()
            os.fsync(fd)
            out[f"fsync_{what}_ms"] = (time.perf_counter() - t0) * 1000
        finally:
            os.close(fd)
    return out


@dataclasses.dataclass(frozen=True)
class Daemon:
    """What the names figure reads of the daemon serving a place: its process (CPU from /proc) and
    its metrics (the FUSE requests by operation)."""

    pid: int
    metrics: Callable[[], str]

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def requests(self) -> dict[str, float]:
        counts = re.findall(r'awsomefs_fuse_request_seconds_count\{op="(\w+)"\} ([0-9.e+]+)', self.metrics())
        return {op: float(n) for op, n in counts}


def single_metrics(log_path: Path) -> Callable[[], str]:
    """A single node's metrics, at the port its log names (it was started with `--metrics-port 0`)."""
    def scrape() -> str:
        port = re.search(r"metrics on http://[^:]+:(\d+)/", log_path.read_text(errors="replace"))
        if port is None:
            raise wl.WorkloadError(f"no metrics port in {log_path}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as answer:
            return str(answer.read().decode())
    return scrape


def caches_dropped() -> int:
    """How many times a program on this machine dropped the kernel's caches (`drop_caches`; tests
    and benches do): a drop during the creates evicts every name created before it, and the
    stats then look each up again (issue 42: 0.4-0.8 lookups per file on the cluster, whose
    creates take 20-30 s here, while its names stayed cached whenever nothing dropped them)."""
    try:
        with open("/proc/vmstat") as stats:
            return next((int(line.split()[1]) for line in stats if line.startswith("drop_slab ")), 0)
    except OSError:
        return 0


def names_phases(directory: Path, files: int, daemon: Daemon | None) -> dict[str, float]:
    """Issue 42's everyday figures, one process: create `files` empty files in a fresh directory,
    stat each, stat each again at once (`stat_hot`: other programs on a shared machine may drop
    the kernel's caches between the creates and the first stats), list the directory (its first
    listing), unlink each. Per phase: files per second,
    and with `daemon` the FUSE requests and daemon CPU (µs) per file (which requests: on stderr)."""
    directory.mkdir(parents=True)
    paths = [str(directory / f"f{i}") for i in range(files)]

    def each(action: Callable[[str], object]) -> Callable[[], object]:
        return lambda: collections.deque(map(action, paths), maxlen=0)

    actions: dict[str, Callable[[], object]] = {
        "create": each(wl.create_file), "stat": each(os.stat), "stat_hot": each(os.stat),
        "listing": lambda: os.listdir(directory), "unlink": each(os.unlink)}
    out = {}
    dropped = caches_dropped()
    for phase in NAMES_PHASES:
        before = (daemon.requests(), daemon.cpu_s()) if daemon is not None else None
        t0 = time.perf_counter()
        actions[phase]()
        out[f"names_{phase}"] = files / (time.perf_counter() - t0)
        if daemon is not None and before is not None:
            time.sleep(0.2)  # a request's metric is recorded after its answer
            counts, cpu = daemon.requests(), daemon.cpu_s()
            delta = {op: n - before[0].get(op, 0.0) for op, n in counts.items() if n != before[0].get(op, 0.0)}
            out[f"names_{phase}_requests"] = sum(delta.values()) / files
            out[f"names_{phase}_cpu_us"] = (cpu - before[1]) * 1e6 / files
            now = caches_dropped()
            log(f"names {phase}: " + " ".join(f"{op}={n:.0f}" for op, n in sorted(delta.items(), key=lambda kv: -kv[1]))
                + f" (kernel caches dropped machine-wide during it: {now - dropped})")
            dropped = now
    os.rmdir(directory)
    return out


def percentile(samples: list[float], q: float) -> float:
    """Nearest rank: the smallest sample with at least q of all samples at or below it (with fewer
    than 100 samples, p99 is the maximum)."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def run_metadata_rounds(args: argparse.Namespace, places: dict[str, list[Path]], workdir: Path,
                        results: dict[str, fsbench.TargetResult], daemons: dict[str, Daemon]) -> None:
    """Every measurement of the figures in --only, each round in turn on every place (the tarball
    is made in `workdir`)."""
    def each_round(measurement: str, rounds: int, action: Callable[[str, list[Path], int], dict[str, float]]) -> None:
        for r in range(rounds):
            for name, roots in places.items():
                before = {k: len(v) for k, v in results[name].values.items()}
                fsbench._record(results[name], measurement, functools.partial(action, name, roots, r))
                new = {k: v[-1] for k, v in results[name].values.items() if len(v) > before.get(k, 0)}
                log(f"{measurement} round {r + 1}/{rounds} on {name}: {fsbench._summary(new)}")

    if "creates" in args.only:
        for measurement in CREATE_MEASUREMENTS:
            each_round(measurement, args.meta_rounds, functools.partial(measure_creates, measurement, args))
    if "renames" in args.only:
        each_round("renames", args.meta_rounds, functools.partial(measure_renames, args))
    if "untar" in args.only:
        params = wl.Params(tree_files=args.tree_files)
        tarball = wl.ensure_tarball(workdir, params.tree_files, params.seed)
        each_round("untar", args.untar_rounds,
                   lambda name, roots, r: wl.run_untar(tg.Target(name, roots[0]), params, r, tarball))
    if "fsync" in args.only:
        each_round("fsync", args.fsync_rounds,
                   lambda name, roots, r: fsync_after_creates_ms(roots[0] / f"fsync-{r}", args.fsync_files))
    if "names" in args.only:
        each_round("names", args.meta_rounds,
                   lambda name, roots, r: names_phases(roots[0] / f"names-{r}", args.names_files, daemons.get(name)))
    for result in results.values():
        for what in ("file", "dir"):
            if samples := result.values.get(f"fsync_{what}_ms"):
                for q in (50, 99):
                    result.values[f"fsync_{what}_p{q}_ms"] = [percentile(samples, q / 100)]


def metadata_rows(args: argparse.Namespace, results: dict[str, fsbench.TargetResult]) -> list[dict[str, Any]]:
    """One row per metric: medians per place, cluster/single, the goals and whether they are met."""
    rows = []
    for m in (m for figure in args.only for m in META_METRICS[figure]):
        cluster = results["cluster"].median(m.key)
        ratio = fsbench._ratio(results, m.key, "cluster", "single")
        goals = META_GOALS.get(m.key, ())
        verdicts = [g.met(cluster, ratio) for g in goals]
        rows.append({
            "metric": m.key, "label": m.label, "unit": m.unit,
            "median": {name: r.median(m.key) for name, r in results.items()},
            "cluster_vs_single": ratio, "cluster_vs_ext4": fsbench._ratio(results, m.key, "cluster", "ext4"),
            "goal": ", ".join(g.text for g in goals) or None,
            "goal_met": None if None in verdicts else all(verdicts) if verdicts else None,
        })
    return rows


def print_metadata_table(args: argparse.Namespace, results: dict[str, fsbench.TargetResult],
                         rows: list[dict[str, Any]], follower: dict[str, Any]) -> None:
    head = ["metric", "unit", *META_PLACES, "cluster/single", "target (cluster)", "met"]
    table = [head]
    for row in rows:
        met = {True: "met", False: "not met", None: "-"}[row["goal_met"]] if row["goal"] else ""
        table.append([row["label"], row["unit"], *(fsbench._cell(results[n], row["metric"]) for n in META_PLACES),
                      fsbench._fmt(row["cluster_vs_single"]), row["goal"] or "", met])
    setup = {"creates": f"creates: {args.meta_rounds} round(s) of {args.seconds:g} s (3 creators on ext4 and single: "
                        "3 processes on the one mount)",
             "renames": f"renames: {args.meta_rounds} round(s) of {args.seconds:g} s ({RENAMED_FILES} files per worker)",
             "untar": f"untar: {args.untar_rounds} round(s), {args.tree_files:,} files",
             "fsync": f"fsync after {args.fsync_files:,} creates: {args.fsync_rounds} round(s)",
             "names": f"names: {args.meta_rounds} round(s) of {args.names_files:,} files"}
    print(f"\ncluster metadata (issues 13 and 42), median (min-max); single = a 1-node AwsomeFS; "
          f"{'; '.join(setup[f] for f in args.only)}")
    print("\n".join(fsbench.format_table(table)))
    print(f"cluster: lone creator, untar and fsync on node {follower['node']}, a follower (leader: node "
          f"{follower['leader_at_start']} at the start, node {follower['leader_at_end']} at the end)")
    for name in META_PLACES:
        if results[name].error:
            print(f"{name}: not measured: {results[name].error}")
        for what, err in results[name].errors.items():
            print(f"{name}: {what} failed: {err}")


def log(msg: str) -> None:
    """Progress on stderr; stdout holds only the table."""
    print(f"cluster_bench: {msg}", file=sys.stderr, flush=True)


def metadata_main(args: argparse.Namespace) -> int:
    results = {name: fsbench.TargetResult(name) for name in META_PLACES}
    with tempfile.TemporaryDirectory(prefix="awsomefs-cluster-bench-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        log("setting up ext4, a single-node AwsomeFS and a 3-node cluster")
        ext4 = stack.enter_context(tg.ext4_target(root, 4 << 30))
        single = stack.enter_context(tg.awsomefs_target(root, "8G", AWSOMEFSD, 90))
        network = stack.enter_context(PrivateNetwork(3))
        (root / "cluster").mkdir()
        cluster = stack.enter_context(cluster_in(network, root / "cluster", size="8G"))
        for node in cluster.nodes:
            node.metrics_port = 0  # the names figure reads the follower's requests
        nodes = cluster.form(3)
        leader = cluster.leader(nodes)
        followers = [n for n in nodes if n is not leader]
        places = {"ext4": [ext4.path] * 3, "single": [single.path] * 3,
                  "cluster": [n.mount for n in [*followers, leader]]}
        log(f"cluster formed: leader node {leader.index}; node {followers[0].index}, a follower, goes first; "
            f"load average {os.getloadavg()[0]:.2f}")
        assert single.pid is not None and followers[0].proc is not None
        daemons = {"single": Daemon(single.pid, single_metrics(root / "awsomefs.log")),
                   "cluster": Daemon(followers[0].proc.pid, followers[0].scrape)}
        run_metadata_rounds(args, places, root, results, daemons)
        log(f"load average at the end {os.getloadavg()[0]:.2f}")
        follower = {"node": followers[0].index, "leader_at_start": leader.index,
                    "leader_at_end": _leader_index(cluster, nodes)}
        log("tearing down")
    rows = metadata_rows(args, results)
    print_metadata_table(args, results, rows, follower)
    if args.json:
        doc = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
               "args": {k: getattr(args, k) for k in META_ARGS},
               "follower": follower, "places": {n: dataclasses.asdict(r) for n, r in results.items()},
               "rows": rows}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return fsbench.exit_status(results)


def _leader_index(cluster: Cluster, nodes: list[Node]) -> int | None:
    try:
        return cluster.leader(nodes).index
    except (LookupError, OSError, ValueError, subprocess.SubprocessError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each create run")
    parser.add_argument("--workers", type=int, default=4, help="create processes per node")
    parser.add_argument("--seq-mib", type=int, default=256, help="MiB written per writer in the sequential test")
    parser.add_argument("--rounds", type=int, default=100, help="read-after-close samples")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--max-creates", type=int, default=MAX_CREATES_PER_WORKER,
                        help="files per creator at most (a create run ends at --seconds or here)")
    meta = parser.add_argument_group("--metadata (issue 13: cluster metadata at local speed)")
    meta.add_argument("--metadata", action="store_true",
                      help="run only these figures, next to a single-node AwsomeFS and ext4")
    meta.add_argument("--only", default=",".join(META_METRICS), help="figures: %(default)s")
    meta.add_argument("--meta-rounds", type=int, default=3, help="rounds of each create figure")
    meta.add_argument("--untar-rounds", type=int, default=1, help="rounds of untar + git status")
    meta.add_argument("--tree-files", type=int, default=wl.Params().tree_files, help="files in the untar tree")
    meta.add_argument("--fsync-rounds", type=int, default=5, help="fsync samples (each after fresh creates)")
    meta.add_argument("--fsync-files", type=int, default=1000, help="files created before each fsync")
    meta.add_argument("--names-files", type=int, default=10_000, help="files of the names figure")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, loop devices, FUSE)", file=sys.stderr)
        return 2
    if args.metadata:
        args.only = fsbench._choices(parser, args.only, tuple(META_METRICS), "--only")
        return metadata_main(args)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="awsomefs-cluster-bench-") as tmp:
        root = Path(tmp)
        with tg.ext4_target(root, 4 << 30) as ext4:
            results["ext4_creates_per_s"] = creates_per_s(
                [ext4.path / f"w{k}" for k in range(args.workers)], args.seconds, args.max_creates)
            results["ext4_seq_write_mib_s"] = seq_write_mib_s([ext4.path / "seq"], args.seq_mib * MiB)
        with tg.raw_target(root, (args.seq_mib + 64) * MiB) as raw:
            results["raw_seq_write_mib_s"] = raw_seq_write_mib_s(raw.path, args.seq_mib * MiB)
        with PrivateNetwork(3) as network, cluster_in(network, root / "cluster", size="8G") as cluster:
            (root / "cluster").mkdir(exist_ok=True)
            nodes = cluster.form(3)
            a, b, _c = nodes
            results["creates_per_s_one_node"] = creates_per_s(
                [a.mount / "one" / f"w{k}" for k in range(args.workers)], args.seconds, args.max_creates)
            results["creates_per_s_three_nodes"] = creates_per_s(
                [n.mount / "three" / f"n{n.index}w{k}" for n in nodes for k in range(args.workers)], args.seconds, args.max_creates)
            results["read_after_close"] = read_after_close_ms(a, b, args.rounds)
            results["seq_write_mib_s_one_node"] = seq_write_mib_s([a.mount / "seq-a"], args.seq_mib * MiB)
            results["seq_write_mib_s_two_nodes"] = seq_write_mib_s(
                [a.mount / "seq2-a", b.mount / "seq2-b"], args.seq_mib * MiB)
            results["failover"] = failover(cluster, nodes)
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def print_table(r: dict[str, Any], args: argparse.Namespace) -> None:
    rac, fo = r["read_after_close"], r["failover"]
    one, three = r["creates_per_s_one_node"], r["creates_per_s_three_nodes"]
    rows = [
        (f"creates/s, one node ({args.workers} procs)", f"{one:,.0f}",
         f"ext4 {r['ext4_creates_per_s']:,.0f} ({one / r['ext4_creates_per_s']:.3f}x)"),
        ("creates/s, three nodes at once", f"{three:,.0f}", f"target >= 4,000: {'met' if three >= 4000 else 'not met'}; "
                                                            f"{three / one:.2f}x one node"),
        ("read-after-close 4 KiB, p50 / p99", f"{rac['p50_ms']:.2f} / {rac['p99_ms']:.2f} ms",
         f"max {rac['max_ms']:.1f} ms"),
        ("seq write 1 MiB + fsync, one node", f"{r['seq_write_mib_s_one_node']:,.0f} MiB/s",
         f"ext4 {r['ext4_seq_write_mib_s']:,.0f}, raw {r['raw_seq_write_mib_s']:,.0f} MiB/s"),
        ("seq write, two nodes at once", f"{r['seq_write_mib_s_two_nodes']:,.0f} MiB/s",
         f"{r['seq_write_mib_s_two_nodes'] / r['seq_write_mib_s_one_node']:.2f}x one node"),
        ("leader killed: new leader after", f"{fo['new_leader_s']:.2f} s",
         f"writer on a survivor stalled {fo['writer_stall_s']:.2f} s"),
    ]
    width = max(len(k) for k, _, _ in rows)
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>22}  {note}")


if __name__ == "__main__":
    raise SystemExit(main())
