#!/usr/bin/env python3
"""How long applications stall while awsomefsd is replaced under them (issue 14: target < 1 s).

Starts a descriptor keeper and `awsomefsd dev` on a fresh image, runs a writer that appends a line
every few milliseconds through a descriptor it opened at the start, then replaces the daemon
`--rounds` times by hand-over (SIGUSR2, then a new daemon, as `systemctl reload` does) and
`--rounds` times by crash (SIGKILL, then a new daemon). For each replacement it reports the longest
single write the writer saw (the bytes themselves are checked by tests/mounted/test_restart.py).

    sudo .venv/bin/python bench/restart_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AWSOMEFSD = [sys.executable, "-m", "awsomefsd"]
WRITER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
os.fsync(fd)
os.fsync(os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY))
n = 0
while not os.path.exists(sys.argv[2]):
    start = time.monotonic()
    os.write(fd, b"%08d\n" % n)
    took = time.monotonic() - start
    print(f"{start:.6f} {took:.6f}", flush=True)
    n += 1
    time.sleep(0.002)
os.fsync(fd)
print("done", n, flush=True)
"""


def start_daemon(base: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*AWSOMEFSD, "dev", "--state", str(base / "state"), "--mount", str(base / "mnt"),
                             "--size", "2G", "--metrics-port", "-1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd="/")
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.startswith("awsomefsd: mounted"):
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("restart_bench: the daemon did not mount")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="hand-overs, then as many crashes (default 5)")
    p.add_argument("--settle-s", type=float, default=1.0, help="writing between replacements (default 1 s)")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="awsomefs-restart-bench-", dir="/var/tmp"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "AWSOMEFS_MOUNT__FD_KEEPER": str(base / "keeper.sock")}
    keeper = subprocess.Popen([*AWSOMEFSD, "fd-keeper", "--socket", str(base / "keeper.sock")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd="/")
    assert keeper.stdout is not None
    keeper.stdout.readline()
    daemon = start_daemon(base, env)
    stop_flag = base / "stop-writing"
    (base / "mnt" / "w").mkdir()
    with open(base / "writer.out", "w") as out:  # the child keeps its own copy
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(base / "mnt" / "w" / "log"), str(stop_flag)],
                                  stdout=out, stderr=subprocess.STDOUT, cwd="/")
    events: list[tuple[str, float, float]] = []
    try:
        time.sleep(args.settle_s)
        for kind in ["hand-over"] * args.rounds + ["crash"] * args.rounds:
            began = time.monotonic()
            if kind == "hand-over":
                daemon.send_signal(signal.SIGUSR2)
                assert daemon.wait(60) == 75, "the daemon did not hand over"
            else:
                daemon.kill()
                daemon.wait(60)
            daemon = start_daemon(base, env)
            events.append((kind, began, time.monotonic()))
            time.sleep(args.settle_s)
        stop_flag.write_text("")
        writer.wait(60)
    finally:
        if writer.poll() is None:
            writer.kill()
        daemon.send_signal(signal.SIGINT)
        daemon.wait(60)
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(10)
    samples = []
    for line in (base / "writer.out").read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] != "done":
            samples.append((float(fields[0]), float(fields[1])))
    print(f"restart_bench: {len(samples)} writes; longest write during each replacement (s):")
    for kind in ("hand-over", "crash"):
        worst = [max((took for start, took in samples if began - 1 <= start <= ended), default=0.0)
                 for k, began, ended in events if k == kind]
        print(f"  {kind:9s} median {statistics.median(worst):.3f}  max {max(worst):.3f}  "
              f"({' '.join(f'{w:.3f}' for w in worst)})")
    typical = statistics.median(took for _, took in samples)
    print(f"  a write otherwise: median {typical * 1e6:.0f} us")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
