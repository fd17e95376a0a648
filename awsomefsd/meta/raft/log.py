"""The Raft log as the core sees it: stable entries in RaftStorage, followed by an unstable tail.

The unstable tail holds entries (and possibly a snapshot) the caller has not persisted yet. The
caller learns about them through Ready and reports them stable in advance(); only then are they
dropped from memory. Commit and applied indexes live here too; both only ever grow.
"""

from __future__ import annotations

from .messages import Entry, Snapshot
from .storage import LogCompacted, LogUnavailable, RaftStorage, limit_size

NO_LIMIT = 1 << 62


class Unstable:
    """Entries and an optional snapshot not yet persisted; `offset` is the index of entries[0]."""

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        return self.snapshot.meta.index + 1 if self.snapshot is not None else None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.meta.index
        return None

    def maybe_term(self, i: int) -> int | None:
        if i < self.offset:
            if self.snapshot is not None and self.snapshot.meta.index == i:
                return self.snapshot.meta.term
            return None
        last = self.maybe_last_index()
        if last is None or i > last:
            return None
        return self.entries[i - self.offset].term

    def stable_to(self, i: int, t: int) -> None:
        """Entries up to i (of term t) are persisted; a mismatch means they were since replaced."""
        gt = self.maybe_term(i)
        if gt is None:
            return
        if gt == t and i >= self.offset:
            del self.entries[: i + 1 - self.offset]
            self.offset = i + 1

    def stable_snap_to(self, i: int) -> None:
        if self.snapshot is not None and self.snapshot.meta.index == i:
            self.snapshot = None

    def restore(self, s: Snapshot) -> None:
        self.offset = s.meta.index + 1
        self.entries = []
        self.snapshot = s

    def truncate_and_append(self, ents: list[Entry]) -> None:
        after = ents[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(ents)
        elif after <= self.offset:
            self.offset = after
            self.entries = list(ents)
        else:
            self.entries = self.entries[: after - self.offset] + list(ents)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        assert self.offset <= lo <= hi <= self.offset + len(self.entries), (lo, hi, self.offset)
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    def __init__(self, storage: RaftStorage, max_committed_size_per_ready_bytes: int = NO_LIMIT) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        self.committed = first - 1
        self.applied = first - 1
        self.max_committed_size_per_ready_bytes = max_committed_size_per_ready_bytes

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, len(unstable)={len(self.unstable.entries)})"
        )

    # --- indexes and terms ------------------------------------------------------------------------
    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def term(self, i: int) -> int:
        """Term of entry i; 0 beyond the log; raises LogCompacted below the first retained index."""
        dummy = self.first_index() - 1
        if i < dummy:
            raise LogCompacted(i)
        if i > self.last_index():
            return 0
        t = self.unstable.maybe_term(i)
        if t is not None:
            return t
        try:
            return self.storage.term(i)
        except LogUnavailable:
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, i: int, t: int) -> bool:
        try:
            return self.term(i) == t
        except LogCompacted:
            return False

    def is_up_to_date(self, lasti: int, term: int) -> bool:
        """Raft §5.4.1: a voter grants only to candidates whose log is at least as up to date."""
        last_term = self.last_term()
        return term > last_term or (term == last_term and lasti >= self.last_index())

    # --- appending --------------------------------------------------------------------------------
    def append(self, ents: list[Entry]) -> int:
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        assert after >= self.committed, f"after({after}) is out of range [committed({self.committed})]"
        self.unstable.truncate_and_append(ents)
        return self.last_index()

    def find_conflict(self, ents: tuple[Entry, ...] | list[Entry]) -> int:
        """Index of the first entry that is new or disagrees with ours, or 0 if all match."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest index <= `index` whose term is <= `term` (fast back-off on append rejection)."""
        while index > 0:
            try:
                t = self.term(index)
            except LogCompacted:
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def maybe_append(
        self, index: int, log_term: int, committed: int, ents: tuple[Entry, ...]
    ) -> tuple[int, bool, int]:
        """Append a leader's entries after (index, log_term) if that prefix matches.

        Returns (last new index, accepted, first index actually written or 0). Entries we already
        hold are not rewritten, so a duplicated or reordered append never truncates a good suffix.
        """
        if not self.match_term(index, log_term):
            return 0, False, 0
        last_new = index + len(ents)
        ci = self.find_conflict(ents)
        if ci:
            assert ci > self.committed, (
                f"entry {ci} conflicts with committed entry [committed({self.committed})]"
            )
            self.append(list(ents[ci - (index + 1) :]))
        self.commit_to(min(committed, last_new))
        return last_new, True, ci

    # --- reading ----------------------------------------------------------------------------------
    def slice(self, lo: int, hi: int, max_size_bytes: int) -> list[Entry]:
        if lo == hi:
            return []
        assert lo < hi, (lo, hi)
        fi = self.first_index()
        if lo < fi:
            raise LogCompacted(lo)
        assert hi <= self.last_index() + 1, f"slice[{lo},{hi}) out of bound [{fi},{self.last_index()}]"
        ents: list[Entry] = []
        off = self.unstable.offset
        if lo < off:
            stored = self.storage.entries(lo, min(hi, off), max_size_bytes)
            if len(stored) < min(hi, off) - lo:
                return stored
            ents = stored
        if hi > off:
            tail = self.unstable.slice(max(lo, off), hi)
            ents = ents + tail if ents else tail
        return limit_size(ents, max_size_bytes)

    def entries(self, i: int, max_size_bytes: int) -> list[Entry]:
        if i > self.last_index():
            return []
        return self.slice(i, self.last_index() + 1, max_size_bytes)

    def all_entries(self) -> list[Entry]:
        return self.entries(self.first_index(), NO_LIMIT)

    def unstable_entries(self) -> list[Entry]:
        return list(self.unstable.entries)

    def next_committed_entries(self) -> list[Entry]:
        """Committed entries not yet handed out for applying, bounded in bytes per Ready."""
        off = max(self.applied + 1, self.first_index())
        if self.committed + 1 > off:
            return self.slice(off, self.committed + 1, self.max_committed_size_per_ready_bytes)
        return []

    def has_next_committed_entries(self) -> bool:
        return self.committed + 1 > max(self.applied + 1, self.first_index())

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()

    # --- progress ---------------------------------------------------------------------------------
    def commit_to(self, to_commit: int) -> None:
        if self.committed < to_commit:
            assert self.last_index() >= to_commit, (
                f"to_commit({to_commit}) is out of range [last_index({self.last_index()})]"
            )
            self.committed = to_commit

    def maybe_commit(self, max_index: int, term: int) -> bool:
        """Raft §5.4.2: only an entry of the current term is committed by counting replicas."""
        if max_index > self.committed and self.zero_term_on_compacted(max_index) == term:
            self.commit_to(max_index)
            return True
        return False

    def zero_term_on_compacted(self, i: int) -> int:
        try:
            return self.term(i)
        except LogCompacted:
            return 0

    def applied_to(self, i: int) -> None:
        if i == 0:
            return
        assert self.applied <= i <= self.committed, (
            f"applied({i}) out of range [prev_applied({self.applied}), committed({self.committed})]"
        )
        self.applied = i

    def stable_to(self, i: int, t: int) -> None:
        self.unstable.stable_to(i, t)

    def stable_snap_to(self, i: int) -> None:
        self.unstable.stable_snap_to(i)

    def restore(self, s: Snapshot) -> None:
        self.committed = s.meta.index
        self.unstable.restore(s)
