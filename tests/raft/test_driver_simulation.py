"""The Raft driver under the deterministic simulator (driver_sim.py): real RaftNodes on virtual
time, a faulty network and crashing in-memory disks, checked at every step and at the end.

A failure prints its seed and the command that replays it alone:
    pytest tests/raft/test_driver_simulation.py --driver-seed N --driver-seconds S
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable

import pytest
import trio
import trio.testing

from awsomefsd.meta.raft import MessageType
from awsomefsd.meta.replication import driver, proposals
from awsomefsd.meta.replication.driver import RaftNode
from awsomefsd.meta.replication.errors import ProposalTimeout
from awsomefsd.meta.replication.proposals import Proposals
from tests.support import seeds

from .driver_sim import Scenario, SimFailure, Simulation, encode_put, run_seed
from .memory_replica import MemoryReplicaStorage

DEFAULT_SEEDS = range(11)  # enough that a resent entry is found applied already (a forward is abandoned once answered)
DEFAULT_SECONDS = 3.0
FRESH_SEEDS = 8  # a fresh slice each run (tests/support/seeds.py), beside the fixed ones above
SLOW_SEEDS = 150
SLOW_SECONDS = 20.0


def _run_seeds(chosen: range, seconds: float) -> Counter[str]:
    failures, totals = [], Counter[str]()
    for seed in chosen:
        try:
            totals.update(run_seed(seed, seconds).stats())
        except SimFailure as e:
            failures.append(str(e))
            if len(failures) >= 3:
                break
    assert not failures, seeds.failed(chosen, failures)
    return totals


def test_driver_simulation_seeds(driver_seed: int | None, driver_seconds: float | None) -> None:
    """A few seeds; together they must have exercised every mechanism the simulation is for, so
    that it cannot pass because nothing happened."""
    if driver_seed is not None:
        run_seed(driver_seed, driver_seconds or DEFAULT_SECONDS)
        return
    totals = _run_seeds(DEFAULT_SEEDS, driver_seconds or DEFAULT_SECONDS)
    assert totals["elections"] >= 10 and totals["committed"] >= 150 and totals["operations"] >= 300, totals
    assert totals["follower_puts"] >= 50 and totals["forward_retries"] >= 10, totals
    assert totals["duplicates_suppressed"] >= 1, totals  # a resent entry found applied already
    assert totals["crashes"] >= 5 and totals["crash_lost"] + totals["crash_torn"] + totals["crash_complete"] >= 3
    assert totals["snapshots_installed"] >= 2 and totals["pipelined_applies"] >= 50, totals
    assert totals["stalls"] >= 2 and totals["lease_reads"] >= 100, totals  # leases read, and stalled
    assert totals["wire_read_points"] >= 100, totals  # followers read at the leader's lease point


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_driver_simulation_many_seeds() -> None:
    _run_seeds(seeds.fresh_range("driver-simulation-many", SLOW_SEEDS), SLOW_SECONDS)


def test_driver_simulation_fresh_seeds(driver_seed: int | None) -> None:
    """Seeds no run has tried before; the fixed ones above guard the simulator's coverage."""
    if driver_seed is None:
        _run_seeds(seeds.fresh_range("driver-simulation", FRESH_SEEDS), DEFAULT_SECONDS)


def test_a_driver_seed_replays_exactly() -> None:
    """Determinism is what makes a printed seed useful: two runs agree operation for operation."""
    a, b = run_seed(0, 2.0), run_seed(0, 2.0)
    assert a.history == b.history
    assert a.inv.committed == b.inv.committed
    assert a.stats() == b.stats()


# --- the checks have teeth: planted bugs are caught within a few seeds ---------------------------
def _skip_deduplication(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MemoryReplicaStorage, "first_application", lambda self, txn, pid, index: True)


def _answer_at_append(monkeypatch: pytest.MonkeyPatch) -> None:
    """Acknowledge a proposal as soon as the leader appended it: before it is durable anywhere."""
    hand_to = Proposals.hand_to

    def answer_early(self: Proposals, raw: object, max_batch: int) -> None:
        batch = self.queued[:max_batch]
        hand_to(self, raw, max_batch)  # type: ignore[arg-type]
        for p in batch:
            if p.index and not p.done.is_set():
                p.result = p.index
                p.done.set()

    monkeypatch.setattr(proposals.Proposals, "hand_to", answer_early)


def _acknowledge_appends_before_the_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "_EARLY_TYPES", driver._EARLY_TYPES | {MessageType.APP_RESP})


def _reads_before_the_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a stall, hand reads to the core before counting the missed ticks: a leader cut off
    meanwhile still believes its lease."""
    feed = RaftNode._feed

    def reads_first(self: RaftNode[object]) -> None:
        due, self._next_tick = self._next_tick, math.inf
        feed(self)
        self._next_tick = due
        self._tick_to_now()

    monkeypatch.setattr(RaftNode, "_feed", reads_first)


def _lease_read_with_a_tick_overdue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader answers a read from its lease while its loop is stuck and ticks go uncounted."""
    monkeypatch.setattr(RaftNode, "lease_read_point", lambda self: self.raw.lease_read_index())


def _read_point_without_a_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leader gives its commit index as a read point whether or not its lease holds (a leader
    cut off by a partition still answers the followers on its side)."""
    def committed_if_leading(self: RaftNode[object]) -> int | None:
        return self.raw.raft.log.committed if self.raw.is_leader else None

    monkeypatch.setattr(RaftNode, "lease_read_point", committed_if_leading)


def _follower_reads_without_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    """A follower takes its own applied index for the read point where it would ask the leader."""
    async def own_point(self: RaftNode[object], timeout_s: float) -> int | None:
        if self.ask_read_point is None or self.raw.leader_id in (0, self.id):
            return None
        return self.applied

    monkeypatch.setattr(RaftNode, "_leader_read_point", own_point)


@pytest.mark.parametrize(("plant", "sync", "seeds"), [
    (_skip_deduplication, True, 30),
    (_answer_at_append, True, 30),
    (lambda mp: None, False, 30),  # a disk that acknowledges writes it has not flushed
    (_reads_before_the_ticks, True, 40),
    (_lease_read_with_a_tick_overdue, True, 40),
    (_read_point_without_a_lease, True, 40),
    (_follower_reads_without_asking, True, 40),
    pytest.param(_acknowledge_appends_before_the_fsync, True, 200, marks=pytest.mark.slow),
], ids=["no-deduplication", "answer-at-append", "no-sync", "reads-before-ticks", "lease-read-tick-overdue",
        "read-point-without-lease", "follower-reads-without-asking", "append-ack-before-fsync"])
def test_the_driver_simulation_catches_planted_bugs(plant: Callable[[pytest.MonkeyPatch], None], sync: bool,
                                                    seeds: int, monkeypatch: pytest.MonkeyPatch) -> None:
    plant(monkeypatch)
    for seed in range(seeds):
        try:
            run_seed(seed, DEFAULT_SECONDS, sync=sync)
        except SimFailure as e:
            assert "--driver-seed" in str(e)
            return
    pytest.fail("the driver simulation did not notice the planted bug")


# --- a follower cut off while its forwarded proposal commits, then caught up by snapshot -----------
QUIET = Scenario(duration_s=0.0, n_nodes=3, p_drop=0.0, p_dup=0.0, max_delay_s=0.002, p_long_delay=0.0,
                 fault_every_s=1.0, crashes=False, partitions=False, persist_in_thread=False,
                 snapshot_entries=8, catch_up_entries=0, n_clients=0, disk_latency_s=(0.0002, 0.001))


async def _cut_off_while_forwarding(sim: Simulation, out: dict[str, float]) -> None:
    """Node F forwards a put; the leader commits it, but nothing reaches F (its replies are lost,
    so F keeps resending it); the leader compacts its log past the entry; the link heals and F
    catches up by installing a snapshot that holds the entry."""
    async with trio.open_nursery() as nursery:
        sim.nursery = nursery
        nursery.start_soon(sim.net.run)
        for member in sim.members.values():
            sim.boot(member)
        while sim.leader() is None:
            await trio.sleep(0.01)
        leader = sim.leader()
        assert leader is not None and leader.node is not None
        follower = next(m for m in sim.members.values() if m is not leader)
        assert follower.node is not None and follower.storage is not None
        while follower.node.raw.leader_id != leader.id:
            await trio.sleep(0.01)
        installed = follower.node.snapshots.installed
        sim.net.blocked |= {(other, follower.id) for other in sim.members if other != follower.id}

        async def forwarded_put() -> None:
            assert follower.node is not None
            started = trio.current_time()
            with contextlib.suppress(ProposalTimeout):
                await follower.node.propose(encode_put(1, "a", "from F"))
            out["took"] = trio.current_time() - started
            out["answered_at"] = trio.current_time()

        nursery.start_soon(forwarded_put)
        for k in range(2, 3 * QUIET.snapshot_entries):  # the leader commits F's put and compacts past it
            await leader.node.propose(encode_put(k, "b", str(k)))
        sim.net.blocked.clear()
        while follower.node.snapshots.installed == installed:
            await trio.sleep(0.001)
        out["installed_at"] = trio.current_time()
        while "answered_at" not in out:
            await trio.sleep(0.01)
        out["applied_on_leader"] = float(leader.sm.get("a") == "from F") if leader.sm is not None else 0.0
        nursery.cancel_scope.cancel()


def test_a_proposal_an_installed_snapshot_covers_is_answered_at_once() -> None:
    """The nemesis's stall after a partition healed (a write blocked 10 s, then EIO): the proposal
    a cut-off node forwarded was applied, for that node, by the snapshot it installed on its
    return, so no apply answered it and it waited out its timeout. It must be answered (outcome
    unknown) when the snapshot is installed."""
    sim = Simulation(7, 0.0, scenario=QUIET)
    out: dict[str, float] = {}
    trio.run(_cut_off_while_forwarding, sim, out, clock=trio.testing.MockClock(autojump_threshold=0))
    assert out["applied_on_leader"] == 1.0
    assert out["took"] < QUIET.settings().proposal_timeout_s, out
    assert out["answered_at"] - out["installed_at"] < 0.1, out
