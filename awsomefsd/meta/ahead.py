"""Commands acknowledged ahead of the log, and the ordered pipeline that commits them.

A node that holds a directory's delegation (docs/delegations.md) answers a change to it at once:
`run_ahead` applies the command to an overlay of the committed state (meta/overlay.py) with the
state machine's own code, which gives the exact result the log will give, and queues it. One task
(`run`) proposes the queue in order, in batches (one `Batch` per proposal, so one Raft round
carries many commands), and never lets a later batch go before an earlier one is decided:

- **Order.** Batches go one at a time; a command proposed the usual way (`propose`) while others are
  queued joins the queue behind them, so what a caller does after an acknowledged change is
  ordered after it, on every node.
- **Prefix loss only.** When a batch fails as a whole (its node's lease epoch was expired, the log
  was unreachable past its stall, the outcome is unknown), it and everything queued after it fail
  together: what survives a fault is a prefix of what was acknowledged, never a middle piece
  (the contract a crash of a local filesystem keeps). Nothing queued after a failed batch is sent.
- **Reported.** A command acknowledged ahead that the log then refused is a lost change: it is
  logged and counted, and the next durability point (`drain` with `report=True`: fsync, fsyncdir,
  syncfs) fails with EIO, as a lost write does.
- **Durability.** `drain()` returns once everything queued before the call is decided: an fsync
  after it has the log's usual meaning (committed on a majority).

What may run ahead is decided by the caller (it holds the delegation); what can be predicted is
decided here (`can_run_ahead`): the commands whose handlers touch only tables, not the state
machine's counters, run by a `Predictor` (the state machine's code without free-space tracking).
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import lmdb
import trio

from awsomefsd.meta import commands as c
from awsomefsd.meta.commands import R
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.log import ReplicatedLog
from awsomefsd.meta.overlay import Overlay, OverlayTxn
from awsomefsd.meta.replays import SpaceEffect, Writes
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore

log = logging.getLogger(__name__)

MAX_BATCH_COMMANDS = 512
"""Commands per proposal: bounds one log entry (and the apply transaction every member runs)."""
MAX_QUEUED = 8192
MAX_LOST_INODES = 65536
"""Files whose lost changes an fsync of theirs still has to report, at most (`drain`)."""
"""Commands acknowledged and not yet decided: past it `run_ahead` callers wait for room (the log
sets the pace when it is slower than the node), which also bounds what a crash can lose."""
GATHER_S = 0.02
"""How long the pipeline lets changes accumulate before proposing them, unless someone waits (a
durability point, a command that needs its result): every proposal costs each member a round of
messages and a transaction, so a lone creator's changes share them (a batch per few ms, not one per
change). It delays only what nobody waits for."""
TOLD_GATHER_S = 0.002
"""The gathering while a create made for another member is queued (`run_ahead_told`) and this node
is not busy itself: that member's kernel waits for the commit, and 20 ms of gathering were two
thirds of its create (28 ms on an idle cluster, design note 147)."""
BUSY_BATCH = 32
"""A node whose last batch held this many changes is busy with its own: a create it makes for
another member cuts the gathering to BUSY_TOLD_GATHER_S only. Cutting it to 2 ms cut a busy
holder's batches to a tenth and three creators in one directory made a fifth fewer files (note
147)."""
BUSY_TOLD_GATHER_S = 0.008
"""The gathering of a busy node while a create made for another member is queued: that member's
kernel waits for the batch's commit, behind the batch in flight. With the whole gathering (20 ms)
such creates took 40-80 ms each after every hand-over, p99 25 ms and the longest 88-103 ms with
three nodes creating in one directory; with 8 ms p99 20 and the longest 81-117 (most under 100),
at the same creates per second; 4 ms cost 7 % of them (design note 158)."""


def can_run_ahead(command: object) -> bool:
    """Is the command's result predictable from the overlay (its handler writes tables only, or
    free space, which a prediction leaves to the real apply: `Predictor`)?"""
    if isinstance(command, (c.Mknod, c.Link)):
        return command.cookie != 0  # the log's cookie counter is not the node's to predict
    if isinstance(command, c.Rename):
        return command.cookie != 0 and not command.flags & c.RENAME_WHITEOUT
    if isinstance(command, c.SetAttr):
        return command.size is None
    return isinstance(command, (c.Unlink, c.SetXattr, c.RemoveXattr, c.WriteData))


def _inodes_touched(command: object) -> list[int]:
    """The files and directories a command that may run ahead changes: its inode, its parent
    directories (a create, a link, an unlink, a rename)."""
    return [value for name in ("ino", "parent", "old_parent", "new_parent")
            if isinstance(value := getattr(command, name, None), int) and value]


class _UntrackedSpace:
    """Free space as a prediction sees it: not at all. What the handler asked of it is noted
    (`Predictor.effects`), for the real apply of a prediction written as it is (meta/replays.py)."""

    def __init__(self, effects: list[SpaceEffect]) -> None:
        self.effects = effects

    def take(self, txn: object, start: int, count: int) -> None:
        self.effects.append(("take", start, count))


class Predictor(StateMachine):
    """The state machine's handlers, for predictions: a second instance over the same tables,
    whose in-memory state the real apply never sees.

    Free space is not tracked, only noted (`effects`): the extents a WriteData maps are the node's
    own, allocated from its groups and written already; the real apply checks that they are free
    and takes them (and defers what they supersede), or does what was noted when it writes the
    prediction as it is (meta/replays.py). The log's counters must not be used: a prediction of a
    cookie or a sequence number would differ from the log's. `can_run_ahead` rules out the
    commands whose own handler uses one; on a site linked to another, what the command's capture
    does besides may need one too (a copy kept in /.conflicts, an entry shown again under its own
    name: meta/sites/), which only trying tells: `Unpredictable`, and the command is proposed."""

    def __init__(self, store: MetaStore) -> None:
        super().__init__(store)
        self.effects: list[SpaceEffect] = []
        """What the last prediction (`predict`) asked of free space, in order: the real apply
        checks, takes and defers those (meta/replays.py)."""
        self.space = _UntrackedSpace(self.effects)  # type: ignore[assignment]

    def predict(self, txn: OverlayTxn, command: c.Command[R], proposer: int = 0) -> tuple[R, list[SpaceEffect]]:
        """The command's result on `txn`, and what it asked of free space. `proposer`: checked as
        that member's Fenced command (its delegations, its leases); 0: run bare, as the node
        predicting, which checked those itself."""
        self.effects.clear()
        self._proposer = proposer
        try:
            result = self.apply(txn, command)  # type: ignore[arg-type]
        finally:
            self._proposer = 0
        return result, list(self.effects)

    def space_check_new(self, txn: lmdb.Transaction[bytes], extents: Any) -> None:
        self.effects.append(("check", list(extents)))

    def defer_free(self, txn: lmdb.Transaction[bytes], extents: list[tuple[int, int]], now_ns: int) -> None:
        self.effects.append(("defer", list(extents), now_ns))

    def _next(self, txn: lmdb.Transaction[bytes], name: bytes, count: int = 1) -> int:
        raise Unpredictable(name)


class Unpredictable(Exception):
    """A prediction needed one of the log's counters (`Predictor`): only the log can apply it."""


@dataclass(eq=False)
class _Entry:
    seq: int
    command: c.Command[Any]
    epoch: int | None
    ahead: bool  # acknowledged already; else a caller waits for `outcome`
    hurry: bool = False  # a caller waits for it now: the batch that carries it is not gathered
    done: trio.Event | None = None
    outcome: Any = None  # the result, or the FsError the log refused it with


async def _nothing_to_wait_for() -> None:
    """`run_ahead_told`'s `decided` for a command that was proposed and waited for already."""


class AheadLog:
    """The node's pipeline in front of the replicated log; see the module docstring."""

    def __init__(self, log: ReplicatedLog, sm: StateMachine) -> None:
        self._log = log
        self._predictor = Predictor(sm.store)
        self._replays = sm.replays
        self._replays.predict_again = self._predict_again
        self._overlay = Overlay()
        self._queue: deque[_Entry] = deque()
        self._in_flight: list[_Entry] = []
        self._seq = 0
        self._decided = 0  # every entry up to this seq is decided
        self._wake = trio.Event()
        self._urgent = trio.Event()  # someone waits: propose what is queued without gathering
        self._gathering: trio.CancelScope | None = None  # the gathering under way, if any
        self._told_gather = GATHER_S  # shorter while a create made for another member waits in the queue
        self._hurried = 0
        """Commands queued that a caller waits for (`propose`, hurry): while one is, nothing is
        gathered. Their `_urgent` alone did not say it: a batch holds one epoch, so such a command
        queued behind changes of another epoch (a lease acquisition, epoch None, behind creates run
        ahead under the node's epoch) went in the next batch, which then gathered GATHER_S as if
        nobody waited: the first change in each directory a member did not hold took 32 ms, not 8
        (design note 152)."""
        self.last_batch = 0
        """Changes in the last batch proposed (BUSY_BATCH)."""
        self._progress = trio.Event()
        self.before_propose: Callable[[], Awaitable[None]] | None = None
        """Awaited right before each proposal this pipeline makes (a batch, or a command proposed
        with nothing queued): the node writes the data blocks that changes run ahead map
        (fs/writer.py `settle_behind`). An FsError it raises fails that proposal."""
        self.proposals = 0
        self.ran_ahead = 0
        self.unpredictable = 0
        """Commands that could not run ahead after all (`Unpredictable`) and were proposed."""
        self.losses = 0
        self.last_loss = ""
        self._reported = 0
        self._lost_inodes: dict[int, str] = {}
        """Per inode a lost change touched, what was lost: an fsync of that file reports it even
        when another durability point reported the loss first (`drain`)."""

    # -- reading ------------------------------------------------------------------------------------
    def view(self) -> lmdb.Transaction[bytes]:
        """What this node reads: the committed state, with what it acknowledged ahead on top."""
        base = self._log.read_txn()
        if not self._overlay:
            return base
        return OverlayTxn(base, self._overlay)  # type: ignore[return-value]

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._in_flight)

    def has_room(self) -> bool:
        """Would `run_ahead` apply a command now, without waiting for room in the pipeline?"""
        return self.pending < MAX_QUEUED

    # -- writing ------------------------------------------------------------------------------------
    async def run_ahead(self, command: c.Command[R], *, epoch: int | None = None,
                        still: Callable[[], bool] | None = None) -> R:
        """Apply `command` to this node's view now, queue it for the log and return its result
        (or raise its FsError: then nothing is queued). The caller holds every delegation the
        command needs (no other node changes what it reads), or says with `still` whether it may
        still run ahead after a wait for room (if not, it is proposed and waited for)."""
        assert can_run_ahead(command), command
        if not self.has_room():
            while not self.has_room():
                await self._progress.wait()
            if still is not None and not still():
                return await self.propose(command, epoch=epoch)
        queued = self._queue_ahead(command, epoch, told=False)
        if queued is None:
            return await self.propose(command, epoch=epoch)
        return queued[0]

    def _queue_ahead(self, command: c.Command[R], epoch: int | None, *, told: bool) -> tuple[R, _Entry] | None:
        """Apply `command` to this node's view and queue it for the log: its result and its entry
        (`told`: with an event its caller waits on), or None when its prediction needs the log
        (`Unpredictable`: nothing was recorded, the scratch goes). Raises the command's FsError."""
        scratch: Writes = {}
        predictor = self._predictor
        try:
            result, effects = predictor.predict(OverlayTxn(self._log.read_txn(), self._overlay, scratch), command)
        except Unpredictable:
            self.unpredictable += 1
            return None
        self._seq += 1
        self._overlay.record(self._seq, scratch)
        self._replays.record(command, scratch, result, effects)
        entry = _Entry(self._seq, command, epoch, ahead=True, done=trio.Event() if told else None)
        self._queue.append(entry)
        self.ran_ahead += 1
        self._wake.set()
        return result, entry

    def _predict_again(self, txn: lmdb.Transaction[bytes], command: Any, proposer: int
                       ) -> tuple[Any, Writes, list[SpaceEffect]] | None:
        """`command` predicted on `txn` itself (the log's apply of it: meta/replays.py), as
        `proposer` proposed it; None if it needs a counter. Raises its refusal (FsError)."""
        scratch: Writes = {}
        try:
            result, effects = self._predictor.predict(OverlayTxn(txn, Overlay(), scratch), command, proposer)
        except Unpredictable:
            return None
        return result, scratch, effects

    async def run_ahead_told(self, command: c.Command[R], *,
                             epoch: int | None = None) -> tuple[R, Callable[[], Awaitable[None]]]:
        """`run_ahead` for a caller that must also learn the log's decision: a create this node
        runs for another member (design note 145), which answers that member only once the log
        committed it. Returns the result and `decided()`, which returns once the log committed the
        command (it rides the batch being gathered, whose gathering it cuts to TOLD_GATHER_S, or
        to BUSY_TOLD_GATHER_S when this node is busy: BUSY_BATCH) or raises the FsError it was
        refused with: the caller is
        told, so the refusal is not also counted against this node's next durability point. The
        caller holds the delegations, as for `run_ahead`."""
        assert can_run_ahead(command), command
        while not self.has_room():
            await self._progress.wait()
        queued = self._queue_ahead(command, epoch, told=True)
        if queued is None:
            return await self.propose(command, epoch=epoch), _nothing_to_wait_for
        result, entry = queued
        gather = TOLD_GATHER_S if self.last_batch < BUSY_BATCH else BUSY_TOLD_GATHER_S
        self._told_gather = min(self._told_gather, gather)
        if self._gathering is not None:
            self._gathering.deadline = min(self._gathering.deadline, trio.current_time() + gather)

        async def decided() -> None:
            assert entry.done is not None
            await entry.done.wait()
            if isinstance(entry.outcome, FsError):
                raise entry.outcome

        return result, decided

    async def propose(self, command: c.Command[R], *, epoch: int | None = None, hurry: bool = True) -> R:
        """Propose and wait for the result, after everything acknowledged before (directly when
        nothing is queued). `hurry=False`: a background command whose result nobody waits for
        soon (the release of orphans this node unlinked) rides the batch being gathered instead of
        sending it at once: during an unlink burst each release cut the gathering short."""
        if not self.pending:
            if self.before_propose is not None:
                await self.before_propose()
            return await self._log.propose(command, epoch=epoch)
        self._seq += 1
        entry = _Entry(self._seq, command, epoch, ahead=False, done=trio.Event(), hurry=hurry)
        self._queue.append(entry)
        self._wake.set()
        if hurry:
            self._hurried += 1
            self._urgent.set()
        assert entry.done is not None
        await entry.done.wait()
        if isinstance(entry.outcome, FsError):
            raise entry.outcome
        return entry.outcome

    async def drain(self, *, report: bool = False, inode: int | None = None) -> None:
        """Return once everything queued before the call is decided. With `report` (a durability
        point), raise EIO if changes acknowledged ahead were lost since the last report, or, for
        the fsync of `inode`, if a lost change touched that file since its last fsync: as Linux
        reports a writeback error to every file it hit, not only to the first fsync anywhere (a
        process fsync'd a file whose create was lost, after another's fsync had taken the
        report, and was told it was durable: the nemesis found it)."""
        target = self._seq
        while self._decided < target:
            self._urgent.set()
            await self._progress.wait()
        if report and inode is not None and inode in self._lost_inodes:
            what = self._lost_inodes.pop(inode)
            self._reported = self.losses
            raise FsError(errno.EIO, f"a metadata change to this file acknowledged earlier was lost ({what})",
                          cause="lost-writes")
        if report and self.losses > self._reported:
            lost, self._reported = self.losses - self._reported, self.losses
            raise FsError(errno.EIO, f"{lost} metadata changes acknowledged earlier were lost "
                          f"(the last: {self.last_loss})", cause="lost-writes")

    def _decide(self, entry: _Entry, outcome: Any) -> None:
        entry.outcome = outcome
        self._overlay.resolve(entry.seq)
        if entry.ahead:
            self._replays.forget(entry.command)  # (written as predicted: no longer there)
        self._decided = max(self._decided, entry.seq)
        if entry.ahead and isinstance(outcome, FsError) and entry.done is None:  # else its caller is told
            self.losses += 1
            what = f"{type(entry.command).__name__} refused: {outcome}"
            self.last_loss = what
            for ino in _inodes_touched(entry.command):
                self._lost_inodes.pop(ino, None)  # the newest last
                self._lost_inodes[ino] = what
            while len(self._lost_inodes) > MAX_LOST_INODES:  # bounded: the oldest go (still counted)
                del self._lost_inodes[next(iter(self._lost_inodes))]
            log.warning("a metadata change acknowledged ahead of the log was lost: %s (%s)", what, entry.command)
        if entry.done is not None:
            entry.done.set()

    # -- the pipeline task --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._queue:
                if len(self._queue) < MAX_BATCH_COMMANDS and not self._urgent.is_set() and not self._hurried:
                    with trio.move_on_after(self._told_gather) as self._gathering:
                        await self._urgent.wait()
                    self._gathering = None
                self._urgent = trio.Event()
                self._told_gather = GATHER_S
                await self._send_one_batch()

    async def _send_one_batch(self) -> None:
        epoch = self._queue[0].epoch
        batch = self._in_flight
        while self._queue and len(batch) < MAX_BATCH_COMMANDS and self._queue[0].epoch == epoch:
            entry = self._queue.popleft()
            self._hurried -= entry.hurry
            batch.append(entry)
        self.proposals += 1
        self.last_batch = len(batch)
        try:
            if self.before_propose is not None:
                await self.before_propose()
            results = await self._log.propose(c.Batch(tuple(e.command for e in batch)), epoch=epoch)
        except FsError as exc:
            # The whole batch failed (or its fate is unknown): nothing after it may go, or a later
            # change could commit without an earlier one it was acknowledged after. Those were
            # never sent: they certainly failed, whatever the batch's fate.
            unsent = FsError(errno.EIO, f"not proposed: an earlier change failed ({exc.args[1]})", cause=exc.cause)
            for entry in batch:
                self._decide(entry, exc)
            for entry in self._queue:
                self._decide(entry, unsent)
            self._queue.clear()
            self._hurried = 0
        else:
            assert len(results) == len(batch), (len(results), len(batch))
            for entry, result in zip(batch, results):
                self._decide(entry, result)
        finally:
            self._in_flight = []
            self._progress.set()
            self._progress = trio.Event()
