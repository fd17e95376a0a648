"""The linearizability checker on histories whose verdict is known by hand."""

from __future__ import annotations

import math
import random

import pytest

from tests.support.linearizability import (
    UNKNOWN,
    CheckBudgetExceeded,
    KVRegisterModel,
    Operation,
    check_history,
    check_single,
)

INF = math.inf


def put(c: int, key: str, v: str, t0: float, t1: float) -> Operation:
    return Operation(c, "put", key, v, None, t0, t1)


def get(c: int, key: str, out: str | None, t0: float, t1: float) -> Operation:
    return Operation(c, "get", key, None, out, t0, t1)


def cas(c: int, key: str, old: str | None, new: str, ok: object, t0: float, t1: float) -> Operation:
    return Operation(c, "cas", key, (old, new), ok, t0, t1)


def test_sequential_history() -> None:
    h = [put(0, "a", "1", 0, 1), get(1, "a", "1", 2, 3), put(0, "a", "2", 4, 5), get(1, "a", "2", 6, 7)]
    assert check_history(h).ok


def test_stale_read_after_completed_write_is_not_linearizable() -> None:
    h = [put(0, "a", "1", 0, 1), put(0, "a", "2", 2, 3), get(1, "a", "1", 4, 5)]
    r = check_history(h)
    assert not r.ok and r.failed_key == "a"
    assert "not linearizable" in r.explain()


def test_concurrent_write_may_be_seen_or_not() -> None:
    for seen in ("1", None):
        assert check_history([put(0, "a", "1", 0, 10), get(1, "a", seen, 2, 3)]).ok


def test_reads_cannot_flip_flop() -> None:
    """Two reads during one write: once the new value was seen, a later read cannot miss it."""
    h = [put(0, "a", "1", 0, 10), get(1, "a", "1", 1, 2), get(2, "a", None, 3, 4)]
    assert not check_history(h).ok
    h = [put(0, "a", "1", 0, 10), get(1, "a", None, 1, 2), get(2, "a", "1", 3, 4)]
    assert check_history(h).ok


def test_write_with_unknown_outcome_may_take_effect_late_or_never() -> None:
    lost = put(0, "a", "1", 0, INF)
    assert check_history([lost, get(1, "a", None, 5, 6)]).ok
    assert check_history([lost, get(1, "a", "1", 5, 6)]).ok
    # ...but not both ways for the same observer order.
    assert not check_history([lost, get(1, "a", "1", 5, 6), get(1, "a", None, 7, 8)]).ok


def test_cas() -> None:
    h = [put(0, "a", "x", 0, 1), cas(1, "a", "x", "y", True, 2, 3), cas(2, "a", "x", "z", False, 4, 5)]
    assert check_history(h).ok
    h = [put(0, "a", "x", 0, 1), cas(1, "a", "x", "y", True, 2, 3), cas(2, "a", "x", "z", True, 4, 5)]
    assert not check_history(h).ok
    h = [put(0, "a", "x", 0, 1), cas(1, "a", "x", "y", UNKNOWN, 2, INF), get(2, "a", "y", 4, 5)]
    assert check_history(h).ok


def test_keys_are_checked_independently() -> None:
    h = [put(0, "a", "1", 0, 1), put(0, "b", "2", 2, 3), get(1, "a", "1", 4, 5), get(1, "b", "1", 6, 7)]
    r = check_history(h)
    assert not r.ok and r.failed_key == "b"


def test_needs_reordering_of_concurrent_writes() -> None:
    """Writes overlapping in time may be ordered either way; the reads decide which."""
    h = [
        put(0, "a", "1", 0, 10),
        put(1, "a", "2", 0, 10),
        get(2, "a", "2", 11, 12),
        get(3, "a", "2", 13, 14),
    ]
    assert check_history(h).ok
    h.append(get(2, "a", "1", 15, 16))
    assert not check_history(h).ok


def _random_register_history(rng: random.Random, n_clients: int, n_ops: int) -> list[Operation]:
    """An atomic register: each operation takes effect at one instant inside its (overlapping) interval."""
    value: str | None = None
    t = 0.0
    out = []
    for i in range(n_ops):
        start = t
        t += rng.random()  # the instant the operation takes effect
        kind = rng.choice(("put", "get"))
        if kind == "put":
            value = f"v{i}"
        out.append(
            Operation(
                rng.randrange(n_clients),
                kind,
                "k",
                value if kind == "put" else None,
                None if kind == "put" else value,
                start,
                t + rng.random() * 3,
            )
        )
    return out


def test_random_atomic_histories_are_linearizable() -> None:
    rng = random.Random(1)
    for _ in range(50):
        h = _random_register_history(rng, 4, 40)
        assert check_single(KVRegisterModel(), h)[0]


def test_search_budget_is_enforced() -> None:
    h = [put(i, "a", str(i), 0, 100) for i in range(30)] + [get(99, "a", "nope", 101, 102)]
    with pytest.raises(CheckBudgetExceeded):
        check_history(h, max_steps=1000)
