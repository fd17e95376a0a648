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
   request to give it up. So writes from different nodes are serialised, and each writer starts
   from the previous writer's flushed data. A dead holder's leases go with `ExpireNode`.

   Fairness (a writer's wait is bounded; docs/coherence.md, "Write-lease hand-over"): every node
   applies every request, so every node keeps the same first-come queue of the nodes waiting for
   each file (`_waiting`, in log order). The holder keeps the lease at least `MIN_HOLD_S` after it
   got it (each turn does some work), then waits for its writes in progress, flushes the file and
   hands the lease to the node at the head of the queue in one command (`Batch(Release, Acquire
   for that node)`), so the lease never goes back to the fastest asker (the leader, whose requests
   reach the log first). Waiters need not ask again after each hand-over (their place is kept);
   they repeat their request every `REREQUEST_S` all the same, in case the holder restarted or
   installed a snapshot and so lost the queue. A write that waited `LEASE_WAIT_S` gives up with
   EIO, and logs why (node, inode, holder, place in the queue, last error).
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio

from awsomefsd.duty import is_fatal, one_line
from awsomefsd.fs.coherence import FlushFile, HoldsInode
from awsomefsd.fuse.invalidate import Invalidator, Kind, Target, targets
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import Delegated, FsError

log = logging.getLogger(__name__)

MAX_STALE_TRACKED = 1 << 20
ORPHAN_BATCH_S = 0.02
ORPHAN_RETRY_S = 2.5
MAX_ORPHANS_PER_COMMAND = 4096
CATCH_UP_TRY_S = 0.5
CATCH_UP_BUDGET_S = 10.0

LEASE_WAIT_S = 60.0
"""How long a writer waits for another node to give up a file's write lease before EIO. A live
holder hands over within MIN_HOLD_S plus one flush per node ahead in the queue; a dead one loses
its leases after its liveness lease expires."""
MIN_HOLD_S = 0.2
"""A holder keeps a lease it got at least this long before handing it on: every turn writes
something, and two writers do not spend their time handing the lease back and forth."""
REREQUEST_S = 2.0
"""A waiter repeats its request this often: a holder that restarted (or installed a snapshot) has
lost the queue, and sees the repeated request as a new one."""
HANDOVER_RETRY_S = 0.5
MAX_FRESH_TRACKED = 1 << 16
MAX_RELEASES_PER_COMMAND = 1024
MIN_HOLD_DIRECTORY_S = 0.5
"""MIN_HOLD_S for a directory's delegation: a turn of changes at local speed is worth a longer
wait for the others (nodes creating in one directory take turns; each hand-over costs the holder
a drain of its pipeline and one round of the log)."""
IDLE_TURN_S = 0.05
"""A directory's holder that someone waits for hands it over before MIN_HOLD_DIRECTORY_S once it
has changed nothing in it for this long: the turn is for changes at local speed, and a node that
came for one rename (or one lookup) would otherwise keep three nodes' clients waiting half a
second each (renames between two contended directories took 1-1.5 s, and up to 5 s, in the
nemesis run)."""
DELEGATION_IDLE_S = 2.0
"""Once this node has changed nothing under its delegations for this long, it gives back those
nobody asked for: lookups in those directories on other nodes then need no hand-over. While it
is busy it keeps them all: an untar or a build comes back to its directories in any order, and
each return to a given-back directory would cost a round of the log (docs/delegations.md)."""


class ClusterCoherence:
    """The `Coherence` hooks (awsomefsd/fs/coherence.py) of one member."""

    def __init__(self, node_id: int, meta: MetaClient, invalidator: Invalidator, epoch: Callable[[], int], *,
                 flush: FlushFile | None = None,
                 lose_file: Callable[[int, str], None] | None = None,
                 holds: HoldsInode = lambda _ino: False,
                 wait_lease: Callable[[], Awaitable[None]] | None = None,
                 read_barrier: Callable[..., Awaitable[object]] | None = None,
                 strict: bool = False) -> None:
        self.node_id = node_id
        self.strict = strict
        self.meta = meta
        self.invalidator = invalidator
        self.epoch = epoch
        """This node's liveness-lease epoch, now."""
        self.flush = flush
        """`async flush(ino)`: this node's buffered data of the file to the device and the log."""
        self.holds = holds
        self.lose_file = lose_file
        """`lose_file(ino, reason)`: drop the file's buffered bytes; its descriptors report EIO."""
        self.expiries = 0  # times the cluster expired this node's liveness lease (ExpireNode applied)
        """Does anything on this node still reach this inode (a handle, a recent lookup)?"""
        self.wait_lease = wait_lease
        """Until this node's liveness lease is renewed (a writer that finds its epoch expired,
        after a pause, waits for the new one instead of failing at once)."""
        self.read_barrier = read_barrier
        """`async read_barrier(timeout_s=...)`: apply everything committed before the call
        (ReadIndex); without it `catch_up` only drains the invalidations."""
        self._orphans: set[int] = set()  # unlinked inodes to look at: release those we do not hold
        self._orphans_wake = trio.Event()
        self.orphans_released = 0
        self.held: set[int] = set()
        self._acquired_at: dict[int, float] = {}  # inode -> when we got its lease (trio clock)
        self._waiting: dict[int, dict[int, int]] = {}  # inode -> {waiting node: its epoch}, first come first
        self._requested_at: dict[int, float] = {}  # inode -> our last request (trio clock)
        self._releasing: set[int] = set()  # hand-over under way: new writes here wait
        self._handing: set[int] = set()  # hand-over task scheduled or running
        self._writers: dict[int, int] = {}  # inode -> writes in progress under its lease
        self._delegated: set[int] = set()  # directories whose delegation this node asked for
        self._fresh: dict[int, int] = {}  # file created ahead -> its directory (`fresh`)
        self._fresh_in: dict[int, set[int]] = {}  # directory -> the fresh files created in it
        self._touched: dict[int, float] = {}  # inode -> when the last change under its lease ended
        self._idle: dict[int, trio.Event] = {}  # set when an inode's last write in progress ends
        self._stale_data: set[int] = set()
        self._all_stale = False
        self._changed: dict[int, trio.Event] = {}  # set when an inode's lease changes hands
        self._to_release: trio.MemorySendChannel[int]
        self._release_queue: trio.MemoryReceiveChannel[int]
        self._to_release, self._release_queue = trio.open_memory_channel(4096)
        self._nursery: trio.Nursery | None = None
        self.catch_ups = 0
        self.stale_reads = 0
        self.cut_off = False  # the last catch-up ran out of budget and none succeeded since (catch_up)
        self.leases_acquired = 0
        self.leases_released = 0
        self.lease_waits = 0
        self.lease_timeouts = 0
        self.handover_failures = 0
        self.delegations_returned = 0
        self.delegation_refusals = 0
        """Changes of ours the log refused because another node held a directory's delegation."""
        self.lease_wait_s = 0.0  # total time writes waited for a lease
        self.lease_wait_max_s = 0.0

    def reload(self) -> None:
        """Rebuild what this node holds from the state (start, snapshot install, expiry). The
        queues are forgotten (commands were skipped): waiters repeat their requests."""
        self.held = set(self.meta.leases_of(self.node_id))
        self._acquired_at = {ino: -math.inf for ino in self.held}
        self._fresh.clear()
        self._fresh_in.clear()
        self._waiting.clear()
        for ino in list(self._changed):
            self._wake(ino)

    # --- Coherence ----------------------------------------------------------------------------------
    async def catch_up(self, *, drain: bool = True) -> None:
        """Short tries: a ReadIndex sent to a leader that just died is lost, and a new leader is
        elected within a couple of seconds; after CATCH_UP_BUDGET_S serve the local state (a
        partitioned minority still reads what it has; its writes fail on their own).

        `drain=False` for lookups: an entry invalidation of the directory being looked up waits in
        the kernel until that very lookup is answered, so a lookup that waited for the drain would
        deadlock. The lookup's own answer comes from the caught-up state anyway."""
        self.catch_ups += 1
        # Once a catch-up ran out of budget, the next ones try once until a barrier succeeds again:
        # the kernel repeats a lookup that failed, and each repeat would wait the budget again.
        deadline = trio.current_time() + (0.0 if self.cut_off else CATCH_UP_BUDGET_S)
        while self.read_barrier is not None:
            try:
                await self.read_barrier(timeout_s=CATCH_UP_TRY_S)
                self.cut_off = False
                break
            except Exception as exc:
                if trio.current_time() >= deadline:
                    self.stale_reads += 1
                    if not self.cut_off:
                        log.warning("no leader confirmed a read point in %.0fs (%s); serving the local state",
                                    CATCH_UP_BUDGET_S, exc)
                    self.cut_off = True
                    break
                await trio.sleep(0.05)
        if drain:
            await self.invalidator.drain()

    @asynccontextmanager
    async def writing(self, ino: int) -> AsyncIterator[None]:
        """Hold the write lease across a whole write (see Coherence.writing): a hand-over that
        starts meanwhile waits for the block to end, so no byte is buffered, and no append
        offset computed, under a lease that is already someone else's.

        An expiry is not a hand-over: it takes the lease without waiting. A write that was inside
        the block when this node was expired (paused or cut off while the write awaited room, say)
        may have computed its offset under the old lease and buffered after the buffers were
        dropped; it fails with EIO and its file's buffered bytes are dropped and reported lost
        (another node may have written the same offsets since)."""
        await self._acquire(ino)
        expiries = self.expiries
        self._writers[ino] = self._writers.get(ino, 0) + 1
        try:
            yield
        finally:
            self._writer_done(ino)
        if self.expiries != expiries:
            reason = f"node {self.node_id}'s lease expired during a write to inode {ino}"
            if self.lose_file is not None:
                self.lose_file(ino, reason)
            raise FsError(errno.EIO, reason, cause="lease")

    @asynccontextmanager
    async def holding(self, ino: int) -> AsyncIterator[bool]:
        """For work that needs the lease only if this node has it anyway: True while this node
        holds the inode's write lease (or directory's delegation), which it then keeps until the
        block is left, as for a write. It never asks for the lease: False when it is not ours.
        Compaction rewrites a file's committed blocks only then; an attribute change runs ahead of
        the log only then (docs/delegations.md)."""
        if ino not in self.held or ino in self._releasing:
            yield False
            return
        self._writers[ino] = self._writers.get(ino, 0) + 1
        try:
            yield True
        finally:
            self._writer_done(ino)
            if ino in self._delegated:
                self._touched[ino] = trio.current_time()

    @asynccontextmanager
    async def changing(self, dirs: Iterable[int]) -> AsyncIterator[bool]:
        """Hold the delegation of each directory for a whole namespace change in them
        (docs/delegations.md): acquired in inode order (two changes that need the same two
        directories never wait for each other in a cycle), then kept until the block is left, as
        a write keeps a file's lease. True: the change may run ahead of the log. False in strict
        mode, where every change goes through the log in its turn and nothing is delegated."""
        if self.strict:
            yield False
            return
        async with self.taking(dirs):
            yield True

    @asynccontextmanager
    async def taking(self, dirs: Iterable[int]) -> AsyncIterator[None]:
        """Take and hold these directories' delegations for the block (in inode order), in any
        mode: `changing`'s acquisition, and what a change proposed through the log does when the
        state machine refused it because another node holds one (`Delegated`). They are kept
        afterwards like any delegation: until asked for, or idle."""
        entered: list[int] = []
        try:
            for ino in sorted(set(dirs)):
                await self._acquire(ino)
                self._writers[ino] = self._writers.get(ino, 0) + 1
                entered.append(ino)
            yield
        finally:
            now = trio.current_time()
            for ino in entered:
                self._writer_done(ino)
                self._touched[ino] = now
                self._delegated.add(ino)

    def created_ahead(self, ino: int, parent: int, *, is_dir: bool) -> None:
        """A file or directory this node just created ahead of the log, in a directory it holds,
        with its write lease or delegation (`Mknod.lease_to`: nobody else can know it before the
        parent's delegation moves, and that hand-over commits after the create). A new file is
        *fresh* until then: its data mappings may run ahead too (`fresh`). A new directory's
        attributes and entries change ahead from the start (mkdir, then its files and chmod)."""
        self.held.add(ino)
        now = trio.current_time()
        self._acquired_at[ino] = now
        if is_dir:
            self._delegated.add(ino)
            self._touched[ino] = now
        elif len(self._fresh) < MAX_FRESH_TRACKED:
            self._fresh[ino] = parent
            self._fresh_in.setdefault(parent, set()).add(ino)

    def delegations_held(self) -> int:
        """Directory delegations this node holds now (those it asked for and still has)."""
        return len(self._delegated & self.held)

    def fresh(self, ino: int) -> bool:
        """May the file's data mapping be acknowledged ahead of the log? Only while no other node
        can reach the file: created ahead here, reachable only through the directory it was created
        in, whose delegation has not begun to move since. (Close-to-open: an open elsewhere
        of a file it already knows only catches up with the log.)"""
        return ino in self._fresh and ino in self.held and ino not in self._releasing

    def published(self, ino: int) -> None:
        """The file is now reachable another way (a link, a rename into another directory): its
        mappings wait for the log from now on."""
        directory = self._fresh.pop(ino, None)
        if directory is not None:
            self._fresh_in[directory].discard(ino)

    def _unfresh_directories(self, dirs: set[int]) -> None:
        """These directories' delegations begin to move: what was created in them is no longer fresh."""
        for directory in dirs:
            for ino in self._fresh_in.pop(directory, ()):
                self._fresh.pop(ino, None)

    async def looking(self, ino: int) -> bool:
        """Before a lookup that found nothing, or a readdir: True when this node holds the
        directory's delegation (its own view is then complete: no other node changes it). When
        another node holds it, that node may have acknowledged changes the log has not committed:
        ask for the delegation (its hand-over commits them first) and wait for it. Else False:
        the caller catches up with the log as usual."""
        if ino in self.held and ino not in self._releasing:
            return True
        if self.meta.lease_holder(ino) in (0, self.node_id):
            return False
        async with self.taking([ino]):
            return True

    def _writer_done(self, ino: int) -> None:
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
        if ino in self.held and ino not in self._releasing:
            return
        began = trio.current_time()
        deadline = began + LEASE_WAIT_S
        waited = False
        last_error: BaseException | None = None
        while True:
            now = trio.current_time()
            if now >= deadline:
                self._give_up(ino, now - began, last_error)
            changed = self._changed.setdefault(ino, trio.Event())
            if ino in self._releasing:  # our own hand-over is under way: wait for it first
                with trio.move_on_at(deadline):
                    await changed.wait()
                continue
            if ino in self.held:  # `observe` adds it when the lease is granted to us
                if waited:
                    spent = trio.current_time() - began
                    self.lease_wait_s += spent
                    self.lease_wait_max_s = max(self.lease_wait_max_s, spent)
                return
            holder = self.meta.lease_holder(ino)
            asked = self._requested_at.get(ino, -math.inf)
            queued = self.node_id in self._waiting.get(ino, ())
            if holder in (0, self.node_id) or not queued or now - asked >= REREQUEST_S:
                self._requested_at[ino] = now
                try:
                    holder = await self.meta.propose(cc.AcquireWriteLease(ino, self.node_id, self.epoch()))
                except FsError as exc:
                    last_error = exc
                    if not await self._renewed_in_time(deadline):
                        raise
                    continue
                if holder == self.node_id:
                    self.leases_acquired += 1
                    continue
                if not waited:
                    waited = True
                    self.lease_waits += 1
            with trio.move_on_at(min(deadline, self._requested_at.get(ino, now) + REREQUEST_S)):
                await changed.wait()

    async def _renewed_in_time(self, deadline: float) -> bool:
        """After a refused request: if this node's lease epoch is what the cluster expired (it was
        paused or cut off), wait for the renewal under the new epoch and say so; else False."""
        record = self.meta.member(self.node_id)
        stale = record is not None and (record.epoch != self.epoch() or record.expired)
        if not stale or self.wait_lease is None:
            return False
        with trio.move_on_at(deadline):
            await self.wait_lease()
            return True
        return False

    def _give_up(self, ino: int, waited_s: float, last_error: BaseException | None) -> None:
        """A write waited LEASE_WAIT_S: its EIO says why (an EIO alone explains nothing). The
        binding's EIO reporter logs it once with the node and the file (fuse/eio.py)."""
        self.lease_timeouts += 1
        holder = self.meta.lease_holder(ino)
        queue = list(self._waiting.get(ino, {}))
        ahead = queue.index(self.node_id) if self.node_id in queue else len(queue)
        if holder == 0:
            why = "the lease was free each time it was asked for, and others got it first"
        else:
            record = self.meta.member(holder)
            state = ("gone" if record is None else "expired" if record.expired else
                     f"{record.state}, epoch {record.epoch}")
            why = f"node {holder} ({state}) held it and did not hand it over"
        if last_error is not None:
            why += f"; the last request failed: {one_line(last_error)}"
        raise FsError(errno.EIO, f"a write gave up after {waited_s:.1f}s waiting for the write lease of inode {ino}: "
                      f"{why} ({ahead} nodes ahead in the queue {queue})", cause="lease")

    # --- observing applied commands (inside the apply transaction: queue only) -----------------
    def observe(self, command: object, result: Any, mine: bool) -> None:
        """One applied command (the log unwraps batches: `commands.applied`)."""
        if isinstance(result, FsError):
            self._count_refusal(result, mine)
            return
        self._observe_one(command, result)
        if not mine:
            self.invalidator.submit(self._safe(targets(command, result)))

    def _count_refusal(self, error: FsError, mine: bool) -> None:
        if mine and isinstance(error, Delegated):
            self.delegation_refusals += 1  # the operation takes the delegation and goes again

    def _observe_one(self, command: object, result: Any) -> None:
        if isinstance(command, cc.AcquireWriteLease):
            ino = command.ino
            waiting = self._waiting.setdefault(ino, {})
            if result == command.node:  # granted (asked while free, or handed over by the holder)
                waiting.pop(command.node, None)
                if not waiting:
                    del self._waiting[ino]
                if command.node == self.node_id:
                    self.held.add(ino)
                    self._acquired_at[ino] = trio.current_time()
                    self._wake(ino)
                    if waiting:
                        self._hand_over_later(ino)
            else:  # a request: `result` holds it; first come, first served (a repeat keeps its place)
                waiting[command.node] = command.epoch
                if result == self.node_id:
                    self._hand_over_later(ino)
        elif isinstance(command, cc.ReleaseWriteLease) and result:
            if command.node == self.node_id:
                self.held.discard(command.ino)
                self._acquired_at.pop(command.ino, None)
            self._wake(command.ino)
        elif isinstance(command, cc.ExpireNode):
            if command.node == self.node_id:
                self.expiries += 1
                self.held.clear()
                self._acquired_at.clear()
            for ino, waiting in list(self._waiting.items()):
                waiting.pop(command.node, None)  # its next request carries its new epoch
                if not waiting:
                    del self._waiting[ino]
            for ino in list(self._changed):
                self._wake(ino)
        elif isinstance(command, c.Purge):
            self.published(command.ino)
            self.held.discard(command.ino)
            self._acquired_at.pop(command.ino, None)
            self._waiting.pop(command.ino, None)
            self._wake(command.ino)
        elif isinstance(command, c.Unlink) and isinstance(result, int):
            self.release_orphan(result)  # checked later: only an orphan we do not hold is released
        elif isinstance(command, c.Rename) and isinstance(result, int) and result:
            self.release_orphan(result)

    def _hand_over_later(self, ino: int) -> None:
        try:
            self._to_release.send_nowait(ino)
        except trio.WouldBlock:
            log.warning("hand-over queue full; inode %d's lease is handed over on the next request", ino)

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
        for orphan in self.meta.orphans():
            if self.node_id in orphan.holders:
                self._orphans.add(orphan.ino)
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
            mine, later = [], []
            for ino in sorted(batch):
                orphan = self.meta.orphan(ino)
                if orphan is None or (orphan.holders and self.node_id not in orphan.holders):
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
                    await self.meta.propose(cc.ReleaseOrphans(self.node_id, chunk, time.time_ns()))
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
        event = self._changed.pop(ino, None)
        if event is not None:
            event.set()

    # --- handing leases over ---------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hand over the leases other nodes wait for (one task per file: a slow flush of one file
        does not hold up the others)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._release_idle_delegations)
            task_status.started()
            async for ino in self._release_queue:
                if ino in self._handing or ino not in self.held:
                    continue
                self._handing.add(ino)
                nursery.start_soon(self._hand_over, ino)

    def _next_waiter(self, ino: int) -> tuple[int, int] | None:
        """The first node in the file's queue that can still take the lease: (node, its epoch)."""
        waiting = self._waiting.get(ino)
        if not waiting:
            return None
        for node in list(waiting):
            record = self.meta.member(node)
            if node != self.node_id and record is not None and record.active and not record.expired:
                return node, record.epoch
            del waiting[node]  # gone or expired: its next request puts it back, at the end
        return None

    async def _hand_over(self, ino: int) -> None:
        """Give the lease to the first waiter: after MIN_HOLD_S, once the writes in progress ended
        and the file is flushed, in one command (release + acquire for that node)."""
        retry = False
        try:
            await self._turn(ino)
            if ino not in self.held or ino in self._releasing or self._next_waiter(ino) is None:
                return
            self._releasing.add(ino)
            self.held.discard(ino)  # from here no new write starts under it (they wait in _acquire)
            self.published(ino)  # another node knows the file
            self._unfresh_directories({ino})
            try:
                while ino in self._writers:  # writes already under the lease finish first
                    idle = self._idle.setdefault(ino, trio.Event())
                    await idle.wait()
                if self.flush is not None:
                    await self.flush(ino)
                release = cc.ReleaseWriteLease(ino, self.node_id)
                nxt = self._next_waiter(ino)
                if nxt is None:
                    await self.meta.propose(release)
                else:
                    await self.meta.propose(c.Batch((release, cc.AcquireWriteLease(ino, *nxt))))
                self.leases_released += 1
            except Exception as exc:
                if is_fatal(exc):
                    raise
                # The flush failed (fenced, device error) or the metadata group is unreachable: the
                # lease stays ours if the state says so (its data is still here); tried again later.
                self.handover_failures += 1
                still_ours = self.meta.lease_holder(ino) == self.node_id
                log.warning("node %d could not hand over the write lease of inode %d: %s%s", self.node_id, ino,
                            one_line(exc), "; trying again" if still_ours else "")
                if still_ours:
                    self.held.add(ino)
                    retry = True
            finally:
                self._releasing.discard(ino)
                self._wake(ino)
        finally:
            self._handing.discard(ino)
        if retry and self._nursery is not None:
            self._nursery.start_soon(self._retry_hand_over, ino)

    async def _turn(self, ino: int) -> None:
        """Until this node's turn with the lease ends: MIN_HOLD_S after it got it (a file), or
        MIN_HOLD_DIRECTORY_S for a directory, which ends early once nothing here has changed in
        it for IDLE_TURN_S (no change is in progress and the last one is that old)."""
        acquired = self._acquired_at.get(ino, -math.inf)
        inode = self.meta.inode(ino)
        if inode is None or not inode.is_dir:
            await trio.sleep_until(acquired + MIN_HOLD_S)
            return
        if self.strict:
            return  # a strict node changes nothing ahead of the log: a turn would buy it nothing
        end = acquired + MIN_HOLD_DIRECTORY_S
        while (now := trio.current_time()) < end:
            quiet_since = max(acquired, self._touched.get(ino, acquired))
            if ino not in self._writers and now - quiet_since >= IDLE_TURN_S:
                return
            await trio.sleep_until(min(end, max(quiet_since, now) + IDLE_TURN_S))

    async def _retry_hand_over(self, ino: int) -> None:
        await trio.sleep(HANDOVER_RETRY_S)
        if ino in self.held and self._waiting.get(ino):
            self._hand_over_later(ino)

    async def _release_idle_delegations(self) -> None:
        while True:
            await trio.sleep(DELEGATION_IDLE_S / 2)
            now = trio.current_time()
            if now - max(self._touched.values(), default=-math.inf) < DELEGATION_IDLE_S:
                continue  # still changing here: keep them all (an untar visits its directories in any order)
            idle = []
            for ino in sorted(self._delegated):
                if ino not in self.held:
                    self._forget_delegation(ino)
                elif (ino not in self._writers and ino not in self._releasing and ino not in self._handing
                      and not self._waiting.get(ino) and now - self._touched.get(ino, now) >= DELEGATION_IDLE_S):
                    idle.append(ino)
            for start in range(0, len(idle), MAX_RELEASES_PER_COMMAND):
                await self._give_back(idle[start : start + MAX_RELEASES_PER_COMMAND])

    def _forget_delegation(self, ino: int) -> None:
        self._delegated.discard(ino)
        self._touched.pop(ino, None)

    async def _give_back(self, inos: list[int]) -> None:
        """Release idle delegations, in one command ordered after every change made under them
        (meta/ahead.py)."""
        for ino in inos:
            self._forget_delegation(ino)
            self._handing.add(ino)
            self._releasing.add(ino)
            self.held.discard(ino)
        self._unfresh_directories(set(inos))
        try:
            await self.meta.propose(self._releases(inos))
            self.delegations_returned += len(inos)
        except FsError as exc:
            for ino in inos:
                if self.meta.lease_holder(ino) == self.node_id:
                    self.held.add(ino)
            log.info("node %d keeps %d directory delegations for now: %s", self.node_id, len(inos), one_line(exc))
        finally:
            for ino in inos:
                self._releasing.discard(ino)
                self._handing.discard(ino)
                self._wake(ino)

    def _releases(self, inos: list[int]) -> c.Batch:
        """One command giving back several leases (at most MAX_RELEASES_PER_COMMAND)."""
        assert len(inos) <= MAX_RELEASES_PER_COMMAND
        return c.Batch(tuple(cc.ReleaseWriteLease(ino, self.node_id) for ino in inos))

    async def release_all(self) -> int:
        """Give back every write lease and delegation this node holds (a clean stop, after
        everything is flushed; no write can be in progress), in one command per 1,024: nobody
        waits for a node that is not running (a node that created thousands of files holds
        thousands of leases)."""
        held, self.held = sorted(self.held), set()
        released = 0
        for start in range(0, len(held), MAX_RELEASES_PER_COMMAND):
            chunk = held[start : start + MAX_RELEASES_PER_COMMAND]
            try:
                await self.meta.propose(self._releases(chunk))
                released += len(chunk)
            except FsError as exc:
                log.info("node %d: %d write leases go back when its lease expires (%s)", self.node_id, len(chunk), exc)
        return released
