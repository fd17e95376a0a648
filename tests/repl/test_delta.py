"""Delta transfer's block arithmetic (repl/delta.py), against a model that compares two maps block
by block: a block is unchanged when both maps read zeros there (a hole, an unwritten extent) or
both hold the same device block with the same checksum."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.io.checksum import block_checksums
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.records import Extent
from awsomefsd.repl import delta

END = 24


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
