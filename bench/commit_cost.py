#!/usr/bin/env python3
"""What the idle commit (`[data] commit_idle_ms`) costs: throughput and commits, with it on and off.

The local log commits a batch at most `commit_interval_ms` after it began and, with the idle
commit, once no metadata change came for `commit_idle_ms` (docs/fuse-transport.md: sync reaches
no FUSE server). Each round starts `awsomefsd dev` with metrics on a fresh image, once per
setting, in turn, and runs: 2,000 files of 3,000 bytes created, written and closed back to back
by one process; 2,000 buffered 4 KiB appends to one file; and 40 bursts of 25 such files with
50 ms pauses (the pattern that commits more often with the idle commit). For each it prints the
wall time and the commits (`awsomefs_meta_commit_batch_commands_count`).

    sudo .venv/bin/python bench/commit_cost.py [--rounds 3] [--idle-ms 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from request_cost import Daemon

COMMITS = re.compile(r"^awsomefs_meta_commit_batch_commands_count (\S+)$", re.M)
FILES = 2000
PAYLOAD = b"x" * 3000


def commits(daemon: Daemon) -> float:
    """Commits so far. A scrape shows the batch histogram before it observes the batches since the
    last scrape (node.py's collector), so the second of two scrapes is current."""
    for _ in range(2):
        text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=10).read().decode()
    found = COMMITS.search(text)
    return float(found.group(1)) if found else 0.0


def creates(root: Path) -> None:
    root.mkdir()
    for i in range(FILES):
        (root / f"f{i}").write_bytes(PAYLOAD)


def appends(root: Path) -> None:
    with open(root, "wb") as fh:
        for _ in range(FILES):
            fh.write(b"y" * 4096)
            fh.flush()


def bursts(root: Path) -> None:
    root.mkdir()
    for burst in range(40):
        for i in range(25):
            (root / f"b{burst}-{i}").write_bytes(PAYLOAD)
        time.sleep(0.05)


WORKLOADS: dict[str, Callable[[Path], None]] = {"creates": creates, "appends": appends, "bursts": bursts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle-ms", type=int, default=20)
    args = p.parse_args()
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for idle in (0, args.idle_ms):
            os.environ["AWSOMEFS_DATA__COMMIT_IDLE_MS"] = str(idle)
            base = Path(tempfile.mkdtemp(prefix="awsomefs-commit-cost-", dir="/var/tmp"))
            daemon = Daemon(base, "kernel")
            try:
                for name, work in WORKLOADS.items():
                    before, start = commits(daemon), time.monotonic()
                    work(daemon.mount / name)
                    seconds = time.monotonic() - start
                    time.sleep(1.2)  # the batch the workload left is committed by the interval
                    results.setdefault((idle, name), []).append((seconds, commits(daemon) - before))
            finally:
                daemon.stop()
                shutil.rmtree(base, ignore_errors=True)
    print(f"{'workload':<10} {'idle commit':<12} {'seconds (each round)':<32} commits (each round)")
    for (idle, name), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        label = f"{idle} ms" if idle else "off"
        print(f"{name:<10} {label:<12} {' '.join(f'{s:.2f}' for s, _ in runs):<32} "
              f"{' '.join(f'{n:.0f}' for _, n in runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
