"""Throughput and commit latency of the Raft cores alone: in-memory storage and transport.

What it measures: the CPU cost of the consensus logic in Python, with no disk and no network, so
the numbers are an upper bound for what the core allows; a real node adds an fsync per Ready and a
network round trip. "no batching" keeps one proposal in flight (each proposal pays a whole
Ready/persist/send cycle); "batching" keeps up to --batch proposals in flight and hands them to the
core between two Readys, which sends them in one append message per follower.

    .venv/bin/python bench/raft_bench.py [--proposals N] [--batch B] [--payload-bytes P]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proposals", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64, help="proposals in flight when batching")
    ap.add_argument("--payload-bytes", type=int, default=128)
    args = ap.parse_args()
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
