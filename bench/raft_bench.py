"""Throughput and commit latency of Raft: the cores alone, and real members on loopback.

`--mode core` (the default) measures the CPU cost of the consensus logic in Python, with in-memory
storage and transport and no fsync, so the numbers are an upper bound for what the core allows.
"no batching" keeps one proposal in flight (each proposal pays a whole Ready/persist/send cycle);
"batching" keeps up to --batch proposals in flight and hands them to the core between two Readys,
which sends them in one append message per follower.

`--mode processes` starts 1 and 3 `raft_kv` members as separate processes (LMDB storage with an
fsync per Ready, the gRPC transport on 127.0.0.x) and drives them from this process with 1 and
--proposers concurrent clients (asynchronous gRPC calls, one outstanding per proposer), once with
the driver's batching (up to 1024 commands per Ready) and once without (one command per Ready).
Latency is what a client sees: from sending Put to the acknowledgement, after the entry is
durable on a quorum and applied on the leader.

    .venv/bin/python bench/raft_bench.py [--mode core|processes] [--proposals N] [--batch B]
                                         [--proposers P] [--seconds S] [--payload-bytes P]
                                         [--load in-process remote] [--members 1 3] [--batching yes no]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from awsomefsd.meta.raft import (
    Config,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    RawNode,
    Snapshot,
    SnapshotMeta,
)


class InMemoryCluster:
    def __init__(self, n: int) -> None:
        voters = tuple(range(1, n + 1))
        self.storage = {i: MemoryStorage() for i in voters}
        for st in self.storage.values():
            st.apply_snapshot(Snapshot(SnapshotMeta(1, 1, ConfState(voters))))
            st.set_hard_state(HardState(1, 0, 1))
        self.nodes = {
            i: RawNode(
                Config(id=i, random_below=lambda k: 0, applied=1, max_inflight_msgs=1024), self.storage[i]
            )
            for i in voters
        }
        self.leader = self.nodes[1]
        self.leader.campaign()
        while not self.leader.is_leader or self.round(lambda e: None):
            pass

    def round(self, on_leader_apply: Callable[[Entry], None]) -> bool:
        """Every node handles one Ready; then every message is delivered. False when idle."""
        msgs: list[Message] = []
        moved = False
        for i, node in self.nodes.items():
            if not node.has_ready():
                continue
            moved = True
            rd = node.ready()
            st = self.storage[i]
            st.append(rd.entries)
            if rd.hard_state is not None:
                st.set_hard_state(rd.hard_state)
            msgs.extend(rd.messages)
            if node is self.leader:
                for e in rd.committed_entries:
                    on_leader_apply(e)
            node.advance(rd)
        for m in msgs:
            self.nodes[m.to].step(m)
        return moved or bool(msgs)


def run(n_nodes: int, in_flight: int, proposals: int, payload_bytes: int) -> dict[str, float]:
    cluster = InMemoryCluster(n_nodes)
    payload = b"x" * payload_bytes
    started: dict[int, int] = {}
    latencies_us: list[float] = []

    def applied(e: Entry) -> None:
        t0 = started.pop(e.index, None)
        if t0 is not None:
            latencies_us.append((time.perf_counter_ns() - t0) / 1000)

    proposed = 0
    begin = time.perf_counter()
    while len(latencies_us) < proposals:
        room = min(in_flight - len(started), proposals - proposed)
        for _ in range(room):
            started[cluster.leader.propose(payload)] = time.perf_counter_ns()
            proposed += 1
        cluster.round(applied)
    elapsed_s = time.perf_counter() - begin
    qs = statistics.quantiles(latencies_us, n=100)
    return {"proposals_per_s": proposals / elapsed_s, "p50_us": qs[49], "p99_us": qs[98]}


FSYNC_PROBE_DIR = "/var/tmp"


def fsync_latency_ms(samples: int = 100) -> tuple[float, float]:
    """The disk's fsync latency where the members keep their logs: it bounds every figure."""
    import os

    with tempfile.TemporaryDirectory(dir=FSYNC_PROBE_DIR) as tmp:
        fd = os.open(os.path.join(tmp, "probe"), os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            times = []
            for _ in range(samples):
                os.write(fd, b"x" * 4096)
                t0 = time.perf_counter()
                os.fsync(fd)
                times.append((time.perf_counter() - t0) * 1000)
        finally:
            os.close(fd)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def _us(value: float) -> str:
    return "" if value != value else f"{value:,.0f}us"  # NaN: not measured


def _members_cpu_s(cluster: object) -> float:
    """CPU seconds (user + system) the member processes used so far (Linux /proc)."""
    import os

    total = 0.0
    for m in cluster.members.values():  # type: ignore[attr-defined]
        if m.proc is None:
            continue
        with open(f"/proc/{m.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_processes(n_nodes: int, proposers: int, max_batch: int, seconds: float, payload_bytes: int,
                  load: str) -> dict[str, float]:
    """Closed loop: each proposer keeps one command outstanding for `seconds`; `load` is
    "in-process" (proposer tasks inside the leader, like FUSE requests in the daemon) or "remote"
    (one gRPC Put per command from this process)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/support is in the checkout, not the package
    from tests.support.raft_cluster import KVCluster

    with tempfile.TemporaryDirectory(prefix="raft-bench-", dir="/var/tmp") as tmp:
        cluster = KVCluster(Path(tmp), n_nodes, max_batch=max_batch)
        try:
            cluster.start()
            leader = cluster.leader()
            if load == "in-process":
                cpu0 = _members_cpu_s(cluster)
                r = leader.call("Bench", timeout_s=seconds + 30, proposers=proposers, seconds=seconds,
                                payload_bytes=payload_bytes)
                cpu_s = _members_cpu_s(cluster) - cpu0
                return {"proposals_per_s": r["count"] / r["elapsed_s"], "p50_us": r["p50_us"],
                        "p99_us": r["p99_us"], "errors": r["errors"], "mean_batch": r["mean_batch"],
                        "cpu_us": cpu_s * 1e6 / max(r["count"], 1)}
            put = leader.channel.unary_unary("/awsomefs.raftkv.v1.KV/Put")
            value = "x" * payload_bytes
            latencies_us: list[float] = []
            errors = [0]
            lock = threading.Lock()
            done = threading.Event()
            warmup_end = time.monotonic() + min(1.0, seconds / 4)
            end = warmup_end + seconds
            finished = [0]

            def issue(slot: int, n: int) -> None:
                if time.monotonic() >= end:
                    with lock:
                        finished[0] += 1
                        if finished[0] == proposers:
                            done.set()
                    return
                t0 = time.perf_counter_ns()
                body = json.dumps({"key": f"p{slot}-{n % 64}", "value": value}).encode()
                fut = put.future(body, timeout=10)

                def on_done(f: object) -> None:
                    t1 = time.perf_counter_ns()
                    ok = fut.exception() is None and b"index" in fut.result()
                    if time.monotonic() >= warmup_end:
                        with lock:
                            if ok:
                                latencies_us.append((t1 - t0) / 1000)
                            else:
                                errors[0] += 1
                    issue(slot, n + 1)

                fut.add_done_callback(on_done)

            for slot in range(proposers):
                issue(slot, 0)
            done.wait(seconds + 60)
            measured_s = seconds
            qs = statistics.quantiles(latencies_us, n=100) if len(latencies_us) > 1 else [0.0] * 99
            return {"proposals_per_s": len(latencies_us) / measured_s, "p50_us": qs[49], "p99_us": qs[98],
                    "errors": errors[0], "mean_batch": float("nan"), "cpu_us": float("nan")}
        finally:
            cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("core", "processes"), default="core")
    ap.add_argument("--proposals", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64, help="proposals in flight when batching")
    ap.add_argument("--proposers", type=int, default=32, help="concurrent clients (processes mode)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per row (processes mode)")
    ap.add_argument("--payload-bytes", type=int, default=128)
    ap.add_argument("--load", nargs="+", choices=("in-process", "remote"), default=["in-process", "remote"],
                    help="where the proposers run (processes mode)")
    ap.add_argument("--members", nargs="+", type=int, choices=(1, 3), default=[1, 3],
                    help="group sizes to measure (processes mode)")
    ap.add_argument("--batching", nargs="+", choices=("yes", "no"), default=["yes", "no"],
                    help="driver batching on, off or both (processes mode)")
    args = ap.parse_args()
    if args.mode == "processes":
        p50, p99 = fsync_latency_ms()
        print(f"fsync of 4 KiB on {FSYNC_PROBE_DIR}: p50 {p50:.2f} ms, p99 {p99:.2f} ms (varies with the disk's load)")
        print(f"{'load':<10} {'members':>7} {'batching':<9} {'proposers':>9} {'proposals/s':>12} "
              f"{'p50 commit':>12} {'p99 commit':>12} {'batch':>6} {'errors':>6} {'cpu/cmd':>9}")
        for load in args.load:
            for n in args.members:
                for mode, max_batch in (("yes", 1024), ("no", 1)):
                    if mode not in args.batching:
                        continue
                    for proposers in (1, args.proposers):
                        r = run_processes(n, proposers, max_batch, args.seconds, args.payload_bytes, load)
                        print(f"{load:<10} {n:>7} {mode:<9} {proposers:>9} {r['proposals_per_s']:>12,.0f} "
                              f"{r['p50_us'] / 1000:>10,.2f}ms {r['p99_us'] / 1000:>10,.2f}ms "
                              f"{r['mean_batch']:>6.1f} {r['errors']:>6} {_us(r['cpu_us']):>9}", flush=True)
        return
    print(f"{'members':>7} {'mode':<12} {'proposals/s':>12} {'p50 commit':>12} {'p99 commit':>12}")
    for n in (1, 3):
        for mode, in_flight in (("no batching", 1), (f"batch {args.batch}", args.batch)):
            count = args.proposals if in_flight > 1 else max(1, args.proposals // 4)
            r = run(n, in_flight, count, args.payload_bytes)
            print(
                f"{n:>7} {mode:<12} {r['proposals_per_s']:>12,.0f} "
                f"{r['p50_us']:>10,.0f}us {r['p99_us']:>10,.0f}us"
            )


if __name__ == "__main__":
    main()
