"""A look on a node that is handing a directory's delegation over (awsomefsd/cluster/coherence.py,
`looking`), on the simulated log of test_write_lease_fairness.py, with one member that applies
its own proposals late: the log has given the delegation to the next node, which may change the
directory and answer at once, while the member still reads the state from before.

Found by tests/cluster/test_member_names.py on a loaded machine: node b renamed f003 over f004
in a directory node a had just handed it, and a's stat of f004 right after the rename returned
still found f004's old inode. A look in that window must wait for the hand-over to be applied
here, then take the delegation for the look like any other look in a directory another node
holds (its hand-over commits what that node acknowledged first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import trio
import trio.testing

from tests.cluster.test_write_lease_fairness import INO, Cluster, NodeLog, run_members

GIVER, TAKER = 2, 3


class LateApplyLog(NodeLog):
    """A member whose apply trails the log: between the log applying one of its proposals and
    that proposal returning, it reads the state from before (a follower applying later than the
    node the command hands a lease to)."""

    def __init__(self, base: NodeLog) -> None:
        super().__init__(base.sim, base.node, base.epoch)
        self._before: lmdb.Transaction | None = None

    def read_txn(self) -> lmdb.Transaction:
        return self._before if self._before is not None else self.sim.read_txn()

    async def propose(self, command: object, *, epoch: int | None = None) -> Any:
        self._before = self.sim.h.store.env.begin()
        try:
            return await super().propose(command, epoch=epoch)
        finally:
            self._before.abort()
            self._before = None


def holder_in_the_log(cluster: Cluster) -> int:
    return cluster.h.sm.cluster.lease_holder(cluster.h.store.env.begin(), INO)


async def test_a_look_while_the_log_already_gave_the_delegation_away_waits_and_takes_it_back(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    cluster = Cluster(tmp_path)
    giver = cluster.co(GIVER)
    late = LateApplyLog(giver.meta._log)  # type: ignore[attr-defined]
    giver.meta._log = giver.meta.ahead._log = late  # type: ignore[attr-defined]
    looked: list[tuple[bool, int]] = []

    async def body(nursery: trio.Nursery) -> None:
        async with giver.taking([INO]):
            pass

        async def change_on_the_taker() -> None:
            async with cluster.co(TAKER).taking([INO]):
                await trio.sleep(0.05)  # a change acknowledged under the delegation

        nursery.start_soon(change_on_the_taker)
        with trio.fail_after(5):
            while holder_in_the_log(cluster) != TAKER:
                await trio.sleep(0.001)
        assert giver.meta.lease_holder(INO) == GIVER, "the giver should not have applied the hand-over yet"
        with trio.fail_after(5):
            answer = await giver.looking(INO)
        looked.append((answer, holder_in_the_log(cluster)))

    await run_members(cluster, body)
    (answer, holder), = looked
    assert answer and holder == GIVER, (
        f"the look answered {'from the delegation' if answer else 'from its own state'} while the log "
        f"gave the directory to node {holder}: a change acknowledged there could be missing")
