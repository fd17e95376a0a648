"""Read workers (`[mount] read_workers`, docs/multicore.md step 1): reads with 0 workers (the daemon
reads every request) against N, and bench/kernelfloor.py (the transport's floor), alternating.

Each run starts a fresh `awsomefsd dev` (or kernelfloor), writes a file, syncs, drops caches and
measures with fio: 4 KiB random reads, O_DIRECT, libaio at queue depth 16 (one job), and 16 psync
jobs; then a sequential read of the file in 1 MiB blocks after dropping caches. CPU is utime+stime
of the daemon and every worker (/proc/PID/stat) over each random-read phase. The 1-minute load
average is printed before and after every run: other work on the machine shows there.

    python bench/workers_bench.py                          # modes 0,2,floor; 3 runs; 256 MiB; 8 s each
    python bench/workers_bench.py --modes 0,1,2 --runs 5 --runtime 10 --mib 512
    python bench/compare_commits.py main HEAD --bench workers_bench.py --rounds 4 -- --modes 0,1,2 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import Target, awsomefs_target, cpu_seconds, drop_caches, floor_target

REPO = Path(__file__).resolve().parent.parent
DAEMON = [sys.executable, "-m", "awsomefsd"]
"""This interpreter, with the package of $PYTHONPATH, else of this tree, first on its path
(`serving`): bench/compare_commits.py measures another commit's daemon with this bench that way."""


def server_pids(root: int) -> list[int]:
    """The server and its children (the read workers)."""
    out = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True).stdout.split()
    return [root, *(int(p) for p in out)]


def serving(mode: str, base: Path) -> AbstractContextManager[Target]:
    """The daemon with `mode` read workers, or the transport's floor."""
    if mode == "floor":
        return floor_target("kernelfloor", base, sys.executable, 120)
    return awsomefs_target(base, "4G", DAEMON, 120, settings={
        "AWSOMEFS_MOUNT__READ_WORKERS": mode,
        "PYTHONPATH": os.environ.get("PYTHONPATH") or str(REPO)})


def fio(path: Path, size: str, runtime: int, *extra: str) -> dict[str, float]:
    out = subprocess.run(["fio", "--name=r", f"--filename={path}", f"--size={size}", "--output-format=json",
                          "--group_reporting", *extra], check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]["read"]
    return {"iops": job["iops"], "ios": job["total_ios"], "mib_s": job["bw_bytes"] / (1 << 20)}


def measure(mode: str, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="workers-bench-") as tmp, serving(mode, Path(tmp)) as target:
        assert target.pid is not None
        data = target.path / "data"
        subprocess.run(["dd", "if=/dev/urandom", f"of={data}", "bs=1M", f"count={args.mib}", "conv=fsync"],
                       check=True, capture_output=True)
        time.sleep(2)  # the last writes' commit (until then a worker forwards reads of the file)
        drop_caches()
        result: dict[str, float] = {"load_before": os.getloadavg()[0]}
        pids = server_pids(target.pid)
        for name, extra in (("qd16", ["--rw=randread", "--bs=4k", "--direct=1", "--ioengine=libaio",
                                      "--iodepth=16", "--numjobs=1"]),
                            ("psync16", ["--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync",
                                         "--numjobs=16", "--thread"])):
            cpu0 = cpu_seconds(*pids)
            got = fio(data, f"{args.mib}M", args.runtime, *extra, "--time_based", f"--runtime={args.runtime}")
            result[f"{name}_iops"] = got["iops"]
            result[f"{name}_cpu_us"] = 1e6 * (cpu_seconds(*pids) - cpu0) / max(got["ios"], 1)
        drop_caches()
        got = fio(data, f"{args.mib}M", 0, "--rw=read", "--bs=1M", "--ioengine=psync")
        result["seq_mib_s"] = got["mib_s"]
        result["load_after"] = os.getloadavg()[0]
        return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="0,2,floor", help="read_workers counts and/or 'floor' (default %(default)s)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--runtime", type=int, default=8, help="seconds per random-read phase")
    p.add_argument("--mib", type=int, default=256, help="file size in MiB")
    p.add_argument("--json", type=Path, help="write every run's figures here (bench/compare_commits.py reads it)")
    args = p.parse_args()
    modes = args.modes.split(",")
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for run in range(args.runs):
        for mode in modes:  # alternating: noise spreads over every mode
            rows[mode].append(measure(mode, args))
            print(f"run {run + 1} {mode}: " + " ".join(f"{k}={v:.1f}" for k, v in rows[mode][-1].items()),
                  file=sys.stderr, flush=True)
    keys = ["qd16_iops", "psync16_iops", "seq_mib_s", "qd16_cpu_us", "psync16_cpu_us"]
    print(f"\nmedians of {args.runs} alternating runs, {args.mib} MiB file, {args.runtime} s per random phase")
    print(f"{'mode':8}" + "".join(f"{k:>16}" for k in keys) + "   load (1 min) before-after")
    for mode, rs in rows.items():
        loads = f"{min(r['load_before'] for r in rs):.1f}-{max(r['load_after'] for r in rs):.1f}"
        print(f"{mode:8}" + "".join(f"{statistics.median(r[k] for r in rs):16.1f}" for k in keys) + f"   {loads}")
    print(json.dumps(rows), file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
