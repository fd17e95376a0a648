"""A node's own predictions, written as they are when the log applies them here.

A member acknowledges a change ahead of the log (meta/ahead.py) by running the state machine's
handler against an overlay of the committed state; when the log then applies the same command on
that node, the handler ran a second time on the node that is busiest, for the same records (a
follower's create or unlink cost it 13-17 µs again; design note 156). The second run is needed
only when the state it meets differs from the one the prediction read. It does not when every
command applied here since the prediction was one of this node's earlier predictions, applied as
they were predicted: the committed state is then the overlay the prediction read, and the handler
depends only on the state and the command (state_machine.py's rules), so it would write exactly
the records the prediction wrote. `Replays` keeps each prediction's writes and result for that
moment, and `generation` tells whether the moment came.

- Every command the state machine applies in full while predictions wait (another node's, one
  proposed the usual way) moves `generation` on, unless it writes nothing a prediction reads
  (`state_machine.UNSEEN_BY_PREDICTIONS`: lease renewals, inode reservations). A prediction made
  before that is no longer exact: it is predicted again on the state the log applies it to
  (`predict_again`: as its proposer's command, delegations and leases checked) and written so.
  If that writes what it wrote before (the command in between touched none of its records), the
  predictions made on it stay exact; else `generation` moves on again.
- A prediction's command that is decided without being applied (refused with its batch, its
  outcome unknown) moves it on too: later predictions assumed its writes.
- Only the oldest waiting prediction may be exact: the log applies this node's commands in the
  order they were queued, so any other order means one was skipped.

A prediction does not track free space; it notes what its handler asked of it (`SpaceEffect`: a
check that new extents are free and the proposer's, a take, a deferred free), and the state machine
does those for real around the writes (`write_as_predicted`): the checks first (a refusal there
is the full apply's, which then runs), the takes and deferred frees after, in order. Counters are
never predicted (`Unpredictable`), and on a site linked to another nothing is written as predicted
(capture tells listeners what it kept, which a prediction does not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import lmdb

from awsomefsd.meta.errors import COMMAND_BUGS, FsError

if TYPE_CHECKING:
    from awsomefsd.meta.state_machine import StateMachine

log = logging.getLogger(__name__)

SpaceEffect: TypeAlias = tuple[Any, ...]
"""("check", [(start, count), ...]), ("take", start, count) or ("defer", [(start, count), ...], now_ns)."""

Writes: TypeAlias = dict[tuple[Any, bytes], bytes | None]
"""(table, key) -> the record's value, None for a delete."""
PredictAgain: TypeAlias = Callable[["lmdb.Transaction[bytes]", Any, int], "tuple[Any, Writes, list[SpaceEffect]] | None"]

PAYOFF_WINDOW = 1024
"""Predictions taken between two halvings of the recent counts (`worth_predicting_again`)."""
PAYOFF_RATIO = 2
"""Exact predictions written per prediction made again, at least, for predicting again to pay: it
costs about a second full apply, and each exact one written saves about two thirds of one."""
PROBE = 64
"""Predictions made again while the recent counts say nothing yet (or no longer): the workload
may have changed since predicting again stopped paying."""

MAX_KEY_BYTES = 511
"""LMDB's longest key: a write past it fails in the store, which a full apply reports as the
command's bug (isolation.py); such a prediction is applied in full instead."""


@dataclass(eq=False, slots=True)
class Replay:
    """One prediction: its command (the very object proposed), the records it wrote ((table,
    key) -> value, None for a delete), its result, what it asked of free space, and the
    `generation` it was made in."""

    command: object
    writes: Writes
    result: Any
    effects: list[SpaceEffect]
    generation: int

    def writable(self) -> bool:
        """Would every write fit in the store's limits, and do the checks of free space come before
        anything taken or freed (so that a refusal is known before anything is written)?"""
        if any(len(key) > MAX_KEY_BYTES for _, key in self.writes):
            return False
        checks = sum(1 for effect in self.effects if effect[0] == "check")
        return all(effect[0] == "check" for effect in self.effects[:checks])


class Replays:
    """The predictions waiting for their apply on this node, oldest first; see the module docstring."""

    def __init__(self) -> None:
        self.generation = 0
        self._waiting: dict[int, Replay] = {}  # id(command) -> its prediction, in the order made
        self.replayed = 0
        """Commands written as predicted (not run again)."""
        self.predicted_again = 0
        """Predictions no longer exact, made again on the state they were applied to."""
        self.predict_again: PredictAgain | None = None
        """Runs a command's prediction on a given transaction as a given member proposed it:
        (result, writes, effects), or None when it cannot be predicted (meta/ahead.py sets it)."""
        self._recent_exact = 0.0  # exact predictions taken lately (halved every PAYOFF_WINDOW taken)
        self._recent_again = 0.0  # predictions made again lately
        self._taken = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def record(self, command: object, writes: Writes, result: Any,
               effects: list[SpaceEffect]) -> None:
        """`command` was predicted now: `writes`, `result` and `effects` stand for its apply if
        nothing else is applied before it. They are kept, not copied: the caller must not change
        them."""
        self._waiting[id(command)] = Replay(command, writes, result, effects, self.generation)

    def applied_in_full(self) -> None:
        """A command was applied by its handler: the predictions made before it read a state
        that is no longer the committed one."""
        if self._waiting:
            self.generation += 1

    def forget(self, command: object) -> None:
        """`command` was decided. If its prediction is still waiting, it was not applied as
        predicted (refused, or its fate unknown), and the predictions after it assumed it was."""
        replay = self._waiting.get(id(command))
        if replay is not None and replay.command is command:
            del self._waiting[id(command)]
            self.applied_in_full()

    def take(self, command: object) -> tuple[Replay | None, bool]:
        """`command`'s prediction, if it was one of this node's (it no longer waits), and whether it
        is exact now: nothing but earlier predictions, written as predicted, was applied since it
        was made. An exact one is written as it is; one that is not is made again on the state
        it is applied to (`predict_again`), or applied in full where that does not pay."""
        waiting = self._waiting
        if not waiting:
            return None, False
        key = id(command)
        replay = waiting.get(key)
        if replay is None or replay.command is not command:
            return None, False
        oldest = next(iter(waiting)) == key
        del waiting[key]
        exact = oldest and replay.generation == self.generation
        self._recent_exact += exact
        self._taken += 1
        if self._taken % PAYOFF_WINDOW == 0:
            self._recent_exact /= 2
            self._recent_again /= 2
        return replay, exact

    def worth_predicting_again(self) -> bool:
        """Should an inexact prediction be made again rather than applied in full? Only if a
        prediction made since the last full apply waits behind it (only those can stay exact), and
        lately predicting again has been followed by enough exact ones (PAYOFF_RATIO): with three
        creators in their own directories another member's batch arrives between any two of this
        node's, every prediction made again is soon inexact itself, and predicting again only
        doubled the apply (7 % fewer creates in all)."""
        waiting = self._waiting
        if not waiting or next(reversed(waiting.values())).generation != self.generation:
            return False
        return self._recent_again < PROBE or self._recent_exact >= PAYOFF_RATIO * self._recent_again

    def predicting_again(self) -> None:
        self._recent_again += 1


def predict_again(sm: StateMachine, txn: lmdb.Transaction[bytes], stale: Replay, proposer: int) -> Replay | None:
    """`stale`'s command predicted again on the state the log applies it to, as `proposer` proposed
    it (delegations and leases are checked as the full apply checks them), for writing as its
    apply; None when it is refused now or cannot be predicted (the full apply then runs). Why not
    the full apply at once: the predictions made after this one read what it was predicted to
    write. If it writes just that (the command applied in between touched none of its records, the
    common case), they are still exact, and a member that keeps changing as fast as the log
    commits is not left running every later change twice (each full apply would make every
    prediction waiting behind it inexact, for as long as the pipeline never empties). When that
    does not pay (`worth_predicting_again`), the full apply is the cheaper of the two: None."""
    again = sm.replays.predict_again
    if again is None or not sm.replays.worth_predicting_again() or sm.sites.peer(txn) is not None:
        return None  # (on a linked site nothing is written as predicted: `write_as_predicted`)
    sm.replays.predicting_again()
    try:
        made = again(txn, stale.command, proposer)
    except FsError:
        return None
    except COMMAND_BUGS:  # the full apply meets it again, and keeps it that command's (isolation.py)
        log.warning("predicting %r again failed: applying it in full", stale.command, exc_info=True)
        return None
    if made is None:
        return None
    result, writes, effects = made
    if writes != stale.writes or effects != stale.effects:
        sm.replays.applied_in_full()  # what was predicted after it read other records
    sm.replays.predicted_again += 1
    return Replay(stale.command, writes, result, effects, sm.replays.generation)


def write_as_predicted(sm: StateMachine, txn: lmdb.Transaction[bytes], replay: Replay) -> bool:
    """Apply `replay`'s command by writing its prediction, and doing for real what it asked of free
    space; False, with nothing written, when that cannot stand for the apply: the site is linked to
    another, a write would not fit, or free space refuses what the prediction was not asked to
    check (the full apply then refuses it the same way)."""
    if not replay.writable() or sm.sites.peer(txn) is not None:
        return False
    if not replay.effects:
        _write(txn, replay.writes)
        sm.replays.replayed += 1
        return True
    try:
        for effect in replay.effects:
            if effect[0] == "check":
                sm.space_check_new(txn, effect[1])
    except FsError:
        return False
    child = sm.store.env.begin(write=True, parent=txn)  # taking space may meet a bug: undone alone
    try:
        _write(child, replay.writes)
        for effect in replay.effects:
            if effect[0] == "take":
                sm.space.take(child, effect[1], effect[2])
            elif effect[0] == "defer":
                sm.defer_free(child, effect[1], effect[2])
    except COMMAND_BUGS:
        child.abort()
        sm.load(txn)  # the mirrors follow what the parent holds; the full apply meets the bug again
        log.warning("writing a prediction of %r as its apply failed: applying it in full", replay.command,
                    exc_info=True)
        return False
    except BaseException:
        child.abort()
        raise
    child.commit()
    sm.replays.replayed += 1
    return True


def _write(txn: lmdb.Transaction[bytes], writes: Writes) -> None:
    for (db, key), value in writes.items():
        if value is None:
            txn.delete(key, db=db)
        else:
            txn.put(key, value, db=db)
