"""Cluster benchmarks: a real 3-node cluster (separate processes, one network namespace each, one
shared image file), next to ext4 and the raw loop device measured in the same run.

    sudo .venv/bin/python bench/cluster_bench.py [--seconds 5] [--workers 4] [--seq-mib 256] [--json F]

Figures (issue "The cluster"): creates per second from one node and from three nodes at once
(target: >= 4,000/s in total), cross-node read-after-close latency, time to a new leader after the
leader is killed (and how long a writer on a surviving node stalls), sequential write throughput
from two nodes at once compared with one node. The machine is shared and noisy: compare ratios
within one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.targets import ext4_target, raw_target  # noqa: E402
from tests.support.cluster import Cluster, Node, cluster_in  # noqa: E402
from tests.support.netns import TestNetwork  # noqa: E402

MiB = 1 << 20


# --- workloads (run in worker processes: the kernel, not the GIL, is what is measured) -------------
MAX_CREATES_PER_WORKER = 40_000  # ext4 would run out of inodes long before the clock


def _create_worker(args: tuple[str, float, Any]) -> tuple[int, float]:
    directory, seconds, start = args
    os.makedirs(directory, exist_ok=True)
    start.wait()
    t0 = time.monotonic()
    deadline = t0 + seconds
    n = 0
    while time.monotonic() < deadline and n < MAX_CREATES_PER_WORKER:
        for _ in range(50):
            fd = os.open(f"{directory}/f{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
            n += 1
    return n, time.monotonic() - t0


def creates_per_s(dirs: list[Path], seconds: float) -> float:
    """All `dirs` at once, one worker process each; total creates per second."""
    with multiprocessing.Manager() as manager:
        start = manager.Event()
        with multiprocessing.Pool(len(dirs)) as pool:
            result = pool.map_async(_create_worker, [(str(d), seconds, start) for d in dirs])
            time.sleep(0.5)  # workers are up and waiting
            start.set()
            done = result.get(seconds * 10 + 120)
    return sum(n / elapsed for n, elapsed in done)


def _seq_worker(args: tuple[str, int]) -> float:
    path, size = args
    block = os.urandom(MiB)
    t0 = time.monotonic()
    with open(path, "wb", buffering=0) as f:
        for _ in range(size // MiB):
            f.write(block)
        os.fsync(f.fileno())
    return time.monotonic() - t0


def seq_write_mib_s(paths: list[Path], size: int) -> float:
    """Each path written by its own process at once; aggregate MiB/s (data fsynced)."""
    with multiprocessing.Pool(len(paths)) as pool:
        t0 = time.monotonic()
        pool.map(_seq_worker, [(str(p), size) for p in paths])
        elapsed = time.monotonic() - t0
    return len(paths) * size / MiB / elapsed


def raw_seq_write_mib_s(device: Path, size: int) -> float:
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={device}", "bs=1M", f"count={size // MiB}", "oflag=direct",
                    "conv=fsync", "status=none"], check=True, timeout=600)
    return size / MiB / (time.monotonic() - t0)


def read_after_close_ms(writer: Node, reader: Node, rounds: int) -> dict[str, float]:
    """Write + close a 4 KiB file on one node; then open + read it on another: how long that read
    takes (it includes catching up with the leader: the close-to-open guarantee)."""
    samples = []
    (writer.mount / "rac").mkdir(exist_ok=True)
    for i in range(rounds):
        payload = os.urandom(4096)
        (writer.mount / "rac" / f"f{i}").write_bytes(payload)
        t0 = time.perf_counter()
        got = (reader.mount / "rac" / f"f{i}").read_bytes()
        samples.append((time.perf_counter() - t0) * 1000)
        assert got == payload, "read-after-close returned other bytes"
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1],
            "max_ms": samples[-1]}


def failover(cluster: Cluster, nodes: list[Node]) -> dict[str, float]:
    """Kill -9 the leader while a survivor creates files: the longest gap between two successful
    creates on the survivor, and when a new leader was reported."""
    leader = cluster.leader(nodes)
    survivor = next(n for n in nodes if n is not leader)
    stamps: list[float] = []
    stop = threading.Event()

    def creator() -> None:
        (survivor.mount / "failover").mkdir(exist_ok=True)
        i = 0
        while not stop.is_set():
            try:
                fd = os.open(survivor.mount / "failover" / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
                os.close(fd)
                stamps.append(time.monotonic())
                i += 1
            except OSError:
                time.sleep(0.01)

    t = threading.Thread(target=creator, daemon=True)
    t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    leader.kill()
    new_leader_s = None
    deadline = killed_at + 60
    while time.monotonic() < deadline:
        try:
            st = survivor.status().get("cluster") or {}
            lead = st.get("raft", {}).get("leader", 0)
            if lead and lead != leader.node_id:
                new_leader_s = time.monotonic() - killed_at
                break
        except Exception:
            pass
        time.sleep(0.05)
    time.sleep(2.0)
    stop.set()
    t.join(30)
    after = [s for s in stamps if s >= killed_at - 1]
    gaps = [b - a for a, b in itertools.pairwise(after)]
    return {"new_leader_s": new_leader_s or float("nan"), "writer_stall_s": max(gaps) if gaps else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each create run")
    parser.add_argument("--workers", type=int, default=4, help="create processes per node")
    parser.add_argument("--seq-mib", type=int, default=256, help="MiB written per writer in the sequential test")
    parser.add_argument("--rounds", type=int, default=100, help="read-after-close samples")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, loop devices, FUSE)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="awsomefs-cluster-bench-") as tmp:
        root = Path(tmp)
        with ext4_target(root, 4 << 30) as ext4:
            results["ext4_creates_per_s"] = creates_per_s(
                [ext4.path / f"w{k}" for k in range(args.workers)], args.seconds)
            results["ext4_seq_write_mib_s"] = seq_write_mib_s([ext4.path / "seq"], args.seq_mib * MiB)
        with raw_target(root, (args.seq_mib + 64) * MiB) as raw:
            results["raw_seq_write_mib_s"] = raw_seq_write_mib_s(raw.path, args.seq_mib * MiB)
        with TestNetwork(3) as network, cluster_in(network, root / "cluster", size="8G") as cluster:
            (root / "cluster").mkdir(exist_ok=True)
            nodes = cluster.form(3)
            a, b, _c = nodes
            results["creates_per_s_one_node"] = creates_per_s(
                [a.mount / "one" / f"w{k}" for k in range(args.workers)], args.seconds)
            results["creates_per_s_three_nodes"] = creates_per_s(
                [n.mount / "three" / f"n{n.index}w{k}" for n in nodes for k in range(args.workers)], args.seconds)
            results["read_after_close"] = read_after_close_ms(a, b, args.rounds)
            results["seq_write_mib_s_one_node"] = seq_write_mib_s([a.mount / "seq-a"], args.seq_mib * MiB)
            results["seq_write_mib_s_two_nodes"] = seq_write_mib_s(
                [a.mount / "seq2-a", b.mount / "seq2-b"], args.seq_mib * MiB)
            results["failover"] = failover(cluster, nodes)
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def print_table(r: dict[str, Any], args: argparse.Namespace) -> None:
    rac, fo = r["read_after_close"], r["failover"]
    one, three = r["creates_per_s_one_node"], r["creates_per_s_three_nodes"]
    rows = [
        (f"creates/s, one node ({args.workers} procs)", f"{one:,.0f}",
         f"ext4 {r['ext4_creates_per_s']:,.0f} ({one / r['ext4_creates_per_s']:.3f}x)"),
        ("creates/s, three nodes at once", f"{three:,.0f}", f"target >= 4,000: {'met' if three >= 4000 else 'not met'}; "
                                                            f"{three / one:.2f}x one node"),
        ("read-after-close 4 KiB, p50 / p99", f"{rac['p50_ms']:.2f} / {rac['p99_ms']:.2f} ms",
         f"max {rac['max_ms']:.1f} ms"),
        ("seq write 1 MiB + fsync, one node", f"{r['seq_write_mib_s_one_node']:,.0f} MiB/s",
         f"ext4 {r['ext4_seq_write_mib_s']:,.0f}, raw {r['raw_seq_write_mib_s']:,.0f} MiB/s"),
        ("seq write, two nodes at once", f"{r['seq_write_mib_s_two_nodes']:,.0f} MiB/s",
         f"{r['seq_write_mib_s_two_nodes'] / r['seq_write_mib_s_one_node']:.2f}x one node"),
        ("leader killed: new leader after", f"{fo['new_leader_s']:.2f} s",
         f"writer on a survivor stalled {fo['writer_stall_s']:.2f} s"),
    ]
    width = max(len(k) for k, _, _ in rows)
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>22}  {note}")


if __name__ == "__main__":
    raise SystemExit(main())
