"""DirtyRanges against a plain bytearray model: whatever the write pattern, reads agree."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.fs.dirty import DirtyRanges

writes = st.lists(st.tuples(st.integers(0, 5000), st.binary(min_size=1, max_size=700)), max_size=40)


def model_apply(ops: list[tuple[int, bytes]]) -> tuple[bytearray, bytearray]:
    data = bytearray(6000)
    mask = bytearray(6000)
    for offset, chunk in ops:
        data[offset : offset + len(chunk)] = chunk
        mask[offset : offset + len(chunk)] = b"\x01" * len(chunk)
    return data, mask


@settings(max_examples=300, deadline=None)
@given(writes)
def test_overlay_matches_model(ops: list[tuple[int, bytes]]) -> None:
    dirty = DirtyRanges()
    for offset, chunk in ops:
        dirty.write(offset, chunk)
    data, mask = model_apply(ops)
    out = bytearray(b"\xee" * 6000)
    dirty.overlay(0, out)
    for i in range(6000):
        assert out[i] == (data[i] if mask[i] else 0xEE), i
    assert dirty.dirty_bytes == sum(mask)
    assert dirty.end_offset == (max(i for i in range(6000) if mask[i]) + 1 if any(mask) else 0)
    runs = dirty.take()
    assert all(a_start + len(a) < b_start for (a_start, a), (b_start, _) in itertools.pairwise(runs)), "runs merged"
    assert not dirty and dirty.dirty_bytes == 0


@settings(max_examples=200, deadline=None)
@given(writes, st.integers(0, 6000))
def test_truncate_drops_tail(ops: list[tuple[int, bytes]], size: int) -> None:
    dirty = DirtyRanges()
    for offset, chunk in ops:
        dirty.write(offset, chunk)
    dirty.truncate(size)
    data, mask = model_apply(ops)
    out = bytearray(6000)
    dirty.overlay(0, out)
    for i in range(6000):
        expected = data[i] if mask[i] and i < size else 0
        assert out[i] == expected
    assert dirty.end_offset <= size


def test_sequential_appends_stay_one_run() -> None:
    dirty = DirtyRanges()
    for i in range(100):
        dirty.write(i * 4096, b"x" * 4096)
    assert dirty.run_count == 1
    assert dirty.covers(0, 100 * 4096)
    assert not dirty.covers(0, 100 * 4096 + 1)
