"""The batch of closed files (fs/batch.py, issue 40) on and off, alternating: small files created
with data in one directory (open O_CREAT|O_EXCL, write, close), as an untar or rsync makes them.

Each round starts a fresh `awsomefsd dev` (tests/support/daemon.py) per mode with
`AWSOMEFS_DATA__BATCH_CLOSED_FILES` set, swaps the modes' order every round, and prints per mode
the files per second up to the last close, the seconds of a `sync -f` after it, every round's
value, their medians, and the 1-minute load average before and after each run (other work on
the machine weighs on both modes alike, not on their ratio).

    .venv/bin/python bench/closed_batch_bench.py --files 10000 --size 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.daemon import Daemon


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def one_run(batch: bool, files: int, size: int, workdir: Path) -> tuple[float, float, float, float]:
    """(files/s up to the last close, seconds of the sync after, load before, load after)."""
    base = Path(tempfile.mkdtemp(prefix="closed-batch-", dir=workdir))
    daemon = Daemon(base / "state", base / "mnt", size="2G",
                    env={"AWSOMEFS_DATA__BATCH_CLOSED_FILES": "true" if batch else "false"})
    try:
        daemon.start()
        target = daemon.mount / "d"
        target.mkdir()
        payload = os.urandom(size)
        before = load()
        start = time.perf_counter()
        for i in range(files):
            fd = os.open(target / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)
        created = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(["sync", "-f", str(target)], check=True)
        synced = time.perf_counter() - start
        after = load()
        if daemon.stop() != 0:
            raise SystemExit(f"the daemon did not stop cleanly: {daemon.logs()}")
        return files / created, synced, before, after
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--size", type=int, default=1024, help="bytes written into each file")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = p.parse_args()
    results: dict[bool, list[tuple[float, float, float, float]]] = {True: [], False: []}
    for r in range(args.rounds):
        for batch in ((True, False) if r % 2 == 0 else (False, True)):
            results[batch].append(one_run(batch, args.files, args.size, args.workdir))
            rate, synced, before, after = results[batch][-1]
            print(f"round {r + 1} batch {'on ' if batch else 'off'}: {rate:,.0f} files/s, sync {synced:.3f} s, "
                  f"load {before:.1f} -> {after:.1f}", flush=True)
    for batch in (True, False):
        rates = [x[0] for x in results[batch]]
        syncs = [x[1] for x in results[batch]]
        print(f"batch {'on ' if batch else 'off'}: median {statistics.median(rates):,.0f} files/s "
              f"({', '.join(f'{x:,.0f}' for x in rates)}), sync median {statistics.median(syncs):.3f} s")
    on, off = (statistics.median(x[0] for x in results[b]) for b in (True, False))
    print(f"on/off: {on / off:.2f}x")


if __name__ == "__main__":
    main()
