"""The node driver: a trio loop around one RawNode, its storage and a transport.

What it does for each Ready, in order (the durability order docs/raft.md argues for):
  1. install a received snapshot, if any (the state-machine environment is replaced whole);
  2. in ONE write transaction of the storage: append the entries, write the hard state, apply
     the committed entries and record the last applied index; commit with fsync (group commit:
     one fsync per Ready on every member);
  3. only then send the messages (votes and append acknowledgements promise durable state) and
     resolve the proposals and reads that the applied entries answer;
  4. advance().
Two relaxations, argued in docs/raft.md: a leader's appends and heartbeats leave before step 2
(its fsync overlaps the followers'), and committed entries this node persisted in an earlier
Ready are answered from inside step 2's transaction, before its fsync. A Ready that only applies
may run behind the loop (leader) or wait for the next Ready's transaction (follower): apply.py.
A Ready with nothing to write skips the transaction.
Because step 2 is one transaction, a crash leaves either the whole Ready or none of it; on restart
the core hands out committed entries after the recorded applied index again, and applying skips
anything at or below it, so replay is idempotent.

The jobs around the loop each have a module: proposals (ids, batches, answers, de-duplication),
forwarding (a follower's proposals), reads (ReadIndex), apply (the apply contract, pipelined and
deferred applies), snapshots.

Threads: with `persist_in_thread` a leader's write transaction (and its fsync) runs in a worker
thread so the loop keeps accepting messages and proposals meanwhile (they form the next batch); a
follower persists on its loop (nothing it serves waits, and the hops would lengthen the round).
Only the driver loop touches the RawNode and the storage; other tasks only append to queues.

Everything outside the loop is injected, so the simulator runs this very code
(tests/raft/driver_sim.py): the storage (`ReplicaStorage`), how its blocking calls run
(`DiskCalls`), the transport (`send`, `deliver`, the `report_*` calls, `forward`), randomness
(`seed`) and time (trio's clock; the simulator's is virtual).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Generic

import trio

from awsomefsd.meta.raft import (
    ConfChange,
    Config,
    ConfState,
    EntryType,
    HardState,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    ReadOnlyOption,
    Ready,
    SnapshotMeta,
    StateType,
)
from awsomefsd.meta.replication.apply import (
    MAX_DEFERRED_READIES,
    Deferred,
    DeferredApplies,
    ReadyApply,
    ReplicatedStateMachine,
    applies_only,
)
from awsomefsd.meta.replication.errors import NotLeader
from awsomefsd.meta.replication.forwarding import Forward, propose_via_leader
from awsomefsd.meta.replication.proposals import Proposal, Proposals
from awsomefsd.meta.replication.reads import ReadBarriers
from awsomefsd.meta.replication.settings import NodeSettings
from awsomefsd.meta.replication.snapshots import Snapshots
from awsomefsd.meta.replication.storage import DiskCalls, ReplicaStorage, ThreadedDiskCalls, TxnT

log = logging.getLogger(__name__)

MAX_INBOX_MESSAGES = 100_000
GATHER_S = 0.002
GATHER_QUIET_ROUNDS = 3
NOTHING_TO_GATHER = frozenset({MessageType.READ_INDEX, MessageType.READ_INDEX_RESP, MessageType.HEARTBEAT,
                               MessageType.HEARTBEAT_RESP})
"""Messages whose turn of the loop writes nothing (`_gather` lets such a turn go at once)."""
READ_POINT_WAIT_S = 1.0
"""The longest a follower waits for the leader's read point on the wire before it asks through
Raft: an idle leader answers in under a millisecond, and its answer is late only while its
connection back is redialled (an election timeout at most)."""


class RaftNode(Generic[TxnT]):
    """Drives one member; see the module docstring for the contract."""

    def __init__(
        self,
        node_id: int,
        storage: ReplicaStorage[TxnT],
        sm: ReplicatedStateMachine[TxnT],
        *,
        settings: NodeSettings | None = None,
        bootstrap_voters: tuple[int, ...] = (),
        seed: int | None = None,
        disk: DiskCalls | None = None,
        send: Callable[[list[Message]], None] | None = None,
        sent: Callable[[], Awaitable[None]] | None = None,
        forward: Forward | None = None,
        before_persist: Callable[[Ready], None] | None = None,
        on_applied: Callable[[int], None] | None = None,
        on_member_added: Callable[[int, str], None] | None = None,
        lease_reads: Callable[[], bool] | None = None,
    ) -> None:
        """`send` queues messages for peers (the transport's; none: a group of one); `sent()`
        returns once they are written (RaftTransport.sent: a Ready's early messages leave before
        its fsync on the loop, not after);
        `forward` hands a follower's proposals to the leader (forwarding.py; none: a follower
        answers NotLeader); `before_persist` runs before a Ready is persisted (e.g. flush the
        device: data before the metadata that points at it); `on_applied(index)` after each
        applied batch; `on_member_added(node, address)` when a ConfChange adds a node;
        `lease_reads()` says once every member keeps the lease's promise (docs/raft.md), and the
        leader answers reads from its lease from then on (None: from the start)."""
        self.id = node_id
        self.settings = settings = settings or NodeSettings()
        self.sm = sm
        self.storage = storage
        self.disk = disk or ThreadedDiskCalls()
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
            read_only_option=ReadOnlyOption.LEASE_BASED,
        )
        self.raw = RawNode(config, self.storage)
        self._lease_reads_yet = lease_reads
        self.raw.raft.lease_reads_allowed = lease_reads is None
        self.send: Callable[[list[Message]], None] = send or self._no_peers
        self.sent = sent
        self.on_member_added: Callable[[int, str], None] = on_member_added or (lambda _id, _addr: None)
        self.before_persist = before_persist
        self.on_applied: Callable[[int], None] = on_applied or (lambda _index: None)
        self.forward = forward
        self.forward_retries = 0
        self.ask_read_point: Callable[[int, float], Awaitable[int]] | None = None
        """`await ask_read_point(leader, timeout_s)`: the leader's read point from its lease, asked
        on the wire (the daemon sets it: cluster/rpc.py); ConnectionError when it gave none."""
        self.lease_reads = 0  # read barriers a leader answered from its lease, without the loop
        self.batch_sizes: list[int] = []  # entries per Ready, drained by metrics
        self._wake = trio.Event()
        self._tick_s = settings.tick_ms / 1000
        self._next_tick = -math.inf
        """When the next tick is due (trio's clock); -inf until `run` starts the ticks."""
        nonce = self._rng.getrandbits(63) or 1
        self.proposals = Proposals(node_id, nonce, self._poke)
        self.reads = ReadBarriers(nonce, self._poke)
        self.snapshots = Snapshots(storage, sm, settings, self.disk)
        self._inbox: list[Message] = []
        self._reports: list[tuple[str, int, bool]] = []
        self._conf_changes: list[tuple[ConfChange, ...]] = []
        self.applied = self.storage.applied_index()
        self.readies = 0
        self.dropped_messages = 0
        self.pipelined_applies = 0
        self._nursery: trio.Nursery | None = None
        self._apply_done: trio.Event | None = None  # set when the apply-only Ready in flight is done
        self._deferred: DeferredApplies[TxnT] = DeferredApplies()  # a follower's apply-only Readys

    def _bootstrap(self, voters: tuple[int, ...]) -> None:
        """A brand-new group: every founding member starts from the same snapshot at index 1."""
        meta = SnapshotMeta(1, 1, ConfState(tuple(sorted(voters))))
        self.storage.save(HardState(1, 0, 1), [], meta, also=partial(self.storage.write_applied, index=1))

    @staticmethod
    def _no_peers(messages: list[Message]) -> None:
        assert not messages, f"a one-member group sent {messages[0].type.name} to node {messages[0].to}"

    def _poke(self) -> None:
        self._wake.set()

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
        """For the transport (worker thread): a copy of the state for a peer's snapshot."""
        return self.storage.snapshot_chunks()

    async def propose(self, command: bytes, *, timeout_s: float | None = None, forward: bool = True,
                      forward_timeout_s: float | None = None) -> Any:
        """Order, commit and apply `command`; the state machine's result (proposals.py says how
        it can fail). A follower forwards it to the leader when it can (forwarding.py), unless
        `forward` is False: a leader's own decision, taken from what it saw while it led, must
        not be carried out by a later leader that saw more (it raises NotLeader instead).
        `forward_timeout_s` bounds a forwarded proposal (default: `timeout_s`): sending it again
        is safe, so its caller may let it outlast an election (ReplicatedFsLog: its stall budget)."""
        if not self.raw.is_leader:
            if forward and self.forward is not None and self.raw.leader_id not in (0, self.id):
                return await propose_via_leader(self, self.forward, command,
                                                forward_timeout_s or timeout_s or self.settings.proposal_timeout_s)
            raise NotLeader(self.raw.leader_id)
        return await self.submit(Proposal(self.proposals.next_id(), command), timeout_s)

    async def submit(self, p: Proposal, timeout_s: float | None = None) -> Any:
        """Queue a proposal whose id is already set, for the loop to hand to the core."""
        return await self.proposals.submit(p, timeout_s or self.settings.proposal_timeout_s)

    def change_membership(self, *changes: ConfChange) -> None:
        """Leader only: queue one membership change (several: voters added to a lone leader at
        once) for the loop to append. The core refuses it (silently, here) while another is
        uncommitted; the caller watches the configuration and asks again, which is how the
        cluster's reconciler works anyway."""
        self._conf_changes.append(changes)
        self._wake.set()

    async def read_barrier(self, *, timeout_s: float | None = None) -> int:
        """Linearizable read point (reads.py): returns the applied index once it covers the read
        index. A leader whose lease holds knows the read index without the loop: its commit
        index, if no tick is overdue (the lease is counted in ticks, and the loop may be stuck in
        a long fsync or the process was paused: then the loop counts the missed ticks first). A
        follower asks the leader for that same read point on the wire (`ask_read_point`, design
        note 153), which its wire reader answers without a turn of either loop; only when it
        gives none (no lease now, not the leader, no wire) does the read go through Raft's
        ReadIndex."""
        timeout_s = timeout_s or self.settings.read_timeout_s
        start = trio.current_time()
        index = self.lease_read_point()
        if index is not None:
            self.lease_reads += 1
        else:
            index = await self._leader_read_point(timeout_s)
        if index is not None:
            await self.reads.applied_past(index, self.applied, timeout_s, lambda: self.raw.leader_id)
            return self.applied
        remaining = max(timeout_s - (trio.current_time() - start), self._tick_s)
        await self.reads.barrier(remaining, lambda: self.raw.leader_id)
        return self.applied

    def lease_read_point(self) -> int | None:
        """This node's read index from its leader's lease, unless a tick is overdue (then None);
        None on a follower. Also what the transport answers a follower that asks on the wire."""
        if trio.current_time() >= self._next_tick:
            return None
        return self.raw.lease_read_index()

    async def _leader_read_point(self, timeout_s: float) -> int | None:
        """A follower's read point from the leader's lease, asked on the wire (at most half the
        read's time, and READ_POINT_WAIT_S: the rest is left to Raft's ReadIndex); None when
        there is no one to ask or the leader gave none."""
        leader = self.raw.leader_id
        if self.ask_read_point is None or leader in (0, self.id):
            return None
        try:
            return await self.ask_read_point(leader, min(timeout_s / 2, READ_POINT_WAIT_S))
        except ConnectionError as exc:
            log.debug("read point from node %d: %s", leader, exc)
            return None

    def campaign(self) -> None:
        """Start an election now (bootstrap of a one-member group, tests)."""
        self.raw.campaign()
        self._wake.set()

    # --- the loop ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._next_tick = trio.current_time() + self._tick_s
        task_status.started()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._loop()

    async def _loop(self) -> None:
        while True:
            with trio.move_on_at(min(self._next_tick, self._deferred.until)):
                await self._wake.wait()
            self._wake = trio.Event()
            await self._gather()
            self._feed()
            while self.raw.has_ready():
                await self._handle_ready()
                await self._gather()
                self._feed()
            if self._deferred and trio.current_time() >= self._deferred.until:
                await self._flush_deferred()
                await self._maybe_snapshot()

    async def _gather(self) -> None:
        """With a blocking fsync, first let every task that can make progress now (requests just
        read, proposers just resumed) queue its command, so they share the next fsync.

        The loop yields to the scheduler until GATHER_QUIET_ROUNDS rounds in a row found no other
        task runnable and brought no new input (trio runs every task that is runnable, and polls
        I/O, between two of our turns), or GATHER_S passed. A heuristic for throughput only:
        whatever comes later goes into the next batch. Not for a turn with nothing to share an
        fsync: no proposal queued, and only reads and heartbeats in the inbox. A follower's read
        barrier crosses the loop three times (its ReadIndex, the leader's answer, the answer
        here), and gathering at each cost a tenth of its round trip (opendirs that catch up:
        609-661 against 526-659 us, design note 151)."""
        if self.settings.persist_in_thread:
            return
        if not self.proposals.queued and all(m.type in NOTHING_TO_GATHER for m in self._inbox):
            return
        deadline = trio.current_time() + GATHER_S
        quiet = 0
        arrived = self._arrivals()
        while quiet < GATHER_QUIET_ROUNDS and trio.current_time() < deadline:
            await trio.lowlevel.checkpoint()
            now_arrived = self._arrivals()
            busy = trio.lowlevel.current_statistics().tasks_runnable > 0 or now_arrived != arrived
            quiet = 0 if busy else quiet + 1
            arrived = now_arrived

    def _arrivals(self) -> tuple[int, int, int]:
        return len(self.proposals.queued), self.reads.queued, len(self._inbox)

    def _feed(self) -> None:
        reports, self._reports = self._reports, []
        for kind, peer, ok in reports:
            if kind == "unreachable":
                self.raw.report_unreachable(peer)
            else:
                self.raw.report_snapshot(peer, ok)
        inbox, self._inbox = self._inbox, []
        for m in inbox:
            if m.type != MessageType.READ_INDEX:
                self.raw.step(m)
        self._tick_to_now()
        changes, self._conf_changes = self._conf_changes, []
        for change in changes[:1]:
            try:
                self.raw.propose_conf_change(*change)
            except ProposalDropped as exc:
                log.debug("membership change %s refused: %s", change, exc)
        self.proposals.hand_to(self.raw, self.settings.max_batch)
        for m in inbox:  # followers' reads, and ours: answered from the lease as measured now
            if m.type == MessageType.READ_INDEX:
                self.raw.step(m)
        self.reads.hand_to(self.raw)

    def _tick_to_now(self) -> None:
        """Count every tick due by now. After a stall (a paused process, a long fsync) the
        messages that arrived meanwhile are stepped first (heartbeat answers keep a leader's
        quorum alive), then the ticks: they must never run slower than real time, or a leader's
        lease would outlast the followers' promises (docs/raft.md). So reads, local or a
        follower's, are handed to the core only after this. Beyond two election timeouts more
        ticks change nothing, so that bounds the work."""
        assert self._next_tick > -math.inf, "ticks are counted once the loop runs"
        now = trio.current_time()
        due = 0
        while now >= self._next_tick:
            due += 1
            self._next_tick += self._tick_s
        for _ in range(min(due, 2 * self.settings.election_ticks)):
            self.raw.tick()
        if due and not self.raw.raft.lease_reads_allowed:
            assert self._lease_reads_yet is not None
            self.raw.raft.lease_reads_allowed = self._lease_reads_yet()  # once on, on for good

    async def _wait_applies(self) -> None:
        """Wait for the apply-only Ready in flight, if any: write transactions stay in Ready order."""
        if self._apply_done is not None:
            await self._apply_done.wait()
            self._apply_done = None

    async def _handle_ready(self) -> None:
        rd = self.raw.ready()
        self.readies += 1
        if rd.snapshot is not None:
            await self._flush_deferred()
            self.applied = await self.snapshots.install(rd.snapshot, rd.hard_state or self.storage.hard_state)
            self.proposals.answer_covered(self.applied, self.storage.applied_at)
        work = ReadyApply(rd, self.storage, self.sm)
        durable_last = self.storage.last_index()
        if (self.settings.persist_in_thread and self.raw.is_leader and rd.committed_entries
                and rd.committed_entries[0].index <= durable_last):
            # Committed entries this node persisted in an earlier Ready are durable in the logs
            # of a quorum, us included. Their effects need not be durable before answering
            # (replay from the log recreates them), so their proposers learn the results now,
            # from inside the transaction, not after its fsync. Entries appended by this very
            # Ready (a one-member group commits them at once) wait for the fsync like everything
            # else. Without waiting for the loop to run it: the commit need not wait for a hop.
            token = trio.lowlevel.current_trio_token()
            work.answer_early = partial(token.run_sync_soon, self.proposals.resolve, rd.committed_entries,
                                        work.outcome, work.skipped, durable_last)
        # A leader's appends and heartbeats promise nothing about its own disk: they may leave
        # while it persists the same entries (its own acknowledgement counts only once this Ready
        # is done, because peers' answers are stepped after it). Everything else waits.
        early, late = _split_early(rd, self.storage.hard_state.term)
        self.send(early)
        if early and rd.entries and self.sent is not None:
            # The transport's senders are tasks: let them write the appends before the fsync
            # below, so the followers persist while we do. Only for appends: waiting also before
            # an apply's fsync (the commit notices) delayed the leader's own answers by ~1 ms.
            await self.sent()
        if (self.settings.persist_in_thread and self._nursery is not None
                and applies_only(rd, self.storage.hard_state, durable_last)):
            # Nothing in this Ready is new to the log. The rest of the order is unchanged: late
            # messages, answers and reads follow the fsync of the transaction that applies them.
            if not self.raw.is_leader and len(self._deferred) < MAX_DEFERRED_READIES:
                # A follower's applies answer nobody: they wait for its next append's transaction.
                self._deferred.add(work, late, trio.current_time())
                self.raw.advance(rd)
                return
            # On the leader its transaction runs behind the loop, which goes on to the next Ready
            # (whose appends leave at once; its own transaction waits for this one).
            await self._wait_applies()
            hard_state, also, deferred = self._deferred.take(rd.hard_state, work)
            self._apply_done = trio.Event()
            self.pipelined_applies += 1
            self.raw.advance(rd)
            self._nursery.start_soon(self._finish_apply, work, late, hard_state, also, deferred, self._apply_done)
            return
        await self._wait_applies()
        entries = rd.entries
        writes = rd.hard_state is not None or bool(entries) or bool(rd.committed_entries)
        # A Ready with nothing to write (messages only) skips the transaction and its thread hop;
        # deferred applies keep waiting for one that writes.
        hard_state, also, deferred = self._deferred.take(rd.hard_state, work) if writes else (None, None, [])
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
            await self.disk.in_thread(partial(self.storage.save, hard_state, entries, None, also=also))
        else:
            await self.disk.on_loop(partial(self.storage.save, hard_state, entries, None, also=also))
        self._settle_deferred(deferred)
        self._settle(work, late)
        if rd.committed_entries:
            self.on_applied(self.applied)
        for node_id, address in work.added:
            self.on_member_added(node_id, address)
        self.raw.advance(rd)
        self.reads.serve(self.applied)
        if rd.soft_state is not None and rd.soft_state.state != StateType.LEADER:
            self.proposals.fail_queued(self.raw.leader_id)
        await self._maybe_snapshot()

    def _settle(self, work: ReadyApply[TxnT], late: list[Message]) -> None:
        """What a Ready still owes once the transaction that applied it is durable: its late
        messages, the answers to its proposals, and its confirmed reads."""
        self.send(late)
        committed = work.rd.committed_entries
        if committed:
            self.applied = max(self.applied, committed[-1].index)
        self.proposals.resolve(committed, work.outcome, work.skipped)
        self.reads.confirmed(work.rd.read_states)

    def _settle_deferred(self, deferred: list[Deferred[TxnT]]) -> None:
        for d in deferred:
            self._settle(d.work, d.late)
        if deferred:
            self.on_applied(self.applied)

    async def _flush_deferred(self) -> None:
        """Apply the deferred Readys in a transaction of their own (nothing else came in time)."""
        await self._wait_applies()
        hard_state, also, deferred = self._deferred.take(None, None)
        if not deferred:
            return
        await self.disk.in_thread(partial(self.storage.save, hard_state, [], None, also=also))
        self._settle_deferred(deferred)
        self.reads.serve(self.applied)  # no snapshot here: this may run between ready() and advance()

    async def _finish_apply(self, work: ReadyApply[TxnT], late: list[Message], hard_state: HardState | None,
                            also: Callable[[TxnT], None] | None, deferred: list[Deferred[TxnT]],
                            done: trio.Event) -> None:
        """The rest of a leader's apply-only Ready, behind the loop (see _handle_ready)."""
        try:
            await self.disk.in_thread(partial(self.storage.save, hard_state, [], None, also=also))
            self._settle_deferred(deferred)
            self._settle(work, late)
            self.on_applied(self.applied)
            self.reads.serve(self.applied)  # snapshots are taken by the loop, never beside this transaction
        finally:
            done.set()
        self._wake.set()

    async def _maybe_snapshot(self) -> None:
        await self.snapshots.maybe_take(self.applied, self.raw.conf_state_at)

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
            "snapshots_installed": self.snapshots.installed,
            "snapshots_taken": self.snapshots.taken,
        }


_EARLY_TYPES = frozenset({MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP})


def _split_early(rd: Ready, durable_term: int) -> tuple[list[Message], list[Message]]:
    """Messages that may be sent before the Ready is persisted, and those that must wait. A new
    configuration waits: voters added to a lone leader at once are safe only if the leader holds
    them durably before any follower can use them (Raft._validate_conf_changes)."""
    if rd.hard_state is not None and rd.hard_state.term != durable_term:
        return [], rd.messages
    if any(e.type == EntryType.CONF_CHANGE for e in rd.entries):
        return [], rd.messages
    early = [m for m in rd.messages if m.type in _EARLY_TYPES]
    if not early:
        return [], rd.messages
    return early, [m for m in rd.messages if m.type not in _EARLY_TYPES]


__all__ = ["NodeSettings", "RaftNode"]
