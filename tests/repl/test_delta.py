"""Delta transfer's block arithmetic (repl/delta.py), against a model that compares two maps block
by block: a block is unchanged when both maps read zeros there (a hole, an unwritten extent) or
both hold the same device block with the same checksum."""

from __future__ import annotations

import itertools
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.crdt.hlc import Stamp
from awsomefsd.io.checksum import block_checksums
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.records import Extent
from awsomefsd.repl import delta

END = 24
STAMP = Stamp(1, 0, bytes(16))


def crc(n: int) -> bytes:
    return n.to_bytes(4, "little")


def per_block(extents: list[Extent], end: int) -> list[tuple[int, bytes] | None]:
    """The model: what each block of [0, end) is (None: reads as zeros)."""
    blocks: list[tuple[int, bytes] | None] = [None] * end
    for ext in extents:
        for i in range(ext.count):
            if ext.file_block + i < end and not ext.unwritten:
                blocks[ext.file_block + i] = (ext.dev_block + i, ext.checksums[4 * i:4 * i + 4])
    return blocks


@st.composite
def maps(draw: st.DrawFn) -> list[Extent]:
    """A file map: extents in order, disjoint, some unwritten; device blocks from a small pool so
    that two maps share some."""
    out, block = [], 0
    while block < END + 4:
        block += draw(st.integers(0, 3))
        count = draw(st.integers(1, 5))
        if draw(st.booleans()):
            out.append(Extent(block, 1000 + 10 * draw(st.integers(0, 4)) + block % 10, count,
                              b"" if draw(st.integers(0, 5)) == 0 else b"".join(crc(draw(st.integers(0, 2)))
                                                                                for _ in range(count))))
        block += count
    return out


@settings(max_examples=300, deadline=None)
@given(maps(), maps(), st.integers(0, END))
def test_unchanged_ranges_are_the_blocks_both_maps_hold_alike(old: list[Extent], new: list[Extent], end: int) -> None:
    ranges = delta.unchanged_ranges(old, new, end)
    same = [a == b for a, b in zip(per_block(old, end), per_block(new, end))]
    assert [i for lo, hi in ranges for i in range(lo, hi)] == [i for i in range(end) if same[i]]
    assert all(lo < hi for lo, hi in ranges) and all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), "merged"
    rest = delta.complement(ranges, end)
    assert sorted(i for lo, hi in ranges + rest for i in range(lo, hi)) == list(range(end))
    for lo, hi in ranges:  # what the receiver compares: the same digest from either map
        assert delta.range_digest(old, lo, hi) == delta.range_digest(new, lo, hi)


def test_a_hole_a_reservation_and_a_block_of_zeros_digest_alike() -> None:
    """The stager leaves zero blocks out, so the receiver may hold a hole where the sender has a
    written block of zeros: the digest must not tell them apart."""
    zeros = block_checksums(bytes(BLOCK_SIZE))
    written = [Extent(0, 500, 2, zeros * 2)]
    reserved = [Extent(0, 700, 2, b"")]
    assert delta.range_digest(written, 0, 2) == delta.range_digest([], 0, 2) == delta.range_digest(reserved, 0, 2)
    assert delta.range_digest([Extent(0, 500, 2, zeros + crc(7))], 0, 2) != delta.range_digest([], 0, 2)


def test_one_block_rewritten_in_the_middle_leaves_two_ranges() -> None:
    old = [Extent(0, 100, 16, b"".join(crc(i) for i in range(16)))]
    new = [old[0].slice(0, 5), Extent(5, 900, 1, crc(99)), old[0].slice(6, 16)]
    assert delta.unchanged_ranges(old, new, 16) == [(0, 5), (6, 16)]
    assert delta.complement([(0, 5), (6, 16)], 20) == [(5, 6), (16, 20)]
    assert delta.unchanged_ranges(old, [Extent(0, 100, 16, old[0].checksums[:-4] + crc(1))], 16) == [(0, 15)]


ZERO = block_checksums(bytes(BLOCK_SIZE))


def as_read(extents: list[Extent], lo: int, hi: int) -> list[bytes]:
    """The model of what a digest covers: each block's checksum, a zero block's for a hole."""
    blocks = [ZERO] * hi
    for ext in extents:
        for i in range(ext.count):
            if ext.file_block + i < hi and not ext.unwritten:
                blocks[ext.file_block + i] = ext.checksums[4 * i:4 * i + 4]
    return blocks[lo:hi]


@st.composite
def reads(draw: st.DrawFn) -> list[Extent]:
    """A file map whose written blocks hold a few checksums, a zero block's among them."""
    out, block = [], 0
    while block < END:
        block += draw(st.integers(0, 3))
        count = draw(st.integers(1, 6))
        unwritten = draw(st.integers(0, 5)) == 0
        sums = b"" if unwritten else b"".join(draw(st.sampled_from([ZERO, crc(1), crc(2)])) for _ in range(count))
        out.append(Extent(block, 1000 + block, count, sums))
        block += count
    return out


@st.composite
def recut(draw: st.DrawFn, extents: list[Extent]) -> list[Extent]:
    """The same blocks as `extents` read, mapped otherwise: extents split, zero blocks left out
    (as the stager does) or reserved."""
    out = []
    for ext in extents:
        for i in range(ext.count):
            one = ext.slice(ext.file_block + i, ext.file_block + i + 1)
            if one.unwritten or one.checksums == ZERO:
                choice = draw(st.integers(0, 2))
                if choice == 0:
                    continue  # a hole
                one = Extent(one.file_block, one.dev_block, 1, b"" if choice == 1 else ZERO)
            if out and out[-1].end_block == one.file_block and bool(out[-1].unwritten) == bool(one.unwritten) \
                    and draw(st.booleans()):
                last = out.pop()
                one = Extent(last.file_block, last.dev_block, last.count + 1, last.checksums + one.checksums)
            out.append(one)
    return out


@settings(max_examples=300, deadline=None)
@given(st.data(), reads(), st.integers(0, END), st.integers(0, END))
def test_the_digest_depends_on_what_the_blocks_read_not_on_how_the_map_cuts_them(
        data: st.DataObject, extents: list[Extent], lo: int, hi: int) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    other = data.draw(recut(extents))
    assert as_read(other, lo, hi) == as_read(extents, lo, hi)
    assert delta.range_digest(other, lo, hi) == delta.range_digest(extents, lo, hi)


@settings(max_examples=500, deadline=None)
@given(reads(), reads(), st.integers(0, END), st.integers(0, END))
def test_two_ranges_that_read_differently_digest_differently(a: list[Extent], b: list[Extent], lo: int, hi: int) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    assert (delta.range_digest(a, lo, hi) == delta.range_digest(b, lo, hi)) == (as_read(a, lo, hi) == as_read(b, lo, hi))


def test_a_terabyte_of_holes_digests_without_a_buffer_of_its_size() -> None:
    """A sparse disk image; and what a peer may name as a range (the receiver digests it)."""
    blocks = (1 << 40) // BLOCK_SIZE
    tail = Extent(blocks - 1, 5, 1, crc(7))
    tracemalloc.start()
    try:
        assert delta.range_digest([tail], 0, blocks) != delta.range_digest([], 0, blocks)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    assert delta.range_digest([Extent(blocks - 1, 9, 1, crc(7))], 0, blocks) == delta.range_digest([tail], 0, blocks)


def test_a_compacted_file_is_still_unchanged_where_only_compaction_moved_it() -> None:
    """The peer holds 16 blocks; block 5 is rewritten here, then compaction copies all 16 to one
    fresh extent. Only block 5 differs from what the peer holds."""
    sums = b"".join(crc(i) for i in range(16))
    base = delta.ShippedVersion(STAMP, 16 * BLOCK_SIZE, (Extent(0, 100, 16, sums),))
    written = [base.extents[0].slice(0, 5), Extent(5, 900, 1, crc(99)), base.extents[0].slice(6, 16)]
    compacted = [Extent(0, 2000, 16, sums[:20] + crc(99) + sums[24:])]
    assert delta.unchanged_ranges(base.extents, compacted, 16) == [], "by map records alone, all changed"
    after = delta.moved(base, written, compacted)
    assert delta.unchanged_ranges(after.extents, compacted, 16) == [(0, 5), (6, 16)]
    assert after.stamp == base.stamp and after.size == base.size


@settings(max_examples=300, deadline=None)
@given(maps(), maps(), maps())
def test_a_move_renames_only_the_blocks_the_version_held_as_the_copy_holds_them(
        held: list[Extent], old: list[Extent], new: list[Extent]) -> None:
    version = delta.ShippedVersion(STAMP, END * BLOCK_SIZE, tuple(e for e in held if not e.unwritten))
    after = delta.moved(version, old, new)
    top = END + 40
    before_blocks, old_blocks, new_blocks = (per_block(list(m), top) for m in (version.extents, old, new))
    expected = [n if b is not None and b == o and n is not None and n[1] == b[1] else b
                for b, o, n in zip(before_blocks, old_blocks, new_blocks)]
    assert per_block(list(after.extents), top) == expected
    assert all(x.end_block <= y.file_block for x, y in itertools.pairwise(after.extents)), "in order, disjoint"
