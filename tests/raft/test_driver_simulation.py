"""The Raft driver under the deterministic simulator (driver_sim.py): real RaftNodes on virtual
time, a faulty network and crashing in-memory disks, checked at every step and at the end.

A failure prints its seed and the command that replays it alone:
    pytest tests/raft/test_driver_simulation.py --driver-seed N --driver-seconds S
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from awsomefsd.meta.raft import MessageType
from awsomefsd.meta.replication import driver, proposals
from awsomefsd.meta.replication.proposals import Proposals

from .driver_sim import SimFailure, run_seed
from .memory_replica import MemoryReplicaStorage

DEFAULT_SEEDS = range(6)
DEFAULT_SECONDS = 3.0
SLOW_SEEDS = range(1_000, 1_150)
SLOW_SECONDS = 20.0


def _run_seeds(seeds: range, seconds: float) -> Counter[str]:
    failures, totals = [], Counter[str]()
    for seed in seeds:
        try:
            totals.update(run_seed(seed, seconds).stats())
        except SimFailure as e:
            failures.append(str(e))
            if len(failures) >= 3:
                break
    assert not failures, "\n\n".join(failures)
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


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_driver_simulation_many_seeds() -> None:
    _run_seeds(SLOW_SEEDS, SLOW_SECONDS)


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


@pytest.mark.parametrize(("plant", "sync", "seeds"), [
    (_skip_deduplication, True, 30),
    (_answer_at_append, True, 30),
    (lambda mp: None, False, 30),  # a disk that acknowledges writes it has not flushed
    pytest.param(_acknowledge_appends_before_the_fsync, True, 200, marks=pytest.mark.slow),
], ids=["no-deduplication", "answer-at-append", "no-sync", "append-ack-before-fsync"])
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
