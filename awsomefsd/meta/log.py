"""The replicated-log interface every namespace mutation goes through, and its one-member form.

propose → commit → apply: a mutation is visible (linearizable) when `propose` returns, and durable
after the next `barrier()` (fsync, fdatasync, syncfs) or group commit, whichever comes first — the
contract of a local filesystem, where a crash may lose un-synced operations but never reorders
them. The Raft log (awsomefsd/meta/raft) implements the same interface for several members.

LocalLog's group commit: all commands since the last commit are applied inside one open LMDB write
transaction, which every metadata read also uses (everything runs on the trio thread, so reads see
every acknowledged mutation). A commit — one device flush, then one LMDB commit with its fsync —
makes the whole batch durable atomically: a crash loses a suffix of operations, never a middle one.
A command whose apply fails other than with its FsError (a bug) fails alone, with EIO: the batch is
applied again without it (the same replay that follows a growth of the map), so nothing another
caller was told succeeded is undone.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import lmdb
import trio

from awsomefsd.meta.commands import Command, R
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import u64
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore

log = logging.getLogger(__name__)

MAX_BATCH_COMMANDS = 50_000
BATCH_HEADROOM_BYTES = 128 << 20


def _now() -> float:
    """trio's clock inside a run (so tests can drive it), else none is needed."""
    try:
        return trio.current_time()
    except RuntimeError:
        return 0.0


class ReplicatedLog(Protocol):
    """What the filesystem needs from the metadata log, whatever its membership."""

    async def propose(self, command: Command[R], *, epoch: int | None = None) -> R:
        """Order, commit and apply `command`; its result, or the FsError it was refused with.
        `epoch`: fence it with this liveness-lease epoch, not the current one (see `lease_epoch`)."""
        ...

    def lease_epoch(self) -> int | None:
        """The liveness-lease epoch proposals are fenced with now; None where nothing is fenced
        (one node). Work that a later proposal commits (data written to the shared device) takes
        it when it starts and proposes with it: if the lease was lost and renewed in between,
        the proposal is refused instead of committing work done under the lost lease."""
        ...

    async def barrier(self) -> None:
        """Return once everything proposed before the call is durable."""
        ...

    def read_txn(self) -> lmdb.Transaction[bytes]:
        """A transaction that sees every mutation acknowledged so far (for reads only)."""
        ...

    @property
    def applied_index(self) -> int: ...

    @property
    def committed_index(self) -> int:
        """The last command committed: the local log's in LMDB; Raft's committed in the log."""
        ...

    applied_listeners: list[Callable[[int], None]]
    """Called with the applied index, on the event loop, after commands were applied (memory only:
    MetaClient's `applied_past` wakes the waiters)."""


class LocalLog:
    def __init__(
        self,
        store: MetaStore,
        sm: StateMachine,
        *,
        commit_interval_ms: int = 1000,
        commit_idle_ms: int = 0,
        max_batch_commands: int = MAX_BATCH_COMMANDS,
        before_commit: Callable[[], None] | None = None,
        batch_headroom_bytes: int = BATCH_HEADROOM_BYTES,
    ) -> None:
        assert 0 < max_batch_commands <= MAX_BATCH_COMMANDS
        self.store = store
        self.sm = sm
        self.commit_interval_ms = commit_interval_ms
        self.commit_idle_ms = commit_idle_ms
        """Commit a batch as soon as no command came for this long (0: only at the interval)."""
        self.max_batch_commands = max_batch_commands
        self.before_commit = before_commit
        self.prepare: Callable[[], Awaitable[None]] | None = None
        """Awaited before each commit of `run` and `barrier`: what must be in the batch before it
        commits is proposed now (closed files' data: fs/batch.py)."""
        self.preparing: Callable[[], bool] = lambda: False
        """Has `prepare` anything to do? A full batch then commits from `run`, after it."""
        self._full = trio.Event()
        self.batch_headroom_bytes = batch_headroom_bytes
        self.replays = 0
        self._txn: lmdb.Transaction[bytes] | None = None
        self._batch: list[Command[Any]] = []
        self._batch_started = 0.0
        self._applied = 0
        self._committed = 0
        self.commits = 0
        self.batch_sizes: list[int] = []  # drained by metrics
        self._wake = trio.Event()
        self.applied_listeners: list[Callable[[int], None]] = []
        with store.env.begin() as txn:
            raw = txn.get(b"applied", db=store.db["meta"])
            self._applied = self._committed = 0 if raw is None else int.from_bytes(raw, "big")

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def committed_index(self) -> int:
        return self._committed

    def read_txn(self) -> lmdb.Transaction[bytes]:
        if self._txn is None:
            self.store.grow_if_needed(self.batch_headroom_bytes)
            self._txn = self.store.env.begin(write=True)
        return self._txn

    async def propose(self, command: Command[R], *, epoch: int | None = None) -> R:
        return self.apply_now(command)

    def lease_epoch(self) -> int | None:
        return None

    def apply_now(self, command: Command[R]) -> R:
        """Apply in the open batch; synchronous, for callers that hold no await point."""
        try:
            try:
                result = self.sm.apply(self.read_txn(), command)
            except lmdb.MapFullError:
                result = self.sm.apply(self._replay(grow=True), command)
        except FsError:
            raise
        except BaseException as exc:
            # A bug the state machine's checks missed (or an interrupt): the command may have
            # written part of its change. Only it fails; the batch, acknowledged already, is
            # applied again without it.
            log.error("applying %r failed: refused with EIO, the batch it shared is kept", command, exc_info=True)
            self._replay(grow=False)
            if not isinstance(exc, Exception):
                raise
            raise FsError(errno.EIO, f"{type(command).__name__} failed: {type(exc).__name__}: {exc}") from exc
        self._batch.append(command)
        self._applied += 1
        for listener in self.applied_listeners:
            listener(self._applied)
        if len(self._batch) == 1:
            self._batch_started = _now()
            self._wake.set()
        if len(self._batch) >= self.max_batch_commands:
            if self.preparing():
                self._full.set()  # `run` prepares and commits at once: this must not await
            else:
                self.commit()
        return result

    def _replay(self, *, grow: bool) -> lmdb.Transaction[bytes]:
        """Abort the open transaction and apply the batch's commands again in a new one, after
        growing the map when the batch outgrew it (`grow`), or to undo what a failed command
        wrote. The commands are the ones that succeeded, in their order, on the same committed
        state: they give the results they gave. Should one fail now, the store itself is failing:
        the batch is dropped (a crash's outcome) and the failure goes to the caller."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        if grow:
            self.store.env.set_mapsize(self.store.map_size_bytes * 2)
        txn = self.read_txn()
        self.sm.load(txn)
        self.replays += 1
        self.sm.quiet = True
        try:
            for command in self._batch:
                self.sm.apply(txn, command)
        except BaseException:
            log.critical("applying the uncommitted batch again failed: dropping it", exc_info=True)
            self._abort()
            raise
        finally:
            self.sm.quiet = False
        return txn

    def _abort(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._applied -= len(self._batch)
        self._batch.clear()
        with self.store.env.begin() as txn:
            self.sm.load(txn)

    def commit(self) -> None:
        """Make the batch durable: device data first, then the metadata that points at it."""
        if self._txn is None:
            return
        if not self._batch:
            self._txn.abort()
            self._txn = None
            return
        if self.before_commit is not None:
            self.before_commit()
        self._txn.put(b"applied", u64(self._applied), db=self.store.db["meta"])
        self._txn.commit()
        self._txn = None
        self.batch_sizes.append(len(self._batch))
        del self.batch_sizes[:-1024]
        self._batch.clear()
        self._committed = self._applied
        self.commits += 1

    async def barrier(self) -> None:
        await self._prepare()
        self.commit()

    async def _prepare(self) -> None:
        if self.prepare is not None:
            await self.prepare()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Group commit: a batch is committed at most `commit_interval_ms` after it started, and
        once no command came for `commit_idle_ms`. The kernel tells a FUSE server nothing of
        sync(2) or syncfs(2) (docs/fuse-transport.md), so a burst of changes followed by `sync`
        is made durable this soon after it ends, not up to an interval later; under a steady
        stream of commands nothing changes."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                if not self._batch:
                    continue
                await self._wait_to_commit()
                await self._prepare()
                self._full = trio.Event()
                self.commit()
        finally:
            with trio.CancelScope(shield=True):
                self.commit()

    async def _wait_to_commit(self) -> None:
        """Until the batch is `commit_interval_ms` old, or no command came for `commit_idle_ms`."""
        deadline = self._batch_started + self.commit_interval_ms / 1000
        if not self.commit_idle_ms:
            with trio.move_on_at(deadline):
                await self._full.wait()
            return
        idle = self.commit_idle_ms / 1000
        while self._batch and trio.current_time() < deadline and not self._full.is_set():
            seen = self._applied
            with trio.move_on_at(min(deadline, trio.current_time() + idle)):
                await self._full.wait()
            if self._applied == seen:
                return

    def close(self) -> None:
        self.commit()
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
