"""GroupKeeper's transfers (cluster/duties.py) on a stand-in metadata client: when another node's
claim finds every group owned, the owner gives the groups it can spare, and only those: never one
where a reservation of its own waits for its commit (the state machine would refuse that mapping
once the group is another node's), never below what its own buffered writes need, and not one it
received a moment ago."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from awsomefsd.cluster.duties import GroupKeeper
from awsomefsd.fs.allocator import NodeAllocator
from awsomefsd.io.layout import DeviceLayout
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.freespace import FreeSpaceMap
from awsomefsd.meta.records import Member

GROUP = 1024  # blocks (4 MiB)
LAYOUT = DeviceLayout(size_bytes=64 << 20, ag_blocks=GROUP)


@dataclass
class StandInMeta:
    """The replicated state as the keeper reads it: free map, group owners, members; proposals are
    applied at once and shown to the keeper, as the log's observers would."""

    owners: dict[int, int]
    free: FreeSpaceMap = field(default_factory=FreeSpaceMap)
    proposed: list[object] = field(default_factory=list)
    keeper: GroupKeeper | None = None

    def free_space(self) -> FreeSpaceMap:
        return self.free.copy()

    def free_blocks(self) -> int:
        return self.free.free_blocks

    def group_owners(self) -> dict[int, int]:
        return dict(self.owners)

    def groups_of(self, node: int) -> list[int]:
        return [g for g, n in self.owners.items() if n == node]

    def member(self, node: int) -> Member:
        return Member(node, f"n{node}", "", "", "", "active", 1, False, 0)

    async def propose(self, command: Any) -> Any:
        self.proposed.append(command)
        if isinstance(command, c.GrantGroups):
            self.owners.update((g, command.node) for g in command.groups)
        return None


def keeper_owning(groups: list[int], keep: int = 0) -> tuple[GroupKeeper, StandInMeta]:
    meta = StandInMeta({g: 1 for g in groups})
    for g in range(LAYOUT.ag_count):
        meta.free.add(*(lambda lo, hi: (lo, hi - lo))(*LAYOUT.ag_range(g)))
    allocator = NodeAllocator(LAYOUT, groups, meta.free)
    keeper = GroupKeeper(1, meta, allocator, lambda: 1, low_blocks=GROUP, keep_blocks=lambda: keep)  # type: ignore[arg-type]
    meta.keeper = keeper
    return keeper, meta


def ask(keeper: GroupKeeper, node: int, groups: int) -> None:
    keeper.observe(cc.ClaimGroups(node, 1, groups), (), False)


async def test_an_empty_claim_gets_spare_groups_but_not_one_with_a_reservation_in_flight() -> None:
    keeper, meta = keeper_owning([0, 1, 2, 3])
    reserved = keeper.allocator.allocate(10)  # written, its mapping not yet committed: group 0 or so
    busy = LAYOUT.ag_of(reserved[0][0])
    ask(keeper, 2, 4)
    await keeper._give()
    (grant,) = [cmd for cmd in meta.proposed if isinstance(cmd, c.GrantGroups)]
    assert grant.node == 2 and busy not in grant.groups and len(grant.groups) == 3
    assert keeper.allocator.owned_ags == {busy}, "given groups left the allocator before the proposal"
    assert keeper.given == 3


async def test_the_owner_keeps_what_its_buffered_writes_need() -> None:
    keeper, meta = keeper_owning([0, 1, 2], keep=GROUP + 1)
    ask(keeper, 2, 3)
    await keeper._give()
    (grant,) = [cmd for cmd in meta.proposed if isinstance(cmd, c.GrantGroups)]
    assert len(grant.groups) == 1 and keeper.allocator.free_blocks >= GROUP + 1


async def test_groups_received_a_moment_ago_are_held_then_given(autojump_clock: trio.testing.MockClock) -> None:
    keeper, meta = keeper_owning([])
    keeper.observe(c.GrantGroups(1, (5, 6)), None, False)
    assert keeper.allocator.owned_ags == {5, 6} and keeper.received == 2
    ask(keeper, 3, 2)
    await keeper._give()
    assert not meta.proposed and keeper._asks, "given away at once: two writers would trade groups"
    await trio.sleep(1.5)
    await keeper._give()
    (grant,) = meta.proposed
    assert isinstance(grant, c.GrantGroups) and grant.node == 3 and grant.groups == (5, 6)


async def test_an_ask_is_dropped_once_its_asker_stopped_waiting(autojump_clock: trio.testing.MockClock) -> None:
    keeper, meta = keeper_owning([0], keep=10 * GROUP)  # nothing to spare
    ask(keeper, 2, 1)
    await keeper._give()
    assert keeper._asks
    await trio.sleep(5)
    await keeper._give()
    assert not keeper._asks and not meta.proposed
