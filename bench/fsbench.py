#!/usr/bin/env python3
"""AwsomeFS vs ext4 vs the raw device: one command that sets up, measures, compares and tears down.

Run as root on the machine under test, e.g.

    .venv/bin/python bench/fsbench.py --runs 3 --size 4G --json out.json
    .venv/bin/python bench/fsbench.py --quick --targets ext4,raw        # smoke test, ~1 minute

The table puts AwsomeFS next to ext4 (and the raw loop device for fio) with the goals from the issue,
so a regression or an improvement shows as a ratio rather than as a number one has to remember.
See bench/README.md for what each workload does and why it is configured the way it is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moosefs as mfs
import realprograms as rp
import targets as tg
import workloads as wl

REPO = Path(__file__).resolve().parent.parent
# The daemon of the interpreter running the harness: the checkout's own code under its .venv.
DEFAULT_DAEMON = f"{shlex.quote(sys.executable)} -m awsomefsd"
ALL_TARGETS = ("ext4", "raw", "awsomefs", "awsomefs-pyfuse3", "kernelfloor", "fusefloor", "moosefs")
ALL_WORKLOADS = ("seq", "rand", "meta", "untar", "sqlite", *rp.WORKLOADS)
FLOOR_TARGETS = ("kernelfloor", "fusefloor")  # keep nothing: no real program can run on them
METRICS = {**wl.METRICS, **rp.METRICS}
RAW_WORKLOADS = ("seq", "rand")
EXIT_PARTIAL = 3

QUICK = wl.Params(
    file_size=64 << 20,
    rand_size=64 << 20,
    rand_runtime_s=2,
    meta_files=1000,
    meta_procs=2,
    meta_dirs=4,
    tree_files=400,
    sqlite_txns=200,
    timeout_s=300,
)


@dataclass(frozen=True)
class Goal:
    """A target from the issues: AwsomeFS/ext4 ratio bounds, or an absolute bound for AwsomeFS."""

    text: str
    min_ratio: float | None = None
    max_ratio: float | None = None
    min_value: float | None = None
    max_value: float | None = None
    min_floor_ratio: float | None = None  # AwsomeFS / the do-nothing FUSE filesystem

    def met(self, value: float | None, ratio: float | None, floor_ratio: float | None = None) -> bool | None:
        """True/False when it can be judged, None when a number is missing."""
        if self.min_value is not None:
            return None if value is None else value >= self.min_value
        if self.max_value is not None:
            return None if value is None else value <= self.max_value
        if self.min_floor_ratio is not None:
            return None if floor_ratio is None else floor_ratio >= self.min_floor_ratio
        if ratio is None:
            return None
        if self.min_ratio is not None:
            return ratio >= self.min_ratio
        return ratio <= (self.max_ratio or float("inf"))


GOALS: dict[str, Goal] = {  # issue 14 (FUSE transport v2)
    "seq_write": Goal(">=0.90x ext4", min_ratio=0.90),
    "seq_read": Goal(">=0.90x ext4", min_ratio=0.90),
    "rand_read": Goal(">=20000 IOPS", min_value=20_000),
    "rand_write_direct": Goal(">=15000 IOPS", min_value=15_000),
    "rand_write_buffered": Goal(">=0.80x floor", min_floor_ratio=0.80),
    "meta_single_create": Goal(">=10000/s", min_value=10_000),
    "meta_spread_create": Goal(">=10000/s", min_value=10_000),
    "meta_single_unlink": Goal(">=10000/s", min_value=10_000),
    "meta_single_readdir": Goal(">=1000000/s", min_value=1_000_000),
    "meta_single_readdir_hot": Goal(">=1000000/s", min_value=1_000_000),
    "meta_single_stat_hot": Goal(">=0.90x ext4", min_ratio=0.90),
    "meta_spread_stat_hot": Goal(">=0.90x ext4", min_ratio=0.90),
    "untar": Goal("<=1.0 s", max_value=1.0),
    "git_status": Goal("<=0.05 s", max_value=0.05),
    # issue 40: real programs (and ahead of MooseFS: the aws/moosefs column, < 1 for times)
    "rsync": Goal("<=4x ext4", max_ratio=4.0),
    "sqlite_vacuum": Goal("<=4x ext4", max_ratio=4.0),
    "fsx": Goal("<=4x ext4", max_ratio=4.0),
}


@dataclass
class TargetResult:
    """Everything measured (or failed) on one target."""

    name: str
    error: str | None = None
    skipped: bool = False  # not installed here: reported, but not a failed run
    values: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def median(self, key: str) -> float | None:
        vals = self.values.get(key)
        return statistics.median(vals) if vals else None


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; size flags left unset take the full or --quick defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, help="repetitions of each workload (default 3, --quick: 1)")
    p.add_argument("--size", help="size of each device image (default 4G, --quick: 1G)")
    p.add_argument("--only", default=",".join(ALL_WORKLOADS), help="workloads: " + ",".join(ALL_WORKLOADS))
    p.add_argument("--targets", default="ext4,raw,awsomefs,kernelfloor,moosefs",
                   help="targets: " + ",".join(ALL_TARGETS) + " (awsomefs-pyfuse3: the fallback transport; "
                   "kernelfloor, fusefloor: do-nothing filesystems on each transport)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--awsomefsd", default=DEFAULT_DAEMON, help="daemon command (default: %(default)s)")
    p.add_argument("--awsomefsd-timeout", type=float, default=60, help="seconds to wait for the ready line")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/awsomefs-bench"), help="images (not tmpfs)")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 run: a smoke test")
    p.add_argument("--file-size", help="seq file size (default 1G)")
    p.add_argument("--rand-size", help="random-read file size (default 1G)")
    p.add_argument("--rand-runtime", type=int, help="seconds per random-read run (default 15)")
    p.add_argument("--meta-files", type=int, help="files per metadata layout (default 12000)")
    p.add_argument("--meta-procs", type=int, help="metadata worker processes (default 4)")
    p.add_argument("--tree-files", type=int, help="files in the untar tree (default 4000)")
    p.add_argument("--rsync-entries", type=int, help="entries of the rsync tree (default 70000, --quick: 3000)")
    p.add_argument("--vacuum-mb", type=int, help="size of the VACUUM database in MB (default 200, --quick: 20)")
    p.add_argument("--fsx-ops", type=int, help="fsx operations (default 20000, --quick: 2000)")
    args = p.parse_args(argv)
    args.only = _choices(p, args.only, ALL_WORKLOADS, "--only")
    args.targets = _choices(p, args.targets, ALL_TARGETS, "--targets")
    args.runs = args.runs or (1 if args.quick else 3)
    args.size = args.size or ("1G" if args.quick else "4G")
    return args


def _choices(parser: argparse.ArgumentParser, text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    """Comma list validated against `allowed`, kept in canonical order."""
    chosen = {s.strip() for s in text.split(",") if s.strip()}
    if unknown := chosen - set(allowed):
        parser.error(f"{flag}: unknown {', '.join(sorted(unknown))} (choose from {', '.join(allowed)})")
    return [a for a in allowed if a in chosen]


def build_params(args: argparse.Namespace) -> wl.Params:
    """Full or quick defaults, with any explicit size flag on top."""
    params = QUICK if args.quick else wl.Params()
    overrides: dict[str, Any] = {
        "file_size": args.file_size and tg.parse_size(args.file_size),
        "rand_size": args.rand_size and tg.parse_size(args.rand_size),
        "rand_runtime_s": args.rand_runtime,
        "meta_files": args.meta_files,
        "meta_procs": args.meta_procs,
        "tree_files": args.tree_files,
    }
    return dataclasses.replace(params, **{k: v for k, v in overrides.items() if v})


def build_real_params(args: argparse.Namespace) -> rp.RealParams:
    """The real programs' sizes: full or quick, with any explicit flag on top."""
    real = rp.QUICK if args.quick else rp.RealParams()
    overrides = {"rsync_entries": args.rsync_entries, "vacuum_mb": args.vacuum_mb, "fsx_ops": args.fsx_ops}
    return dataclasses.replace(real, **{k: v for k, v in overrides.items() if v})


# ---------------------------------------------------------------------------------------------
# environment checks and cleanup guards


def preflight(args: argparse.Namespace, params: wl.Params) -> None:
    """Fail early, with a reason, on what would otherwise fail halfway through."""
    if os.geteuid() != 0:
        sys.exit("fsbench: must run as root (losetup, mount, drop_caches)")
    needed = ["losetup", "mkfs.ext4", "mount", "umount", "tar", "git"]
    if {"seq", "rand"} & set(args.only):
        needed.append(wl.FIO)
    needed += [tool for workload, tool in (("rsync", "rsync"), ("vacuum", "sqlite3")) if workload in args.only]
    if missing := [c for c in needed if not shutil.which(c)]:
        sys.exit(f"fsbench: missing tools: {', '.join(missing)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(args.workdir)], capture_output=True, text=True)
    if fstype.stdout.strip() in ("tmpfs", "ramfs"):
        sys.exit(f"fsbench: {args.workdir} is on {fstype.stdout.strip()}; images must be on a local disk")
    biggest = max(params.file_size, params.rand_size)
    if biggest * 2 > tg.parse_size(args.size):
        sys.exit(f"fsbench: --size {args.size} too small for {biggest >> 20} MiB files")


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """One harness per work dir: two would fight over the same images and loop devices."""
    with open(workdir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"fsbench: another fsbench is using {workdir}")
        yield


def _raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C, so the `finally` blocks tear the targets down."""
    raise KeyboardInterrupt(f"signal {signum}")


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the table."""
    print(f"fsbench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# running


def start_targets(
    stack: contextlib.ExitStack, args: argparse.Namespace
) -> tuple[list[tg.Target], dict[str, TargetResult]]:
    """Bring up each requested target; one that fails is reported and the others still run."""
    size_bytes = tg.parse_size(args.size)
    factories: dict[str, Callable[[], contextlib.AbstractContextManager[tg.Target]]] = {
        "ext4": lambda: tg.ext4_target(args.workdir, size_bytes),
        "raw": lambda: tg.raw_target(args.workdir, size_bytes),
        "awsomefs": lambda: tg.awsomefs_target(
            args.workdir, args.size, shlex.split(args.awsomefsd), args.awsomefsd_timeout
        ),
        "awsomefs-pyfuse3": lambda: tg.awsomefs_target(
            args.workdir, args.size, shlex.split(args.awsomefsd), args.awsomefsd_timeout, transport="pyfuse3"
        ),
        "kernelfloor": lambda: tg.floor_target("kernelfloor", args.workdir, sys.executable, args.awsomefsd_timeout),
        "fusefloor": lambda: tg.floor_target("fusefloor", args.workdir, sys.executable, args.awsomefsd_timeout),
        "moosefs": lambda: mfs.moosefs_target(args.workdir, size_bytes, args.awsomefsd_timeout),
    }
    up: list[tg.Target] = []
    results: dict[str, TargetResult] = {}
    for name in args.targets:
        if name == "raw" and not set(RAW_WORKLOADS) & set(args.only):
            continue
        results[name] = TargetResult(name)
        log(f"setting up {name}")
        try:
            up.append(stack.enter_context(factories[name]()))
        except (tg.TargetError, OSError, subprocess.SubprocessError) as err:
            results[name].error = str(err)
            results[name].skipped = isinstance(err, tg.TargetSkipped)
            log(f"{name} unavailable: {err}")
    return up, results


def _record(result: TargetResult, workload: str, action: Callable[[], dict[str, float]]) -> None:
    """Run one workload on one target; a failure is kept as text and later runs of it are skipped."""
    if workload in result.errors:
        return
    try:
        for key, value in action().items():
            result.values.setdefault(key, []).append(value)
    except (wl.WorkloadError, OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
        result.errors[workload] = f"{type(err).__name__}: {err}"
        log(f"{workload} failed on {result.name}: {err}")


def _summary(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())


def run_workloads(
    args: argparse.Namespace, params: wl.Params, up: list[tg.Target], results: dict[str, TargetResult]
) -> None:
    """Each workload `runs` times; within a run the targets take turns, so drift hits all alike."""
    inputs = prepare_inputs(args, params)
    for workload in args.only:
        here = [t for t in up if workload in RAW_WORKLOADS or not t.is_block_device]
        if workload in rp.WORKLOADS:
            here = [t for t in here if t.name not in FLOOR_TARGETS]
        prepare = {"seq": wl.prepare_seq, "rand": wl.prepare_rand}.get(workload)
        for t in here:
            if prepare is not None:
                log(f"{workload}: untimed warm-up write on {t.name}")
                _record(results[t.name], workload, _untimed(prepare, t, params))
        for run_index in range(args.runs):
            for t in here:
                action = _action(workload, t, params, args.real, run_index, inputs)
                before = {k: len(v) for k, v in results[t.name].values.items()}
                _record(results[t.name], workload, action)
                new = {k: v[-1] for k, v in results[t.name].values.items() if len(v) > before.get(k, 0)}
                if new:
                    log(f"{workload} run {run_index + 1}/{args.runs} on {t.name}: {_summary(new)}")
        for t in here:
            if workload in RAW_WORKLOADS:
                wl.cleanup_fio_files(t)


def _untimed(
    prepare: Callable[[tg.Target, wl.Params], None], t: tg.Target, params: wl.Params
) -> Callable[[], dict[str, float]]:
    """A preparation step in the shape `_record` takes: it reports failures but no numbers."""

    def action() -> dict[str, float]:
        prepare(t, params)
        return {}

    return action


def prepare_inputs(args: argparse.Namespace, params: wl.Params) -> dict[str, Path]:
    """Generate (once per size and seed, in the work dir) what the chosen workloads read."""
    real: rp.RealParams = args.real
    makers: dict[str, Callable[[], Path]] = {
        "untar": lambda: wl.ensure_tarball(args.workdir, params.tree_files, params.seed),
        "rsync": lambda: rp.ensure_tree(args.workdir, real.rsync_entries, real.seed),
        "vacuum": lambda: rp.ensure_database(args.workdir, real.vacuum_mb, real.seed),
    }
    inputs = {}
    for workload in args.only:
        if workload in makers:
            log(f"{workload}: preparing its input in {args.workdir}")
            inputs[workload] = makers[workload]()
    return inputs


def _action(
    workload: str, t: tg.Target, params: wl.Params, real: rp.RealParams, run_index: int, inputs: dict[str, Path]
) -> Callable[[], dict[str, float]]:
    if workload == "seq":
        return lambda: wl.run_seq(t, params, run_index)
    if workload == "rand":
        return lambda: wl.run_rand(t, params, run_index)
    if workload == "meta":
        return lambda: wl.run_meta(t, params, run_index)
    if workload == "sqlite":
        return lambda: wl.run_sqlite(t, params, run_index)
    if workload == "rsync":
        return lambda: rp.run_rsync(t, real, run_index, inputs["rsync"])
    if workload == "vacuum":
        return lambda: rp.run_vacuum(t, real, run_index, inputs["vacuum"])
    if workload == "fsx":
        return lambda: rp.run_fsx(t, real, run_index)
    return lambda: wl.run_untar(t, params, run_index, inputs["untar"])


# ---------------------------------------------------------------------------------------------
# reporting


def _fmt(value: float | None) -> str:
    """Readable numbers: thousands separators for big ones, 3 significant digits for small."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cell(result: TargetResult | None, key: str) -> str:
    """median, with (min-max) when there is more than one run."""
    if result is None or not result.values.get(key):
        return "-"
    vals = result.values[key]
    text = _fmt(statistics.median(vals))
    if len(vals) > 1:
        text += f" ({_fmt(min(vals))}-{_fmt(max(vals))})"
    return text


def _ratio(results: dict[str, TargetResult], key: str, num: str, den: str) -> float | None:
    a = results[num].median(key) if num in results else None
    b = results[den].median(key) if den in results else None
    return a / b if a is not None and b else None


def comparison_rows(args: argparse.Namespace, results: dict[str, TargetResult]) -> list[dict[str, Any]]:
    """One row per metric with medians, ratios and the goal verdict (also the JSON payload)."""
    rows = []
    for workload in args.only:
        for m in METRICS[workload]:
            goal = GOALS.get(m.key)
            aw_ext4 = _ratio(results, m.key, "awsomefs", "ext4")
            aw_floor = _ratio(results, m.key, "awsomefs", "kernelfloor")
            aw = results["awsomefs"].median(m.key) if "awsomefs" in results else None
            rows.append(
                {
                    "workload": workload,
                    "metric": m.key,
                    "label": m.label,
                    "unit": m.unit,
                    "higher_is_better": m.higher_is_better,
                    "median": {name: r.median(m.key) for name, r in results.items()},
                    "awsomefs_vs_ext4": aw_ext4,
                    "awsomefs_vs_raw": _ratio(results, m.key, "awsomefs", "raw") if m.raw else None,
                    "ext4_vs_raw": _ratio(results, m.key, "ext4", "raw") if m.raw else None,
                    "awsomefs_vs_floor": aw_floor,
                    "awsomefs_vs_pyfuse3": _ratio(results, m.key, "awsomefs", "awsomefs-pyfuse3"),
                    "awsomefs_vs_moosefs": _ratio(results, m.key, "awsomefs", "moosefs"),
                    "goal": goal.text if goal else None,
                    "goal_met": goal.met(aw, aw_ext4, aw_floor) if goal else None,
                }
            )
    return rows


def print_table(
    args: argparse.Namespace, results: dict[str, TargetResult], rows: list[dict[str, Any]], out: TextIO
) -> None:
    """Fixed-width table: median (min-max) per target, ratios, goal and verdict."""
    names = [n for n in ALL_TARGETS if n in results]
    ratios = [
        (key, label)
        for key, label, pair in (
            ("awsomefs_vs_ext4", "aws/ext4", ("awsomefs", "ext4")),
            ("awsomefs_vs_raw", "aws/raw", ("awsomefs", "raw")),
            ("ext4_vs_raw", "ext4/raw", ("ext4", "raw")),
            ("awsomefs_vs_floor", "aws/floor", ("awsomefs", "kernelfloor")),
            ("awsomefs_vs_pyfuse3", "aws/pyfuse3", ("awsomefs", "awsomefs-pyfuse3")),
            ("awsomefs_vs_moosefs", "aws/moosefs", ("awsomefs", "moosefs")),
        )
        if set(pair) <= set(names)
    ]
    head = ["metric", "unit", *names, *(label for _, label in ratios), "goal (aws)", "ok"]
    table = [head]
    for row in rows:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[row["goal_met"]] if row["goal"] else ""
        table.append(
            [
                row["label"],
                row["unit"],
                *(_cell(results[n], row["metric"]) for n in names),
                *(_fmt(row[key]) for key, _ in ratios),
                row["goal"] or "",
                verdict,
            ]
        )
    print(f"\nfsbench: {args.runs} run(s), median (min-max); aws = awsomefs", file=out)
    for line in format_table(table):
        print(line, file=out)
    for name in names:
        res = results[name]
        if res.error:
            print(f"{name}: {'skipped' if res.skipped else 'not measured'}: {res.error}", file=out)
        for workload, err in res.errors.items():
            print(f"{name}: {workload} failed: {err}", file=out)


def format_table(table: list[list[str]]) -> list[str]:
    """Fixed-width lines, a rule under the first row; the first two columns (name, unit) are
    left-aligned, the figures right-aligned."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for i, r in enumerate(table):
        lines.append(
            "  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def write_json(
    path: Path,
    args: argparse.Namespace,
    params: wl.Params,
    results: dict[str, TargetResult],
    rows: list[dict[str, Any]],
) -> None:
    """Machine-readable results with the parameters and environment needed to compare runs later."""
    doc = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "fio": subprocess.run([wl.FIO, "--version"], capture_output=True, text=True).stdout.strip(),
        "args": {
            "runs": args.runs,
            "size": args.size,
            "only": args.only,
            "targets": args.targets,
            "quick": args.quick,
            "awsomefsd": args.awsomefsd,
        },
        "params": {**dataclasses.asdict(params), **dataclasses.asdict(args.real)},
        "targets": {n: dataclasses.asdict(r) for n, r in results.items()},
        "comparison": rows,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def exit_status(results: dict[str, TargetResult]) -> int:
    """0 when every requested target and workload produced numbers, EXIT_PARTIAL otherwise."""
    failed = any((r.error and not r.skipped) or r.errors for r in results.values())
    return EXIT_PARTIAL if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = build_params(args)
    args.real = build_real_params(args)
    preflight(args, params)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    with workdir_lock(args.workdir), contextlib.ExitStack() as stack:
        up, results = start_targets(stack, args)
        try:
            run_workloads(args, params, up, results)
        finally:
            log("tearing down")
    rows = comparison_rows(args, results)
    print_table(args, results, rows, sys.stdout)
    if args.json:
        write_json(args.json, args, params, results, rows)
    return exit_status(results)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("fsbench: interrupted; targets torn down", file=sys.stderr)
        sys.exit(130)
