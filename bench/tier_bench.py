"""Tiering benchmarks (issue 16): a real `awsomefsd dev` daemon with [tier] pointing at the S3 test
server (moto's server mode on loopback, a separate process: tests/support/s3_server.py).

As root (from another user: sudo in front), from the repository root:

    .venv/bin/python bench/tier_bench.py [--size-mib 1024] [--random-reads 2000] [--runs 3] [--json F]

Figures, each run on fresh targets, medians of `--runs` runs with every run's value beside them,
each read with the kernel's page cache dropped first:
- sequential and random 4 KiB reads of the same bytes on ext4 over a loop device, and on the raw
  loop device (the references);
- sequential read of the file while it is on the AwsomeFS device;
- `awsomefsd tier evict` of it (tiering throughput, MiB/s to the store);
- the store's own ceiling: sequential 1 MiB ranged GETs of one 64 MiB object from one thread;
- sequential read of it tiered, cold (from the store, through the disk cache) and warm (the caches);
- random 4 KiB reads of it tiered with a warm cache, next to the same reads on the device;
- sequential write throughput with and without an eviction running beside it (the write path's
  cost of tiering in the background).
moto keeps objects in its own memory: the store here is fast and near, so these figures bound
what our side costs, not what a real store over a network gives.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from targets import ext4_target, raw_target  # noqa: E402

from awsomefsd.tier.sigv4 import Credentials  # noqa: E402
from awsomefsd.tier.store import ObjectStore  # noqa: E402
from tests.support.daemon import Daemon, run_cli  # noqa: E402
from tests.support.s3 import TEST_KEY_ID, TEST_SECRET, s3_server  # noqa: E402

CHUNK = 1 << 20


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sequential_read_mib_s(path: Path) -> float:
    drop_page_cache()
    start = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
    return total / (1 << 20) / (time.perf_counter() - start)


def random_reads_per_s(path: Path, count: int, seed: int) -> float:
    drop_page_cache()
    size = path.stat().st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for offset in offsets:
            os.pread(fd, 4096, offset)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


def write_mib_s(path: Path, mib: int) -> float:
    block = os.urandom(CHUNK)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(mib):
            f.write(block)
        os.fsync(f.fileno())
    return mib / (time.perf_counter() - start)


def store_get_mib_s(endpoint: str, bucket: str) -> float:
    """The store's own ceiling: one reader's sequential 1 MiB ranged GETs of a 64 MiB object."""
    store = ObjectStore(endpoint, bucket, Credentials(TEST_KEY_ID, TEST_SECRET), prefix="ceiling/")
    store.put("object", os.urandom(64 << 20))
    start = time.perf_counter()
    for offset in range(0, 64 << 20, CHUNK):
        store.get("object", offset, CHUNK)
    return 64 / (time.perf_counter() - start)


def evict(daemon: Daemon, path: Path) -> float:
    start = time.perf_counter()
    done = run_cli("tier", "evict", str(path), "--state", str(daemon.state), timeout_s=3600)
    if done.returncode != 0:
        raise RuntimeError(f"tier evict failed: {done.stderr}")
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One run of every figure, on fresh targets."""
    results: dict[str, float] = {}
    with s3_server() as s3, tempfile.TemporaryDirectory(prefix="awsomefs-tierbench-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        reference_bytes = (args.size_mib + 256) << 20
        with ext4_target(base, 2 * reference_bytes) as ext4:
            copy = ext4.path / "big.bin"
            subprocess.run(["dd", "if=/dev/urandom", f"of={copy}", "bs=1M", f"count={args.size_mib}", "conv=fsync",
                            "status=none"], check=True)
            results["ext4_seq_read_mib_s"] = sequential_read_mib_s(copy)
            results["ext4_random_4k_per_s"] = random_reads_per_s(copy, args.random_reads, seed=1)
        with raw_target(base, reference_bytes) as raw:
            subprocess.run(["dd", "if=/dev/urandom", f"of={raw.path}", "bs=1M", f"count={args.size_mib}",
                            "oflag=direct", "status=none"], check=True)
            results["raw_seq_read_mib_s"] = sequential_read_mib_s(raw.path)
        results["store_get_mib_s"] = store_get_mib_s(s3.endpoint, s3.bucket)
        env = {"AWSOMEFS_TIER__ENDPOINT": s3.endpoint, "AWSOMEFS_TIER__BUCKET": s3.bucket,
               "AWSOMEFS_TIER__RECALL_READS": "0", "AWSOMEFS_TIER__CACHE_BYTES": f"{2 * args.size_mib}M",
               "AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET}
        daemon = Daemon(base / "state", base / "mnt", size=f"{max(4, 3 * args.size_mib // 1024 + 2)}G", env=env).start()
        try:
            path = daemon.mount / "big.bin"
            subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={args.size_mib}", "conv=fsync",
                            "status=none"], check=True)
            results["device_seq_read_mib_s"] = sequential_read_mib_s(path)
            results["device_random_4k_per_s"] = random_reads_per_s(path, args.random_reads, seed=1)
            took = evict(daemon, path)
            results["tiering_mib_s"] = args.size_mib / took
            results["tiered_cold_seq_read_mib_s"] = sequential_read_mib_s(path)
            results["tiered_warm_seq_read_mib_s"] = sequential_read_mib_s(path)
            results["tiered_warm_random_4k_per_s"] = random_reads_per_s(path, args.random_reads, seed=1)
            results["write_mib_s_alone"] = write_mib_s(daemon.mount / "w1.bin", args.write_mib)
            other = daemon.mount / "other.bin"
            subprocess.run(["dd", "if=/dev/urandom", f"of={other}", "bs=1M", f"count={args.size_mib // 2}",
                            "conv=fsync", "status=none"], check=True)
            beside = threading.Thread(target=evict, args=(daemon, other))
            beside.start()
            results["write_mib_s_while_tiering"] = write_mib_s(daemon.mount / "w2.bin", args.write_mib)
            beside.join()
        finally:
            daemon.stop()
    return results


RATIOS = (
    ("cold tiered seq read / store GETs", "tiered_cold_seq_read_mib_s", "store_get_mib_s"),
    ("cold tiered / ext4 seq read", "tiered_cold_seq_read_mib_s", "ext4_seq_read_mib_s"),
    ("cold / device seq read", "tiered_cold_seq_read_mib_s", "device_seq_read_mib_s"),
    ("warm / device seq read", "tiered_warm_seq_read_mib_s", "device_seq_read_mib_s"),
    ("warm random 4K / device", "tiered_warm_random_4k_per_s", "device_random_4k_per_s"),
    ("write while tiering / alone", "write_mib_s_while_tiering", "write_mib_s_alone"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--random-reads", type=int, default=2000)
    parser.add_argument("--write-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="runs to take medians of (default 3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = []
    for number in range(1, args.runs + 1):
        print(f"run {number} of {args.runs}", file=sys.stderr, flush=True)
        runs.append(measure(args))
    print(f"{'figure (size ' + str(args.size_mib) + ' MiB)':34} {'median':>10}  runs")
    for key in runs[0]:
        values = [run[key] for run in runs]
        print(f"{key:34} {statistics.median(values):10.1f}  {' '.join(f'{v:.1f}' for v in values)}")
    for label, top, bottom in RATIOS:
        ratios = [run[top] / run[bottom] for run in runs]
        print(f"{label:34} {statistics.median(ratios):10.2f}  {' '.join(f'{r:.2f}' for r in ratios)}")
    if args.json:
        args.json.write_text(json.dumps({"size_mib": args.size_mib, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
