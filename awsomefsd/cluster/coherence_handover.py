"""Handing write leases and directory delegations over (docs/coherence.md, "Write-lease
hand-over"; docs/delegations.md): to the first node waiting for one, after this node's turn, once
the writes under it ended and the file is flushed, in one command; delegations nobody asked for
given back once idle; and everything given back at a clean stop. Part of `ClusterCoherence`
(cluster/coherence.py).
"""

from __future__ import annotations

import logging
import math

import trio

from awsomefsd.cluster.coherence_base import CoherenceBase
from awsomefsd.duty import is_fatal, one_line
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError

log = logging.getLogger(__name__)

MIN_HOLD_S = 0.2
"""A holder keeps a lease it got at least this long before handing it on: every turn writes
something, and two writers do not spend their time handing the lease back and forth."""
HANDOVER_RETRY_S = 0.5
MAX_RELEASES_PER_COMMAND = 1024
MIN_HOLD_DIRECTORY_S = 0.2
"""MIN_HOLD_S for a directory's delegation: nodes changing one directory take turns, and each
hand-over costs the holder a drain of its pipeline and one round of the log, so shorter turns
buy shorter waits with fewer changes per second. Measured at 0.1 / 0.2 / 0.5 s (three creators
in one directory, design note 139): longest create 575 / 993 / 1,671 ms at 2,582 / 2,791 /
3,026 creates/s in total."""
IDLE_TURN_S = 0.05
"""A directory's holder that someone waits for hands it over before MIN_HOLD_DIRECTORY_S once it
has changed nothing in it for this long: the turn is for changes at local speed, and a node that
came for one rename (or one lookup) would otherwise keep three nodes' clients waiting half a
second each (renames between two contended directories took 1-1.5 s, and up to 5 s, in the
nemesis run)."""
LOOKUP_TURN_S = 0.02
"""How long a directory's delegation taken by a lookup that found nothing waits for the change
that most often follows (the kernel's CREATE comes well under a millisecond after its LOOKUP's
answer): a lookup alone (a build probing for a file) keeps other nodes waiting no longer."""
DELEGATION_IDLE_S = 2.0
"""Once this node has changed nothing under its delegations for this long, it gives back those
nobody asked for: lookups in those directories on other nodes then need no hand-over. While it
is busy it keeps them all: an untar or a build comes back to its directories in any order, and
each return to a given-back directory would cost a round of the log (docs/delegations.md)."""
FRESH_IDLE_S = 10.0
"""How long an idle delegation is kept instead of DELEGATION_IDLE_S while files created ahead in
its directory are still fresh (nobody else can have reached them). Giving it back ends that: each
such file unlinked later is an orphan every member must release (three more commands each member
applies, not one UnlinkAlone), and its writes no longer run ahead. A follower that created 12,000
files, paused 3 s and unlinked them: 7,160-7,330 unlinks/s at 120-123 µs of its CPU each, the
other members 37 and 34; kept, 7,820-8,080/s at 108-112, 27 and 25 (design note 159). Kept, it
costs another node that wants the directory meanwhile one hand-over, no more than the give-back's
own round."""


class LeaseHandOver(CoherenceBase):
    """The hand-over task (`run`) and the returns of leases and delegations."""

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
        asked = trio.current_time()
        granted = self._acquired_at.get(ino, asked)
        try:
            await self._turn(ino)
            turned = trio.current_time()
            if ino not in self.held or ino in self._releasing or self._next_waiter(ino) is None:
                return
            self._releasing.add(ino)
            self.held.discard(ino)  # from here no new write starts under it (they wait in _acquire)
            self._no_longer_a_look(ino)
            self.published(ino)  # another node knows the file
            self._unfresh_directories({ino})
            directory = ino in self._delegated or self._is_directory(ino)
            if directory:
                self.names_leaving()
            try:
                while ino in self._writers:  # writes already under the lease finish first
                    idle = self._idle.setdefault(ino, trio.Event())
                    await idle.wait()
                written = trio.current_time()
                if self.flush is not None:
                    await self.flush(ino)
                flushed = trio.current_time()
                release = cc.ReleaseWriteLease(ino, self.node_id)
                nxt = self._next_waiter(ino)
                if nxt is None:
                    await self.meta.propose(release)
                else:
                    await self.meta.propose(c.Batch((release, cc.AcquireWriteLease(ino, *nxt))))
                self.leases_released += 1
                if log.isEnabledFor(logging.DEBUG):  # the steps of a hand-over (bench/contended_bench.py --timeline)
                    log.debug("node %d: hand-over of %d to node %s: asked +%.1f ms after the grant, turn ended +%.1f, "
                              "writers +%.1f, flushed +%.1f, committed +%.1f ms", self.node_id, ino,
                              nxt[0] if nxt else "none", *((t - granted) * 1000 for t in
                                                           (asked, turned, written, flushed, trio.current_time())))
                if directory:
                    self.names_leaving()
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
        it for IDLE_TURN_S (no change is in progress and the last one is that old). None for a
        delegation taken for a look; LOOKUP_TURN_S for one taken by a lookup that found nothing,
        unless a change came meanwhile."""
        acquired = self._acquired_at.get(ino, -math.inf)
        if not self._is_directory(ino):
            await trio.sleep_until(acquired + MIN_HOLD_S)
            return
        if self.strict or ino in self._looked_only:
            return  # nothing here runs ahead under it (strict mode, or taken for a look): a turn buys nothing
        if ino in self._awaiting_change:  # taken by a lookup that found nothing: a create may follow
            await trio.sleep_until(acquired + LOOKUP_TURN_S)
            if ino in self._awaiting_change and ino not in self._writers:
                return  # it did not come
        end = acquired + MIN_HOLD_DIRECTORY_S
        while (now := trio.current_time()) < end:
            quiet_since = max(acquired, self._touched.get(ino, acquired))
            if ino not in self._writers and now - quiet_since >= IDLE_TURN_S:
                return
            await trio.sleep_until(min(end, max(quiet_since, now) + IDLE_TURN_S))

    def _is_directory(self, ino: int) -> bool:
        inode = self.meta.inode(ino)
        return inode is not None and inode.is_dir

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
                      and not self._waiting.get(ino) and now - self._touched.get(ino, now) >= self._idle_after(ino)):
                    idle.append(ino)
            for start in range(0, len(idle), MAX_RELEASES_PER_COMMAND):
                await self._give_back(idle[start : start + MAX_RELEASES_PER_COMMAND])

    def _idle_after(self, directory: int) -> float:
        """How long the delegation of `directory` stays unused before it goes back unasked."""
        return FRESH_IDLE_S if self._fresh_in.get(directory) else DELEGATION_IDLE_S

    def _forget_delegation(self, ino: int) -> None:
        self._delegated.discard(ino)
        self._no_longer_a_look(ino)
        self._touched.pop(ino, None)

    async def _give_back(self, inos: list[int]) -> None:
        """Release idle delegations, in one command ordered after every change made under them
        (meta/ahead.py)."""
        self._begin_give_back(inos)
        await self._send_give_back(inos)

    def _begin_give_back(self, inos: list[int]) -> None:
        """The first half of `_give_back`, with no await: from here no change starts under them
        (a change that came meanwhile waits in `_acquire` and asks again)."""
        for ino in inos:
            self._forget_delegation(ino)
            self._handing.add(ino)
            self._releasing.add(ino)
            self.held.discard(ino)
        self._unfresh_directories(set(inos))
        # Nobody else can change them before their release commits: their names stay long here
        # until this node applies another node's grant or change (names_changed_elsewhere).
        self._long_names.update(inos)

    async def _send_give_back(self, inos: list[int]) -> None:
        """The second half of `_give_back`: the release, proposed."""
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
        self.names_leaving()  # the mount may outlive this process (a hand-over to the next daemon)
        released = 0
        for start in range(0, len(held), MAX_RELEASES_PER_COMMAND):
            chunk = held[start : start + MAX_RELEASES_PER_COMMAND]
            try:
                await self.meta.propose(self._releases(chunk))
                released += len(chunk)
            except FsError as exc:
                log.info("node %d: %d write leases go back when its lease expires (%s)", self.node_id, len(chunk), exc)
        return released
