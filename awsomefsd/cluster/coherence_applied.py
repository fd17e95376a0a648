"""What a member's coherence does with each applied command (inside the apply transaction: it only
queues): lease grants, releases and requests (the first-come queue of waiters), expiries and
purges; the kernel caches another node's changes made stale (attribute invalidations now, page
caches dropped at the next open: `keep_cache`); and the orphans an unlink or rename leaves, which
it releases in batches once nothing here holds them. Part of `ClusterCoherence`
(cluster/coherence.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import trio

from awsomefsd.cluster.coherence_base import CoherenceBase
from awsomefsd.fuse.invalidate import Kind, Target, compact, targets
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import Delegated, FsError

log = logging.getLogger(__name__)

MAX_STALE_TRACKED = 1 << 20
MAX_OPENED_TRACKED = 1 << 16
MAX_LISTINGS_TRACKED = 1 << 16
"""Directory listings remembered as kept by the kernel (`keep_listing`); past it the memory is emptied."""
"""Inodes remembered as opened since the start (`keep_cache`); past it the memory is emptied."""
ORPHAN_BATCH_S = 0.2
"""How long unlinked inodes accumulate before this node releases them in one command. Every member
releases every orphan (each may hold it open), so during an unlink burst on one node each member
proposed a release every round (with 0.02 s, about one log entry per ten unlinks per member, each
a forwarded call from a follower); the space comes back at most this much later."""
ORPHAN_INTERVAL_S = 1.0
"""At least this long between two releases of this node: during an unlink burst the members that
are not unlinking released every 0.2-0.3 s, each release a log entry every member stores and
applies (and, from a follower, a forwarded call): more than half the log entries of a 5,000-file
`rm` on a follower (issue 42). A lone unlink after a quiet second is still released
`ORPHAN_BATCH_S` later; the blocks wait out the delayed free (5 s) in any case."""
ORPHAN_RETRY_S = 2.5
MAX_ORPHANS_PER_COMMAND = 4096
NOT_FROM_OUR_KERNEL = (c.ApplyRemote, c.ApplyRemoteSharing, c.ResolveConflict, c.CreateVolume, c.DeleteVolume,
                       c.CreateSnapshot, c.DeleteSnapshot)
"""Changes to names this node proposes that no request of its kernel made (another site's batch, a
conflict's resolution, a volume or a snapshot): its kernel may cache the names they change. (A
create run for another member, MknodFor, changes one name: `changed_for_another`.)"""


class AppliedCommands(CoherenceBase):
    """Applied commands observed, the kernel caches they made stale, and the orphans they leave."""

    # --- observing applied commands (inside the apply transaction: queue only) -----------------
    def observe(self, command: object, result: Any, mine: bool) -> None:
        """One applied command (the log unwraps batches: `commands.applied`)."""
        if isinstance(result, FsError):
            self._count_refusal(result, mine)
            return
        self._observe_one(command, result)
        if not mine:
            stale = targets(command, result, merged=False)  # merged once `_tell_kernel` has kept some
            if self._long_names or self._listed:
                self._entries_changed_elsewhere({t.ino for t in stale if t.kind is Kind.ENTRY})
            self._tell_kernel(stale)
        elif (self._long_names or self._listed) and isinstance(command, NOT_FROM_OUR_KERNEL):
            self._entries_changed_elsewhere({t.ino for t in targets(command, result) if t.kind is Kind.ENTRY})
        elif isinstance(command, c.MknodFor):  # made here for another member, not through our kernel
            self.changed_for_another(command.parent, command.name)  # again: an answer computed before
            self._tell_kernel(targets(command, result))  # the directory's times

    def _tell_kernel(self, stale: list[Target]) -> None:
        """Send the kernel what it may cache of what another node changed (`_safe`: attributes).
        Of an inode the kernel holds nothing of, no page can be stale either: its next open finds
        none cached, so it is not remembered as stale (`_safe`) and costs nothing more here (most
        of what a member applies is another member's, in directories its kernel never saw)."""
        may_cache = self.kernel_may_cache
        held = [target for target in stale if may_cache(target.ino)]
        if held:
            self.invalidator.submit(compact(self._safe(held)))

    def changed_for_another(self, directory: int, name: bytes) -> None:
        """This node made `name` in `directory` for another member (when it ran ahead, and again
        when applied). Every name the kernel caches is dropped only when this one may be among
        them, as absent: a holder busy in the directory answers its own creates' lookups "no such
        name" for long, and dropping every name at each create it made for another (its kernel
        then walked the path again, taking the parents' delegations for the look) cost more than
        the create."""
        self._listed.discard(directory)
        if self._told_absent_unknown or (directory, name) in self._told_absent:
            self.names_leaving()

    def _entries_changed_elsewhere(self, directories: set[int]) -> None:
        """Entries of these directories changed other than through this node's kernel: the names
        it caches for long go, and a listing it keeps is not current any more."""
        if self._long_names:
            self.names_changed_elsewhere(directories)
        self._listed -= directories

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
                else:
                    self.names_changed_elsewhere((ino,))  # it may change the directory from now on
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
                self.names_leaving()  # its delegations are others' now
            for ino, waiting in list(self._waiting.items()):
                waiting.pop(command.node, None)  # its next request carries its new epoch
                if not waiting:
                    del self._waiting[ino]
            for ino in list(self._changed):
                self._wake(ino)
        elif isinstance(command, c.MknodFor) and command.lease_to == self.node_id:
            if command.lease_epoch == self.epoch():  # granted, as the state machine checked (an expiry reloads)
                self.held.add(command.ino)
                self._acquired_at[command.ino] = trio.current_time()
        elif isinstance(command, c.Purge):
            self._forget_deleted(command.ino)
        elif isinstance(command, cc.ReleaseOrphans) and result:
            self._maybe_gone(command.inos)  # the last holder released some of them
        elif isinstance(command, c.Unlink) and isinstance(result, int):
            if isinstance(command, c.UnlinkAlone) and result == command.ino:
                self._maybe_gone((result,))  # deleted with its last name, unless the log said otherwise
            self.release_orphan(result)  # checked later: only an orphan we do not hold is released
        elif isinstance(command, c.Rename) and isinstance(result, int) and result:
            self.release_orphan(result)

    def _maybe_gone(self, inos: Iterable[int]) -> None:
        """Some of these inodes may have been deleted, with their leases; which, the next look
        tells (`_release_orphans`), once this apply is what the node reads."""
        tracked = [ino for ino in inos if ino in self.held or ino in self._fresh]
        if tracked:
            self._maybe_deleted.update(tracked)
            self._orphans_wake.set()

    def _forget_deleted(self, ino: int) -> None:
        """The inode is gone, and its lease with it: nothing of it is held or fresh any more (else a
        member that creates and removes files keeps every one in `held`, and once `_fresh` is full
        no new file's mappings run ahead)."""
        self.published(ino)
        self.held.discard(ino)
        self._acquired_at.pop(ino, None)
        self._waiting.pop(ino, None)
        self._wake(ino)

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

    def keep_listing(self, ino: int) -> bool:
        """May the kernel keep the listing of this directory it has, at an OPENDIR (after the
        open's catch-up: this node's view holds every change acknowledged before it)? Yes when
        the kernel read it from this daemon from the start (`listed`) and no change to its
        entries made elsewhere (another node's, another site's, a volume's) was applied here
        since. This node's own changes go through its kernel, which drops what it keeps of the
        directory itself (as on a single node). A warm `git status` on a follower sent every
        directory's READDIRs again: 3.4x a single node's time (design note 141)."""
        return ino in self._listed

    def listed(self, ino: int) -> None:
        """The kernel read the directory's listing from the start from this daemon's view: kept
        until a change made elsewhere is applied (`keep_listing`)."""
        if len(self._listed) >= MAX_LISTINGS_TRACKED:
            self._listed.clear()  # those listed again are kept again: only slower
        self._listed.add(ino)

    def keep_cache(self, ino: int) -> bool:
        """May an open keep the kernel's pages of the file? Not when another node changed it since
        the last open here, nor at its first open since this daemon started: the daemon before it,
        on a mount continued after a hand-over or a crash, may have seen a change this one never
        will. On a fresh mount that first drop is free (nothing is cached yet)."""
        if ino not in self._opened:
            if len(self._opened) >= MAX_OPENED_TRACKED:
                self._opened.clear()  # those opened again drop their pages once more: only slower
            self._opened.add(ino)
            self._stale_data.discard(ino)
            return False
        if self._all_stale:
            return False
        if ino in self._stale_data:
            self._stale_data.discard(ino)
            return False
        return True

    # --- orphans ----------------------------------------------------------------------------------
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
        last_release = -ORPHAN_INTERVAL_S  # trio clock
        while True:
            await self._orphans_wake.wait()
            self._orphans_wake = trio.Event()
            await trio.sleep_until(max(trio.current_time() + ORPHAN_BATCH_S, last_release + ORPHAN_INTERVAL_S))
            batch, self._orphans = self._orphans, set()
            deleted, self._maybe_deleted = self._maybe_deleted, set()
            for ino in deleted:
                if self.meta.inode(ino) is None:  # inode numbers are never used again
                    self._forget_deleted(ino)
                elif self.meta.orphan(ino) is not None:
                    self._maybe_deleted.add(ino)  # still waiting for a holder: looked at again at the next wake
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
            if mine:
                last_release = trio.current_time()
            for start in range(0, len(mine), MAX_ORPHANS_PER_COMMAND):
                chunk = tuple(mine[start : start + MAX_ORPHANS_PER_COMMAND])
                self.orphan_releases += 1
                try:
                    await self.meta.propose(cc.ReleaseOrphans(self.node_id, chunk, time.time_ns()), hurry=False)
                    self.orphans_released += len(chunk)
                except FsError as exc:
                    log.warning("releasing %d unlinked inodes failed (%s); retrying later", len(chunk), exc)
                    self._orphans.update(chunk)

    async def _retry_later(self, inos: list[int]) -> None:
        await trio.sleep(ORPHAN_RETRY_S)
        for ino in inos:
            self.release_orphan(ino)
