"""Free-space extents and the node-local allocator."""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from awsomefsd.fs.allocator import NodeAllocator, NoSpaceError
from awsomefsd.io.layout import MiB, plan_layout
from awsomefsd.meta import freespace as freespace_module
from awsomefsd.meta.freespace import FreeSpaceMap
from awsomefsd.meta.sortedints import SortedInts
from tests.support import seeds

# -- FreeSpaceMap: examples --------------------------------------------------------------------------


def test_adjacent_extents_merge_and_removal_splits() -> None:
    m = FreeSpaceMap([(10, 5), (20, 5)])
    m.add(15, 5)
    assert list(m) == [(10, 15)]
    m.remove(12, 3)
    assert list(m) == [(10, 2), (15, 10)]
    assert (m.free_blocks, m.extent_count, m.largest_extent_blocks) == (12, 2, 10)
    m.check()


def test_double_free_and_freeing_used_space_are_refused() -> None:
    m = FreeSpaceMap([(10, 5)])
    for start, count in ((10, 1), (8, 3), (14, 4), (0, 100)):
        with pytest.raises(ValueError, match="double free"):
            m.add(start, count)
    for start, count in ((9, 2), (14, 2), (30, 1)):
        with pytest.raises(ValueError, match="not entirely free"):
            m.remove(start, count)
    with pytest.raises(ValueError):
        m.add(5, 0)
    assert list(m) == [(10, 5)]


def test_contains_and_overlaps() -> None:
    m = FreeSpaceMap([(10, 5)])
    assert m.contains_free(10, 5) and m.contains_free(12, 1)
    assert not m.contains_free(9, 2) and not m.contains_free(14, 2)
    assert m.overlaps_free(9, 2) and m.overlaps_free(14, 5) and m.overlaps_free(0, 100)
    assert not m.overlaps_free(0, 10) and not m.overlaps_free(15, 3)


def test_allocate_prefers_the_extent_at_the_hint() -> None:
    m = FreeSpaceMap([(0, 100), (500, 100)])
    assert m.allocate(10, hint=500) == (500, 10)
    assert m.allocate(10, hint=510) == (510, 10)  # a growing file stays contiguous
    assert m.allocate(10, hint=550) == (550, 10)  # inside an extent: carve from the hint
    assert m.allocate(200, min_count=5, hint=590) == (590, 10)  # partial, up to the extent's end
    got = m.allocate(10, min_count=10, hint=595)  # a used hint: somewhere else
    assert got is not None and got[0] != 595


def test_next_fit_rotates_instead_of_reusing_the_front() -> None:
    m = FreeSpaceMap([(0, 10), (100, 10), (200, 10)])
    assert m.allocate(4) == (0, 4)
    assert m.allocate(4) == (4, 4)
    assert m.allocate(4) == (100, 4)  # (8, 2) is too small; the cursor moved on
    m.add(0, 8)
    assert m.allocate(4) == (104, 4)
    assert m.allocate(4) == (200, 4)
    assert m.allocate(4) == (204, 4)
    assert m.allocate(4) == (0, 4)  # wrapped around


def test_partial_allocation_takes_the_largest_extent() -> None:
    m = FreeSpaceMap([(0, 3), (10, 7), (30, 5)])
    assert m.allocate(20, min_count=6) == (10, 7)
    assert m.allocate(20, min_count=6) is None
    assert m.allocate(20) == (30, 5)
    with pytest.raises(ValueError):
        m.allocate(5, min_count=6)


def test_within_restricts_allocation_to_a_range() -> None:
    m = FreeSpaceMap([(0, 100)])
    assert m.allocate(10, within=(50, 70)) == (50, 10)
    assert m.allocate(20, within=(50, 70)) == (60, 10)
    assert m.allocate(1, within=(50, 70)) is None
    assert m.allocate(10, hint=95, within=(0, 98)) == (95, 3)
    assert all(not (50 <= s < 70) for s, _ in m)


def test_within_on_a_fragmented_range_uses_the_size_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(freespace_module, "RANGE_SCAN_EXTENTS", 8)
    monkeypatch.setattr(freespace_module, "NEXT_FIT_SCAN_EXTENTS", 2)
    m = FreeSpaceMap([(2 * i, 1) for i in range(100)] + [(1000, 50), (300, 30)])
    # range [0, 1010): 1-block extents, (300, 30), and (1000, 50) straddling its end
    assert m.allocate(20, within=(0, 1010)) == (300, 20)
    assert m.allocate(10, within=(0, 1010)) == (320, 10)  # best fit, entirely inside
    assert m.allocate(40, min_count=2, within=(0, 1010)) == (1000, 10)  # largest: the clipped edge
    assert m.allocate(40, min_count=2, within=(0, 1010)) is None
    got = m.allocate(40, within=(0, 1010))
    assert got is not None and got[1] == 1 and got[0] < 200
    m.check()


def test_size_index_never_returns_less_than_min_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the stateful model: the largest in-range extent is too small, so nothing fits."""
    monkeypatch.setattr(freespace_module, "RANGE_SCAN_EXTENTS", 2)
    monkeypatch.setattr(freespace_module, "NEXT_FIT_SCAN_EXTENTS", 1)
    m = FreeSpaceMap([(1, 1), (25, 1), (27, 1), (40, 5)])
    assert m.allocate(2, min_count=2, within=(0, 30)) is None
    assert m.allocate(2, min_count=1, within=(0, 30)) is not None
    m.check()


def test_extents_within_clips() -> None:
    m = FreeSpaceMap([(0, 10), (20, 10), (40, 10)])
    assert list(m.extents_within(5, 45)) == [(5, 5), (20, 10), (40, 5)]
    assert list(m.extents_within(10, 20)) == []


# -- FreeSpaceMap against a set-of-blocks model --------------------------------------------------------

UNIVERSE = 300
starts = st.integers(0, UNIVERSE - 1)
counts = st.integers(1, 40)


def _runs(blocks: object) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for b in sorted(blocks):  # type: ignore[call-overload]
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


class FreeSpaceModel(RuleBasedStateMachine):
    """FreeSpaceMap must behave like a plain set of free block numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.map = FreeSpaceMap()
        self.free: set[int] = set()

    @rule(start=starts, count=counts)
    def add(self, start: int, count: int) -> None:
        blocks = set(range(start, start + count))
        if blocks & self.free:
            with pytest.raises(ValueError):
                self.map.add(start, count)
        else:
            self.map.add(start, count)
            self.free |= blocks

    @rule(start=starts, count=counts)
    def remove(self, start: int, count: int) -> None:
        blocks = set(range(start, start + count))
        assert self.map.contains_free(start, count) == (blocks <= self.free)
        assert self.map.overlaps_free(start, count) == bool(blocks & self.free)
        if blocks <= self.free:
            self.map.remove(start, count)
            self.free -= blocks
        else:
            with pytest.raises(ValueError):
                self.map.remove(start, count)

    @rule(
        wanted=counts,
        min_fraction=st.floats(0, 1),
        hint=st.one_of(st.none(), starts),
        within=st.one_of(st.none(), st.tuples(starts, counts.map(lambda c: c * 5))),
    )
    def allocate(self, wanted: int, min_fraction: float, hint: int | None, within: tuple[int, int] | None) -> None:
        min_count = max(1, int(wanted * min_fraction))
        lo, hi = (0, UNIVERSE + 100) if within is None else (within[0], within[0] + within[1])
        runs = _runs(b for b in self.free if lo <= b < hi)
        got = self.map.allocate(wanted, min_count=min_count, hint=hint,
                                within=None if within is None else (lo, hi))
        if got is None:
            assert all(n < min_count for _, n in runs)
            return
        start, n = got
        assert min_count <= n <= wanted
        assert lo <= start and start + n <= hi
        blocks = set(range(start, start + n))
        assert blocks <= self.free
        at_hint = hint is not None and lo <= hint < hi and hint in self.free
        hint_run = next((s + c - hint for s, c in runs if at_hint and s <= hint < s + c), 0)  # type: ignore[operator]
        if hint_run >= min_count:
            assert (start, n) == (hint, min(hint_run, wanted))
        elif any(c >= wanted for _, c in runs):
            assert n == wanted
        else:
            assert n == max(c for _, c in runs)
        self.free -= blocks

    @precondition(lambda self: self.free)
    @rule()
    def use_everything(self) -> None:
        for start, count in list(self.map):
            self.map.remove(start, count)
        self.free.clear()

    @invariant()
    def matches_model(self) -> None:
        self.map.check()
        runs = _runs(self.free)
        assert list(self.map) == runs
        assert self.map.free_blocks == len(self.free)
        assert self.map.largest_extent_blocks == max((n for _, n in runs), default=0)


TestFreeSpaceModel = FreeSpaceModel.TestCase
TestFreeSpaceModel.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


class FreeSpaceModelShortScans(FreeSpaceModel):
    """The same model with scan limits so small that `within` goes through the size index."""

    def __init__(self) -> None:
        super().__init__()
        self.saved = freespace_module.RANGE_SCAN_EXTENTS, freespace_module.NEXT_FIT_SCAN_EXTENTS
        freespace_module.RANGE_SCAN_EXTENTS, freespace_module.NEXT_FIT_SCAN_EXTENTS = 2, 1

    def teardown(self) -> None:
        freespace_module.RANGE_SCAN_EXTENTS, freespace_module.NEXT_FIT_SCAN_EXTENTS = self.saved


TestFreeSpaceModelShortScans = FreeSpaceModelShortScans.TestCase
TestFreeSpaceModelShortScans.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


def test_sorted_ints_against_a_set() -> None:
    rng = random.Random(7)
    s = SortedInts()
    model: set[int] = set()
    for _ in range(20000):
        v = rng.randrange(5000)
        if v in model:
            s.remove(v)
            model.discard(v)
        else:
            s.add(v)
            model.add(v)
        if rng.random() < 0.01:
            s.check()
            q = rng.randrange(-10, 5010)
            below = [x for x in model if x <= q]
            above = [x for x in model if x >= q]
            assert s.floor(q) == (max(below) if below else None)
            assert s.ceiling(q) == (min(above) if above else None)
            assert list(s.iter_from(q)) == sorted(above)
            assert list(s.iter_down_from(q)) == sorted(below, reverse=True)
    assert list(s) == sorted(model) and len(s) == len(model)


def test_a_map_of_100k_extents_stays_consistent() -> None:
    m = FreeSpaceMap((2 * i, 1) for i in range(100_000))
    assert m.extent_count == 100_000
    rng = random.Random(3)
    for _ in range(2000):
        got = m.allocate(1)
        assert got is not None
        m.add(*got)
        block = 2 * rng.randrange(100_000) + 1
        m.add(block, 1)
        m.remove(block, 1)
    assert m.allocate(2, min_count=2) is None
    assert m.extent_count == 100_000
    m.check()


# -- NodeAllocator -------------------------------------------------------------------------------------

LAYOUT = plan_layout(64 * MiB, ag_size_bytes=4 * MiB)  # 16 groups of 1024 blocks (the last shorter)


def _free_device() -> FreeSpaceMap:
    return FreeSpaceMap([(LAYOUT.data_start_block, LAYOUT.data_blocks)])


def test_allocates_only_inside_owned_groups_and_copies_the_map() -> None:
    free = _free_device()
    alloc = NodeAllocator(LAYOUT, [2, 5], free)
    assert alloc.owned_ags == {2, 5}
    assert alloc.free_blocks == 2 * LAYOUT.ag_blocks
    got = alloc.allocate(1500)
    assert sum(n for _, n in got) == 1500
    for start, n in got:
        assert LAYOUT.ag_of(start) in (2, 5) and LAYOUT.ag_of(start + n - 1) == LAYOUT.ag_of(start)
    assert free.free_blocks == LAYOUT.data_blocks  # the authoritative map is untouched


def test_hint_keeps_a_growing_file_contiguous() -> None:
    alloc = NodeAllocator(LAYOUT, [0, 1], _free_device())
    [(start, n)] = alloc.allocate(10)
    assert alloc.allocate(10, hint=start + n) == [(start + n, 10)]
    other_ag_start = LAYOUT.ag_range(1)[0]
    assert alloc.allocate(5, hint=other_ag_start + 100) == [(other_ag_start + 100, 5)]


def test_fragmented_space_gives_several_extents_summing_exactly() -> None:
    lo, hi = LAYOUT.ag_range(3)
    free = FreeSpaceMap((b, 2) for b in range(lo, hi, 4))  # 2 free, 2 used, ...
    alloc = NodeAllocator(LAYOUT, [3], free)
    got = alloc.allocate(9)
    assert sum(n for _, n in got) == 9 and len(got) == 5
    assert len({s for s, _ in got}) == 5


def test_no_space_allocates_nothing() -> None:
    alloc = NodeAllocator(LAYOUT, [1], _free_device())
    before = alloc.free_blocks
    with pytest.raises(NoSpaceError) as info:
        alloc.allocate(before + 1)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert alloc.free_blocks == before
    assert sum(n for _, n in alloc.allocate(before)) == before
    with pytest.raises(NoSpaceError):
        alloc.allocate(1)
    empty = NodeAllocator(LAYOUT, [], _free_device())
    with pytest.raises(NoSpaceError):
        empty.allocate(1)


def test_release_and_on_freed() -> None:
    alloc = NodeAllocator(LAYOUT, [4], _free_device())
    got = alloc.allocate(100)
    alloc.release(got)
    assert alloc.free_blocks == LAYOUT.ag_blocks
    with pytest.raises(ValueError):
        alloc.release(got)  # a double release is a double free
    # frees spanning several groups: only the part in group 4 counts
    lo4, _ = LAYOUT.ag_range(4)
    alloc2 = NodeAllocator(LAYOUT, [4], FreeSpaceMap())
    alloc2.on_freed([(lo4 - 10, 30), (LAYOUT.ag_range(9)[0], 5)])
    assert alloc2.revoke(4) == [(lo4, 20)]


def test_grant_and_revoke() -> None:
    alloc = NodeAllocator(LAYOUT, [], _free_device())
    lo, hi = LAYOUT.ag_range(7)
    alloc.grant(7, [(lo - 5, 15), (lo + 100, 50), (hi - 2, 10)])
    assert alloc.free_blocks == 10 + 50 + 2
    with pytest.raises(ValueError, match="already owned"):
        alloc.grant(7, [])
    got = alloc.allocate(40)
    assert got == [(lo + 100, 40)]
    assert alloc.revoke(7) == [(lo, 10), (lo + 140, 10), (hi - 2, 2)]
    assert alloc.free_blocks == 0 and alloc.revoke(7) == []
    alloc.release(got)  # reservations in a revoked group are dropped, not an error
    assert alloc.free_blocks == 0
    with pytest.raises(ValueError):
        alloc.grant(LAYOUT.ag_count, [])


def test_allocation_limits() -> None:
    alloc = NodeAllocator(LAYOUT, [0], _free_device())
    with pytest.raises(ValueError):
        alloc.allocate(0)
    with pytest.raises(ValueError):
        alloc.allocate(freespace_module.MAX_ALLOCATION_BLOCKS + 1)


@pytest.mark.parametrize("seed", seeds.params("allocator", 5))
def test_allocator_free_count_follows_every_change(seed: int) -> None:
    """The allocator keeps its free-block count as it changes (every write asks for it): after any
    seeded sequence of allocations, releases, frees, grants and revocations it is the count of the
    blocks a model holds free in the owned groups."""
    rng = random.Random(seed)
    alloc = NodeAllocator(LAYOUT, [0, 1], _free_device())
    model = {b for ag in (0, 1) for b in range(*LAYOUT.ag_range(ag))}
    held: list[tuple[int, int]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.45 and alloc.free_blocks:
            got = alloc.allocate(rng.randint(1, min(64, alloc.free_blocks)))
            held += got
            for start, count in got:
                assert set(range(start, start + count)) <= model
                model -= set(range(start, start + count))
        elif op < 0.85 and held:
            start, count = held.pop(rng.randrange(len(held)))
            (alloc.release if op < 0.65 else alloc.on_freed)([(start, count)])
            model |= set(range(start, start + count))
        elif op < 0.92 and len(alloc.owned_ags) > 1:
            ag = rng.choice(sorted(alloc.owned_ags))
            lo, hi = LAYOUT.ag_range(ag)
            assert sorted(b for s, n in alloc.revoke(ag) for b in range(s, s + n)) == sorted(b for b in model if lo <= b < hi)
            model = {b for b in model if not lo <= b < hi}
            held = [(s, n) for s, n in held if not lo <= s < hi]
        elif op >= 0.92:
            ag = rng.choice([g for g in range(4) if g not in alloc.owned_ags] or [None])
            if ag is not None:
                lo, hi = LAYOUT.ag_range(ag)
                alloc.grant(ag, [(lo, hi - lo)])
                model |= set(range(lo, hi))
        assert alloc.free_blocks == len(model) == sum(alloc.free_blocks_in(ag) for ag in alloc.owned_ags)
