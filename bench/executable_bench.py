"""The executable build.py makes against the interpreter every other bench runs (design note 129):
what a request costs the daemon users run.

Each run starts a fresh single node (`awsomefsd dev`) with one of the two commands, in the order
interpreter, executable, executable, interpreter, ... (so a drift of the machine's load falls on
both), and measures: serial creates, stats, stats of absent names and unlinks of `--files` files
from one process (wall µs per call and the daemon's CPU µs per call, utime+stime from /proc);
4 KiB random reads and writes from 16 psync jobs (fio, O_DIRECT); fsbench's untar, git add and
warm git status of `--tree-files` files, and the daemon's CPU over that phase. Busy polling is off
unless asked (`--busy-poll-us`): a polling daemon's CPU counts its polls, not its requests.

    .venv/bin/python build.py binary && .venv/bin/python bench/executable_bench.py
    .venv/bin/python bench/executable_bench.py --executable dist/awsomefsd --rounds 2 --files 5000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets as tg
import workloads as wl

REPO = Path(__file__).resolve().parent.parent
INTERPRETER = [sys.executable, "-m", "awsomefsd"]
STANDALONE = REPO / "build" / "nuitka" / "awsomefsd.dist" / "awsomefsd.bin"


def per_call(pid: int, count: int, action: Callable[[], None]) -> tuple[float, float]:
    """Wall and daemon-CPU microseconds per call of `count` calls made by `action`."""
    cpu, start = tg.cpu_seconds(pid), time.monotonic()
    action()
    return (time.monotonic() - start) / count * 1e6, (tg.cpu_seconds(pid) - cpu) / count * 1e6


def serial_calls(pid: int, work: Path, count: int) -> dict[str, tuple[float, float]]:
    names = [work / f"f{i}" for i in range(count)]
    absent = [work / f"absent{i}" for i in range(count)]

    def creates() -> None:
        for path in names:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))

    def stats() -> None:
        for path in names:
            os.stat(path)

    def absent_stats() -> None:
        for path in absent:
            try:
                os.stat(path)
            except FileNotFoundError:
                pass

    def unlinks() -> None:
        for path in names:
            os.unlink(path)

    return {name: per_call(pid, count, action) for name, action in
            (("create", creates), ("stat", stats), ("absent stat", absent_stats), ("unlink", unlinks))}


def one_run(command: list[str], args: argparse.Namespace, params: wl.Params, tarball: Path) -> dict[str, float]:
    settings = {"AWSOMEFS_MOUNT__BUSY_POLL_US": str(args.busy_poll_us)}
    with tg.awsomefs_target(args.workdir, "2G", command, 120, settings=settings) as target:
        assert target.pid is not None
        work = target.path / "serial"
        work.mkdir()
        out: dict[str, float] = {}
        for name, (wall, cpu) in serial_calls(target.pid, work, args.files).items():
            out[f"{name} µs"], out[f"{name} CPU µs"] = wall, cpu
        wl.prepare_rand(target, params)
        rand = wl.run_rand(target, params, 0)
        out["rand read IOPS"], out["rand write IOPS"] = rand["rand_read"], rand["rand_write_direct"]
        wl.cleanup_fio_files(target)
        cpu = tg.cpu_seconds(target.pid)
        tree = wl.run_untar(target, params, 0, tarball)
        out["untar+git CPU s"] = tg.cpu_seconds(target.pid) - cpu
        out["untar s"], out["git add s"], out["git status ms"] = tree["untar"], tree["git_add"], tree["git_status"] * 1e3
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executable", type=Path, default=STANDALONE,
                        help="the built program (default: build.py's standalone tree, which starts without unpacking)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs, each pair in the other order")
    parser.add_argument("--files", type=int, default=3000, help="files per serial phase")
    parser.add_argument("--tree-files", type=int, default=2000)
    parser.add_argument("--rand-mib", type=int, default=256)
    parser.add_argument("--rand-runtime", type=int, default=8)
    parser.add_argument("--busy-poll-us", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/awsomefs-executable-bench"))
    args = parser.parse_args()
    if not args.executable.exists():
        print(f"executable_bench: {args.executable} does not exist (build it: .venv/bin/python build.py binary)",
              file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    params = wl.Params(rand_size=args.rand_mib << 20, rand_runtime_s=args.rand_runtime, tree_files=args.tree_files)
    tarball = wl.ensure_tarball(args.workdir, params.tree_files, params.seed)
    commands = {"interpreter": INTERPRETER, "executable": [str(args.executable.resolve())]}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    for round_index in range(args.rounds):
        order = ["interpreter", "executable"] if round_index % 2 == 0 else ["executable", "interpreter"]
        for name in order:
            load = os.getloadavg()[0]
            results[name].append(one_run(commands[name], args, params, tarball))
            print(f"executable_bench: {name} run {round_index + 1} done (load {load:.1f} before)", file=sys.stderr)
    print(f"{'median of ' + str(args.rounds):<20} {'interpreter':>12} {'executable':>12} {'ratio':>7}")
    for key in results["interpreter"][0]:
        a = statistics.median(run[key] for run in results["interpreter"])
        b = statistics.median(run[key] for run in results["executable"])
        print(f"{key:<20} {a:12.1f} {b:12.1f} {b / a if a else float('nan'):7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
