"""Applying committed entries, and moving a Ready that only applies off the loop's critical path.

The apply contract: a Ready's committed entries are applied inside a write transaction of the
storage, which also records the last applied index, so a crash leaves both or neither; entries at
or below the recorded index are skipped (replay after a restart is idempotent). A forwarded entry
applied before under the same proposal id is skipped too (proposals.py, de-duplication).

An apply-only Ready (no entries, no snapshot, no change of term, vote, role or membership; its
entries were made durable by earlier Readys) needs no fsync of its own before the loop goes on:
- on the leader its transaction runs behind the loop (pipelined), so the next Ready's appends
  leave during that fsync (the next transaction waits for it: transactions stay in Ready order);
- on a follower it is deferred into the next Ready's transaction (within DEFER_APPLY_S), one fsync
  per round instead of two.
Either way its late messages, answers and reads still wait for the fsync of the transaction that
applied it, and apply + applied index stay in one transaction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from awsomefsd.meta.raft import ConfChangeType, EntryType, HardState, Message, Ready
from awsomefsd.meta.raft.codec import decode_conf_change
from awsomefsd.meta.replication.proposals import DUPLICATE, HEADER, Outcome, is_forwarded, proposal_id
from awsomefsd.meta.replication.storage import ReplicaStorage, TxnT

DEFER_APPLY_S = 0.01
"""How long a follower may keep committed entries unapplied, waiting to apply them in the
transaction of its next append (one fsync instead of two per replication round)."""
MAX_DEFERRED_READIES = 64

TxnC = TypeVar("TxnC", contravariant=True)


class ReplicatedStateMachine(Protocol[TxnC]):
    """The application side. Applying must be deterministic: same bytes, same effect everywhere."""

    def apply(self, txn: TxnC, index: int, command: bytes) -> Any:
        """Apply one committed command inside the driver's write transaction (the storage's
        kind); returns its result (handed to the proposer). Raising aborts the whole Ready:
        reserve it for this node's own failures (its store). A command that fails the same way
        on every replica must become an outcome instead (the filesystem's: meta/isolation.py),
        or every replica would stop at that entry."""
        ...

    def install_snapshot(self, staged: Any) -> Any:
        """Replace the state machine's state by a staged copy (`ReplicaStorage.stage_snapshot`);
        returns what the storage continues on (`ReplicaStorage.reopen`)."""
        ...


@dataclass
class ReadyApply(Generic[TxnT]):
    """The apply half of one Ready: called inside a write transaction, it applies the committed
    entries and collects what the proposers and the membership need to hear afterwards."""

    rd: Ready
    storage: ReplicaStorage[TxnT]
    sm: ReplicatedStateMachine[TxnT]
    outcome: list[Outcome] = field(default_factory=list)
    skipped: set[int] = field(default_factory=set)
    """Indexes applied before (replay, or covered by an installed snapshot)."""
    added: list[tuple[int, str]] = field(default_factory=list)
    """(node id, address) of members added by the applied membership changes."""
    answer_early: Callable[[], None] | None = None
    """Runs at the end of the transaction, before its commit (see the driver's resolve_early)."""

    def __call__(self, txn: TxnT) -> None:
        committed = self.rd.committed_entries
        applied = self.storage.read_applied(txn)
        for e in committed:
            if e.index <= applied:
                self.skipped.add(e.index)
                continue
            assert e.index == applied + 1, f"apply {e.index} after {applied}: a committed entry is missing"
            applied = e.index
            if e.type == EntryType.CONF_CHANGE:
                cc = decode_conf_change(e.data)
                if cc.type != ConfChangeType.REMOVE_NODE and cc.context:
                    self.added.append((cc.node_id, cc.context.decode()))
                continue
            pid = proposal_id(e.data)
            if pid is None:
                continue  # the empty entry a new leader appends
            if is_forwarded(pid) and not self.storage.first_application(txn, e.data[: HEADER.size], e.index):
                self.outcome.append((e.index, DUPLICATE, pid))  # a resent copy: applied once already
                continue
            self.outcome.append((e.index, self.sm.apply(txn, e.index, e.data[HEADER.size :]), pid))
        if committed:
            self.storage.write_applied(txn, applied)
        if self.answer_early is not None:
            self.answer_early()


def applies_only(rd: Ready, durable: HardState, durable_last: int) -> bool:
    """A Ready that appends nothing, changes no term, vote, role or membership, and applies
    entries already durable here (up to `durable_last`): the one kind whose transaction may run
    behind the loop or wait for the next one."""
    hs = rd.hard_state
    return (
        bool(rd.committed_entries)
        and not rd.entries
        and rd.snapshot is None
        and rd.soft_state is None
        and (hs is None or (hs.term, hs.vote) == (durable.term, durable.vote))
        and rd.committed_entries[-1].index <= durable_last
        and all(e.type != EntryType.CONF_CHANGE for e in rd.committed_entries)
    )


@dataclass
class Deferred(Generic[TxnT]):
    """A follower's apply-only Ready whose transaction waits for the next one."""

    work: ReadyApply[TxnT]
    late: list[Message]


class DeferredApplies(Generic[TxnT]):
    """A follower's apply-only Readys, not yet persisted; `until` is when they must be, at latest."""

    def __init__(self) -> None:
        self.items: list[Deferred[TxnT]] = []
        self.until = math.inf

    def __len__(self) -> int:
        return len(self.items)

    def add(self, work: ReadyApply[TxnT], late: list[Message], now: float) -> None:
        if not self.items:
            self.until = now + DEFER_APPLY_S
        self.items.append(Deferred(work, late))

    def take(self, hard_state: HardState | None, apply: Callable[[TxnT], None] | None
             ) -> tuple[HardState | None, Callable[[TxnT], None] | None, list[Deferred[TxnT]]]:
        """Fold the deferred applies into the next transaction: they run first, in order, and the
        newest hard state is written (a deferred Ready's differs from the durable one only in its
        commit index)."""
        deferred, self.items = self.items, []
        self.until = math.inf
        if not deferred:
            return hard_state, apply, []
        if hard_state is None:
            hard_state = next((d.work.rd.hard_state for d in reversed(deferred) if d.work.rd.hard_state is not None),
                              None)

        def also(txn: TxnT) -> None:
            for d in deferred:
                d.work(txn)
            if apply is not None:
                apply(txn)

        return hard_state, also, deferred
