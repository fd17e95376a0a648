"""The node-local allocator: the allocation groups this node owns, and their free extents.

Pure and in memory: no I/O, no clocks. It belongs to the file system layer (it reserves the blocks
a flush, a compaction or a truncate writes); the authoritative free space is replicated metadata
(meta/space.py, meta/freespace.py), and which groups a node owns is decided by the cluster
(cluster/duties.py GroupKeeper grants and revokes them here).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from awsomefsd.io.layout import DeviceLayout
from awsomefsd.meta.errors import certainly_not_applied
from awsomefsd.meta.freespace import MAX_ALLOCATION_BLOCKS, Extent, FreeSpaceMap, check_extent


class NoSpaceError(OSError):
    """No free extents left in the node's allocation groups (errno ENOSPC, so FUSE passes it on)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class NodeAllocator:
    """The node's private allocator over the allocation groups the leader granted it.

    The authoritative free map lives in the replicated state machine. This allocator is the node's
    own view of its groups: their free extents as of the grant, plus frees the state machine reports
    (`on_freed`), minus the node's in-flight reservations. Allocating needs no round trip: the
    leader never hands out blocks of a group it granted to this node. A reservation becomes real
    only when the metadata commit that references it is applied (the state machine then removes the
    extents from its own map; this view already excludes them). If the node crashes between writing
    the data and the commit, nothing leaks: the reservation was never committed, so the blocks are
    still free in the authoritative map and come back when the group is granted again. Reserved
    blocks that end up unused go back with `release`.

    The allocator copies what it is given; it never mutates the `free` map passed in.
    """

    def __init__(self, layout: DeviceLayout, owned_ags: Iterable[int], free: FreeSpaceMap) -> None:
        self.layout = layout
        self._groups: dict[int, FreeSpaceMap] = {}
        self._free_blocks = 0  # the groups' free blocks, kept as they change: every write asks
        self._last_ag = 0
        self.withheld_blocks = 0
        """Blocks reserved for changes whose outcome stayed unknown (`release_after_failure`)."""
        for ag in owned_ags:
            self.grant(ag, free.extents_within(*layout.ag_range(ag)))

    @property
    def owned_ags(self) -> frozenset[int]:
        return frozenset(self._groups)

    @property
    def free_blocks(self) -> int:
        return self._free_blocks

    def free_blocks_in(self, ag: int) -> int:
        group = self._groups.get(ag)
        return 0 if group is None else group.free_blocks

    def allocate(self, count_blocks: int, hint: int | None = None) -> list[Extent]:
        """Reserve exactly `count_blocks` blocks, as few extents as the free space allows.

        Prefers one extent starting at `hint` (the block after the file's previous extent), then one
        extent anywhere in the node's groups, then several. Raises NoSpaceError (ENOSPC) and reserves
        nothing when the groups hold fewer free blocks.
        """
        if not 0 < count_blocks <= MAX_ALLOCATION_BLOCKS:
            raise ValueError(f"allocation of {count_blocks} blocks outside [1, {MAX_ALLOCATION_BLOCKS}]")
        free_blocks = self.free_blocks
        if free_blocks < count_blocks:
            raise NoSpaceError(
                f"no space: {count_blocks} blocks wanted, {free_blocks} free in this node's "
                f"{len(self._groups)} allocation groups"
            )
        order = self._ag_order(hint)
        for ag in order:
            got = self._groups[ag].allocate(count_blocks, min_count=count_blocks, hint=hint)
            if got is not None:
                self._last_ag = ag
                self._free_blocks -= count_blocks
                return [got]
        extents: list[Extent] = []
        remaining = count_blocks
        for ag in order:
            group = self._groups[ag]
            steps = 0
            while remaining and group.free_blocks:
                got = group.allocate(remaining, hint=hint)
                assert got is not None and steps <= count_blocks
                steps += 1
                extents.append(got)
                remaining -= got[1]
                hint = got[0] + got[1]
            if not remaining:
                self._last_ag = ag
                break
        assert remaining == 0 and sum(n for _, n in extents) == count_blocks
        self._free_blocks -= count_blocks
        return extents

    def release(self, extents: Iterable[Extent]) -> None:
        """Give back reserved extents that were not committed (parts outside the node's groups,
        e.g. of a group revoked meanwhile, are dropped: they were never taken from the state)."""
        self._give(extents)

    def release_after_failure(self, extents: list[Extent], failure: BaseException) -> None:
        """Settle extents reserved for a change whose proposal raised `failure`: give them back
        when the change certainly did not commit; otherwise withhold them (counted in
        `withheld_blocks`). A change whose outcome is unknown may still commit, mapping these
        blocks: handed out again, they would be overwritten under a committed checksum. Withheld
        blocks that stayed free in the authoritative map come back when the node rebuilds its
        allocator (a restart, or its groups granted again)."""
        if certainly_not_applied(failure):
            self.release(extents)
        else:
            self.withheld_blocks += sum(count for _, count in extents)

    def on_freed(self, extents: Iterable[Extent]) -> None:
        """Extents the state machine freed; those in the node's groups become allocatable."""
        self._give(extents)

    def grant(self, ag: int, free_extents: Iterable[Extent]) -> None:
        """Take ownership of group `ag` with its free extents (clipped to the group)."""
        lo, hi = self.layout.ag_range(ag)
        if ag in self._groups:
            raise ValueError(f"allocation group {ag} is already owned by this node")
        group = FreeSpaceMap()
        for start, count in free_extents:
            start, end = max(start, lo), min(start + count, hi)
            if start < end:
                group.add(start, end - start)
        self._groups[ag] = group
        self._free_blocks += group.free_blocks

    def revoke(self, ag: int) -> list[Extent]:
        """Stop allocating in `ag`; returns the free extents the node still saw there."""
        group = self._groups.pop(ag, None)
        if group is None:
            return []
        self._free_blocks -= group.free_blocks
        return list(group)

    def _ag_order(self, hint: int | None) -> list[int]:
        owned = sorted(self._groups)
        if not owned:
            return []
        first = self._last_ag
        if hint is not None and self.layout.data_start_block <= hint < self.layout.data_end_block:
            hint_ag = self.layout.ag_of(hint)
            if hint_ag in self._groups:
                first = hint_ag
        split = next((i for i, ag in enumerate(owned) if ag >= first), 0)
        return owned[split:] + owned[:split]

    def _give(self, extents: Iterable[Extent]) -> None:
        layout = self.layout
        for start, count in extents:
            check_extent(start, count)
            end = start + count
            block = max(start, layout.data_start_block)
            while block < min(end, layout.data_end_block):
                ag = layout.ag_of(block)
                ag_end = min(layout.ag_range(ag)[1], end)
                group = self._groups.get(ag)
                if group is not None:
                    group.add(block, ag_end - block)
                    self._free_blocks += ag_end - block
                block = ag_end
