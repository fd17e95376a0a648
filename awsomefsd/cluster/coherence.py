"""Cross-node coherence: close-to-open, per-file write leases, kernel cache invalidation.

The contract is in docs/coherence.md; this module implements its three mechanisms.

1. Every member applies every committed command. Commands another node proposed go through
   `awsomefsd.fuse.invalidate.targets` to the Invalidator, which drops the kernel's dentries,
   attributes and page cache they made stale (on a worker thread: the kernel may be waiting on the
   trio thread).
2. `catch_up()` (open, and a lookup that found nothing): a ReadIndex barrier makes this node apply
   everything committed before the call, then the invalidator is drained, so an open that starts
   after a close elsewhere sees that close's data and no stale cache.
3. Write leases: a node buffers writes to a file only while it holds the file's write lease
   (`AcquireWriteLease` through the log). Asking for a lease someone else holds is itself the
   request to give it up: the holder sees that command applied, flushes the file (data on the
   device, mapping committed) and proposes `ReleaseWriteLease`; the asker sees the release and
   asks again. So writes from different nodes are serialised, and each writer starts from the
   previous writer's flushed data. A dead holder's leases go with `ExpireNode` (lease + margin).
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from awsomefsd.fuse.invalidate import Invalidator, Kind, Target, targets
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.raft_log import RaftLog
from awsomefsd.meta.state_machine import StateMachine

log = logging.getLogger(__name__)

MAX_STALE_TRACKED = 1 << 20
ORPHAN_BATCH_S = 0.02
ORPHAN_RETRY_S = 2.5
MAX_ORPHANS_PER_COMMAND = 4096
CATCH_UP_TRY_S = 0.5
CATCH_UP_BUDGET_S = 10.0

LEASE_WAIT_S = 60.0
"""How long a writer waits for another node to give up a file's write lease before EIO. A live
holder releases within one flush; a dead one loses its leases after its liveness lease expires."""


class ClusterCoherence:
    """The `Coherence` hooks of awsomefsd.fuse.operations for one member."""

    def __init__(self, node_id: int, log_: RaftLog, sm: StateMachine, invalidator: Invalidator,
                 epoch: Any, *, strict: bool = False) -> None:
        self.node_id = node_id
        self.strict = strict
        self.log = log_
        self.sm = sm
        self.invalidator = invalidator
        self.epoch = epoch
        """Callable returning this node's liveness-lease epoch."""
        self.flush: Any = None
        """Set once the file system exists: `async flush(ino)` of this node's buffered data."""
        self.holds: Any = lambda _ino: False
        """Set once the file system exists: does anything here still reach this inode?"""
        self._orphans: set[int] = set()  # unlinked inodes to look at: release those we do not hold
        self._orphans_wake = trio.Event()
        self.orphans_released = 0
        self.held: set[int] = set()
        self._releasing: set[int] = set()
        self._writers: dict[int, int] = {}  # inode -> writes in progress under its lease
        self._idle: dict[int, trio.Event] = {}  # set when an inode's last write in progress ends
        self._stale_data: set[int] = set()
        self._all_stale = False
        self._released: dict[int, trio.Event] = {}
        self._to_release: trio.MemorySendChannel[int]
        self._release_queue: trio.MemoryReceiveChannel[int]
        self._to_release, self._release_queue = trio.open_memory_channel(4096)
        self.catch_ups = 0
        self.stale_reads = 0
        self.leases_acquired = 0
        self.leases_released = 0
        self.lease_waits = 0

    def reload(self) -> None:
        """Rebuild what this node holds from the state (start, snapshot install)."""
        self.held = set(self.sm.cluster.leases_of(self.log.read_txn(), self.node_id))

    # --- Coherence ----------------------------------------------------------------------------------
    async def catch_up(self, *, drain: bool = True) -> None:
        """Short tries: a ReadIndex sent to a leader that just died is lost, and a new leader is
        elected within a couple of seconds; after CATCH_UP_BUDGET_S serve the local state (a
        partitioned minority still reads what it has; its writes fail on their own).

        `drain=False` for lookups: an entry invalidation of the directory being looked up waits in
        the kernel until that very lookup is answered, so a lookup that waited for the drain would
        deadlock. The lookup's own answer comes from the caught-up state anyway."""
        self.catch_ups += 1
        deadline = trio.current_time() + CATCH_UP_BUDGET_S
        while True:
            try:
                await self.log.node.read_barrier(timeout_s=CATCH_UP_TRY_S)
                break
            except Exception as exc:
                if trio.current_time() >= deadline:
                    self.stale_reads += 1
                    log.warning("no leader confirmed a read point in %.0fs (%s); serving the local state",
                                CATCH_UP_BUDGET_S, exc)
                    break
                await trio.sleep(0.05)
        if drain:
            await self.invalidator.drain()

    @asynccontextmanager
    async def writing(self, ino: int) -> AsyncIterator[None]:
        """Hold the write lease across a whole write (see Coherence.writing): a hand-over that
        starts meanwhile waits for the block to end, so no byte is buffered, and no append
        offset computed, under a lease that is already someone else's."""
        await self._acquire(ino)
        self._writers[ino] = self._writers.get(ino, 0) + 1
        try:
            yield
        finally:
            left = self._writers[ino] - 1
            if left:
                self._writers[ino] = left
            else:
                del self._writers[ino]
                idle = self._idle.pop(ino, None)
                if idle is not None:
                    idle.set()

    async def _acquire(self, ino: int) -> None:
        """Return once the lease is ours and no hand-over of it has begun. The caller counts
        itself as a writer right after, with no await in between, so a hand-over that starts
        later waits for it; one that started while our request was on its way is waited out
        here first (the loop checks again after every await)."""
        with trio.move_on_after(LEASE_WAIT_S):
            while True:
                released = self._released.setdefault(ino, trio.Event())
                if ino in self._releasing:  # our own hand-over is under way: wait for it first
                    await released.wait()
                    continue
                if ino in self.held:  # `observe` adds it when our request is applied
                    return
                holder = await self.log.propose(c.AcquireWriteLease(ino, self.node_id, self.epoch()))
                if holder == self.node_id:
                    self.leases_acquired += 1
                    continue
                self.lease_waits += 1
                await released.wait()
        raise FsError(errno.EIO, f"node {self.node_id} waited {LEASE_WAIT_S:.0f}s for the write lease of inode {ino}")

    # --- observing applied commands (inside the apply transaction: queue only) -----------------
    def observe(self, command: object, result: Any, mine: bool) -> None:
        if isinstance(result, FsError):
            return
        if isinstance(command, c.AcquireWriteLease):
            if result == self.node_id and command.node != self.node_id:
                try:
                    self._to_release.send_nowait(command.ino)
                except trio.WouldBlock:
                    log.warning("release queue full; inode %d's lease is handed over on the next request",
                                command.ino)
            elif result == command.node == self.node_id:
                self.held.add(command.ino)
        elif isinstance(command, c.ReleaseWriteLease) and result:
            if command.node == self.node_id:
                self.held.discard(command.ino)
            self._wake(command.ino)
        elif isinstance(command, c.ExpireNode):
            if command.node == self.node_id:
                self.held.clear()
            for ino in list(self._released):
                self._wake(ino)
        elif isinstance(command, c.Purge):
            self.held.discard(command.ino)
            self._wake(command.ino)
        elif isinstance(command, c.Unlink) and isinstance(result, int):
            self.release_orphan(result)  # checked later: only an orphan we do not hold is released
        elif isinstance(command, c.Rename) and isinstance(result, int) and result:
            self.release_orphan(result)
        if not mine:
            self.invalidator.submit(self._safe(targets(command, result)))

    def _safe(self, stale: list[Target]) -> list[Target]:
        """Only attribute invalidations go to the kernel: they never wait for anything there. Stale
        data is dropped at the next open instead (keep_cache), and stale names expire by their short
        timeout: entry and page-cache invalidations wait in the kernel for pending requests on the
        directory or the pages, and a daemon SIGKILLed during such a wait can never exit."""
        safe = []
        for target in stale:
            if target.kind == Kind.INODE:
                if len(self._stale_data) >= MAX_STALE_TRACKED:
                    self._all_stale = True  # too many to track: no page cache survives an open
                    self._stale_data.clear()
                self._stale_data.add(target.ino)
                safe.append(Target.attr_only(target.ino))
            elif target.kind == Kind.ATTR:
                safe.append(target)
        return safe

    def appended(self, ino: int) -> None:
        self.invalidator.submit([Target.attr_only(ino)])

    def release_orphan(self, ino: int) -> None:
        self._orphans.add(ino)
        self._orphans_wake.set()

    def pending_orphans(self) -> None:
        """At start nothing here holds anything: every orphan waiting for us can be released."""
        txn = self.log.read_txn()
        for key, value in txn.cursor(self.sm.db["orphans"]):
            if value and self.node_id in json.loads(bytes(value)):
                self._orphans.add(int.from_bytes(key, "big"))
        self._orphans_wake.set()

    async def run_orphans(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Release, in batches, the orphans nothing here holds (one command per batch); look again
        later at those something still holds."""
        async with trio.open_nursery() as nursery:
            self._nursery_start = nursery.start_soon
            task_status.started()
            await self._release_orphans()

    async def _release_orphans(self) -> None:
        while True:
            await self._orphans_wake.wait()
            self._orphans_wake = trio.Event()
            await trio.sleep(ORPHAN_BATCH_S)
            batch, self._orphans = self._orphans, set()
            txn = self.log.read_txn()
            mine, later = [], []
            for ino in sorted(batch):
                raw = txn.get(ino.to_bytes(8, "big"), db=self.sm.db["orphans"])
                if raw is None or (raw and self.node_id not in json.loads(bytes(raw))):
                    continue
                if self.holds(ino):
                    later.append(ino)  # an open handle releases it at close; a recent lookup expires
                    continue
                mine.append(ino)
            if later:
                self._nursery_start(self._retry_later, later)
            for start in range(0, len(mine), MAX_ORPHANS_PER_COMMAND):
                chunk = tuple(mine[start : start + MAX_ORPHANS_PER_COMMAND])
                try:
                    await self.log.propose(c.ReleaseOrphans(self.node_id, chunk, time.time_ns()))
                    self.orphans_released += len(chunk)
                except FsError as exc:
                    log.warning("releasing %d unlinked inodes failed (%s); retrying later", len(chunk), exc)
                    self._orphans.update(chunk)

    async def _retry_later(self, inos: list[int]) -> None:
        await trio.sleep(ORPHAN_RETRY_S)
        for ino in inos:
            self.release_orphan(ino)

    def keep_cache(self, ino: int) -> bool:
        if self._all_stale:
            return False
        if ino in self._stale_data:
            self._stale_data.discard(ino)
            return False
        return True

    def _wake(self, ino: int) -> None:
        event = self._released.pop(ino, None)
        if event is not None:
            event.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Give up leases other nodes asked for: flush first, then release."""
        task_status.started()
        async for ino in self._release_queue:
            if ino not in self.held or ino in self._releasing:
                continue
            self._releasing.add(ino)
            self.held.discard(ino)  # from here no new write starts under it (they wait above)
            try:
                while ino in self._writers:  # writes already under the lease finish first
                    idle = self._idle.setdefault(ino, trio.Event())
                    await idle.wait()
                if self.flush is not None:
                    await self.flush(ino)
                await self.log.propose(c.ReleaseWriteLease(ino, self.node_id))
                self.leases_released += 1
            except FsError as exc:
                # The flush failed (fenced, device error): keep the lease, the data is still ours.
                log.warning("could not hand over the write lease of inode %d: %s", ino, exc)
                self.held.add(ino)
            finally:
                self._releasing.discard(ino)
                self._wake(ino)
