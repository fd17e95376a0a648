"""A member's background duties: its liveness lease, its allocation groups, and — on the leader —
membership, expiry of nodes that stopped renewing, and the cluster's log level (raised once
every member's build decodes newer commands: the end of a rolling upgrade).

Timing of the liveness lease (docs/cluster.md has the argument):
- a member proposes `RenewLease(node, epoch)` every `renew_s`; when it is applied, the member's write
  fence opens until `sent + lease_s` on its own monotonic clock (`sent` = when the proposal left,
  so the lease never starts later than the leader could believe);
- the leader notes, on its own monotonic clock, when it applied each member's last renewal, and
  proposes `ExpireNode` once `lease_s + margin_s` have passed without one. Only then are the
  member's groups and write leases free for others;
- a new leader starts every member's clock at its own election: it can only expire later, never
  earlier, than the old leader would have.

Each loop here is a duty (awsomefsd/duty.py): an error in one step — a refused proposal after this
node's lease expired while it was paused, no leader, a broken stream — is logged once per kind,
counted and retried; it never ends the daemon.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from awsomefsd.cluster.voters import CAUGHT_UP_ENTRIES, MembershipView, next_changes, successors
from awsomefsd.duty import DutyBook, run_duty
from awsomefsd.fs.allocator import NodeAllocator
from awsomefsd.io.fence import WriteFence
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError, certainly_not_applied
from awsomefsd.meta.levels import LOG_LEVEL
from awsomefsd.meta.raft import ConfChangeType
from awsomefsd.meta.replication.fs_log import ReplicatedFsLog

log = logging.getLogger(__name__)
MAX_CLAIM_AT_ONCE = 16
GIFT_WAIT_S = 3.0
"""How long a writer whose claim found every group owned waits for the owners' spare groups."""
GIFT_MORE_S = 0.2
"""After a first transfer, how long it waits for more (several owners may give)."""
HOLD_S = 1.0
"""Groups a node received are not given away again for this long: the writer that asked uses them
first (no ping-pong between two writers). Shorter than GIFT_WAIT_S: a third node's ask is answered
within its wait."""
ASK_RETRY_S = 0.2
"""How often an ask this node could not answer yet is looked at again (while its asker waits)."""
LEVEL_ASK_S = 2.0
"""How often the leader asks the members' builds for their log level while the cluster's is below
its own (a rolling upgrade under way)."""


@dataclass(frozen=True)
class LeaseSettings:
    lease_s: float = 10.0
    renew_s: float = 2.0
    margin_s: float = 2.0
    """The leader waits lease + margin before expiring a node; the node's fence closes `fence
    margin` (WriteFence.margin_s) before its lease ends."""

    def __post_init__(self) -> None:
        assert 0 < self.renew_s * 2 < self.lease_s, "at least two renewals per lease"
        assert self.margin_s > 0


class LeaseEpoch:
    """This node's liveness-lease epoch: every proposal is fenced with it, and write-lease and
    group requests carry it. Made before the metadata log, which fences with it; 0 (and no
    fencing) until `load` reads it from the member table, once this node holds the cluster's
    state. The lease renews it, and learns a new one when the cluster expired the old."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.value = 0
        self._renewed = trio.Event()

    def load(self, meta: MetaClient) -> None:
        """The epoch the member table holds for this node (0 before it is a member)."""
        record = meta.member(self.node_id)
        self.value = 0 if record is None else record.epoch

    def current(self) -> int:
        return self.value

    def fencing(self) -> int | None:
        """What the metadata log fences proposals with: None before the epoch is loaded (a
        joining node's first proposals, made before it is a member, are not fenced)."""
        return self.value or None

    def renewed(self) -> None:
        """A renewal was applied: wake the writers waiting for one."""
        self._renewed.set()
        self._renewed = trio.Event()

    async def wait_renewed(self) -> None:
        """Until the next renewal is applied (the write fence is open again after it)."""
        await self._renewed.wait()


class LivenessLease:
    """Renews this node's lease and keeps the device's write fence in step with it."""

    def __init__(self, node_id: int, log_: ReplicatedFsLog, meta: MetaClient, fence: WriteFence, epoch: LeaseEpoch,
                 settings: LeaseSettings, on_expired: Callable[[], None], book: DutyBook | None = None) -> None:
        self.node_id = node_id
        self.log = log_
        self.meta = meta
        self.fence = fence
        self.lease_epoch = epoch
        self.settings = settings
        self.on_expired = on_expired
        self.book = book or DutyBook(f"node {node_id}")
        self.renewals = 0
        self.refusals = 0
        self.first_renewal = trio.Event()

    @property
    def epoch(self) -> int:
        return self.lease_epoch.value

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew every `renew_s` whatever happens: a failed renewal is retried at the same cadence
        (no growing back-off: the lease runs out meanwhile)."""
        await run_duty("lease renewal", self._renew_once, book=self.book, period_s=self.settings.renew_s,
                       max_backoff_s=self.settings.renew_s, task_status=task_status)

    async def _renew_once(self) -> float:
        """One renewal; returns how long to wait before the next one."""
        sent = time.monotonic()
        if not self.epoch:
            self.lease_epoch.load(self.meta)
        ok: Any = False
        with trio.move_on_after(self.settings.renew_s):
            ok, result = await self.log.propose_outcome(cc.RenewLease(self.node_id, self.epoch), fenced=False)
            ok = ok and result is True
        if ok:
            self.fence.renewed(sent + self.settings.lease_s)
            self.renewals += 1
            self.first_renewal.set()
            self.lease_epoch.renewed()
        elif self.epoch and self._maybe_expired():
            return 0.0  # renew at once under the new epoch: until then every write of ours fails
        return sent + self.settings.renew_s - time.monotonic()

    def _maybe_expired(self) -> bool:
        """A refused renewal: the leader expired us (or we were removed). Our groups and write
        leases are gone; start again with the current epoch. True when a new epoch was learned."""
        record = self.meta.member(self.node_id)
        if record is None or record.epoch == self.epoch:
            return False
        self.refusals += 1
        log.warning("node %d's lease epoch %d expired (now %d): groups and write leases were taken back; "
                    "rejoining under the new epoch", self.node_id, self.epoch, record.epoch)
        self.lease_epoch.value = record.epoch
        self.on_expired()
        return True


class GroupKeeper:
    """Claims allocation groups for this node when its free space runs low (ClaimGroups through the
    log); applies grants and expiries to the node's allocator as they are applied; and gives groups
    it can spare to a node that needs space when no group is left unowned.

    Space must follow demand while its owner lives: a node that wrote and deleted most of the
    device holds groups that are nearly all free, and another node's writes would fail with ENOSPC
    while `df` shows the space (until the owner's lease expired). So a claim that comes back empty
    (every group is owned) is an ask: every other member sees it applied (`observe`) and gives the
    asker groups it can spare (`_give`: a transfer, `GrantGroups` fenced with the giver's epoch, so
    a giver the cluster expired meanwhile gives nothing), and the asking writer waits a moment for
    them (`claim_now`). A group is spare when it has free blocks and none of this node's
    reservations is in flight there (the allocator's view of the group equals the replicated free
    map's: nothing reserved waits for its commit, which the state machine would refuse once the
    group is another node's), most free first, keeping what this node's own buffered writes need
    (`keep_blocks`). It leaves the allocator before the transfer is proposed, so nothing allocates
    there meanwhile. Groups received are not given away again for `HOLD_S` (no ping-pong between
    two writers)."""

    def __init__(self, node_id: int, meta: MetaClient, allocator: NodeAllocator,
                 epoch: Callable[[], int], low_blocks: int, book: DutyBook | None = None,
                 keep_blocks: Callable[[], int] = lambda: 0) -> None:
        self.node_id = node_id
        self.meta = meta
        self.allocator = allocator
        self.epoch = epoch
        self.low_blocks = low_blocks
        self.keep_blocks = keep_blocks
        """Blocks this node must keep free for itself when it gives groups (its buffered writes)."""
        self.book = book or DutyBook(f"node {node_id}")
        self.claims = 0
        self.given = 0
        self.received = 0
        self._asks: dict[int, tuple[int, float]] = {}
        """Blocks each node asked for (its claim found no unowned group), not yet answered here, and
        until when it waits for them (trio clock)."""
        self._held_until: dict[int, float] = {}
        self._gift = trio.Event()
        self._wake = trio.Event()

    def observe(self, command: object, result: Any, _mine: bool) -> None:
        if isinstance(command, cc.ClaimGroups) and isinstance(result, tuple):
            if command.node == self.node_id:
                self._grant(result)
            elif not result:  # every group is owned: that node asks the owners for spare ones
                want = max(command.count * self.allocator.layout.ag_blocks, self._asks.get(command.node, (0, 0.0))[0])
                self._asks[command.node] = want, trio.current_time() + GIFT_WAIT_S
                self._wake.set()
        elif isinstance(command, c.GrantGroups) and command.node == self.node_id and not isinstance(result, FsError):
            self._grant(command.groups)
            until = trio.current_time() + HOLD_S
            self._held_until.update((group, until) for group in command.groups)
            self.received += len(command.groups)
            self._gift.set()
            self._gift = trio.Event()
        elif isinstance(command, cc.ExpireNode) and command.node == self.node_id and isinstance(result, list):
            for group in result:
                self.allocator.revoke(group)
            self._wake.set()

    def _grant(self, groups: tuple[int, ...]) -> None:
        free = self.meta.free_space()
        for group in groups:
            if group not in self.allocator.owned_ags:
                self.allocator.grant(group, free.extents_within(*self.allocator.layout.ag_range(group)))

    def reload(self) -> None:
        owned = set(self.meta.groups_of(self.node_id))
        for group in self.allocator.owned_ags - owned:
            self.allocator.revoke(group)
        self._grant(tuple(sorted(owned - self.allocator.owned_ags)))

    def poke(self) -> None:
        self._wake.set()

    async def claim_now(self, need_blocks: int) -> bool:
        """A writer needs more space than this node's groups hold: claim enough groups for it. When
        every group is owned, the claim is an ask (see the class docstring): wait up to
        `GIFT_WAIT_S` for the owners' spare groups, unless the file system itself lacks the space."""
        size = self.allocator.layout.ag_blocks
        count = min(max(-(-(need_blocks - self.allocator.free_blocks) // size), 1) + 1, MAX_CLAIM_AT_ONCE)
        gift = self._gift  # taken before the claim: only a transfer that answers it can set it
        try:
            granted = await self.meta.propose(cc.ClaimGroups(self.node_id, self.epoch(), count))
        except FsError as exc:
            log.warning("claiming %d allocation groups failed: %s", count, exc)
            return False
        self.claims += 1
        if granted:
            return True
        if self.meta.free_blocks() - self.allocator.free_blocks < need_blocks:
            return False  # not free elsewhere (maybe not yet: frees wait out their grace period)
        got = False
        with trio.move_on_after(GIFT_WAIT_S):
            await gift.wait()
            got = True
            while self.allocator.free_blocks < need_blocks:  # other owners may give too
                more = self._gift
                with trio.move_on_after(GIFT_MORE_S):
                    await more.wait()
                if not more.is_set():
                    break
        return got

    async def _give(self) -> None:
        """Answer the asks seen so far: spare groups to each asker (class docstring). An ask this
        node cannot answer yet (a reservation in flight, groups it received a moment ago) is kept
        until its asker stops waiting."""
        asks, self._asks = self._asks, {}
        now = trio.current_time()
        for asker, (want, until) in asks.items():
            member = self.meta.member(asker)
            if member is None or not member.active or member.expired:
                continue  # gone or expired: what it received would stay stranded with it
            groups = self._spare(want)
            if not groups:
                if now < until:
                    self._asks.setdefault(asker, (want, until))
                continue
            for group in groups:
                self.allocator.revoke(group)  # nothing allocates there from now on
            try:
                await self.meta.propose(c.GrantGroups(asker, groups))
            except FsError as exc:
                if certainly_not_applied(exc):
                    self._grant(tuple(g for g in groups if g in self.meta.groups_of(self.node_id)))
                log.warning("giving allocation groups %s to node %d failed: %s", list(groups), asker, exc)
                continue
            self.given += len(groups)
            log.info("gave allocation groups %s to node %d (every group was owned and it needed space)",
                     list(groups), asker)

    def _spare(self, want_blocks: int) -> tuple[int, ...]:
        """Groups this node can give, most free first, up to `want_blocks` of free space, keeping
        `keep_blocks` for itself: only groups whose free space the allocator and the replicated
        map agree on (no reservation of ours is in flight there) and not received lately."""
        layout, free = self.allocator.layout, self.meta.free_space()
        now = trio.current_time()
        candidates = []
        for group in self.allocator.owned_ags:
            mine = self.allocator.free_blocks_in(group)
            if not mine or self._held_until.get(group, 0.0) > now:
                continue
            if sum(count for _, count in free.extents_within(*layout.ag_range(group))) != mine:
                continue
            candidates.append((mine, group))
        left, given, spare = self.allocator.free_blocks, 0, []
        for mine, group in sorted(candidates, reverse=True):
            if given >= want_blocks:
                break
            if left - mine < self.keep_blocks():
                continue
            spare.append(group)
            left -= mine
            given += mine
        return tuple(sorted(spare))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await run_duty("allocation group claims", self._claim_step, book=self.book, period_s=0.0,
                       task_status=task_status)

    async def _claim_step(self) -> float:
        if self._asks:
            await self._give()
            if self._asks:
                return ASK_RETRY_S
        if self.allocator.free_blocks < self.low_blocks:
            if len(self.meta.group_owners()) >= self.allocator.layout.ag_count:
                # Every group is owned: an empty claim would ask the others for theirs, which only
                # a writer that needs the space should do (claim_now); idle nodes would trade.
                with trio.move_on_after(5.0):
                    await self._wake.wait()
                self._wake = trio.Event()
                return 0.0
            granted = await self.meta.propose(cc.ClaimGroups(self.node_id, self.epoch(), 2))
            self.claims += 1
            if not granted:
                log.info("no unowned allocation group left to claim")
                return 5.0
            return 0.0
        with trio.move_on_after(1.0):
            await self._wake.wait()
        self._wake = trio.Event()
        return 0.0


class LeaderDuties:
    """While this node leads: keep the Raft configuration equal to the member table (add new
    members as learners, promote caught-up learners while voters are below target, remove removed
    members) and expire members whose liveness lease ran out."""

    def __init__(self, node_id: int, log_: ReplicatedFsLog, meta: MetaClient, settings: LeaseSettings,
                 tick_s: float = 0.25, book: DutyBook | None = None,
                 ask_level: Callable[[int], Awaitable[int]] | None = None) -> None:
        self.node_id = node_id
        self.ask_level = ask_level
        """`await ask_level(node)`: the newest commands that member's build decodes (Member.LogLevel)."""
        self.level_rounds = 0
        """Rounds in which this leader asked every member for its build's level (status shows them)."""
        self.log = log_
        self.meta = meta
        self.settings = settings
        self.tick_s = tick_s
        self.book = book or DutyBook(f"node {node_id}")
        self.last_renewal: dict[int, float] = {}
        self.leading_since: float | None = None
        self.expired = 0
        self.conf_changes = 0
        self.caught_up_at: dict[int, float] = {}
        """When each learner's log came within reach of this leader's (the promotion order)."""
        self.voters_seen: tuple[int, ...] = ()
        """The voters this leader last logged (a change of them is logged once)."""
        self.leader_seen = 0
        self.leader_changes = 0

    def observe(self, command: object, result: Any, _mine: bool) -> None:
        if isinstance(command, cc.RenewLease) and result is True:
            self.last_renewal[command.node] = time.monotonic()
        elif isinstance(command, cc.AddMember) and isinstance(result, int):
            self.last_renewal[result] = time.monotonic()  # a new member's clock starts at its admission

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            # apart: asking a member that does not answer takes seconds, and expiries must not wait
            nursery.start_soon(partial(run_duty, "log level", self.raise_log_level, book=self.book,
                                       period_s=LEVEL_ASK_S, max_backoff_s=LEVEL_ASK_S))
            await nursery.start(partial(run_duty, "leader duties", self._tick, book=self.book,
                                        period_s=self.tick_s, max_backoff_s=1.0))
            task_status.started()

    async def raise_log_level(self) -> None:
        """On the leader, while the cluster's log level is below this build's: ask every active
        member's build for its level and record the lowest (`SetLogLevel`) when that is higher.
        A member that does not answer keeps the level where it is (it may run an older build);
        so does one that answers lower. Builds before the gate answer UNIMPLEMENTED: the base."""
        if self.ask_level is None or not self.log.node.raw.is_leader:
            return
        current = self.meta.log_level()
        if current >= LOG_LEVEL:
            return
        lowest = LOG_LEVEL
        asked = tuple(sorted(n for n, member in self.meta.members().items() if member.active))
        for n in asked:
            if n == self.node_id:
                continue
            try:
                lowest = min(lowest, await self.ask_level(n))
            except ConnectionError as exc:
                log.debug("log level: node %d did not answer (%s)", n, exc)
                return
        self.level_rounds += 1
        if lowest > current:
            level = await self.log.propose(c.SetLogLevel(lowest, asked))
            if level == lowest:
                log.info("cluster log level %d -> %d: every member's build decodes its commands", current, level)

    async def _tick(self) -> None:
        self._note_leader()
        if not self.log.node.raw.is_leader:
            self.leading_since = None
            return
        now = time.monotonic()
        if self.leading_since is None:
            self.leading_since = now
            self.last_renewal = {}
        self._reconcile_membership()
        await self._expire_silent(now)
        await self._remove_replaced()

    def _note_leader(self) -> None:
        """Log a change of leader once (INFO, on every member): the first thing an operator looks
        for after a stall."""
        raw = self.log.node.raw
        leader = raw.leader_id
        if leader and leader != self.leader_seen:
            if self.leader_seen:
                self.leader_changes += 1
                log.info("node %d: node %d leads now (term %d; was node %d)", self.node_id, leader,
                         raw.raft.term, self.leader_seen)
            else:
                log.info("node %d: node %d leads (term %d)", self.node_id, leader, raw.raft.term)
            self.leader_seen = leader

    def _reconcile_membership(self) -> None:
        """One change towards the member table per tick (awsomefsd/cluster/voters.py decides which)."""
        node = self.log.node
        status = node.raw.status()
        conf = status.conf_state
        learners = frozenset(conf.learners)
        if conf.voters != self.voters_seen:
            log.info("node %d: voters are now %s (learners %s)", self.node_id, list(conf.voters), list(conf.learners))
            self.voters_seen = conf.voters
        now = time.monotonic()
        caught_up = {n for n in learners
                     if (progress := status.progress.get(n)) is not None
                     and progress.match + CAUGHT_UP_ENTRIES >= status.last_index}
        self.caught_up_at = {n: self.caught_up_at.get(n, now) for n in caught_up}
        info = self.meta.cluster_info()
        view = MembershipView(me=self.node_id, voters=frozenset(conf.voters), learners=learners,
                              members=self.meta.members(), target=3 if info is None else info.voters_target,
                              caught_up_s={n: now - since for n, since in self.caught_up_at.items()})
        changes = next_changes(view)
        for change in changes:
            if change.type == ConfChangeType.REMOVE_NODE and change.node_id in view.voters:
                log.info("node %d leaves the voters (%s)", change.node_id,
                         "removed" if not view.members[change.node_id].active else "joined again at its address")
        if changes:
            node.change_membership(*changes)
            self.conf_changes += 1

    async def _remove_replaced(self) -> None:
        """A node that lost its state directory joins again (one-token formation,
        awsomefsd/daemon/formation.py) at its old address: once the cluster has expired the
        member it was, that member is removed (its certificate revoked; its fence epoch stays
        expired; its vote went at once: cluster/voters.py). A node that comes back at another
        address leaves its old member expired, for `node remove`."""
        members = self.meta.members()
        for n, successor in sorted(successors(members).items()):
            record = members[n]
            if record.active and record.expired:
                log.info("node %d (%s) joined again as node %d at %s: removing its old member", n, record.name,
                         successor, record.address)
                await self.log.propose_outcome(cc.RemoveMember(n, time.time_ns()), fenced=False, leader_only=True)

    async def _expire_silent(self, now: float) -> None:
        assert self.leading_since is not None
        deadline = self.settings.lease_s + self.settings.margin_s
        members = self.meta.members()
        for n, record in members.items():
            if n == self.node_id or record.expired:
                continue
            seen = max(self.last_renewal.get(n, self.leading_since), self.leading_since)
            if not record.active and not self.meta.groups_of(n) and not self.meta.leases_of(n):
                continue
            if now - seen > deadline:
                log.warning("node %d has not renewed its lease for %.1fs: expiring it (its groups and "
                            "write leases go back to the cluster)", n, now - seen)
                await self.log.propose_outcome(cc.ExpireNode(n, time.time_ns()), fenced=False, leader_only=True)
                self.expired += 1
