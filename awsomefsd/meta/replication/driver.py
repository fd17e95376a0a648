"""The node driver: a trio loop around one RawNode, LMDB storage and a transport.

What it does for each Ready, in order (the durability order docs/raft.md argues for):
  1. install a received snapshot, if any (the state-machine environment is replaced whole);
  2. in ONE LMDB write transaction: append the entries, write the hard state, apply the committed
     entries and record the last applied index; commit with fsync (group commit: one fsync per
     Ready on every member);
  3. only then send the messages (votes and append acknowledgements promise durable state) and
     resolve the proposals and reads that the applied entries answer;
  4. advance().
Two relaxations, argued in docs/raft.md: a leader's appends and heartbeats leave before step 2
(its fsync overlaps the followers'), and committed entries this node persisted in an earlier
Ready are answered from inside step 2's transaction, before its fsync.
Two reorderings for a Ready that only applies (no entries, no snapshot, no change of term, vote,
role or membership; its entries were made durable by earlier Readys): on the leader its
transaction runs behind the loop, so the next Ready's appends leave during that fsync (the next
transaction waits for it: transactions stay in Ready order); on a follower it is folded into the
next Ready's transaction (within DEFER_APPLY_S), one fsync per round instead of two. Either way its
late messages, answers and reads still wait for the fsync of the transaction that applied it, and
apply + applied index stay in one transaction. A Ready with nothing to write skips the transaction.
Because step 2 is one transaction, a crash leaves either the whole Ready or none of it; on restart
the core hands out committed entries after the recorded applied index again, and applying skips
anything at or below it, so replay is idempotent.

Proposals: `propose(command)` queues the command; the loop hands every queued command to the core
in one batch before asking for the next Ready, so concurrent proposers share appends and fsyncs.
Each command is prefixed with (boot nonce, sequence) so that the proposer recognises its own
entry when it is applied; if a different entry is applied at the index it was given, the proposal
was certainly lost (a new leader overwrote it) and `ProposalLost` says retrying is safe. A
follower with a `forward` hook sends the entry, header included, to the leader
(`propose_forwarded` there) and answers its caller from its own apply of that entry; without the
hook, or with no leader known, it raises `NotLeader` with the leader it knows of. A proposal not
applied within its timeout raises `ProposalTimeout`: its fate is unknown.

Reads: `read_barrier()` runs ReadIndex (confirmed by a heartbeat quorum, or the lease when
configured) and returns once the local state machine has applied the read point; any read
transaction opened after that sees every write acknowledged before the call.

Threads: with `persist_in_thread` a leader's write transaction (and its fsync) runs in a worker
thread so the loop keeps accepting messages and proposals meanwhile (they form the next batch); a
follower persists on its loop (nothing it serves waits, and the hops would lengthen the round). Only the
driver loop touches the RawNode and the storage; other tasks only append to queues.
"""

from __future__ import annotations

import logging
import math
import os
import random
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import lmdb
import trio
import trio.testing

from awsomefsd.meta.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    EntryType,
    HardState,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    Ready,
    SnapshotMeta,
    StateType,
)
from awsomefsd.meta.raft.codec import decode_conf_change
from awsomefsd.meta.replication.storage import (
    APPLIED_KEY,
    DEFAULT_CHUNK_BYTES,
    LmdbRaftStorage,
    adopt_snapshot_env,
    read_applied_index,
    snapshot_chunks,
)

log = logging.getLogger(__name__)

HEADER = struct.Struct("<QQ")  # boot nonce, sequence number of the proposing process
FORWARDED = 1 << 63
"""Sequence bit of entries a follower forwarded: they may arrive twice and are de-duplicated."""
DUPLICATE: Any = type("Duplicate", (), {"__repr__": lambda self: "DUPLICATE"})()
_U64 = struct.Struct("<Q")
MAX_QUEUED_PROPOSALS = 100_000
MAX_INBOX_MESSAGES = 100_000
GATHER_S = 0.002
DEFER_APPLY_S = 0.01
"""How long a follower may keep committed entries unapplied, waiting to apply them in the
transaction of its next append (one fsync instead of two per replication round)."""


class NotLeader(Exception):
    """This node cannot order commands; `leader_id` is the leader it knows of (0: none yet)."""

    def __init__(self, leader_id: int) -> None:
        super().__init__(f"not the leader (leader: {leader_id or 'unknown'})")
        self.leader_id = leader_id


class ProposalLost(Exception):
    """The command was certainly not applied (another entry took its place): retrying is safe."""


class ProposalTimeout(Exception):
    """The command was not applied in time; it may still be applied later."""


class ReplicatedStateMachine(Protocol):
    """The application side. Applying must be deterministic: same bytes, same effect everywhere."""

    def apply(self, txn: lmdb.Transaction[bytes], index: int, command: bytes) -> Any:
        """Apply one committed command inside the driver's write transaction; returns its result
        (handed to the proposer). Raising aborts the whole Ready: reserve it for bugs."""
        ...

    def install_snapshot(self, staged: Path) -> lmdb.Environment:
        """Replace the state machine's environment by the staged one; return the new one open."""
        ...


@dataclass
class _Proposal:
    pid: tuple[int, int]
    data: bytes
    done: trio.Event = field(default_factory=trio.Event)
    index: int = 0
    result: Any = None
    error: BaseException | None = None


@dataclass
class _Read:
    ctx: bytes
    done: trio.Event = field(default_factory=trio.Event)
    index: int = -1
    error: BaseException | None = None


@dataclass
class _Deferred:
    """A follower's apply-only Ready whose transaction waits for the next one (see DEFER_APPLY_S)."""

    rd: Ready
    apply: Callable[[lmdb.Transaction[bytes]], None]
    late: list[Message]
    outcome: list[tuple[int, Any, tuple[int, int] | None]]
    skipped: set[int]


@dataclass(frozen=True)
class NodeSettings:
    tick_ms: int = 50
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    proposal_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    snapshot_entries: int = 10_000
    """Take a snapshot (and compact the log) every this many applied entries."""
    catch_up_entries: int = 1_000
    """Entries kept behind a snapshot so a briefly lagging follower catches up from the log."""
    max_batch: int = 1024
    persist_in_thread: bool = True

    def __post_init__(self) -> None:
        assert 1 <= self.tick_ms <= 10_000
        assert 0 < self.heartbeat_ticks < self.election_ticks
        assert self.snapshot_entries > 0 and self.catch_up_entries >= 0
        assert 0 < self.max_batch <= 4096


class RaftNode:
    """Drives one member; see the module docstring for the contract."""

    def __init__(
        self,
        node_id: int,
        env: lmdb.Environment,
        sm: ReplicatedStateMachine,
        *,
        settings: NodeSettings = NodeSettings(),
        bootstrap_voters: tuple[int, ...] = (),
        seed: int | None = None,
    ) -> None:
        self.id = node_id
        self.settings = settings
        self.sm = sm
        self.storage = LmdbRaftStorage(env=env)
        self._rng = random.Random(seed)
        if self.storage.last_index() == 0 and bootstrap_voters:
            self._bootstrap(bootstrap_voters)
        hs, _ = self.storage.initial_state()
        applied = min(self.storage.applied_index(), hs.commit)
        config = Config(
            id=node_id,
            random_below=self._rng.randrange,
            election_tick=settings.election_ticks,
            heartbeat_tick=settings.heartbeat_ticks,
            applied=max(applied, self.storage.first_index() - 1),
            max_proposal_batch=settings.max_batch,
            check_quorum=True,
            pre_vote=True,
        )
        self.raw = RawNode(config, self.storage)
        self.send: Callable[[list[Message]], None] = self._no_peers
        self.on_member_added: Callable[[int, str], None] = lambda _id, _addr: None
        self.before_persist: Callable[[Ready], None] | None = None
        """Runs before a Ready is persisted (e.g. flush the device: data before the metadata)."""
        self.on_applied: Callable[[int], None] = lambda _index: None
        self.forward: Callable[[int, bytes], Awaitable[int]] | None = None
        """Set by a cluster member: hand an entry (header included) to the leader with this id; returns
        once the leader applied it (its index), raises NotLeader when that node does not lead."""
        self._forwarded: dict[tuple[int, int], _Proposal] = {}
        self.forward_retries = 0
        self.batch_sizes: list[int] = []  # entries per Ready, drained by metrics
        self._nonce = self._rng.getrandbits(63) or 1
        self._seq = 0
        self._inbox: list[Message] = []
        self._queued: list[_Proposal] = []
        self._by_index: dict[int, _Proposal] = {}
        self._read_queue: list[_Read] = []
        self._reads_by_ctx: dict[bytes, _Read] = {}
        self._waiting_reads: list[_Read] = []
        self._reports: list[tuple[str, int, bool]] = []
        self._conf_changes: list[ConfChange] = []
        self._wake = trio.Event()
        self.applied = self.storage.applied_index()
        self.snapshots_installed = 0
        self.snapshots_taken = 0
        self.readies = 0
        self.dropped_messages = 0
        self.pipelined_applies = 0
        self._nursery: trio.Nursery | None = None
        self._apply_done: trio.Event | None = None  # set when the apply-only Ready in flight is done
        self._deferred: list[_Deferred] = []  # a follower's apply-only Readys, not yet persisted
        self._deferred_until = math.inf

    def _bootstrap(self, voters: tuple[int, ...]) -> None:
        """A brand-new group: every founding member starts from the same snapshot at index 1."""
        meta = SnapshotMeta(1, 1, ConfState(tuple(sorted(voters))))

        def mark_applied(txn: lmdb.Transaction[bytes]) -> None:
            txn.put(APPLIED_KEY, _U64.pack(1), db=self.storage.meta_db)

        self.storage.save(HardState(1, 0, 1), [], meta, also=mark_applied)

    @staticmethod
    def _no_peers(messages: list[Message]) -> None:
        assert not messages, f"a one-member group sent {messages[0].type.name} to node {messages[0].to}"

    # --- inputs from other tasks (never block, never touch the core) ------------------------------
    def deliver(self, messages: list[Message]) -> None:
        """From the transport: queue peer messages for the loop."""
        room = MAX_INBOX_MESSAGES - len(self._inbox)
        if room < len(messages):
            self.dropped_messages += len(messages) - max(room, 0)
            messages = messages[: max(room, 0)]
        self._inbox.extend(messages)
        self._wake.set()

    def report_unreachable(self, peer_id: int) -> None:
        self._reports.append(("unreachable", peer_id, False))
        self._wake.set()

    def report_snapshot(self, peer_id: int, delivered: bool) -> None:
        self._reports.append(("snapshot", peer_id, delivered))
        self._wake.set()

    def snapshot_chunks(self) -> Iterator[bytes]:
        """For the transport (worker thread): a compacted copy of the shared environment."""
        return snapshot_chunks(self.storage.env, DEFAULT_CHUNK_BYTES)

    async def propose(self, command: bytes, *, timeout_s: float | None = None) -> Any:
        """Order, commit and apply `command`; the state machine's result. See the module docstring."""
        if not self.raw.is_leader:
            if self.forward is not None and self.raw.leader_id not in (0, self.id):
                return await self._propose_via_leader(command, timeout_s or self.settings.proposal_timeout_s)
            raise NotLeader(self.raw.leader_id)
        self._seq += 1
        return await self._propose_here(_Proposal((self._nonce, self._seq), command), timeout_s)

    async def propose_forwarded(self, entry: bytes, *, timeout_s: float | None = None) -> int:
        """On the leader, for a follower's `forward`: order an entry that already carries its
        proposer's header; returns its index once applied here (the follower reads its result
        from its own apply of the same entry)."""
        if not self.raw.is_leader:
            raise NotLeader(self.raw.leader_id)
        if len(entry) < HEADER.size:
            raise ValueError("a forwarded entry without its header")
        p = _Proposal(HEADER.unpack_from(entry), entry[HEADER.size :])
        await self._propose_here(p, timeout_s)
        return p.index

    async def _propose_via_leader(self, command: bytes, timeout_s: float) -> Any:
        """Follower side of forwarding: the leader appends our entry under our own header, and we
        answer from our own apply of it (`_resolve` matches the header), so the result needs no
        encoding and the caller's next read here already sees the effect.

        When a call fails we cannot always tell whether the leader appended the entry (it may have
        died mid-call), so the same entry (same id) is sent again, to whichever node leads next,
        until it is applied here or the timeout ends; the id makes a second copy a no-op
        (`LmdbRaftStorage.first_application`)."""
        assert self.forward is not None
        self._seq += 1
        p = _Proposal((self._nonce, self._seq | FORWARDED), command)
        entry = HEADER.pack(*p.pid) + command
        self._forwarded[p.pid] = p
        try:
            with trio.move_on_after(timeout_s):
                while not p.done.is_set():
                    leader = self.raw.leader_id
                    if leader == self.id:  # we lead now: append it here, under the same id
                        result = await self._propose_here(_Proposal(p.pid, command), timeout_s)
                        if result is DUPLICATE:  # an earlier copy was applied: its result is ours
                            await p.done.wait()
                            result = p.result
                        return result
                    if leader == 0:
                        await _wait_or(p.done, self.settings.tick_ms / 1000)
                        continue
                    try:
                        p.index = await self.forward(leader, entry)
                        await p.done.wait()
                    except NotLeader as exc:  # certainly not appended there; try where it points
                        self.forward_retries += 1
                        await _wait_or(p.done, 0.0 if exc.leader_id not in (0, leader) else 0.05)
                    except (ProposalLost, ProposalTimeout, OSError) as exc:
                        self.forward_retries += 1
                        log.debug("forwarding to node %d: %s; sending it again", leader, exc)
                        await _wait_or(p.done, 0.05)
        finally:
            self._forwarded.pop(p.pid, None)
        if not p.done.is_set():
            raise ProposalTimeout(f"forwarded entry {p.index or '?'} not applied here in time")
        if p.error is not None:
            raise p.error
        return p.result

    async def _propose_here(self, p: _Proposal, timeout_s: float | None) -> Any:
        if len(self._queued) >= MAX_QUEUED_PROPOSALS:
            raise NotLeader(self.id)  # overloaded: the caller backs off and retries
        self._queued.append(p)
        self._wake.set()
        with trio.move_on_after(timeout_s or self.settings.proposal_timeout_s):
            await p.done.wait()
        if not p.done.is_set():
            if p.index == 0 and p in self._queued:
                self._queued.remove(p)
                raise ProposalLost("never handed to the core")
            raise ProposalTimeout(f"entry {p.index} not applied in time")
        if p.error is not None:
            raise p.error
        return p.result

    def change_membership(self, cc: ConfChange) -> None:
        """Leader only: queue one membership change for the loop to append. The core refuses it
        (silently, here) while another is uncommitted; the caller watches the configuration and
        asks again, which is how the cluster's reconciler works anyway."""
        self._conf_changes.append(cc)
        self._wake.set()

    async def read_barrier(self, *, timeout_s: float | None = None) -> int:
        """Linearizable read point: returns the applied index once it covers the read index."""
        r = _Read(os.urandom(16))
        self._read_queue.append(r)
        self._wake.set()
        with trio.move_on_after(timeout_s or self.settings.read_timeout_s):
            await r.done.wait()
        self._reads_by_ctx.pop(r.ctx, None)
        if not r.done.is_set():
            raise NotLeader(self.raw.leader_id)
        if r.error is not None:
            raise r.error
        return self.applied

    # --- the loop ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        tick_s = self.settings.tick_ms / 1000
        next_tick = trio.current_time() + tick_s
        task_status.started()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._loop(next_tick, tick_s)

    async def _loop(self, next_tick: float, tick_s: float) -> None:
        while True:
            with trio.move_on_at(min(next_tick, self._deferred_until)):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            due = 0
            while now >= next_tick:
                due += 1
                next_tick += tick_s
            await self._gather()
            self._feed()
            # After a stall, step what arrived first (heartbeat answers keep a leader's quorum
            # alive), then count every missed tick: ticks must never run slower than real time,
            # or a leader's lease would outlast the followers' promises (docs/raft.md). Beyond
            # two election timeouts more ticks change nothing, so that bounds the work.
            for _ in range(min(due, 2 * self.settings.election_ticks)):
                self.raw.tick()
            while self.raw.has_ready():
                await self._handle_ready()
                await self._gather()
                self._feed()
            if self._deferred and trio.current_time() >= self._deferred_until:
                await self._flush_deferred()
                await self._maybe_snapshot()

    async def _gather(self) -> None:
        """With a blocking fsync, first let every task that can make progress now (requests just
        read, proposers just resumed) queue its command, so they share the next fsync. Bounded."""
        if self.settings.persist_in_thread:
            return
        with trio.move_on_after(GATHER_S):
            await trio.testing.wait_all_tasks_blocked()

    def campaign(self) -> None:
        """Start an election now (bootstrap of a one-member group, tests)."""
        self.raw.campaign()
        self._wake.set()

    def _feed(self) -> None:
        reports, self._reports = self._reports, []
        for kind, peer, ok in reports:
            if kind == "unreachable":
                self.raw.report_unreachable(peer)
            else:
                self.raw.report_snapshot(peer, ok)
        inbox, self._inbox = self._inbox, []
        for m in inbox:
            self.raw.step(m)
        changes, self._conf_changes = self._conf_changes, []
        for cc in changes[:1]:
            try:
                self.raw.propose_conf_change(cc)
            except ProposalDropped as exc:
                log.debug("membership change %s refused: %s", cc, exc)
        if self._queued:  # one batch per Ready: max_batch bounds what one fsync carries
            batch = self._queued[: self.settings.max_batch]
            del self._queued[: len(batch)]
            try:
                last = self.raw.propose_batch([HEADER.pack(*p.pid) + p.data for p in batch])
            except ProposalDropped as exc:
                leader = exc.leader_hint or self.raw.leader_id
                batch += self._queued  # whatever refused this batch refuses the rest too
                self._queued = []
                for p in batch:
                    p.error = NotLeader(leader if leader != self.id else 0)
                    p.done.set()
            else:
                for i, p in enumerate(batch):
                    p.index = last - len(batch) + 1 + i
                    self._by_index[p.index] = p
        reads, self._read_queue = self._read_queue, []
        for r in reads:
            self._reads_by_ctx[r.ctx] = r
            self.raw.read_index(r.ctx)

    async def _wait_applies(self) -> None:
        """Wait for the apply-only Ready in flight, if any: LMDB transactions stay in Ready order."""
        if self._apply_done is not None:
            await self._apply_done.wait()
            self._apply_done = None

    async def _handle_ready(self) -> None:
        rd = self.raw.ready()
        self.readies += 1
        if rd.snapshot is not None:
            await self._flush_deferred()
            await self._install_snapshot(rd)
        outcome: list[tuple[int, Any, tuple[int, int] | None]] = []
        added: list[tuple[int, str]] = []
        skipped: set[int] = set()

        def apply(txn: lmdb.Transaction[bytes]) -> None:
            applied = read_applied_index(txn, self.storage.meta_db)
            for e in rd.committed_entries:
                if e.index <= applied:
                    skipped.add(e.index)
                    continue
                assert e.index == applied + 1, f"apply {e.index} after {applied}: a committed entry is missing"
                applied = e.index
                if e.type == EntryType.CONF_CHANGE:
                    cc = decode_conf_change(e.data)
                    if cc.type != ConfChangeType.REMOVE_NODE and cc.context:
                        added.append((cc.node_id, cc.context.decode()))
                    continue
                if len(e.data) < HEADER.size:
                    continue  # the empty entry a new leader appends
                pid = HEADER.unpack_from(e.data)
                if pid[1] & FORWARDED and not self.storage.first_application(txn, e.data[: HEADER.size], e.index):
                    outcome.append((e.index, DUPLICATE, pid))  # a resent copy: applied once already
                    continue
                outcome.append((e.index, self.sm.apply(txn, e.index, e.data[HEADER.size :]), pid))
            if rd.committed_entries:
                txn.put(APPLIED_KEY, _U64.pack(applied), db=self.storage.meta_db)
            if resolve_early and rd.committed_entries and rd.committed_entries[0].index <= durable_last:
                # Committed entries this node persisted in an earlier Ready are durable in the logs
                # of a quorum, us included. Their effects need not be durable before answering
                # (replay from the log recreates them), so their proposers learn the results now,
                # not after this transaction's fsync. Entries appended by this very Ready (a
                # one-member group commits them at once) wait for the fsync like everything else.
                # Without waiting for the loop to run it: the commit need not wait for a thread hop.
                token.run_sync_soon(self._resolve, rd, outcome, skipped, durable_last)

        resolve_early = self.settings.persist_in_thread and self.raw.is_leader
        durable_last = self.storage.last_index()
        token = trio.lowlevel.current_trio_token()
        # A leader's appends and heartbeats promise nothing about its own disk: they may leave
        # while it persists the same entries (its own acknowledgement counts only once this Ready
        # is done, because peers' answers are stepped after it). Everything else waits.
        early, late = _split_early(rd, self.storage.hard_state.term)
        self.send(early)
        if self._apply_only(rd):
            # Nothing in this Ready is new to the log: it only applies entries that earlier Readys
            # made durable. The rest of the order is unchanged: late messages, answers and reads
            # follow the fsync of the transaction that applies them.
            if not self.raw.is_leader and len(self._deferred) < 64:
                # A follower's applies answer nobody: they wait (DEFER_APPLY_S at most) for the
                # transaction of the next append, so a round costs a follower one fsync, not two.
                if not self._deferred:
                    self._deferred_until = trio.current_time() + DEFER_APPLY_S
                self._deferred.append(_Deferred(rd, apply, late, outcome, skipped))
                self.raw.advance(rd)
                return
            # On the leader its transaction runs behind the loop, which goes on to the next Ready
            # (whose appends leave at once; its own transaction waits for this one).
            await self._wait_applies()
            hard_state, also, deferred = self._take_deferred(rd.hard_state, apply)
            self._apply_done = trio.Event()
            self.pipelined_applies += 1
            self.raw.advance(rd)
            assert self._nursery is not None
            self._nursery.start_soon(self._finish_apply, rd, hard_state, also, deferred, late, outcome, skipped,
                                     self._apply_done)
            return
        await self._wait_applies()
        entries = rd.entries
        writes = rd.hard_state is not None or bool(entries) or bool(rd.committed_entries)
        # A Ready with nothing to write (messages only) skips the transaction and its thread hop;
        # deferred applies keep waiting for one that writes.
        hard_state, also, deferred = self._take_deferred(rd.hard_state, apply) if writes else (None, None, [])
        if self.before_persist is not None:
            self.before_persist(rd)
        if entries:
            self.batch_sizes.append(len(entries))
            del self.batch_sizes[:-1024]
        if not writes:
            pass
        elif self.settings.persist_in_thread and self.raw.is_leader:
            # Only a leader has proposers and reads to serve meanwhile. A follower's loop only
            # waits for its leader's next messages (they queue in the transport), so it persists
            # here, two thread hops shorter on the round trip its acknowledgement is part of.
            await trio.to_thread.run_sync(partial(self.storage.save, hard_state, entries, None, also=also))
        else:
            self.storage.save(hard_state, entries, None, also=also)
        self._finish_deferred(deferred)
        self.send(late)
        if rd.committed_entries:
            self.applied = max(self.applied, rd.committed_entries[-1].index)
            self.on_applied(self.applied)
        self._resolve(rd, outcome, skipped)
        for node_id, address in added:
            self.on_member_added(node_id, address)
        for rs in rd.read_states:
            r = self._reads_by_ctx.pop(rs.request_ctx, None)
            if r is not None:
                r.index = rs.index
                self._waiting_reads.append(r)
        self.raw.advance(rd)
        self._serve_reads()
        if rd.soft_state is not None and rd.soft_state.state != StateType.LEADER:
            self._fail_queued()
        await self._maybe_snapshot()

    def _apply_only(self, rd: Ready) -> bool:
        """A Ready that appends nothing, changes no term, vote, role or membership, and applies
        entries already durable here: the one kind whose transaction may run behind the loop."""
        hs, durable = rd.hard_state, self.storage.hard_state
        return (
            self.settings.persist_in_thread
            and self._nursery is not None
            and bool(rd.committed_entries)
            and not rd.entries
            and rd.snapshot is None
            and rd.soft_state is None
            and (hs is None or (hs.term, hs.vote) == (durable.term, durable.vote))
            and rd.committed_entries[-1].index <= self.storage.last_index()
            and all(e.type != EntryType.CONF_CHANGE for e in rd.committed_entries)
        )

    def _take_deferred(
        self, hard_state: HardState | None, apply: Callable[[lmdb.Transaction[bytes]], None] | None
    ) -> tuple[HardState | None, Callable[[lmdb.Transaction[bytes]], None] | None, list[_Deferred]]:
        """Fold the deferred applies into the next transaction: they run first, in order, and the
        newest hard state is written (a deferred Ready's differs from the durable one only in its
        commit index)."""
        deferred, self._deferred = self._deferred, []
        self._deferred_until = math.inf
        if not deferred:
            return hard_state, apply, []
        if hard_state is None:
            hard_state = next((d.rd.hard_state for d in reversed(deferred) if d.rd.hard_state is not None), None)

        def also(txn: lmdb.Transaction[bytes]) -> None:
            for d in deferred:
                d.apply(txn)
            if apply is not None:
                apply(txn)

        return hard_state, also, deferred

    def _finish_deferred(self, deferred: list[_Deferred]) -> None:
        """After the transaction that applied them: what the deferred Readys still owe."""
        for d in deferred:
            self.send(d.late)
            self.applied = max(self.applied, d.rd.committed_entries[-1].index)
            self._resolve(d.rd, d.outcome, d.skipped)
            for rs in d.rd.read_states:
                r = self._reads_by_ctx.pop(rs.request_ctx, None)
                if r is not None:
                    r.index = rs.index
                    self._waiting_reads.append(r)
        if deferred:
            self.on_applied(self.applied)

    async def _flush_deferred(self) -> None:
        """Apply the deferred Readys in a transaction of their own (nothing else came in time)."""
        await self._wait_applies()
        hard_state, also, deferred = self._take_deferred(None, None)
        if not deferred:
            return
        await trio.to_thread.run_sync(partial(self.storage.save, hard_state, [], None, also=also))
        self._finish_deferred(deferred)
        self._serve_reads()  # no snapshot here: this may run between ready() and advance()

    async def _finish_apply(self, rd: Ready, hard_state: HardState | None,
                            also: Callable[[lmdb.Transaction[bytes]], None] | None, deferred: list[_Deferred],
                            late: list[Message], outcome: list[tuple[int, Any, tuple[int, int] | None]],
                            skipped: set[int], done: trio.Event) -> None:
        """The rest of an apply-only Ready, behind the loop (see _handle_ready)."""
        try:
            await trio.to_thread.run_sync(partial(self.storage.save, hard_state, [], None, also=also))
            self._finish_deferred(deferred)
            self.send(late)
            self.applied = max(self.applied, rd.committed_entries[-1].index)
            self.on_applied(self.applied)
            self._resolve(rd, outcome, skipped)
            for rs in rd.read_states:
                r = self._reads_by_ctx.pop(rs.request_ctx, None)
                if r is not None:
                    r.index = rs.index
                    self._waiting_reads.append(r)
            self._serve_reads()  # snapshots are taken by the loop, never beside this transaction
        finally:
            done.set()
        self._wake.set()

    def _resolve(self, rd: Ready, outcome: list[tuple[int, Any, tuple[int, int] | None]], skipped: set[int],
                 up_to: int | None = None) -> None:
        """Answer the proposals at the applied indexes (those up to `up_to` only, if given)."""
        results = {index: (result, pid) for index, result, pid in outcome}
        if self._forwarded:
            for index, result, pid in outcome:
                if result is DUPLICATE:
                    continue
                fwd = self._forwarded.pop(pid, None) if pid is not None and (up_to is None or index <= up_to) else None
                if fwd is not None:
                    fwd.result = result
                    fwd.done.set()
        for e in rd.committed_entries:
            if up_to is not None and e.index > up_to:
                break
            p = self._by_index.pop(e.index, None)
            if p is None:
                continue
            got = results.get(e.index)
            if got is not None and got[1] == p.pid:
                p.result = got[0]
            elif e.index in skipped:
                # Applied earlier (an installed snapshot covered it): ours or not, we cannot tell.
                p.error = ProposalTimeout(f"entry {e.index} was applied before its result could be seen")
            else:
                p.error = ProposalLost(f"entry {e.index} holds another command")
            p.done.set()

    def _serve_reads(self) -> None:
        still = []
        for r in self._waiting_reads:
            if self.applied >= r.index:
                r.done.set()
            else:
                still.append(r)
        self._waiting_reads = still

    def _fail_queued(self) -> None:
        """Lost leadership: commands not yet handed to the core go back to their callers."""
        queued, self._queued = self._queued, []
        for p in queued:
            p.error = NotLeader(self.raw.leader_id)
            p.done.set()

    async def _install_snapshot(self, rd: Ready) -> None:
        snap = rd.snapshot
        assert snap is not None
        staged = Path(snap.data.decode())
        assert staged.is_dir(), f"snapshot at {snap.meta.index} without its staged copy"
        hs = rd.hard_state or self.storage.hard_state
        hs = HardState(hs.term, hs.vote, max(hs.commit, snap.meta.index))
        await trio.to_thread.run_sync(adopt_snapshot_env, staged, snap.meta, hs)
        env = self.sm.install_snapshot(staged)
        self.storage.reopen(env)
        self.applied = self.storage.applied_index()
        self.snapshots_installed += 1
        log.info("installed snapshot at %d (state machine at %d)", snap.meta.index, self.applied)

    async def _maybe_snapshot(self) -> None:
        s = self.settings
        snap_index = self.storage.first_index() - 1
        if self.applied - snap_index < s.snapshot_entries + s.catch_up_entries:
            return
        # An installed snapshot's environment may have applied past the snapshot's index, hence
        # past this log's end: a snapshot needs its index's entry (its term) in the log.
        index = min(self.applied - s.catch_up_entries, self.storage.last_index())
        if index <= snap_index:
            return
        conf = self.raw.conf_state_at(index)
        if s.persist_in_thread:
            await trio.to_thread.run_sync(self.storage.create_snapshot, index, conf)
        else:
            self.storage.create_snapshot(index, conf)
        self.snapshots_taken += 1

    # --- observation ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Term, leader, commit/applied index and, on the leader, each peer's match index."""
        st = self.raw.status()
        return {
            "id": self.id,
            "term": st.hard_state.term,
            "vote": st.hard_state.vote,
            "leader": st.soft_state.lead,
            "role": st.soft_state.state.name.lower(),
            "commit_index": st.hard_state.commit,
            "applied_index": self.applied,
            "last_index": st.last_index,
            "snapshot_index": self.storage.first_index() - 1,
            "voters": list(st.conf_state.voters),
            "learners": list(st.conf_state.learners),
            "match_index": {str(i): p.match for i, p in st.progress.items()},
            "snapshots_installed": self.snapshots_installed,
            "snapshots_taken": self.snapshots_taken,
        }


async def _wait_or(event: trio.Event, timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        await event.wait()


_EARLY_TYPES = frozenset({MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP})


def _split_early(rd: Ready, durable_term: int) -> tuple[list[Message], list[Message]]:
    """Messages that may be sent before the Ready is persisted, and those that must wait."""
    if rd.hard_state is not None and rd.hard_state.term != durable_term:
        return [], rd.messages
    early = [m for m in rd.messages if m.type in _EARLY_TYPES]
    if not early:
        return [], rd.messages
    return early, [m for m in rd.messages if m.type not in _EARLY_TYPES]


__all__ = [
    "NodeSettings",
    "NotLeader",
    "ProposalLost",
    "ProposalTimeout",
    "RaftNode",
    "ReplicatedStateMachine",
]
