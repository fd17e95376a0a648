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

`ClusterCoherence` is built in parts, one module per job: coherence_base.py (the state they
share), coherence_applied.py (mechanism 1: applied commands, stale caches, orphans),
coherence_handover.py (handing leases and delegations over), and here the `Coherence` hooks the
filesystem layer calls (mechanisms 2 and 3: catching up, holding and acquiring leases).
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager, nullcontext

import trio

from awsomefsd.cluster.coherence_applied import AppliedCommands
from awsomefsd.cluster.coherence_blocks import Changing, Holding, Taking, Writing
from awsomefsd.cluster.coherence_handover import LeaseHandOver
from awsomefsd.duty import one_line
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta.errors import FsError

log = logging.getLogger(__name__)

CATCH_UP_TRY_S = 0.5
CATCH_UP_BUDGET_S = 10.0

LEASE_WAIT_S = 60.0
"""How long a writer waits for another node to give up a file's write lease before EIO. A live
holder hands over within MIN_HOLD_S plus one flush per node ahead in the queue; a dead one loses
its leases after its liveness lease expires."""
REREQUEST_S = 2.0
"""A waiter repeats its request this often: a holder that restarted (or installed a snapshot) has
lost the queue, and sees the repeated request as a new one."""
MAX_FRESH_TRACKED = 1 << 16


TURN_AFTER_S = 0.1
"""Creates sent to a directory's holder this close together are a run: the next asks for the turn."""
MAX_SENT_TRACKED = 4096


class ClusterCoherence(LeaseHandOver, AppliedCommands):
    """The `Coherence` hooks (awsomefsd/fs/coherence.py) of one member (the constructor is
    CoherenceBase's: cluster/coherence_base.py)."""

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

    async def opening(self, ino: int) -> None:
        """A file whose write lease this node holds (no hand-over begun, and its liveness lease
        valid: else the cluster may have expired it and given the file to another node) was
        written nowhere else since the grant this node applied: every close elsewhere came
        before it (a hand-over commits the holder's flush first), so the open needs no read
        barrier, only the invalidations those closes queued. A ReadIndex is a round trip to the
        leader: `git add` or a build opening the files it just wrote paid one each."""
        if self._opens_without_barrier(ino):
            self.opens_held += 1
            if not self.invalidator.settled():
                await self.invalidator.drain()
            return
        await self.catch_up()

    def _opens_without_barrier(self, ino: int) -> bool:
        return self.holds_now((ino,)) and self.lease_valid()

    def opens_at_once(self, ino: int) -> bool:
        """Would `opening(ino)` return without a wait, or even a checkpoint: it needs no read
        barrier (`_opens_without_barrier`) and no invalidation waits to be sent?"""
        return self._opens_without_barrier(ino) and self.invalidator.settled()

    def writing(self, ino: int) -> AbstractAsyncContextManager[None]:
        """Hold the write lease across a whole write (see Coherence.writing): a hand-over that
        starts meanwhile waits for the block to end, so no byte is buffered, and no append
        offset computed, under a lease that is already someone else's.

        An expiry is not a hand-over: it takes the lease without waiting. A write that was inside
        the block when this node was expired (paused or cut off while the write awaited room, say)
        may have computed its offset under the old lease and buffered after the buffers were
        dropped; it fails with EIO and its file's buffered bytes are dropped and reported lost
        (another node may have written the same offsets since)."""
        return Writing(self, ino)

    def holding(self, ino: int) -> AbstractAsyncContextManager[bool]:
        """For work that needs the lease only if this node has it anyway: True while this node
        holds the inode's write lease (or directory's delegation), which it then keeps until the
        block is left, as for a write. It never asks for the lease: False when it is not ours.
        Compaction rewrites a file's committed blocks only then; an attribute change runs ahead of
        the log only then (docs/delegations.md)."""
        return Holding(self, ino)

    def changing(self, dirs: Iterable[int]) -> AbstractAsyncContextManager[bool]:
        """Hold the delegation of each directory for a whole namespace change in them
        (docs/delegations.md): acquired in inode order (two changes that need the same two
        directories never wait for each other in a cycle), then kept until the block is left, as
        a write keeps a file's lease. True: the change may run ahead of the log. False in strict
        mode, where every change goes through the log in its turn and nothing is delegated."""
        return nullcontext(False) if self.strict else Changing(self, dirs)

    def holds_now(self, inodes: Iterable[int]) -> bool:
        """`changing`, `holding` and `writing` enter at once (`_acquire` returns before any
        await) and `changing` yields True."""
        return not self.strict and all(ino in self.held and ino not in self._releasing for ino in inodes)

    def taking(self, dirs: Iterable[int], *, look: bool = False) -> AbstractAsyncContextManager[None]:
        """Take and hold these directories' delegations for the block (in inode order), in any
        mode: `changing`'s acquisition, and what a change proposed through the log does when the
        state machine refused it because another node holds one (`Delegated`). They are kept
        afterwards like any delegation: until asked for, or idle. `look`: for a look alone
        (`looking`): one taken that way stays `_looked_only` until a change takes it."""
        return Taking(self, dirs, look=look)

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

    # --- creates and looks another member sends here, or this node sends (design note 145) -----
    def holder_elsewhere(self, directory: int) -> int:
        if self.strict or directory in self.held or directory in self._releasing:
            return 0
        holder = self.meta.lease_holder(directory)
        return 0 if holder == self.node_id else holder

    async def holder_to_ask(self, directory: int) -> int:
        while directory in self._releasing:
            await self._changed.setdefault(directory, trio.Event()).wait()
        return self.holder_elsewhere(directory)

    def ask_for_turn(self, directory: int) -> None:
        """Only at the second create sent within TURN_AFTER_S: a lone create (a log file, a lock
        file) leaves the holder its turn, and a run of them (an untar, a build) gets its own."""
        now = trio.current_time()
        last = self._sent_at.pop(directory, -math.inf)
        if len(self._sent_at) >= MAX_SENT_TRACKED:
            self._sent_at.clear()
        self._sent_at[directory] = now
        if now - last > TURN_AFTER_S:
            return
        if self._nursery is not None and directory not in self._asking:
            self._asking.add(directory)
            self._nursery.start_soon(self._take_turn, directory)

    async def _take_turn(self, directory: int) -> None:
        """The delegation, taken as for a change (a turn that ends after IDLE_TURN_S of quiet):
        the create that asked for it is still on its way through the holder when it comes, and
        the next one runs here."""
        try:
            async with self.taking([directory]):
                pass
        except FsError as exc:
            log.debug("node %d: no turn with directory %d: %s", self.node_id, directory, one_line(exc))
        finally:
            self._asking.discard(directory)

    def serves_for_another(self, directory: int) -> bool:
        return self.holds_now((directory,)) and directory not in self._looked_only

    def held_for_a_look(self, directory: int) -> bool:
        return self.holds_now((directory,)) and directory in self._looked_only

    def granted_epoch(self) -> int:
        return self.epoch()

    def delegations_held(self) -> int:
        """Directory delegations this node holds now (those it asked for and still has)."""
        return len(self._delegated & self.held)

    def fresh(self, ino: int) -> bool:
        """May the file's data mapping, or its unlink as UnlinkAlone, be acknowledged ahead of the
        log? While only this node can reach it (`only_here`) and this node's liveness lease is
        valid: lapsed, the cluster may have expired the node and given the directory away (it
        renews only after applying that expiry, which drops what it held)."""
        return self.only_here(ino) and self.lease_valid()

    def only_here(self, ino: int) -> bool:
        """Can no other node have reached the file: created ahead here, reachable only through the
        directory it was created in, whose delegation has not begun to move since? Whatever the
        liveness lease says: another node's look ends it (`published`) even while the lease is
        lapsed, so that the file is not fresh again once it is renewed. (Close-to-open: an open
        elsewhere of a file it already knows only catches up with the log.)"""
        return ino in self._fresh and ino in self.held and ino not in self._releasing

    async def looking(self, ino: int, *, found: int | None = None, change_next: bool = False) -> bool:
        """Before a lookup that found nothing, or a readdir: True when this node holds the
        directory's delegation (its own view is then complete: no other node changes it). When
        another node holds it, that node may have acknowledged changes the log has not committed:
        ask for the delegation (its hand-over commits them first) and wait for it. Else False:
        the caller catches up with the log as usual.

        A delegation moved here for a look alone is handed on at once when asked for (no turn:
        nothing here runs ahead under it), and when the lookup `found` a directory (a path walk)
        given back right after the look. (The last name of an unlink or a rename,
        a file most often, keeps it: the change comes next and would take it again, a turn later.) Kept, it made path walks ping-pong: every hand-over
        makes the kernel forget every name (`names_leaving`), so the node that gave up, say, the
        root directory looked its path up again and took the root back, and three creators in
        their own directories waited for the root's and the parent's delegations at each create
        (about 25 creates/s in total). Given back, nobody holds a directory that is only
        walked through, and a lookup there only reads (the caller answers from the state the
        grant made current: every change acknowledged before the look is in it).

        A lookup that found nothing (`change_next`) is most often a create's first step (the
        kernel looks the name up, then creates it): the delegation is kept LOOKUP_TURN_S for the
        change, whose turn it then becomes. Handed on at once as a look's, the create that came
        next waited for every other node's turn a second time: the longest create of three
        creators in one directory was two whole waits (754-978 ms against a waiter's longest
        wait of 500 ms, design note 140)."""
        while ino in self._releasing:
            # Our own hand-over (or give-back) is on its way. Once it commits, the next holder may
            # change the directory and answer at once, while this node has not applied the
            # release yet and still reads itself as the holder: a look now would answer from
            # before that change (seen: a rename over a name, acknowledged on the other node,
            # and this node's stat right after it still found the name's old inode).
            await self._changed.setdefault(ino, trio.Event()).wait()
        if ino in self.held:
            if change_next and ino in self._looked_only:
                self._await_change(ino)
            return True
        if self.meta.lease_holder(ino) in (0, self.node_id):
            return False
        async with self.taking([ino], look=True):
            pass
        if change_next and ino in self._looked_only:
            self._await_change(ino)
        if (found is not None and ino not in self._writers and ino in self._looked_only and self._nursery is not None
                and self._is_directory(found)):
            if self._waiting.get(ino):
                self._hand_over_later(ino)
            elif ino not in self._handing and ino not in self._releasing:
                self._begin_give_back([ino])  # now: a change that comes next waits for the release
                self._nursery.start_soon(self._send_give_back, [ino])
        return True

    def _await_change(self, ino: int) -> None:
        """A delegation taken for a look that found nothing: kept for the change that most often
        follows, from now (LOOKUP_TURN_S unless the change comes; coherence_handover `_turn`)."""
        self._looked_only.discard(ino)
        self._awaiting_change.add(ino)
        self._acquired_at[ino] = trio.current_time()

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
                    log.debug("node %d waited %.1f ms for the lease of %d", self.node_id, spent * 1000, ino)
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
