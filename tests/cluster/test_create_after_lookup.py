"""A create in a directory other nodes are changing (awsomefsd/cluster/coherence.py, `looking`
with `change_next`), on the simulated log of test_write_lease_fairness.py, in virtual time.

The kernel creates a name in two requests: a LOOKUP that finds nothing, then the CREATE. When
another node holds the directory, the lookup takes its delegation (its hand-over commits what that
node acknowledged first). A delegation taken for a look alone is handed on at once when somebody
asks, so with a third node waiting, the create that came a moment after the lookup found the
delegation gone and waited for every other node's turn a second time: the longest create of
three creators in one directory was two whole waits (bench/contended_bench.py, design note 140).
A lookup that found nothing keeps the delegation for a turn, as a change does; a look that found
a name (a path walk) still hands it on at once."""

from __future__ import annotations

import stat
from pathlib import Path

import trio
import trio.testing

from awsomefsd.cluster import coherence_handover
from awsomefsd.meta.records import ROOT_INO
from tests.cluster.test_write_lease_fairness import Cluster, run_members

HOLDER, CREATOR, OTHER = 1, 2, 3
KERNEL_GAP_S = 0.0005
"""Between the LOOKUP's answer and the CREATE the kernel sends next."""


async def _create_while_another_waits(tmp_path: Path, *, change_next: bool) -> int:
    """Node HOLDER holds the directory, OTHER keeps changing it, and CREATOR looks a name up
    (finding nothing) then creates it: how many times CREATOR waited for the delegation."""
    cluster = Cluster(tmp_path)
    directory = cluster.h.mk(ROOT_INO, b"shared", stat.S_IFDIR | 0o755)
    creator = cluster.co(CREATOR)
    created = trio.Event()

    async def other_changes() -> None:
        while not created.is_set():
            async with cluster.co(OTHER).taking([directory]):
                await trio.sleep(0.001)

    async def body(nursery: trio.Nursery) -> None:
        async with cluster.co(HOLDER).taking([directory]):
            pass
        waits = creator.lease_waits

        async def create() -> None:
            await creator.looking(directory, change_next=change_next)
            await trio.sleep(KERNEL_GAP_S)
            async with creator.taking([directory]):
                pass
            created.set()

        nursery.start_soon(create)
        await trio.sleep(0.01)  # CREATOR asked first; OTHER queues behind it and keeps asking
        nursery.start_soon(other_changes)
        with trio.fail_after(30):
            await created.wait()
        waits = creator.lease_waits - waits
        result.append(waits)

    result: list[int] = []
    await run_members(cluster, body)
    return result[0]


async def test_a_create_waits_once_for_a_directory_others_change(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    assert await _create_while_another_waits(tmp_path / "create", change_next=True) == 1
    # The look of a path walk (the lookup found a name): handed on at once, so a change that
    # follows it waits again. This is what the create's lookup did before.
    assert await _create_while_another_waits(tmp_path / "look", change_next=False) == 2


async def test_a_lookup_alone_keeps_others_waiting_only_its_short_turn(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """A lookup that found nothing and no create after it (a build probing for a file): the node
    hands the delegation on LOOKUP_TURN_S after it got it, not after a change's idle turn."""
    cluster = Cluster(tmp_path)
    directory = cluster.h.mk(ROOT_INO, b"shared", stat.S_IFDIR | 0o755)
    got: list[float] = []

    async def body(nursery: trio.Nursery) -> None:
        async with cluster.co(HOLDER).taking([directory]):
            pass

        async def other_changes() -> None:
            async with cluster.co(OTHER).taking([directory]):
                got.append(trio.current_time())

        await cluster.co(CREATOR).looking(directory, change_next=True)
        looked = trio.current_time()
        nursery.start_soon(other_changes)
        with trio.fail_after(30):
            while not got:
                await trio.sleep(0.001)
        got[0] -= looked

    await run_members(cluster, body)
    print(f"\nanother node got the directory {got[0] * 1000:.1f} ms after the lookup")
    assert coherence_handover.LOOKUP_TURN_S <= got[0] < coherence_handover.IDLE_TURN_S, got
