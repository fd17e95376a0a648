"""DirtyRanges against a plain bytearray model: whatever the write pattern, reads agree."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.fs.dirty import MERGE_BYTES, DirtyRanges

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
    assert all(dirty.covers(a, b - a) for a, b in dirty.ranges())
    runs = dirty.take()
    assert all(a_start + len(a) <= b_start for (a_start, a), (b_start, _) in itertools.pairwise(runs)), "runs overlap"
    assert all(len(a) + len(b) > MERGE_BYTES for (a_start, a), (b_start, b) in itertools.pairwise(runs)
               if a_start + len(a) == b_start), "small touching runs left apart"
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


def test_writes_out_of_order_never_copy_a_large_run() -> None:
    """1 MiB writes in reverse order (several writers, the kernel's writeback): each becomes a run
    of its own; joining them would copy what is already buffered, again and again."""
    dirty = DirtyRanges()
    chunk = 1 << 20
    for k in reversed(range(8)):
        dirty.write(k * chunk, bytes([k]) * chunk)
    first_runs = [run for _, run in zip(dirty.ranges(), dirty._runs, strict=True)]
    dirty.write(3 * chunk + 100, b"y" * 10)  # inside a run: in place
    dirty.write(8 * chunk - 5, b"z" * 10)  # over the end of the last: in place, then appended
    assert dirty.run_count == 8
    assert all(a is b for a, b in zip(first_runs, dirty._runs, strict=True)), "a buffered run was copied"
    assert dirty.covers(0, 8 * chunk + 5) and not dirty.covers(0, 8 * chunk + 6)
    out = bytearray(8 * chunk + 5)
    dirty.overlay(0, out)
    expected = bytearray(b"".join(bytes([k]) * chunk for k in range(8)) + bytes(5))
    expected[3 * chunk + 100 : 3 * chunk + 110] = b"y" * 10
    expected[8 * chunk - 5 :] = b"z" * 10
    assert out == expected
    assert dirty.dirty_bytes == 8 * chunk + 5


def test_small_writes_out_of_order_join_their_neighbours() -> None:
    dirty = DirtyRanges()
    for k in reversed(range(32)):
        dirty.write(k * 1024, b"s" * 1024)
    assert dirty.run_count == 1
    assert dirty.ranges() == [(0, 32 * 1024)]
    dirty.write(40 * 1024, b"t" * 1024)
    dirty.write(32 * 1024, b"u" * 8 * 1024)  # closes the gap exactly
    assert dirty.ranges() == [(0, 41 * 1024)]
    out = bytearray(41 * 1024)
    dirty.overlay(0, out)
    assert out == b"s" * 32 * 1024 + b"u" * 8 * 1024 + b"t" * 1024
