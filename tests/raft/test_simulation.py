"""The Raft cores under a seeded storm of faults (see sim.py), checked at every step.

A failure prints the seed and the command that replays it alone:
    pytest tests/raft/test_simulation.py --raft-seed N
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from awsomefsd.meta.raft import Message
from awsomefsd.meta.raft.core import Raft
from awsomefsd.meta.raft.log import RaftLog

from .sim import SimFailure, run_seed

DEFAULT_SEEDS = 1000
SLOW_SEEDS = 10_000
SLOW_FIRST_SEED = 1_000_000  # the slow run covers seeds the default run does not


def _run_seeds(seeds: range) -> None:
    failures = []
    for seed in seeds:
        try:
            run_seed(seed)
        except SimFailure as e:
            failures.append(str(e))
            if len(failures) >= 3:
                break
    assert not failures, "\n\n".join(failures)


def test_simulation_seeds(raft_seed: int | None, raft_seed_count: int | None) -> None:
    if raft_seed is not None:
        run_seed(raft_seed)
        return
    _run_seeds(range(raft_seed_count or DEFAULT_SEEDS))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~6 min alone on 2 cores; more when the machine is shared
def test_simulation_many_seeds() -> None:
    _run_seeds(range(SLOW_FIRST_SEED, SLOW_FIRST_SEED + SLOW_SEEDS))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulation_long_runs() -> None:
    """Fewer seeds, each ten times longer: more snapshots, membership churn and leader changes."""
    for seed in range(2_000_000, 2_000_100):
        run_seed(seed, duration=30_000)


def test_a_seed_replays_exactly() -> None:
    """Determinism is what makes a printed seed useful: two runs must agree event for event."""
    a, b = run_seed(7), run_seed(7)
    assert a.history == b.history
    assert a.inv.committed == b.inv.committed
    assert a.describe() == b.describe()


def test_the_simulation_does_real_work() -> None:
    """Guard against a simulator that passes because nothing happens."""
    elections = commits = ops = snapshots = 0
    for seed in range(40):
        sim = run_seed(seed)
        elections += len(sim.inv.leader_of_term)
        commits += sim.inv.committed_hi
        ops += len(sim.operations())
        snapshots += sum(n.storage.snapshot().meta.index > 1 for n in sim.nodes.values())
    assert elections > 100 and commits > 2000 and ops > 2000 and snapshots > 40, (
        elections,
        commits,
        ops,
        snapshots,
    )


def _vote_without_log_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RaftLog, "is_up_to_date", lambda self, index, term: True)


def _forget_votes(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Raft._handle_vote_request

    def handle(self: Raft, m: Message) -> None:
        vote = self.vote
        original(self, m)
        self.vote = vote

    monkeypatch.setattr(Raft, "_handle_vote_request", handle)


def _read_without_quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Raft, "_leader_read_index", lambda self, m: self._respond_read(m, self.log.committed))


@pytest.mark.parametrize("break_core", [_vote_without_log_check, _forget_votes, _read_without_quorum])
def test_the_simulator_catches_broken_cores(
    break_core: Callable[[pytest.MonkeyPatch], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks have teeth: each classic Raft bug is caught within a few dozen seeds."""
    break_core(monkeypatch)
    for seed in range(150):
        try:
            run_seed(seed)
        except SimFailure as e:
            assert "--raft-seed" in str(e)
            return
    pytest.fail("the simulator did not notice a broken core")
