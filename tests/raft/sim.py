"""Deterministic simulation of a Raft cluster: real cores, fake network, fake disks, fake clocks.

Everything random comes from one `random.Random(seed)`, so a seed replays exactly. Time is an integer
of abstract units; each node ticks on its own period (clock skew). The network loses, delays,
duplicates and reorders messages, and partitions (symmetric, asymmetric, isolating the leader).
Nodes crash and restart with their durable state (log, hard state, state machine) kept; a crash in
the middle of a Ready may tear the unsynced write (a prefix of its entries survives) or stop
half-way through applying. Membership changes, leadership transfers and snapshots happen in the
middle of all that. Clients run puts and gets against a key-value state machine and record their
history, which is checked for linearizability at the end.

After every event the invariants are checked (see `Invariants`); a violation raises SimFailure.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from dataclasses import dataclass
from typing import Any

from awsomefsd.meta.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    EntryType,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    ReadOnlyOption,
    Ready,
    Snapshot,
    SnapshotMeta,
)
from awsomefsd.meta.raft.codec import decode_conf_change
from awsomefsd.meta.raft.storage import MemoryStorage
from tests.support.linearizability import UNKNOWN, CheckBudgetExceeded, Operation, check_history

from .invariants import Invariants, SimFailure

ELECTION_TICK = 10
HEARTBEAT_TICK = 2
TICK_PERIOD = 10
MAX_SKEW = 0.1  # tick periods within +-10%: what the lease arithmetic allows (see docs/raft.md)
LEASE_TICKS = 7
KEYS = ("a", "b", "c")
MAX_NODE_IDS = 9
MAX_MEMBERS = 5
OP_TIMEOUT = 400


@dataclass
class Scenario:
    """Fault rates for one run; drawn from the seed so that every seed mixes faults differently."""

    duration: int
    n_initial: int
    p_drop: float
    p_dup: float
    max_delay: int
    p_long_delay: float
    fault_every: int
    crashes: bool
    partitions: bool
    membership: bool
    snapshot_every: int
    read_mode: ReadOnlyOption
    pre_vote: bool
    skew: float
    n_clients: int
    max_msg_bytes: int

    @staticmethod
    def draw(rng: random.Random, duration: int) -> Scenario:
        return Scenario(
            duration=duration,
            n_initial=rng.choice((1, 3, 3, 3, 5)),
            p_drop=rng.choice((0.0, 0.02, 0.1, 0.2)),
            p_dup=rng.choice((0.0, 0.02, 0.1)),
            max_delay=rng.choice((3, 10, 30)),
            p_long_delay=rng.choice((0.0, 0.01, 0.05)),
            fault_every=rng.choice((100, 250, 500)),
            crashes=rng.random() < 0.7,
            partitions=rng.random() < 0.7,
            membership=rng.random() < 0.6,
            snapshot_every=rng.choice((5, 20, 100)),
            read_mode=rng.choice((ReadOnlyOption.SAFE, ReadOnlyOption.LEASE_BASED)),
            pre_vote=rng.random() < 0.8,
            skew=rng.choice((0.0, MAX_SKEW / 2, MAX_SKEW)),
            n_clients=rng.choice((2, 3, 4)),
            max_msg_bytes=rng.choice((1, 200, 4096)),  # 1: one entry per append message
        )


class KV:
    """The replicated state machine. Durable: it survives crashes, like an LMDB environment would."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.applied = 0

    def apply(self, index: int, data: bytes) -> None:
        assert index == self.applied + 1, (
            f"apply {index} after {self.applied}: applied index must be contiguous"
        )
        if data:
            key, _, value = data.decode().partition("=")
            self.data[key] = value
        self.applied = index

    def snapshot_bytes(self) -> bytes:
        return json.dumps(self.data, sort_keys=True).encode()

    def restore(self, snap: Snapshot) -> None:
        assert snap.meta.index > self.applied, "a snapshot must move the state machine forward"
        self.data = json.loads(snap.data)
        self.applied = snap.meta.index


@dataclass
class PendingWrite:
    op_index: int
    index: int
    data: bytes


class SimNode:
    def __init__(self, node_id: int, storage: MemoryStorage, kv: KV, tick_period: int) -> None:
        self.id = node_id
        self.storage = storage
        self.kv = kv
        self.tick_period = tick_period
        self.raw: RawNode | None = None
        self.incarnation = 0
        self.stopped = False  # removed from the cluster and shut down for good
        self.pending_writes: dict[int, PendingWrite] = {}
        self.pending_reads: dict[bytes, int] = {}
        self.waiting_reads: list[tuple[int, int]] = []  # (read index, op index)


class Simulation:
    def __init__(self, seed: int, duration: int = 3000) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.sc = Scenario.draw(self.rng, duration)
        self.now = 0
        self.seq = 0
        self.events: list[tuple[int, int, str, object]] = []  # (time, sequence, kind, payload)
        self.nodes: dict[int, SimNode] = {}
        self.next_id = 1
        self.blocked: set[tuple[int, int]] = set()
        self.inv = Invariants()
        # One record per operation: [client, op, key, input, output, return time, status, call time]
        self.history: list[list] = []
        self.client_busy: dict[int, bool] = {}
        self.client_hint: dict[int, int] = {}  # each client's own idea of the leader: may be stale
        self.faults = True
        self.removed: set[int] = set()
        self.steps = 0
        voters = tuple(range(1, self.sc.n_initial + 1))
        for _ in voters:
            self._start_new_node(bootstrap=ConfState(voters))
        for c in range(self.sc.n_clients):
            self.client_busy[c] = False
            self._schedule(self.rng.randrange(50, 200), "client", c)
        self._schedule(self.sc.fault_every, "fault", None)

    # --- scheduling -------------------------------------------------------------------------------
    def _schedule(self, delay: int, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (self.now + delay, self.seq, kind, payload))

    def _stamp(self) -> int:
        """A strictly increasing timestamp for histories: no two events share one."""
        self.steps += 1
        return self.steps

    # --- nodes ------------------------------------------------------------------------------------
    def _start_new_node(self, bootstrap: ConfState | None) -> SimNode:
        node_id = self.next_id
        self.next_id += 1
        assert node_id <= MAX_NODE_IDS
        storage, kv = MemoryStorage(), KV()
        if bootstrap is not None:
            snap = Snapshot(SnapshotMeta(1, 1, bootstrap), kv.snapshot_bytes())
            storage.apply_snapshot(snap)
            kv.restore(snap)
        skew = self.sc.skew
        period = max(1, round(TICK_PERIOD * (1 + self.rng.uniform(-skew, skew))))
        node = SimNode(node_id, storage, kv, period)
        self.nodes[node_id] = node
        self._boot(node)
        return node

    def _boot(self, node: SimNode) -> None:
        snap = node.storage.snapshot()
        if snap.meta.index > node.kv.applied:
            node.kv.restore(snap)  # the snapshot was persisted but the crash came before applying it
        rng = random.Random(self.rng.getrandbits(32))
        cfg = Config(
            id=node.id,
            random_below=rng.randrange,
            election_tick=ELECTION_TICK,
            heartbeat_tick=HEARTBEAT_TICK,
            applied=node.kv.applied,
            max_size_per_msg_bytes=self.sc.max_msg_bytes,
            max_inflight_msgs=self.rng.choice((1, 4, 64)),
            check_quorum=True,
            pre_vote=self.sc.pre_vote,
            read_only_option=self.sc.read_mode,
            lease_ticks=LEASE_TICKS,
        )
        node.raw = RawNode(cfg, node.storage)
        node.incarnation += 1
        self._schedule(self.rng.randrange(1, node.tick_period + 1), "tick", (node.id, node.incarnation))
        self.inv.on_boot(node)

    def _crash(self, node: SimNode) -> None:
        raw = node.raw
        assert raw is not None
        mode = self.rng.random()
        if raw.has_ready() and mode < 0.5:
            rd = raw.ready()
            if mode < 0.25:
                # Torn write: a prefix of the entries reached the disk, nothing else did.
                if rd.snapshot is None and rd.entries:
                    prefix = rd.entries[: self.rng.randrange(len(rd.entries) + 1)]
                    node.storage.append(prefix)
                    self.inv.on_persist(node, prefix)
            else:
                # Crash half-way through applying: persisted and sent, a prefix applied.
                self._persist(node, rd)
                self._send_all(node, rd)
                cut = self.rng.randrange(len(rd.committed_entries) + 1)
                self._apply(node, rd, limit=cut)
        for pw in node.pending_writes.values():
            self.history[pw.op_index][5] = math.inf  # outcome unknown to the client
            self.history[pw.op_index][4] = UNKNOWN
            self.client_busy[self.history[pw.op_index][0]] = False
        for op_index in list(node.pending_reads.values()) + [o for _, o in node.waiting_reads]:
            self._drop_op(op_index)
        node.pending_writes.clear()
        node.pending_reads.clear()
        node.waiting_reads.clear()
        node.raw = None

    def _drop_op(self, op_index: int) -> None:
        rec = self.history[op_index]
        if rec[6] is None:
            rec[6] = "dropped"
            self.client_busy[rec[0]] = False

    # --- Ready handling ---------------------------------------------------------------------------
    def _persist(self, node: SimNode, rd: Ready) -> None:
        if rd.snapshot is not None:
            node.storage.apply_snapshot(rd.snapshot)
        node.storage.append(rd.entries)
        if rd.hard_state is not None:
            self.inv.on_hard_state(node, node.storage.hard_state, rd.hard_state)
            node.storage.set_hard_state(rd.hard_state)
        self.inv.on_persist(node, rd.entries)

    def _send_all(self, node: SimNode, rd: Ready) -> None:
        for m in rd.messages:
            self._send(node, m)

    def _send(self, node: SimNode, m: Message) -> None:
        if (m.frm, m.to) in self.blocked or m.to not in self.nodes or self.rng.random() < self._p_drop():
            if m.type == MessageType.SNAP and node.raw is not None:
                node.raw.report_snapshot(m.to, delivered=False)
            return
        copies = 2 if self.faults and self.rng.random() < self.sc.p_dup else 1
        for _ in range(copies):
            delay = self.rng.randint(1, self.sc.max_delay)
            if self.faults and self.rng.random() < self.sc.p_long_delay:
                delay += self.rng.randint(50, 400)
            self._schedule(delay, "msg", m)

    def _p_drop(self) -> float:
        return self.sc.p_drop if self.faults else 0.0

    def _apply(self, node: SimNode, rd: Ready, limit: int | None = None) -> None:
        if rd.snapshot is not None:
            node.kv.restore(rd.snapshot)
            self.inv.on_snapshot_applied(node, rd.snapshot)
        ents = rd.committed_entries if limit is None else rd.committed_entries[:limit]
        for e in ents:
            if e.index <= node.kv.applied:
                continue  # replay after a restart: already applied (idempotent by index)
            self.inv.on_apply(node, e)
            if e.type == EntryType.CONF_CHANGE:
                node.kv.apply(e.index, b"")
                self._on_conf_applied(decode_conf_change(e.data))
            else:
                node.kv.apply(e.index, e.data)
            pw = node.pending_writes.pop(e.index, None)
            if pw is not None:
                rec = self.history[pw.op_index]
                if e.data == pw.data:
                    rec[4], rec[5] = None, self._stamp()
                else:
                    rec[6] = "dropped"  # another entry won this index: ours never took effect
                self.client_busy[rec[0]] = False
        self._serve_reads(node)

    def _serve_reads(self, node: SimNode) -> None:
        still = []
        for index, op_index in node.waiting_reads:
            if node.kv.applied >= index:
                rec = self.history[op_index]
                rec[4], rec[5] = node.kv.data.get(rec[2]), self._stamp()
                self.client_busy[rec[0]] = False
            else:
                still.append((index, op_index))
        node.waiting_reads = still

    def _handle_ready(self, node: SimNode) -> None:
        raw = node.raw
        assert raw is not None
        while raw.has_ready():
            rd = raw.ready()
            self._persist(node, rd)
            self._send_all(node, rd)
            for rs in rd.read_states:
                op_index = node.pending_reads.pop(rs.request_ctx, None)
                if op_index is not None:
                    node.waiting_reads.append((rs.index, op_index))
            self._apply(node, rd)
            raw.advance(rd)
            self.inv.after_ready(node, rd)
            self._maybe_snapshot(node)

    def _maybe_snapshot(self, node: SimNode) -> None:
        st = node.storage
        if node.kv.applied - st.snapshot().meta.index < self.sc.snapshot_every:
            return
        assert node.raw is not None
        applied = node.kv.applied
        st.create_snapshot(applied, node.raw.conf_state_at(applied), node.kv.snapshot_bytes())
        st.compact(max(st.first_index() - 1, applied - self.rng.randrange(0, 5)))

    def _on_conf_applied(self, cc: ConfChange) -> None:
        if cc.type != ConfChangeType.REMOVE_NODE or cc.node_id in self.removed:
            return
        self.removed.add(cc.node_id)
        node = self.nodes.get(cc.node_id)
        if node is not None and self.rng.random() < 0.7:
            self._schedule(self.rng.randrange(1, 100), "stop", cc.node_id)

    # --- clients ----------------------------------------------------------------------------------
    def _client_step(self, client: int) -> None:
        if self.client_busy[client]:
            return
        live = [n for n in self.nodes.values() if n.raw is not None and not n.stopped]
        if not live:
            return
        hinted = self.nodes.get(self.client_hint.get(client, 0))
        node = hinted if hinted in live and self.rng.random() < 0.9 else self.rng.choice(live)
        assert node is not None and node.raw is not None
        key = self.rng.choice(KEYS)
        call = self._stamp()
        if self.rng.random() < 0.5:
            value = f"{client}.{call}"
            data = f"{key}={value}".encode()
            try:
                index = node.raw.propose(data)
            except ProposalDropped as e:
                self.client_hint[client] = e.leader_hint
                return
            self.client_hint[client] = node.id
            self.history.append([client, "put", key, value, None, None, None, call])
            node.pending_writes[index] = PendingWrite(len(self.history) - 1, index, data)
        else:
            ctx = f"r{call}".encode()
            self.history.append([client, "get", key, None, None, None, None, call])
            node.pending_reads[ctx] = len(self.history) - 1
            node.raw.read_index(ctx)
        self.client_busy[client] = True
        self._schedule(OP_TIMEOUT, "timeout", (client, len(self.history) - 1, node.id))
        self._handle_ready(node)

    def _client_timeout(self, client: int, op_index: int, node_id: int) -> None:
        rec = self.history[op_index]
        if rec[5] is not None or rec[6] is not None:
            return
        node = self.nodes[node_id]
        if rec[1] == "put":
            rec[4], rec[5] = UNKNOWN, math.inf
            node.pending_writes = {k: v for k, v in node.pending_writes.items() if v.op_index != op_index}
            self.client_busy[client] = False
        else:
            node.pending_reads = {k: v for k, v in node.pending_reads.items() if v != op_index}
            node.waiting_reads = [(i, o) for i, o in node.waiting_reads if o != op_index]
            self._drop_op(op_index)

    # --- faults -----------------------------------------------------------------------------------
    def _fault(self) -> None:
        if not self.faults:
            return
        self._schedule(
            self.rng.randint(self.sc.fault_every // 2, self.sc.fault_every * 3 // 2), "fault", None
        )
        live = [n for n in self.nodes.values() if not n.stopped]
        ids = [n.id for n in live]
        r = self.rng.random()
        if r < 0.2 and self.sc.partitions:
            self._partition(ids)
        elif r < 0.3:
            self.blocked.clear()
        elif r < 0.5 and self.sc.crashes:
            up = [n for n in live if n.raw is not None]
            down = [n for n in live if n.raw is None]
            if down and (self.rng.random() < 0.6 or not up):
                self._boot(self.rng.choice(down))
            elif up:
                victim = self.rng.choice(up)
                self._crash(victim)
                self._schedule(self.rng.randint(20, 600), "restart", victim.id)
        elif r < 0.7 and self.sc.membership:
            self._membership_change()
        elif r < 0.8:
            leader = self._leader()
            if leader is not None and leader.raw is not None:
                voters = [v for v in leader.raw.raft.voters if v != leader.id]
                if voters:
                    leader.raw.transfer_leader(self.rng.choice(voters))
                    self._handle_ready(leader)

    def _partition(self, ids: list[int]) -> None:
        self.blocked.clear()
        kind = self.rng.random()
        leader = self._leader()
        if kind < 0.4 and leader is not None:
            group = {leader.id}  # isolate the leader
        else:
            group = {i for i in ids if self.rng.random() < 0.5}
        for a in group:
            for b in ids:
                if b not in group:
                    if kind < 0.8 or self.rng.random() < 0.5:
                        self.blocked.add((a, b))  # symmetric, or one direction only (asymmetric)
                    if kind < 0.8 or self.rng.random() < 0.5:
                        self.blocked.add((b, a))

    def _leader(self) -> SimNode | None:
        leaders = [n for n in self.nodes.values() if n.raw is not None and n.raw.is_leader and not n.stopped]
        return max(leaders, key=lambda n: n.raw.raft.term) if leaders else None  # type: ignore[union-attr]

    def _membership_change(self) -> None:
        leader = self._leader()
        if leader is None or leader.raw is None:
            return
        raft = leader.raw.raft
        voters, learners = sorted(raft.voters), sorted(raft.learners)
        choice = self.rng.random()
        changes: list[ConfChange] = []
        if choice < 0.35 and len(voters) + len(learners) < MAX_MEMBERS and self.next_id <= MAX_NODE_IDS:
            changes = [ConfChange(ConfChangeType.ADD_LEARNER, self.next_id)]
        elif choice < 0.65 and len(learners) >= 2 and (len(voters) == 1 or self.rng.random() < 0.1):
            # several voters at once: the core takes them from a lone leader only (design note 146)
            changes = [ConfChange(ConfChangeType.ADD_NODE, n) for n in self.rng.sample(learners, 2)]
        elif choice < 0.65 and learners:
            changes = [ConfChange(ConfChangeType.ADD_NODE, self.rng.choice(learners))]
        elif len(voters) > 1 or learners:
            target = self.rng.choice(voters + learners)
            if target in voters and len(voters) == 1:
                return
            changes = [ConfChange(ConfChangeType.REMOVE_NODE, target)]
        if not changes:
            return
        try:
            leader.raw.propose_conf_change(*changes)
        except ProposalDropped:
            return
        if changes[0].type == ConfChangeType.ADD_LEARNER:
            self._start_new_node(bootstrap=None)
        self._handle_ready(leader)

    # --- main loop --------------------------------------------------------------------------------
    def _dispatch(self, kind: str, payload: Any) -> None:
        if kind == "tick":
            node_id, inc = payload
            node = self.nodes[node_id]
            if node.raw is None or node.incarnation != inc or node.stopped:
                return
            node.raw.tick()
            self._schedule(node.tick_period, "tick", (node_id, inc))
            self._handle_ready(node)
        elif kind == "msg":
            m: Message = payload
            target = self.nodes.get(m.to)
            if target is None or target.raw is None or target.stopped or (m.frm, m.to) in self.blocked:
                return
            target.raw.step(m)
            self._handle_ready(target)
            sender = self.nodes.get(m.frm)
            if m.type == MessageType.SNAP and sender is not None and sender.raw is not None:
                sender.raw.report_snapshot(m.to, delivered=True)
                self._handle_ready(sender)
        elif kind == "client":
            self._client_step(payload)
            self._schedule(self.rng.randint(5, 60), "client", payload)
        elif kind == "timeout":
            self._client_timeout(*payload)
        elif kind == "fault":
            self._fault()
        elif kind == "restart":
            node = self.nodes[payload]
            if node.raw is None and not node.stopped:
                self._boot(node)
        elif kind == "stop":
            node = self.nodes[payload]
            if node.raw is not None:
                self._crash(node)
            node.stopped = True
        self.inv.after_event(self)

    def run_until(self, end: int) -> None:
        while self.events and self.events[0][0] <= end:
            self.now, _, kind, payload = heapq.heappop(self.events)
            self._dispatch(kind, payload)
        self.now = end

    def heal(self) -> None:
        """Stop injecting faults, reconnect everything, restart every crashed member."""
        self.faults = False
        self.blocked.clear()
        for node in self.nodes.values():
            if node.raw is None and not node.stopped:
                self._boot(node)

    def converged(self) -> bool:
        members = [n for n in self.nodes.values() if not n.stopped and n.id not in self.removed]
        leader = self._leader()
        if leader is None or leader.raw is None:
            return False
        commit = leader.raw.raft.log.committed
        if leader.raw.raft.log.zero_term_on_compacted(commit) != leader.raw.raft.term:
            return False
        return all(
            n.raw is not None and n.kv.applied >= commit for n in members if n.id in leader.raw.raft.voters
        )

    def run(self) -> None:
        self.run_until(self.sc.duration)
        self.heal()
        deadline = self.now + 6000
        while self.now < deadline:
            self.run_until(self.now + 100)
            if self.converged():
                break
        else:
            raise SimFailure(f"no progress after healing: {self.describe()}")
        self.check_history()

    def operations(self) -> list[Operation]:
        ops = []
        for rec in self.history:
            client, op, key, value, output, ret, status, call = rec
            if status == "dropped" or (op == "get" and ret is None):
                continue
            if ret is None:  # a write still in flight at the end: its outcome is unknown
                output, ret = UNKNOWN, math.inf
            ops.append(Operation(client, op, key, value, output, call, ret))
        return ops

    def check_history(self) -> None:
        try:
            result = check_history(self.operations(), max_steps=500_000)
        except CheckBudgetExceeded as e:
            raise SimFailure(f"linearizability check exceeded its budget: {e}") from None
        if not result.ok:
            raise SimFailure(result.explain())

    def describe(self) -> str:
        parts = []
        for n in self.nodes.values():
            if n.raw is None:
                parts.append(f"{n.id}:{'stopped' if n.stopped else 'down'}")
                continue
            r = n.raw.raft
            parts.append(
                f"{n.id}:{r.state.name} t{r.term} lead={r.lead} commit={r.log.committed} "
                f"applied={n.kv.applied} last={r.log.last_index()} voters={sorted(r.voters)}"
            )
        return f"t={self.now} " + "; ".join(parts)


def run_seed(seed: int, duration: int = 3000) -> Simulation:
    sim = Simulation(seed, duration)
    try:
        sim.run()
    except (SimFailure, AssertionError) as e:
        raise SimFailure(
            f"seed {seed} failed: {e}\n{sim.describe()}\n"
            f"replay: pytest tests/raft/test_simulation.py --raft-seed {seed}"
        ) from e
    return sim
