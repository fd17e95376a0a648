"""The stable-log interface the core reads from, and an in-memory implementation.

The core only ever *reads* storage; the caller writes to it while handling a Ready (append entries,
set hard state, apply snapshots) and compacts it after taking snapshots. `MemoryStorage` serves the
simulator and the benchmarks; `awsomefsd.meta.replication.lmdb_storage.LmdbRaftStorage` is the durable one.
"""

from __future__ import annotations

from typing import Protocol

from .messages import EMPTY_HARD_STATE, ConfState, Entry, HardState, Snapshot, SnapshotMeta


class LogCompacted(Exception):
    """The requested index is at or below the last snapshot: only the snapshot can serve it."""


class LogUnavailable(Exception):
    """The requested index is beyond the last stored entry."""


class SnapshotTemporarilyUnavailable(Exception):
    """No snapshot can be produced right now; the leader retries later."""


class RaftStorage(Protocol):
    """Read side of the durable Raft log, with etcd-raft's semantics.

    Indexes up to and including the snapshot index are compacted; `first_index()` is snapshot index
    + 1; `term(first_index() - 1)` is the snapshot term.
    """

    def initial_state(self) -> tuple[HardState, ConfState]: ...

    def entries(self, lo: int, hi: int, max_size_bytes: int) -> list[Entry]:
        """Entries [lo, hi); at least one entry if any is in range, then stop at max_size_bytes."""
        ...

    def term(self, index: int) -> int: ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot: ...


def limit_size(entries: list[Entry], max_size_bytes: int) -> list[Entry]:
    """Keep a prefix of at most max_size_bytes, but never fewer than one entry (progress guarantee)."""
    if not entries:
        return entries
    size = entries[0].size_bytes()
    for i in range(1, len(entries)):
        size += entries[i].size_bytes()
        if size > max_size_bytes:
            return entries[:i]
    return entries


class MemoryStorage:
    """A RaftStorage kept in a list; `ents[0]` is a dummy holding the snapshot's index and term."""

    def __init__(self) -> None:
        self.hard_state = EMPTY_HARD_STATE
        self.snap = Snapshot()
        self.ents: list[Entry] = [Entry(term=0, index=0)]

    # --- read side -------------------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self.snap.meta.conf_state

    def entries(self, lo: int, hi: int, max_size_bytes: int) -> list[Entry]:
        offset = self.ents[0].index
        if lo <= offset:
            raise LogCompacted(lo)
        if hi > self.last_index() + 1:
            raise LogUnavailable(hi)
        assert lo <= hi, (lo, hi)
        return limit_size(self.ents[lo - offset : hi - offset], max_size_bytes)

    def term(self, index: int) -> int:
        offset = self.ents[0].index
        if index < offset:
            raise LogCompacted(index)
        if index - offset >= len(self.ents):
            raise LogUnavailable(index)
        return self.ents[index - offset].term

    def first_index(self) -> int:
        return self.ents[0].index + 1

    def last_index(self) -> int:
        return self.ents[0].index + len(self.ents) - 1

    def snapshot(self) -> Snapshot:
        return self.snap

    # --- write side (the caller, while handling a Ready) --------------------------------------------
    def set_hard_state(self, hs: HardState) -> None:
        self.hard_state = hs

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log with the snapshot (a follower installing a leader's snapshot)."""
        if snap.meta.index <= self.snap.meta.index:
            return
        self.snap = snap
        self.ents = [Entry(term=snap.meta.term, index=snap.meta.index)]

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record a snapshot of the state machine at `index` (which must be applied, hence stored)."""
        assert index <= self.last_index(), (index, self.last_index())
        if index <= self.snap.meta.index:
            return self.snap
        self.snap = Snapshot(SnapshotMeta(index, self.term(index), conf_state), data)
        return self.snap

    def compact(self, index: int) -> None:
        """Drop entries up to and including `index`; the caller has a snapshot covering them."""
        offset = self.ents[0].index
        if index <= offset:
            return
        assert index <= self.last_index(), (index, self.last_index())
        i = index - offset
        self.ents = [Entry(term=self.ents[i].term, index=index), *self.ents[i + 1 :]]

    def append(self, entries: list[Entry]) -> None:
        """Append, replacing any conflicting suffix (the core already decided what conflicts)."""
        if not entries:
            return
        first = self.first_index()
        last = entries[0].index + len(entries) - 1
        if last < first:
            return
        if first > entries[0].index:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self.ents[0].index
        assert offset <= len(self.ents), (
            f"missing log entries [last: {self.last_index()}, append at: {entries[0].index}]"
        )
        del self.ents[offset:]
        self.ents.extend(entries)
