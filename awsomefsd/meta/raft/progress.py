"""What the leader knows about each follower's log, and how much it may send it before an answer.

A follower is probed (one append in flight until it answers), replicated to (a bounded window of
appends in flight, optimistically advancing `next`), or waiting for a snapshot. The window
(`Inflights`) is the core's back-pressure: a slow or partitioned follower costs bounded memory.
"""

from __future__ import annotations

import enum
from collections import deque

NEVER_TICK = -(1 << 62)
"""A lease acknowledgement tick older than any real one."""


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Inflights:
    """Last indexes of the appends sent but not yet acknowledged, oldest first; at most `capacity`."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self.capacity = capacity
        self._last_indexes: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._last_indexes)

    def add(self, index: int) -> None:
        assert not self.full(), "cannot add into a full inflights window"
        assert not self._last_indexes or index >= self._last_indexes[-1], "inflights must grow"
        self._last_indexes.append(index)

    def free_le(self, index: int) -> None:
        """Forget every append acknowledged by an answer covering `index`."""
        q = self._last_indexes
        while q and q[0] <= index:
            q.popleft()

    def free_first_one(self) -> None:
        if self._last_indexes:
            self._last_indexes.popleft()

    def full(self) -> bool:
        return len(self._last_indexes) >= self.capacity

    def reset(self) -> None:
        self._last_indexes.clear()


class Progress:
    __slots__ = (
        "inflights",
        "is_learner",
        "lease_ack_tick",
        "match",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "snapshot_sent_tick",
        "state",
    )

    def __init__(self, next_index: int, match: int, max_inflight: int, is_learner: bool) -> None:
        self.match = match
        self.next = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.probe_sent = False
        self.recent_active = False
        self.is_learner = is_learner
        self.inflights = Inflights(max_inflight)
        self.lease_ack_tick = NEVER_TICK
        self.snapshot_sent_tick = NEVER_TICK

    def __repr__(self) -> str:
        s = f"{self.state.name} match={self.match} next={self.next}"
        if self.is_learner:
            s += " learner"
        if self.state == ProgressState.SNAPSHOT:
            s += f" pending_snap={self.pending_snapshot}"
        if self.probe_sent:
            s += " paused"
        if len(self.inflights):
            s += f" inflight={len(self.inflights)}"
        return s

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int, now_tick: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index
        self.snapshot_sent_tick = now_tick

    def maybe_update(self, n: int) -> bool:
        """An append up to n was acknowledged; False if the answer is stale."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        self.next = max(self.next, n + 1)
        return updated

    def optimistic_update(self, n: int) -> None:
        self.next = n + 1

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """An append at `rejected` was refused; back off towards `match_hint`. False if stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True
