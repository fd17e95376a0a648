"""A linearizability checker for client histories (Wing & Gong search with Lowe's refinements).

A history is a list of completed (or abandoned) operations with the time each was called and the
time its result came back. The history is linearizable if some total order of the operations
respects real time (an operation that returned before another was called comes first) and replays
against the sequential model with the recorded outputs.

How the search stays tractable:
- P-compositionality: operations on different keys of a key-value store are independent, so each
  key's sub-history is checked alone (a history is linearizable iff every key's is).
- Just-in-time linearization (Lowe): walk the events in time order; at a call, try to linearize
  that operation now; at a return whose call was not yet linearized, backtrack.
- Memoization: a (set of linearized operations, model state) pair reached once and failed is never
  explored again.

An operation whose outcome the client never learned (a timeout, a crashed server) has
return_time = math.inf and output UNKNOWN: it may take effect at any point after its call, or never.
Reads with unknown outcome constrain nothing; drop them before checking.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

UNKNOWN: Any = type("Unknown", (), {"__repr__": lambda self: "UNKNOWN"})()
"""Output of an operation whose result never reached the client."""

DEFAULT_MAX_STEPS = 2_000_000


class CheckBudgetExceeded(Exception):
    """The search ran past its step budget: the history is neither proved nor refuted."""


@dataclass(frozen=True, slots=True)
class Operation:
    client_id: int
    op: str
    key: Hashable
    input: Any
    output: Any
    call_time: float
    return_time: float

    def __post_init__(self) -> None:
        assert self.call_time < self.return_time, f"operation returned before it was called: {self}"


class Model(Protocol):
    """A sequential specification. States must be hashable (they are memoized)."""

    def init(self) -> Hashable: ...

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        """Apply `op` to `state`: (whether the recorded output is possible, the next state)."""
        ...


class KVRegisterModel:
    """One register per key: get -> value (None if never written), put(v), cas((expected, new)) -> bool."""

    def init(self) -> Hashable:
        return None

    def step(self, state: Hashable, op: Operation) -> tuple[bool, Hashable]:
        if op.op == "get":
            return (op.output is UNKNOWN or op.output == state), state
        if op.op == "put":
            return True, op.input
        if op.op == "cas":
            expected, new = op.input
            swapped = state == expected
            if op.output is not UNKNOWN and op.output != swapped:
                return False, state
            return True, (new if swapped else state)
        raise ValueError(f"unknown operation {op.op!r}")


@dataclass
class CheckResult:
    ok: bool
    failed_key: Hashable | None = None
    failed_history: list[Operation] | None = None
    steps: int = 0

    def explain(self) -> str:
        if self.ok:
            return "linearizable"
        assert self.failed_history is not None
        lines = [f"not linearizable: key {self.failed_key!r}, {len(self.failed_history)} operations:"]
        for o in sorted(self.failed_history, key=lambda o: o.call_time):
            ret = "inf" if math.isinf(o.return_time) else f"{o.return_time:g}"
            lines.append(
                f"  [{o.call_time:g}, {ret}] client {o.client_id}: {o.op}({o.input!r}) -> {o.output!r}"
            )
        return "\n".join(lines)


class _Node:
    __slots__ = ("is_call", "match", "next", "op_id", "prev")

    def __init__(self, op_id: int, is_call: bool) -> None:
        self.op_id = op_id
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def _build_list(ops: Sequence[Operation]) -> _Node:
    events: list[tuple[float, int, int]] = []
    for i, o in enumerate(ops):
        events.append((o.call_time, 0, i))
        events.append((o.return_time, 1, i))
    # At equal times calls sort first: such operations count as concurrent (never a false alarm).
    events.sort()
    head = _Node(-1, False)
    calls: dict[int, _Node] = {}
    prev = head
    for _, kind, i in events:
        n = _Node(i, kind == 0)
        if kind == 0:
            calls[i] = n
        else:
            n.match = calls[i]
            calls[i].match = n
        prev.next = n
        n.prev = prev
        prev = n
    return head


def _lift(call: _Node) -> None:
    """Take a call and its return out of the list (they are linearized)."""
    for n in (call, call.match):
        assert n is not None and n.prev is not None
        n.prev.next = n.next
        if n.next is not None:
            n.next.prev = n.prev


def _unlift(call: _Node) -> None:
    for n in (call.match, call):
        assert n is not None and n.prev is not None
        n.prev.next = n
        if n.next is not None:
            n.next.prev = n


def check_single(
    model: Model, ops: Sequence[Operation], max_steps: int = DEFAULT_MAX_STEPS
) -> tuple[bool, int]:
    """Check one independent sub-history; returns (linearizable, search steps used)."""
    head = _build_list(ops)
    state = model.init()
    linearized = 0
    cache: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Node, Hashable]] = []
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            raise CheckBudgetExceeded(f"more than {max_steps} search steps over {len(ops)} operations")
        assert entry is not None
        if entry.is_call:
            ok, new_state = model.step(state, ops[entry.op_id])
            if ok:
                new_linearized = linearized | (1 << entry.op_id)
                key = (new_linearized, new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state = new_state
                    linearized = new_linearized
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # A return whose call is still in the list: that call had to be linearized before here.
            if not stack:
                return False, steps
            call, state = stack.pop()
            linearized &= ~(1 << call.op_id)
            _unlift(call)
            entry = call.next
    return True, steps


def check_history(
    history: Iterable[Operation], model: Model | None = None, max_steps: int = DEFAULT_MAX_STEPS
) -> CheckResult:
    """Check a key-value history, one key at a time (P-compositionality)."""
    model = model or KVRegisterModel()
    by_key: dict[Hashable, list[Operation]] = defaultdict(list)
    for o in history:
        by_key[o.key].append(o)
    total = 0
    for key in sorted(by_key, key=repr):
        ops = by_key[key]
        ok, steps = check_single(model, ops, max_steps)
        total += steps
        if not ok:
            return CheckResult(False, key, ops, total)
    return CheckResult(True, steps=total)
