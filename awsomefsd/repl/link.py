"""The cursors between two linked sites (design note 48): what to send, what was applied, and how
far back nothing will ever need undoing. Pure: the caller persists, sends and applies.

Each site appends its own operations, in stamp order, to its `Outbox` (in the transaction that
commits them: what commits ships, what does not commit does not). Each shipped entry names the
entry before it (`prev`), so the receiver's `Inbound` cursor can tell a resend (at or before its
cursor: dropped, nothing is applied twice) from a gap (after its cursor but not next: refused,
nothing is skipped). The receiver persists its cursor with the operations it applied, in one
transaction; after a reconnect or a restart it tells the sender where to resume (`Hello`).

Acknowledgements carry two stamps: how far the receiver applied the sender's operations, and
the last operation of its own it had made by then (`Ack.head`). With both, the sender's `Horizon`
knows the greatest stamp h such that every operation at or before h is applied on both sites and
every operation still to come was made after seeing all of them: the point before which the
replicated tree may forget its undo log (ReplicatedTree.forget_before) and the outbox its entries.
This reasoning is for two sites, which is what `site link` pairs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from awsomefsd.crdt.hlc import EPOCH, Stamp

Op = TypeVar("Op")
MAX_BATCH_ENTRIES = 1024
MAX_PENDING_ACKS = 4096
"""Acknowledgements waiting for the peer's head to arrive; older ones are superseded by newer."""


class Gap(ValueError):
    """A batch does not continue where the receiver's cursor is: something in between is missing."""


@dataclass(frozen=True, slots=True)
class Shipped(Generic[Op]):
    stamp: Stamp
    prev: Stamp
    """The stamp of the sender's entry before this one (EPOCH for its first)."""
    op: Op


@dataclass(frozen=True, slots=True)
class Hello:
    """The receiver's cursor: send what comes after it."""

    applied: Stamp


@dataclass(frozen=True, slots=True)
class Ack:
    applied: Stamp
    """The greatest of the sender's stamps the receiver has applied (and persisted)."""
    head: Stamp
    """The receiver's own last operation when it acknowledged (EPOCH if none)."""


@dataclass
class Outbox(Generic[Op]):
    """This site's operations in stamp order, from the oldest the peer may still need."""

    entries: list[Shipped[Op]] = field(default_factory=list)
    trimmed_to: Stamp = EPOCH
    """Everything at or before this was applied by the peer and dropped from here."""

    @property
    def head(self) -> Stamp:
        return self.entries[-1].stamp if self.entries else self.trimmed_to

    def append(self, stamp: Stamp, op: Op) -> Shipped[Op]:
        if stamp <= self.head:
            raise ValueError(f"outbox entries go in stamp order: {stamp} after {self.head}")
        entry = Shipped(stamp, self.head, op)
        self.entries.append(entry)
        return entry

    def resume(self, hello: Hello) -> Stamp:
        """Where to send from on a new connection. Refuses a peer that is behind what it had
        acknowledged: its state went back, and what it lost is no longer here to resend."""
        if hello.applied < self.trimmed_to:
            raise ValueError(f"the peer resumes from {hello.applied}, but it acknowledged up to {self.trimmed_to}: "
                             "its state went back (restored from a backup?); it needs a full resync")
        return hello.applied

    def after(self, cursor: Stamp, limit: int = MAX_BATCH_ENTRIES) -> list[Shipped[Op]]:
        """The entries after `cursor`, at most `limit`. A cursor behind the trimmed part (the
        sender resumed from an acknowledgement that a later one overtook) starts after it: the
        peer applied all of that."""
        start = bisect.bisect_right(self.entries, cursor, key=_stamp_of)
        return self.entries[start:start + limit]

    def trim(self, upto: Stamp) -> int:
        """Drop the entries at or before `upto` (acknowledged by the peer); returns how many."""
        count = bisect.bisect_right(self.entries, upto, key=_stamp_of)
        if count:
            self.trimmed_to = self.entries[count - 1].stamp
            del self.entries[:count]
        return count


def _stamp_of(entry: Shipped[Op]) -> Stamp:
    return entry.stamp


@dataclass
class Inbound:
    """How far this site applied the peer's operations (persisted with them)."""

    applied: Stamp = EPOCH

    def accept(self, batch: Sequence[Shipped[Op]]) -> list[Shipped[Op]]:
        """The entries of `batch` to apply, in order; resent ones are left out. The caller applies
        them and persists the new `applied` in one transaction. Raises Gap, accepting nothing, if
        the batch does not continue from the cursor."""
        fresh = [e for e in batch if e.stamp > self.applied]
        expect = self.applied
        for entry in fresh:
            if entry.prev != expect:
                raise Gap(f"entry {entry.stamp} follows {entry.prev}, but {expect} was the last applied here")
            expect = entry.stamp
        if fresh:
            self.applied = expect
        return fresh

    def ack(self, own_head: Stamp) -> Ack:
        return Ack(self.applied, own_head)


@dataclass
class Horizon:
    """The sender's side of acknowledgements: the greatest stamp nothing will need undone."""

    acked: Stamp = EPOCH
    """The greatest of our stamps the peer applied."""
    pending: list[Ack] = field(default_factory=list)
    stable: Stamp = EPOCH

    def on_ack(self, ack: Ack) -> None:
        if ack.applied < self.acked:
            return  # an older acknowledgement, overtaken (the peer's cursor only moves on)
        self.acked = ack.applied
        self.pending.append(ack)
        if len(self.pending) > MAX_PENDING_ACKS:
            del self.pending[:-MAX_PENDING_ACKS]

    def advance(self, applied_from_peer: Stamp, own_head: Stamp | None = None) -> Stamp:
        """The stable stamp, given how far we applied the peer's operations: an acknowledgement's
        `applied` becomes stable once every operation the peer had made when it sent it (its
        `head`) is applied here. Operations the peer makes later saw all of ours up to there.
        With `own_head` (our last operation): once the peer acknowledged it and no such
        acknowledgement waits, everything made so far is applied on both sites, and whatever
        either site makes from now on has seen it all (and is stamped after it): the stable
        stamp is the later of the two heads. (Else a site whose peer is idle, one-way
        replication, would keep its log and deleted objects for ever.)"""
        while self.pending and self.pending[0].head <= applied_from_peer:
            ack = self.pending.pop(0)
            self.stable = max(self.stable, min(ack.applied, applied_from_peer))
        if own_head is not None and not self.pending and self.acked >= own_head:
            self.stable = max(self.stable, applied_from_peer, own_head)
        return self.stable
