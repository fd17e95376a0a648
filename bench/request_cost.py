#!/usr/bin/env python3
"""What a FUSE request costs the daemon, and how many an untar needs (issue 14).

For each transport (`--transports`, default both) it starts `awsomefsd dev` on a fresh image with
metrics on a free port, runs each workload and reads two things around it: the daemon's FUSE
requests by operation (`awsomefs_fuse_request_seconds_count`) and its CPU time (user + system,
from /proc). It prints requests per item, requests by operation, and daemon CPU per request in
microseconds. Workloads: an untar of the benchmark's source-like tree (bench/workloads.py makes
it; items: its entries), 2,000 buffered 4 KiB writes to one file, and stats of 2,000 files
after the kernel dropped its dentries and inodes (each a LOOKUP), then `ls -l` of those 2,000 files
twice (its listing, and the xattrs it asks of each file: the security label and the ACL).
`settimes` sets the times and then the mode of each of those 2,000 files (what tar, cp -p and
rsync do after writing a file), `opens` opens and closes each for reading (cat, grep, git).
The issue-40 workloads (`--only`): 4 KiB O_DIRECT reads and writes at random offsets of a
64 MiB file laid out beforehand (one at a time: the CPU each costs, not the throughput), creates
of empty files in one directory, its first listing, and the unlinks. Each line also gives the
daemon CPU per item (a read, a create), the figure issue 40 sets a target for.

As root (from another user: sudo in front), from the repository root:

    .venv/bin/python bench/request_cost.py [--files 4000] [--transports kernel,pyfuse3]
    .venv/bin/python bench/request_cost.py --transports kernel --only randread,randwrite,create,readdir,unlink
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from workloads import ensure_tarball

AWSOMEFSD = [sys.executable, "-m", "awsomefsd"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RANDOM_FILE = 64 << 20
"""The file random reads and writes go to: laid out once, so no read meets a hole."""
SETTLE_S = 0.2
ALL = ("untar", "writes", "stats", "ls", "settimes", "opens", "randread", "randwrite", "create", "readdir", "unlink")
COUNT = re.compile(r'awsomefs_fuse_request_seconds_count\{op="(\w+)"\} ([0-9.e+]+)')


class Daemon:
    def __init__(self, base: Path, transport: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "AWSOMEFS_MOUNT__TRANSPORT": transport}
        self.mount = base / "mnt"
        self.proc = subprocess.Popen([*AWSOMEFSD, "dev", "--state", str(base / "state"), "--mount", str(self.mount),
                                      "--size", "4G", "--metrics-port", "0", "--log-level", "info"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd="/")
        assert self.proc.stdout is not None
        self.port = 0
        deadline = time.monotonic() + 60
        for line in self.proc.stdout:
            found = re.search(r"metrics on http://[^:]+:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
            if line.startswith("awsomefsd: mounted"):
                break
            if time.monotonic() > deadline:
                raise SystemExit("request_cost: the daemon did not mount")
        if not self.port:
            raise SystemExit("request_cost: the daemon did not say where its metrics are")

    def requests(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        return {op: float(n) for op, n in COUNT.findall(text)}

    def cpu_s(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the daemon so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS  # utime, stime

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)


def measure(daemon: Daemon, work: Callable[[], object]) -> tuple[dict[str, float], float, float]:
    """(requests by operation, daemon CPU seconds in user mode, in the kernel) spent on `work`."""
    before, (user, system) = daemon.requests(), daemon.cpu_s()
    work()
    time.sleep(SETTLE_S)  # the last answers' metrics are recorded after the answer
    after, (user_after, system_after) = daemon.requests(), daemon.cpu_s()
    counts = {op: after[op] - before.get(op, 0.0) for op in after if after[op] != before.get(op, 0.0)}
    return counts, user_after - user, system_after - system


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=4000, help="files in the untarred tree (default 4000)")
    p.add_argument("--transports", default="kernel,pyfuse3")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/awsomefs-bench-work"))
    p.add_argument("--only", default="untar,writes,stats,ls",
                   help=f"workloads, comma separated, in this order (default untar,writes,stats,ls; all: {','.join(ALL)})")
    p.add_argument("--ios", type=int, default=20000, help="random reads and writes (default 20000)")
    p.add_argument("--creates", type=int, default=10000, help="files to create, list and unlink (default 10000)")
    args = p.parse_args()
    unknown = set(args.only.split(",")) - set(ALL)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))} (known: {', '.join(ALL)})")
    args.workdir.mkdir(parents=True, exist_ok=True)
    tarball = ensure_tarball(args.workdir, args.files, 1)
    entries = len(subprocess.run(["tar", "tf", str(tarball)], capture_output=True, text=True, check=True).stdout.split())

    def untar(mount: Path) -> None:
        subprocess.run(["tar", "xf", str(tarball), "-C", str(mount)], check=True)

    def writes(mount: Path) -> None:
        fd = os.open(mount / "written", os.O_CREAT | os.O_WRONLY, 0o644)
        block = b"w" * 4096
        for i in range(2000):
            os.pwrite(fd, block, i * 4096)
        os.close(fd)

    def stats(mount: Path) -> None:
        for i in range(2000):
            os.stat(mount / "names" / f"n{i}")

    def make_names(mount: Path) -> None:
        if not (mount / "names").exists():
            (mount / "names").mkdir()
            for i in range(2000):
                (mount / "names" / f"n{i}").touch()
            os.sync()

    def before_stats(mount: Path) -> None:
        make_names(mount)
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes

    def set_times(mount: Path) -> None:
        """What tar, cp -p and rsync do to each file after writing it: its times, then its mode."""
        for i in range(2000):
            os.utime(mount / "names" / f"n{i}", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000 + i))
            os.chmod(mount / "names" / f"n{i}", 0o640)

    def opens(mount: Path) -> None:
        """What cat, grep and git do to each file they read, without the reading."""
        for i in range(2000):
            os.close(os.open(mount / "names" / f"n{i}", os.O_RDONLY))

    def long_listings(mount: Path) -> None:
        for _ in range(2):
            subprocess.run(["ls", "-l", str(mount / "names")], check=True, stdout=subprocess.DEVNULL)

    offsets = [random.Random(40).randrange(RANDOM_FILE // 4096) * 4096 for _ in range(args.ios)]

    def lay_out(mount: Path) -> None:
        if not (mount / "random").exists():
            with open(mount / "random", "wb") as f:
                for _ in range(RANDOM_FILE // (1 << 20)):
                    f.write(os.urandom(1 << 20))
            os.sync()

    def direct_ios(mount: Path, write: bool) -> None:
        fd = os.open(mount / "random", (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
        block = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
        block.write(b"r" * 4096)
        try:
            for offset in offsets:
                if write:
                    os.pwrite(fd, block, offset)
                else:
                    os.preadv(fd, [block], offset)
        finally:
            os.close(fd)

    def creates(mount: Path) -> None:
        (mount / "many").mkdir()
        for i in range(args.creates):
            os.close(os.open(mount / "many" / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    def unlinks(mount: Path) -> None:
        for i in range(args.creates):
            os.unlink(mount / "many" / f"f{i}")

    workloads: dict[str, tuple[str, Callable[[Path], object], int]] = {
        "untar": ("untar", untar, entries), "writes": ("writes", writes, 2000), "stats": ("stats", stats, 2000),
        "ls": ("ls -l x2", long_listings, 4000),
        "settimes": ("utime+chmod", set_times, 4000), "opens": ("open+close", opens, 2000),
        "randread": ("randread", lambda m: direct_ios(m, False), args.ios),
        "randwrite": ("randwrite", lambda m: direct_ios(m, True), args.ios),
        "create": ("create", creates, args.creates),
        "readdir": ("readdir", lambda m: os.listdir(m / "many"), args.creates),
        "unlink": ("unlink", unlinks, args.creates),
    }
    print(f"request_cost: {args.only} (untar: {entries} entries; random I/O: {args.ios:,} x 4 KiB O_DIRECT; "
          f"creates: {args.creates:,}); load average {os.getloadavg()[0]:.2f}")
    print(f"{'transport':9s} {'workload':9s} {'requests':>9s} {'per item':>9s} {'CPU us/req':>10s} {'CPU us/item':>11s} "
          f"{'user/item':>9s} {'items/s':>9s}  by operation")
    for transport in args.transports.split(","):
        base = Path(tempfile.mkdtemp(prefix="awsomefs-request-cost-", dir="/var/tmp"))
        daemon = Daemon(base, transport)
        try:
            for key in args.only.split(","):
                name, work, items = workloads[key]
                if work is stats:
                    before_stats(daemon.mount)
                if work in (set_times, opens):
                    make_names(daemon.mount)
                if key in ("randread", "randwrite"):
                    lay_out(daemon.mount)
                start = time.perf_counter()
                counts, user, system = measure(daemon, lambda work=work, mount=daemon.mount: work(mount))
                cpu = user + system
                rate = items / (time.perf_counter() - start - SETTLE_S)
                total = sum(counts.values())
                ops = " ".join(f"{op}={int(n)}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                print(f"{transport:9s} {name:9s} {int(total):9d} {total / items:9.2f} {cpu * 1e6 / max(total, 1):10.1f} "
                      f"{cpu * 1e6 / items:11.1f} {user * 1e6 / items:9.1f} {rate:9.0f}  {ops}", flush=True)
        finally:
            daemon.stop()
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
