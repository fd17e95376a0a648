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
from tests.support import seeds

from .sim import SimFailure, run_seed

DEFAULT_SEEDS = 1000
SLOW_SEEDS = 10_000
CHUNKS = 4  # each seed sweep is split in this many tests, which pytest-xdist spreads over the cores


def _run_seeds(chosen: range) -> None:
    failures = []
    for seed in chosen:
        try:
            run_seed(seed)
        except SimFailure as e:
            failures.append(str(e))
            if len(failures) >= 3:
                break
    assert not failures, seeds.failed(chosen, failures)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_simulation_seeds(raft_seed: int | None, raft_seed_count: int | None, chunk: int) -> None:
    """A fresh slice of seeds every run (tests/support/seeds.py), a quarter in each chunk."""
    if raft_seed is not None:
        if chunk == 0:
            run_seed(raft_seed)
        return
    _run_seeds(seeds.fresh_range("raft-simulation", raft_seed_count or DEFAULT_SEEDS)[chunk::CHUNKS])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~6 min alone on 2 cores in all; more when the machine is shared
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_simulation_many_seeds(chunk: int) -> None:
    _run_seeds(seeds.fresh_range("raft-simulation-many", SLOW_SEEDS)[chunk::CHUNKS])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulation_long_runs() -> None:
    """Fewer seeds, each ten times longer: more snapshots, membership churn and leader changes."""
    chosen = seeds.fresh_range("raft-simulation-long", 100)
    print(seeds.describe(chosen))
    for seed in chosen:
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
