#!/usr/bin/env python3
"""Contended directories (issue 42): a real 3-node cluster, one creator per node in one directory,
every single create timed (median, p90, p99, the longest, a histogram), next to the same three in
their own directories and a lone creator on a follower; renames by three nodes between two
directories, each timed the same way. What a create in a contended directory waits for is a
hand-over of the directory's delegation (docs/delegations.md, "Contended directories").

As root (from another user: sudo in front), from the repository root:

    .venv/bin/python bench/contended_bench.py [--seconds 3] [--rounds 2] [--only shared,spread,lone,renames]
        [--tree DIR] [--timeline] [--logs DIR] [--json F]

`--tree DIR`: run the daemons from that checkout (bench/compare_commits.py gives each commit's
worktree; the bench is this one). `--timeline`: the daemons log at debug level and the hand-over
lines they write (cluster/coherence_handover.py: when the request came, when the turn ended, the
writers, the flush, the commit; the waiter's whole wait) are summarised under the table, one
median and maximum per step. The 1-minute load average is printed before and after every
layout: the machine is shared, so compare figures of one run, or alternate builds
(`bench/compare_commits.py OLD NEW --bench contended_bench.py -- --rounds 1`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]  # bench's modules import each other by bare name

import workloads as wl  # noqa: E402

from awsomefsd.cli.devcluster.network import PrivateNetwork  # noqa: E402
from tests.support.cluster import Node, cluster_in  # noqa: E402

LAYOUTS = ("shared", "spread", "lone", "renames")
RENAMED_FILES = 50  # per rename worker, as bench/cluster_bench.py
BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
MAX_CREATES = 40_000


def _creator(job: tuple[str, str, float, Any]) -> list[float]:
    """Empty files `<directory>/<name>.<n>` (O_CREAT|O_EXCL, close) for `seconds`: each one's seconds."""
    directory, name, seconds, start = job
    start.wait()
    times: list[float] = []
    t0 = now = time.monotonic()
    while now < t0 + seconds and len(times) < MAX_CREATES:
        wl.create_file(f"{directory}/{name}.{len(times)}")
        began, now = now, time.monotonic()
        times.append(now - began)
    return times


def _renamer(job: tuple[str, str, str, float, Any]) -> list[float]:
    """Its own files moved from `a` to `b` one by one, then back, for `seconds`: each rename's seconds."""
    a, b, name, seconds, start = job
    for k in range(RENAMED_FILES):
        wl.create_file(f"{a}/{name}.{k}")
    start.wait()
    times: list[float] = []
    t0 = now = time.monotonic()
    while now < t0 + seconds:
        n = len(times)
        source, target = (a, b) if n // RENAMED_FILES % 2 == 0 else (b, a)
        os.rename(f"{source}/{name}.{n % RENAMED_FILES}", f"{target}/{name}.{n % RENAMED_FILES}")
        began, now = now, time.monotonic()
        times.append(now - began)
    return times


def at_once(worker: Any, jobs: list[tuple[Any, ...]], seconds: float) -> list[list[float]]:
    """One process per job, started together; each one's operation times."""
    with multiprocessing.Manager() as manager:
        start = manager.Event()
        with multiprocessing.Pool(len(jobs)) as pool:
            result = pool.map_async(worker, [(*job, start) for job in jobs])
            time.sleep(0.5)  # the workers are up and waiting
            start.set()
            return result.get(seconds * 10 + 120)  # type: ignore[no-any-return]


def figures(layout: str, times: list[list[float]], seconds: float) -> dict[str, float]:
    """Operations per second in total, and the single operations' median, p90, p99 and longest (ms)."""
    every = sorted(t * 1000 for one in times for t in one)
    out = {f"{layout}_per_s": sum(len(one) for one in times) / seconds}
    for q in (50, 90, 99):
        out[f"{layout}_p{q}_ms"] = every[min(len(every) - 1, len(every) * q // 100)] if every else float("nan")
    out[f"{layout}_max_ms"] = every[-1] if every else float("nan")
    return out


def histogram(times: list[list[float]]) -> str:
    """How many single operations took at most each bucket's milliseconds (and more than the previous)."""
    counts = [0] * (len(BUCKETS_MS) + 1)
    for t in (t * 1000 for one in times for t in one):
        counts[next((k for k, edge in enumerate(BUCKETS_MS) if t <= edge), len(BUCKETS_MS))] += 1
    labels = [f"<={edge}ms" for edge in BUCKETS_MS] + [f">{BUCKETS_MS[-1]}ms"]
    return "  ".join(f"{label}:{n}" for label, n in zip(labels, counts) if n)


def run_layout(layout: str, mounts: list[Path], round_index: int, seconds: float) -> list[list[float]]:
    """One layout on the cluster's mounts (a follower's first); its directories made untimed first."""
    base = f"{layout}-{round_index}"
    if layout == "renames":
        (mounts[0] / base / "a").mkdir(parents=True)
        (mounts[0] / base / "b").mkdir()
        return at_once(_renamer, [(str(m / base / "a"), str(m / base / "b"), f"w{k}", seconds)
                                  for k, m in enumerate(mounts)], seconds)
    dirs = {"shared": [base] * 3, "spread": [f"{base}/c{k}" for k in range(3)], "lone": [base]}[layout]
    for d in dirs:
        (mounts[0] / d).mkdir(parents=True, exist_ok=True)
    return at_once(_creator, [(str(m / d), f"w{k}", seconds) for k, (m, d) in enumerate(zip(mounts, dirs))], seconds)


HAND_OVER = re.compile(r"hand-over of (\d+) to node (\d+): asked \+([\d.]+) ms after the grant, turn ended \+([\d.]+), "
                       r"writers \+([\d.]+), flushed \+([\d.]+), committed \+([\d.]+) ms")
WAITED = re.compile(r"waited ([\d.]+) ms for the lease of (\d+)")


def timeline(logs: list[Path]) -> list[str]:
    """The hand-over steps the daemons logged (debug level), as medians and maxima (ms)."""
    steps: dict[str, list[float]] = {}
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            if m := HAND_OVER.search(line):
                asked, turn, writers, flushed, committed = map(float, m.groups()[2:])
                for name, value in (("request seen, after the grant", asked), ("turn, after the request", turn - asked),
                                    ("writers in progress", writers - turn), ("flush", flushed - writers),
                                    ("release + grant committed", committed - flushed),
                                    ("whole hand-over, after the request", committed - asked)):
                    steps.setdefault(name, []).append(value)
            elif m := WAITED.search(line):
                steps.setdefault("a waiter's whole wait", []).append(float(m.group(1)))
    return [f"  {name:36} n={len(v):5}  median {statistics.median(v):7.1f} ms  max {max(v):7.1f} ms"
            for name, v in steps.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each layout's run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every layout")
    parser.add_argument("--only", default=",".join(LAYOUTS), help=f"layouts: {','.join(LAYOUTS)}")
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout the daemons run from")
    parser.add_argument("--timeline", action="store_true", help="daemons at debug level; hand-over steps summarised")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--logs", type=Path, help="copy the daemons' logs into this directory at the end")
    args = parser.parse_args()
    layouts = [x for x in args.only.split(",") if x]
    if unknown := set(layouts) - set(LAYOUTS):
        parser.error(f"unknown layouts: {', '.join(sorted(unknown))}")
    env = {"PYTHONPATH": str(args.tree.resolve())}
    if args.timeline:
        env["AWSOMEFS_LOG__LEVEL"] = "debug"
    samples: dict[str, list[float]] = {}
    times: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="awsomefs-contended-") as tmp, contextlib.ExitStack() as stack:
        network = stack.enter_context(PrivateNetwork(3))
        cluster = stack.enter_context(cluster_in(network, Path(tmp), size="4G", env=env))
        nodes: list[Node] = cluster.form(3)
        leader = cluster.leader(nodes)
        mounts = [n.mount for n in [*(n for n in nodes if n is not leader), leader]]
        for r in range(args.rounds):
            for layout in layouts:
                load = os.getloadavg()[0]
                took = run_layout(layout, mounts[:1] if layout == "lone" else mounts, r, args.seconds)
                times.setdefault(layout, []).extend(took)
                got = figures(layout, took, args.seconds)
                got[f"{layout}_load_before"], got[f"{layout}_load_after"] = load, os.getloadavg()[0]
                for key, value in got.items():
                    samples.setdefault(key, []).append(value)
                print(f"contended_bench: round {r + 1}/{args.rounds} {layout}: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in got.items()), file=sys.stderr, flush=True)
        steps = timeline([n.log_path for n in nodes]) if args.timeline else []
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for n in nodes:
                shutil.copy(n.log_path, args.logs / n.log_path.name)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    print(f"contended directories, {args.rounds} round(s) of {args.seconds:g} s; medians (min-max) over rounds")
    for key, values in samples.items():
        print(f"  {key:24} {medians[key]:10.1f}  ({min(values):.1f}-{max(values):.1f})")
    for layout, took in times.items():
        print(f"  {layout} single operations: {histogram(took)}")
    if steps:
        print("hand-overs (from the daemons' debug lines):", *steps, sep="\n")
    if args.json:
        args.json.write_text(json.dumps({"figures": medians, "samples": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
