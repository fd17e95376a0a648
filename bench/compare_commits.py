#!/usr/bin/env python3
"""Before/after: `fsbench.py` (or `--bench workers_bench.py`) on two commits, alternately, in both
orders, with medians side by side.

As root (from another user: sudo in front), from the repository root:

    .venv/bin/python bench/compare_commits.py BEFORE AFTER [--rounds 4] [--bench SCRIPT] [-- its args]

e.g. `bench/compare_commits.py 908347c HEAD --rounds 4 -- --quick --targets ext4,awsomefs --only meta,untar`,
or `bench/compare_commits.py main HEAD --bench workers_bench.py -- --modes 0,1,2 --runs 1` (each
figure is then "<read_workers> <metric>", the median of that round's runs), or
`bench/compare_commits.py main HEAD --bench site_bench.py -- --runs 1 --only write,rate,lag` (each
commit's own site_bench.py and daemons; one run a round), or `bench/compare_commits.py main HEAD
--bench contended_bench.py -- --rounds 1` (this checkout's bench, each commit's daemons), or
`bench/compare_commits.py main HEAD --bench cluster_bench.py -- --metadata --seconds 3 --meta-rounds 1`
(each commit's own cluster_bench.py and daemons; the follower's figures and their ratio to the
single node of the same run).

Each commit is checked out in a temporary git worktree and measured with its own bench/ and its
own daemon (this checkout's .venv); with `--bench workers_bench.py`, with this checkout's bench. Why alternate, and in both orders: on a shared machine the
first of two back-to-back runs is often faster than the second, whichever commit it is (measured
while checking issue 12), so one order alone shows a difference that is only the order. Odd
rounds run BEFORE first, even rounds AFTER first. The table gives, per metric, the median of each
side's AwsomeFS figures, their ratio, and the ratio within each order; a change that is real shows
in both orders.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), commit],
                   check=True, capture_output=True)
    return where


def run_fsbench(tree: Path, out: Path, fsbench_args: list[str]) -> dict[str, float]:
    """AwsomeFS's first figure of each metric from one fsbench run in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "bench/fsbench.py", *fsbench_args, "--json", str(out),
                    "--workdir", str(out.parent / "work")], cwd=tree, env=env, check=False)
    values = json.loads(out.read_text())["targets"]["awsomefs"]["values"]
    return {metric: figures[0] for metric, figures in values.items() if figures}


def run_workers_bench(tree: Path, out: Path, bench_args: list[str]) -> dict[str, float]:
    """Each mode's median of each figure from one run of this checkout's workers_bench against the
    daemon of `tree` (the bench of an older commit may lack what this one measures)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(REPO / "bench/workers_bench.py"), *bench_args, "--json", str(out)],
                   cwd=tree, env=env, check=False)
    rows = json.loads(out.read_text())
    return {f"{mode} {key}": statistics.median(run[key] for run in runs)
            for mode, runs in rows.items() for key in runs[0]}


def run_site_bench(tree: Path, out: Path, bench_args: list[str]) -> dict[str, float]:
    """The figures of one run of `tree`'s own site_bench.py (its daemons are that tree's): give
    `--runs 1` and the figures to measure, e.g. `-- --runs 1 --only write,rate,lag`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "bench/site_bench.py", *bench_args, "--json", str(out)], cwd=tree, env=env,
                   check=False)
    runs = json.loads(out.read_text())["runs"]
    return {key: value for figures in runs.values() for key, value in figures[0].items()}


def run_contended_bench(tree: Path, out: Path, bench_args: list[str]) -> dict[str, float]:
    """The figures of one run of this checkout's contended_bench.py with the daemons of `tree`
    (`--tree`: an older commit has no such bench), e.g. `-- --rounds 1 --only shared,renames`."""
    subprocess.run([sys.executable, str(REPO / "bench/contended_bench.py"), *bench_args, "--tree", str(tree),
                    "--json", str(out)], check=False)
    return dict(json.loads(out.read_text())["figures"])


def run_cluster_bench(tree: Path, out: Path, bench_args: list[str]) -> dict[str, float]:
    """The follower's figures of one run of `tree`'s own cluster_bench.py (its daemons are that
    tree's), and each next to the single node of the same run ("/single"), e.g. `-- --metadata
    --seconds 3 --meta-rounds 1 --only creates,untar,names`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "bench/cluster_bench.py", *bench_args, "--json", str(out)], cwd=tree, env=env,
                   check=False)
    figures: dict[str, float] = {}
    for row in json.loads(out.read_text())["rows"]:
        if row["median"].get("cluster") is not None:
            figures[row["metric"]] = row["median"]["cluster"]
        if row.get("cluster_vs_single") is not None:
            figures[row["metric"] + "/single"] = row["cluster_vs_single"]
    return figures


BENCHES = {"fsbench.py": run_fsbench, "workers_bench.py": run_workers_bench, "site_bench.py": run_site_bench,
           "contended_bench.py": run_contended_bench, "cluster_bench.py": run_cluster_bench}


def _ratio(before: list[tuple[int, float]], after: list[tuple[int, float]], rounds: set[int]) -> str:
    """after/before of the medians over `rounds` (one order of the pairs)."""
    b = [v for r, v in before if r in rounds]
    a = [v for r, v in after if r in rounds]
    return f"{statistics.median(a) / statistics.median(b):.2f}" if a and b and statistics.median(b) else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=4, help="before/after pairs (default 4: two in each order)")
    parser.add_argument("--bench", choices=sorted(BENCHES), default="fsbench.py", help="default %(default)s")
    args, rest = parser.parse_known_args()
    bench_args = [a for a in rest if a != "--"]
    if args.bench == "fsbench.py":
        bench_args = bench_args or ["--quick", "--targets", "ext4,awsomefs"]
    results: dict[str, dict[str, list[tuple[int, float]]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory(prefix="awsomefs-compare-", dir="/var/tmp") as tmp:
        trees = {side: worktree(commit, Path(tmp) / side)
                 for side, commit in (("before", args.before), ("after", args.after))}
        try:
            for round_ in range(args.rounds):
                order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
                for side in order:
                    print(f"compare: round {round_ + 1}/{args.rounds}: {side}", flush=True)
                    figures = BENCHES[args.bench](trees[side], Path(tmp) / f"{side}-{round_}.json", bench_args)
                    print(f"compare: round {round_ + 1} {side}: {json.dumps(figures)}", flush=True)
                    for metric, value in figures.items():
                        results[side].setdefault(metric, []).append((round_, value))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               check=False, capture_output=True)
    print(f"\n{'metric':24} {'before':>12} {'after':>12} {'after/before':>12} "
          f"{'before first':>13} {'after first':>12}")
    for metric in results["before"]:
        if metric.endswith(("load_before", "load_after")):
            loads = [v for side in results.values() for _, v in side.get(metric, [])]
            print(f"{metric:24} {min(loads):>12.1f} {max(loads):>12.1f}   (1-minute load average: lowest, highest)")
            continue
        before, after = results["before"][metric], results["after"].get(metric, [])
        if not after:
            continue

        mb, ma = statistics.median(v for _, v in before), statistics.median(v for _, v in after)
        evens = {r for r in range(args.rounds) if r % 2 == 0}
        odds = set(range(args.rounds)) - evens
        print(f"{metric:24} {mb:>12.4g} {ma:>12.4g} {ma / mb if mb else float('nan'):>12.2f} "
              f"{_ratio(before, after, evens):>13} {_ratio(before, after, odds):>12}")
    print("\n(ratios of AwsomeFS figures: above 1 is more of the metric after; for times, more is slower)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
