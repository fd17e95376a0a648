"""Each daemon's CPU per create and per unlink on a 3-node dev cluster (issue 42), source trees
alternating: what one member's namespace change costs the whole cluster, not only the node that
made it.

Per round and source tree: `awsomefsd dev --nodes 3` started from that tree (its own namespaces,
image and mounts under `--workdir`), a follower (node 2; node 1, the founder, leads) creates
`--files` empty files in a new directory and then unlinks them (at once, or `--pause` seconds
later); each phase's CPU of every daemon (user + system, from /proc) divided by the files, and
the phase's rate. The unlink phase's CPU is counted until `--settle` seconds after the last
unlink, so the orphan releases and their applies that follow a burst count too. Rounds swap the trees' order; medians at the end.
Figures are comparable within one run only (the two cores also run the other daemons, the
harness and the kernel).

    .venv/bin/python bench/member_cpu.py --src /tmp/old --src . [--rounds 2] [--files 10000]

An old tree is a checkout or `git worktree add /tmp/old <commit>`: it runs with this venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

VENV_PYTHON = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
START_TIMEOUT_S = 90.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start(tree: Path, base: Path) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    proc = subprocess.Popen([str(VENV_PYTHON), "-m", "awsomefsd", "dev", "--nodes", "3", "--mount", str(base / "m"),
                             "--state", str(base / "s"), "--size", "4G"], cwd=tree,
                            stdout=(base / "log").open("wb"), stderr=subprocess.STDOUT)
    described = base / "s" / "dev-cluster.json"
    deadline = time.monotonic() + START_TIMEOUT_S
    while not described.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"member_cpu: the dev cluster from {tree} did not start (see {base / 'log'})")
        time.sleep(0.2)
    time.sleep(2.0)  # the members' first lease renewals and group claims
    return proc, json.loads(described.read_text())


def phase(pids: list[int], files: int, settle_s: float, work: Callable[[], None]) -> tuple[float, list[float]]:
    """(operations per second, CPU µs per operation of each daemon) of `work()`."""
    before = [cpu_s(pid) for pid in pids]
    started = time.perf_counter()
    work()
    elapsed = time.perf_counter() - started
    time.sleep(settle_s)
    return files / elapsed, [(cpu_s(pid) - was) / files * 1e6 for pid, was in zip(pids, before)]


def one_round(tree: Path, workdir: Path, files: int, settle_s: float, pause_s: float
              ) -> dict[str, tuple[float, list[float]]]:
    proc, cluster = start(tree, workdir / tree.name)
    try:
        nodes: list[dict[str, object]] = cluster["nodes"]  # type: ignore[assignment]
        pids = [int(node["pid"]) for node in nodes]  # type: ignore[call-overload]
        directory = Path(str(nodes[1]["mount"])) / "member-cpu"
        directory.mkdir()
        names = [str(directory / f"f{i}") for i in range(files)]

        def create() -> None:
            for name in names:
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))

        def unlink() -> None:
            for name in names:
                os.unlink(name)

        created = phase(pids, files, 0.5, create)
        time.sleep(pause_s)
        return {"create": created, "unlink": phase(pids, files, settle_s, unlink)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", type=Path, required=True, help="a source tree (repeat)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds counted after the last unlink")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds between the phases: past 2 s the follower gives its idle delegations back, "
                             "and what it created is no longer only its own (an rm -rf long after the untar)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/awsomefs-bench/member-cpu"))
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.src]
    if len({tree.name for tree in trees}) != len(trees):
        sys.exit("member_cpu: the source trees need distinct directory names")
    results: dict[Path, list[dict[str, tuple[float, list[float]]]]] = {tree: [] for tree in trees}
    for round_ in range(args.rounds):
        for tree in trees if round_ % 2 == 0 else trees[::-1]:
            got = one_round(tree, args.workdir, args.files, args.settle, args.pause)
            results[tree].append(got)
            print(f"round {round_ + 1} {tree}: " + "; ".join(
                f"{op} {rate:,.0f}/s, CPU µs per {op} (leader, follower, other) "
                f"{', '.join(f'{us:.0f}' for us in cpu)}, total {sum(cpu):.0f}" for op, (rate, cpu) in got.items()),
                  flush=True)
    print("\nmedians", f"({args.rounds} rounds of {args.files:,} files)")
    for tree, rounds in results.items():
        for op in ("create", "unlink"):
            rate = statistics.median(r[op][0] for r in rounds)
            per_node = [statistics.median(r[op][1][i] for r in rounds) for i in range(3)]
            print(f"  {tree}  {op:6s} {rate:8,.0f}/s  CPU µs leader {per_node[0]:.0f}, follower {per_node[1]:.0f}, "
                  f"other {per_node[2]:.0f}, total {sum(per_node):.0f}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
