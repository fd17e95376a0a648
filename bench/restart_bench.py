#!/usr/bin/env python3
"""How long applications stall while awsomefsd is replaced under them (issue 14: target < 1 s).

Starts a descriptor keeper and `awsomefsd dev` on a fresh image, runs a writer that appends a line
every few milliseconds through a descriptor it opened at the start, then replaces the daemon
`--rounds` times by hand-over (SIGUSR2, then a new daemon, as `systemctl reload` does) and
`--rounds` times by crash (SIGKILL, then a new daemon). For each replacement it reports the longest
single write the writer saw (the bytes themselves are checked by tests/mounted/test_restart.py).

With `--systemd`, the daemon runs as the packaged unit under a real systemd of the benchmark's
own (tests/support/systemd.py; from the checkout, or the binary `--awsomefsd` names) and is
replaced the ways an operator does it: `systemctl restart`, `systemctl reload` (a package
upgrade) and a SIGKILL that systemd restarts, in turn, `--rounds` times each.

As root (from another user: sudo in front), from the repository root:

    .venv/bin/python bench/restart_bench.py --rounds 5
    .venv/bin/python bench/restart_bench.py --rounds 5 --systemd [--awsomefsd dist/awsomefsd]
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


Events = list[tuple[str, float, float]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="hand-overs, then as many crashes (default 5)")
    p.add_argument("--settle-s", type=float, default=1.0, help="writing between replacements (default 1 s)")
    p.add_argument("--systemd", action="store_true", help="the packaged unit under a real systemd")
    p.add_argument("--awsomefsd", type=Path, help="with --systemd: this binary instead of the checkout")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="awsomefs-restart-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        if args.systemd:
            binary = None if args.awsomefsd is None else args.awsomefsd.resolve()  # ExecStart= wants it absolute
            report(base, under_systemd(base, args.rounds, args.settle_s, binary), ("restart", "reload", "crash"))
        else:
            report(base, with_keeper(base, args.rounds, args.settle_s), ("hand-over", "crash"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def under_systemd(base: Path, rounds: int, settle_s: float, binary: Path | None) -> Events:
    """systemctl restart, systemctl reload and a SIGKILL, in turn, `rounds` times each."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.packaging.test_systemd_service import install_service
    from tests.support.systemd import PrivateSystemd, available

    unavailable = available()
    if unavailable is not None:
        raise SystemExit(f"restart_bench: a private systemd cannot run here: {unavailable}")
    units = install_service(binary, base)
    sd = PrivateSystemd(base, units)
    events: Events = []
    try:
        sd.systemctl("start", "awsomefsd.service")
        stop_flag = base / "stop-writing"
        sd.path(base / "mnt" / "w").mkdir()
        with open(base / "writer.out", "w") as out:
            writer = subprocess.Popen([*sd.prefix, sys.executable, "-c", WRITER, str(base / "mnt" / "w" / "log"),
                                       str(stop_flag)], stdout=out, stderr=subprocess.STDOUT, cwd="/")
        time.sleep(settle_s)
        for kind in ["restart", "reload", "crash"] * rounds:
            before = sd.show("awsomefsd.service", "MainPID")["MainPID"]
            began = time.monotonic()
            if kind == "crash":
                sd.run("kill", "-KILL", before)
            else:
                sd.systemctl(kind, "awsomefsd.service")
            deadline = time.monotonic() + 60
            while not _replaced(sd.show("awsomefsd.service", "MainPID", "ActiveState"), before):
                if time.monotonic() > deadline:
                    raise SystemExit(f"restart_bench: no daemon 60 s after {kind}")
                time.sleep(0.01)
            events.append((kind, began, time.monotonic()))
            time.sleep(settle_s)
        stop_flag.write_text("")
        writer.wait(60)
        sd.systemctl("stop", "awsomefsd.service")
    finally:
        sd.close()
    return events


def _replaced(state: dict[str, str], before: str) -> bool:
    return state["ActiveState"] == "active" and state["MainPID"] not in ("0", before)


def with_keeper(base: Path, rounds: int, settle_s: float) -> Events:
    """SIGUSR2 and a new daemon `rounds` times, then SIGKILL and a new daemon as often."""
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
    events: Events = []
    try:
        time.sleep(settle_s)
        for kind in ["hand-over"] * rounds + ["crash"] * rounds:
            began = time.monotonic()
            if kind == "hand-over":
                daemon.send_signal(signal.SIGUSR2)
                assert daemon.wait(60) == 75, "the daemon did not hand over"
            else:
                daemon.kill()
                daemon.wait(60)
            daemon = start_daemon(base, env)
            events.append((kind, began, time.monotonic()))
            time.sleep(settle_s)
        stop_flag.write_text("")
        writer.wait(60)
    finally:
        if writer.poll() is None:
            writer.kill()
        daemon.send_signal(signal.SIGINT)
        daemon.wait(60)
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(10)
    return events


def report(base: Path, events: Events, kinds: tuple[str, ...]) -> None:
    """The longest write the writer saw around each replacement, per kind."""
    samples = []
    for line in (base / "writer.out").read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] != "done":
            samples.append((float(fields[0]), float(fields[1])))
    print(f"restart_bench: {len(samples)} writes; longest write during each replacement (s):")
    for kind in kinds:
        worst = [max((took for start, took in samples if began - 1 <= start <= ended), default=0.0)
                 for k, began, ended in events if k == kind]
        print(f"  {kind:9s} median {statistics.median(worst):.3f}  max {max(worst):.3f}  "
              f"({' '.join(f'{w:.3f}' for w in worst)})")
    typical = statistics.median(took for _, took in samples)
    print(f"  a write otherwise: median {typical * 1e6:.0f} us")


if __name__ == "__main__":
    sys.exit(main())
