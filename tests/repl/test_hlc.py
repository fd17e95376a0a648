"""The hybrid logical clock: monotonic, causal across sites, bounded against a peer's runaway clock."""

from __future__ import annotations

import random

import pytest

from awsomefsd.crdt.hlc import MAX_LOGICAL, PACKED_BYTES, ClockDrift, HybridClock, Stamp

A = bytes(15) + b"\x0a"
B = bytes(15) + b"\x0b"
SECOND = 1_000_000_000


class ManualClock:
    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def test_stamps_follow_the_physical_clock_and_never_go_back() -> None:
    physical = ManualClock(100 * SECOND)
    clock = HybridClock(A, physical_ns=physical)
    first = clock.now()
    assert first == Stamp(100 * SECOND, 0, A)
    second = clock.now()  # same nanosecond: the logical part orders them
    assert second == Stamp(100 * SECOND, 1, A)
    physical.ns = 50 * SECOND  # the clock stepped back (NTP)
    third = clock.now()
    assert third > second and third.wall_ns == 100 * SECOND
    physical.ns = 200 * SECOND
    assert clock.now() == Stamp(200 * SECOND, 0, A)


def test_a_stamp_made_after_receiving_another_orders_after_it() -> None:
    slow = HybridClock(A, physical_ns=ManualClock(10 * SECOND))
    fast = HybridClock(B, physical_ns=ManualClock(12 * SECOND))
    received = fast.now()
    slow.observe(received)
    reply = slow.now()
    assert reply > received
    assert reply.wall_ns == received.wall_ns  # the slow site's stamps carry the later time on
    fast.observe(reply)
    assert fast.now() > reply


def test_equal_times_are_ordered_by_site_and_observing_them_moves_past_both() -> None:
    a = HybridClock(A, physical_ns=ManualClock(5 * SECOND))
    b = HybridClock(B, physical_ns=ManualClock(5 * SECOND))
    sa, sb = a.now(), b.now()
    assert sa < sb and sa.wall_ns == sb.wall_ns and sa.logical == sb.logical
    a.observe(sb)
    assert a.now() > sb


def test_a_restart_resumes_after_the_last_stamp_even_if_the_clock_went_back() -> None:
    before = HybridClock(A, physical_ns=ManualClock(100 * SECOND))
    for _ in range(3):
        last = before.now()
    after = HybridClock(A, last=before.last(), physical_ns=ManualClock(90 * SECOND))
    assert after.now() > last


def test_a_peer_far_ahead_is_refused_and_changes_nothing() -> None:
    clock = HybridClock(A, physical_ns=ManualClock(100 * SECOND), max_drift_ns=60 * SECOND)
    clock.observe(Stamp(159 * SECOND, 0, B))  # within the drift: adopted
    held = clock.last()
    with pytest.raises(ClockDrift, match="ahead of this clock"):
        clock.observe(Stamp(100 * SECOND + 3600 * SECOND, 0, B))
    assert clock.last() == held


def test_the_logical_counter_overflows_into_the_next_nanosecond() -> None:
    clock = HybridClock(A, last=Stamp(7, MAX_LOGICAL - 1, A), physical_ns=ManualClock(0))
    assert clock.now() == Stamp(7, MAX_LOGICAL, A)
    assert clock.now() == Stamp(8, 0, A)


def test_packed_stamps_sort_as_stamps_do() -> None:
    rng = random.Random(7)
    stamps = [Stamp(rng.randrange(4) * SECOND, rng.randrange(3), rng.choice((A, B))) for _ in range(200)]
    packed = [s.pack() for s in stamps]
    assert all(len(p) == PACKED_BYTES for p in packed)
    assert sorted(packed) == [s.pack() for s in sorted(stamps)]
    assert [Stamp.unpack(p) for p in packed] == stamps
    with pytest.raises(ValueError, match="28 bytes"):
        Stamp.unpack(b"short")


def test_bad_site_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        HybridClock(b"short")
    with pytest.raises(ValueError, match="not all zero"):
        HybridClock(bytes(16))
