"""FUSE over io_uring against /dev/fuse by read(): 4 KiB random read and write IOPS on the
transport's floor (bench/kernelfloor.py) and on an AwsomeFS dev mount, the two paths taking
turns in every run so that other load on the machine spreads over both.

    # as root; sets /sys/module/fuse/parameters/enable_uring to Y for the run and restores it
    .venv/bin/python bench/uring_bench.py --runs 3 --runtime 8

Each cell is fio on one file of `--file-size`, O_DIRECT: libaio at queue depth 16 in one job,
and 16 psync jobs. The table shows the median and (min-max) of the runs, and the load average
before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from targets import Target, awsomefs_target, floor_target

PYTHON = sys.executable
ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")
PATHS = ("read", "io_uring")
CELLS = (("randread", "libaio"), ("randwrite", "libaio"), ("randread", "psync"), ("randwrite", "psync"))


def mounted(target: str, path: str, base: Path) -> AbstractContextManager[Target]:
    """`target` (kernelfloor or awsomefs) serving with `path` (read: io_uring off; io_uring: on)."""
    settings = {"AWSOMEFS_MOUNT__IO_URING": "off" if path == "read" else "on"}
    if target == "kernelfloor":
        return floor_target("kernelfloor", base, PYTHON, 120, settings=settings)
    return awsomefs_target(base, "4G", [PYTHON, "-m", "awsomefsd"], 120, settings=settings)


def fio(filename: Path, rw: str, engine: str, runtime: int, size: str) -> float:
    jobs = ["--ioengine=libaio", "--iodepth=16", "--numjobs=1"] if engine == "libaio" else \
        ["--ioengine=psync", "--numjobs=16", "--thread"]
    out = subprocess.run(["fio", f"--name={rw}", f"--filename={filename}", f"--rw={rw}", "--bs=4k", f"--size={size}",
                          "--direct=1", *jobs, "--group_reporting=1", "--time_based=1", f"--runtime={runtime}",
                          "--ramp_time=1", "--norandommap", "--randrepeat=1", "--output-format=json"],
                         capture_output=True, text=True, check=True, timeout=runtime * 4 + 120)
    job = json.loads(out.stdout)["jobs"][0]
    return float(job["read" if rw == "randread" else "write"]["iops"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio cell")
    ap.add_argument("--file-size", default="256M")
    ap.add_argument("--targets", default="kernelfloor,awsomefs")
    args = ap.parse_args()
    if not ENABLE_URING.exists():
        print("uring_bench: this kernel has no FUSE over io_uring", file=sys.stderr)
        return 2
    before = ENABLE_URING.read_text().strip()
    base = Path(tempfile.mkdtemp(prefix="uring-bench-", dir="/var/tmp"))
    results: dict[tuple[str, str, str, str], list[float]] = {}
    load = [os.getloadavg()]
    try:
        ENABLE_URING.write_text("Y")
        for run in range(args.runs):
            order = PATHS if run % 2 == 0 else PATHS[::-1]
            for target in args.targets.split(","):
                for path in order:
                    with mounted(target, path, base) as served:
                        filename = served.path / "fio-file"
                        subprocess.run(["fio", "--name=lay", f"--filename={filename}", "--rw=write", "--bs=1M",
                                        f"--size={args.file_size}", "--end_fsync=1", "--output-format=json"],
                                       capture_output=True, check=True, timeout=300)
                        for rw, engine in CELLS:
                            iops = fio(filename, rw, engine, args.runtime, args.file_size)
                            results.setdefault((target, rw, engine, path), []).append(iops)
                            print(f"run {run + 1} {target:11} {path:8} {rw:9} {engine:6} {iops:10.0f} IOPS", flush=True)
            load.append(os.getloadavg())
    finally:
        ENABLE_URING.write_text(before)
        shutil.rmtree(base, ignore_errors=True)
    print("\nload average (1/5/15 min) before and after each run: "
          + "; ".join("/".join(f"{x:.1f}" for x in la) for la in load))
    print("\n| target | workload | read() IOPS | io_uring IOPS | io_uring / read() |\n|---|---|---|---|---|")
    for target in args.targets.split(","):
        for rw, engine in CELLS:
            cells = [results.get((target, rw, engine, path), []) for path in PATHS]
            if not all(cells):
                continue
            medians = [statistics.median(c) for c in cells]
            shown = [f"{m:,.0f} ({min(c):,.0f}-{max(c):,.0f})" for m, c in zip(medians, cells)]
            name = f"4 KiB {rw[4:]}, {'libaio QD16 1 job' if engine == 'libaio' else '16 psync jobs'}"
            print(f"| {target} | {name} | {shown[0]} | {shown[1]} | {medians[1] / medians[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
