"""Deterministic simulation of the Raft driver: several real `RaftNode`s in one trio run.

What is real: the driver (awsomefsd/meta/replication: the Ready loop, proposals and their
de-duplication, forwarding, ReadIndex reads, pipelined and deferred applies, snapshots) and the
core under it. What is simulated, all of it drawn from one seed:
- time: trio's MockClock, which jumps ahead whenever every task waits (ticks, timeouts, latencies
  are virtual; a run of minutes takes seconds);
- the scheduler: trio's deterministic mode, with its shuffles seeded;
- the network (`SimNetwork`): delivers, drops, duplicates, delays and therefore reorders messages,
  and partitions nodes (both ways or one way); snapshots ship as copies of the sender's disk; a
  follower's Forward call to the leader crosses the same faults, so a lost reply makes the
  follower send its entry again;
- the disks (memory_replica.py): every storage call takes virtual time; a node crashed meanwhile
  loses, tears or completes the write in flight; a disk without sync (`Scenario.sync`, a planted
  bug) also loses what it had not flushed.
Faults: partitions, crashes and restarts (the leader often), so leaders change; snapshots are
taken every few entries, so a node that was down catches up by snapshot.

Clients put and get on a key-value state machine through random nodes (followers forward) and
record their history. Checked: the invariants of invariants.py (election safety, log matching,
leader completeness, state-machine safety, durable state moving forward) as durable state
changes and after every Ready; that no proposal is applied twice (the state machine sees every
command's client id); after healing, that every member converges to the same state; and the
history's linearizability. Every failure names its seed; `--driver-seed N` replays it alone.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import struct
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import trio
import trio.testing

from awsomefsd.meta.raft import Entry, HardState, Message, MessageType, RawNode, Ready, Snapshot, SnapshotMeta
from awsomefsd.meta.replication.driver import RaftNode
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.meta.replication.forwarding import accept_forwarded
from awsomefsd.meta.replication.settings import NodeSettings
from tests.support.linearizability import UNKNOWN, CheckBudgetExceeded, Operation, check_history

from .invariants import Invariants, SimFailure
from .memory_replica import MemoryDisk, MemoryReplicaStorage, MemoryTxn, SimDiskCalls

KEYS = ("a", "b", "c")
TICK_MS = 10
_OP = struct.Struct("<QH")  # client operation id, key length


@dataclass
class Scenario:
    """One run's fault rates and settings, drawn from its seed."""

    duration_s: float
    n_nodes: int
    p_drop: float
    p_dup: float
    max_delay_s: float
    p_long_delay: float
    fault_every_s: float
    crashes: bool
    partitions: bool
    persist_in_thread: bool
    snapshot_entries: int
    catch_up_entries: int
    n_clients: int
    disk_latency_s: tuple[float, float]
    stalls: bool = False
    """The leader's disk now and then stalls for several election timeouts while it is cut off: its
    loop waits, ticks go uncounted, and reads that reach it meanwhile must not be answered from a
    lease that ran out (a long fsync, or a paused process, in a real cluster)."""
    sync: bool = True
    """False plants a disk that acknowledges writes it has not flushed."""
    wire_reads: bool = False
    """Followers ask the leader for its lease's read point (RaftNode.ask_read_point, as the daemon's
    wire does), across the same faults as the Raft messages; else every read is a ReadIndex."""

    @staticmethod
    def draw(rng: random.Random, duration_s: float) -> Scenario:
        return Scenario(
            duration_s=duration_s,
            n_nodes=rng.choice((3, 3, 5)),
            p_drop=rng.choice((0.0, 0.02, 0.1)),
            p_dup=rng.choice((0.0, 0.02, 0.05)),
            max_delay_s=rng.choice((0.002, 0.01, 0.03)),
            p_long_delay=rng.choice((0.0, 0.01, 0.03)),
            fault_every_s=rng.choice((0.3, 0.6, 1.0)),
            crashes=rng.random() < 0.8,
            partitions=rng.random() < 0.7,
            persist_in_thread=rng.random() < 0.5,
            snapshot_entries=rng.choice((8, 20, 50)),
            catch_up_entries=rng.choice((0, 3, 10)),
            n_clients=rng.choice((2, 3, 4)),
            disk_latency_s=rng.choice(((0.0002, 0.001), (0.001, 0.005), (0.0005, 0.02))),
            stalls=rng.random() < 0.5,
            wire_reads=rng.random() < 0.7,
        )

    def settings(self) -> NodeSettings:
        return NodeSettings(
            tick_ms=TICK_MS, election_ticks=10, heartbeat_ticks=2, proposal_timeout_s=2.0, read_timeout_s=1.0,
            snapshot_entries=self.snapshot_entries, catch_up_entries=self.catch_up_entries, max_batch=64,
            persist_in_thread=self.persist_in_thread,
        )


def encode_put(op_id: int, key: str, value: str) -> bytes:
    k = key.encode()
    return _OP.pack(op_id, len(k)) + k + value.encode()


def decode_put(command: bytes) -> tuple[int, str, str]:
    op_id, n = _OP.unpack_from(command)
    return op_id, command[_OP.size : _OP.size + n].decode(), command[_OP.size + n :].decode()


class SimKV:
    """The replicated state machine: a register per key, in the `kv` table of the member's disk."""

    def __init__(self, member: Member) -> None:
        self.member = member

    def apply(self, txn: MemoryTxn, index: int, command: bytes) -> Any:
        op_id, key, value = decode_put(command)
        txn.put("kv", key, value)
        self.member.sim.on_sm_apply(self.member, index, op_id)
        return index

    def get(self, key: str) -> str | None:
        value: str | None = self.member.disk.table("kv").get(key)
        return value

    def install_snapshot(self, staged: Any) -> MemoryDisk:
        self.member.disk.replace(staged)
        return self.member.disk


class Crashed(Exception):
    """The node a client was talking to crashed: the outcome is unknown to the client."""


class Member:
    """One member across its incarnations: its disk survives, everything else is rebuilt."""

    def __init__(self, sim: Simulation, node_id: int) -> None:
        self.sim = sim
        self.id = node_id
        self.disk = MemoryDisk(sync=sim.sc.sync)
        self.disk_rng = random.Random(sim.rng.getrandbits(32))
        self.node: RaftNode[MemoryTxn] | None = None
        self.sm: SimKV | None = None
        self.storage = MemoryReplicaStorage(self.disk, observer=self)  # replaced at each boot
        self.disk_calls: SimDiskCalls | None = None
        self.up = False
        self.running = False  # an incarnation was started and has not finished unwinding
        self.incarnation = 0
        self.scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        self.attached: dict[int, trio.CancelScope] = {}
        self.applied = 0  # what invariants.py reads as `kv.applied`: the durable applied index
        self._done: dict[str, int] = {}  # counters of the incarnations that ended
        self._calls = itertools.count()

    # --- what invariants.py reads of a node ---
    @property
    def kv(self) -> Member:
        return self

    @property
    def raw(self) -> RawNode | None:
        return self.node.raw if self.up and self.node is not None else None

    # --- StorageObserver: durable state changes, reported by the memory storage ---
    def on_hard_state(self, old: HardState, new: HardState) -> None:
        self.sim.inv.on_hard_state(self, old, new)

    def on_persist(self, entries: list[Entry]) -> None:
        self.sim.inv.on_persist(self, entries)

    def on_applied(self, entries: list[Entry]) -> None:
        for e in entries:
            self.sim.inv.on_apply(self, e)
            self.applied = e.index

    def on_install(self, meta: SnapshotMeta, applied: int) -> None:
        self.sim.inv.on_snapshot_applied(self, Snapshot(meta))
        self.applied = applied

    def totals(self) -> dict[str, int]:
        """This member's counters: the ended incarnations' and the running one's."""
        out = dict(self._done)
        for name, n in self._counters().items():
            out[name] = out.get(name, 0) + n
        return out

    def add_totals(self) -> None:
        self._done = self.totals()

    def _counters(self) -> dict[str, int]:
        if self.node is None or self.storage is None or self.disk_calls is None:
            return {}
        return {
            "snapshots_installed": self.node.snapshots.installed,
            "forward_retries": self.node.forward_retries,
            "pipelined_applies": self.node.pipelined_applies,
            "lease_reads": self.node.lease_reads,
            "duplicates_suppressed": self.storage.duplicates,
            **{f"crash_{mode}": n for mode, n in self.disk_calls.crash_outcomes.items()},
        }

    @contextmanager
    def attach(self) -> Iterator[None]:
        """A client call to this member: a crash of the member cancels it (Crashed)."""
        if not self.up:
            raise Crashed(f"node {self.id} is down")
        key = next(self._calls)
        with trio.CancelScope() as scope:
            self.attached[key] = scope
            try:
                yield
            finally:
                self.attached.pop(key, None)
        if scope.cancelled_caught:
            raise Crashed(f"node {self.id} crashed")


class SimNetwork:
    """Messages in flight, by delivery time; see the module docstring."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.rng = sim.rng
        self.faults = True
        self.blocked: set[tuple[int, int]] = set()
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._wake = trio.Event()
        self._snapshots_in_flight: set[tuple[int, int]] = set()
        self.delivered = 0
        self.snapshots_sent = 0
        self.read_points = 0
        """Read points a leader gave a follower's `ask_read_point`."""

    def _push(self, delay_s: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (trio.current_time() + delay_s, self._seq, kind, payload))
        self._wake.set()

    def _delay(self) -> float:
        delay = self.rng.uniform(0.0, self.sim.sc.max_delay_s)
        if self.faults and self.rng.random() < self.sim.sc.p_long_delay:
            delay += self.rng.uniform(0.05, 0.5)
        return delay

    def _lost(self, frm: int, to: int) -> bool:
        return (frm, to) in self.blocked or (self.faults and self.rng.random() < self.sim.sc.p_drop)

    def send(self, frm: int, incarnation: int, messages: list[Message]) -> None:
        """A member's `send`: never blocks; what a crashed incarnation sends is lost."""
        sender = self.sim.members[frm]
        if not sender.up or sender.incarnation != incarnation:
            return
        for m in messages:
            if m.to not in self.sim.members:
                continue
            if m.type == MessageType.SNAP:
                self._ship_snapshot(sender, m)
                continue
            if self._lost(frm, m.to):
                continue
            copies = 2 if self.faults and self.rng.random() < self.sim.sc.p_dup else 1
            for _ in range(copies):
                self._push(self._delay(), "msg", m)

    def _ship_snapshot(self, sender: Member, m: Message) -> None:
        """As the transport does: at most one per peer in flight, a copy of the sender's state
        taken now, delivered whole or reported failed."""
        assert sender.node is not None and sender.storage is not None and m.snapshot is not None
        pair = (sender.id, m.to)
        if pair in self._snapshots_in_flight:
            sender.node.report_snapshot(m.to, delivered=False)
            return
        self._snapshots_in_flight.add(pair)
        blob = b"".join(sender.storage.snapshot_chunks())
        delay = self._delay() + self.rng.uniform(0.01, 0.1)
        if self._lost(sender.id, m.to):
            self._push(delay, "snap-failed", (pair, sender.incarnation))
        else:
            self._push(delay, "snap", (replace(m, snapshot=Snapshot(m.snapshot.meta, blob)), sender.incarnation))

    async def run(self) -> None:
        while True:
            with trio.move_on_at(self._heap[0][0] if self._heap else math.inf):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, kind, payload = heapq.heappop(self._heap)
                self._dispatch(kind, payload)

    def _dispatch(self, kind: str, payload: Any) -> None:
        members = self.sim.members
        if kind == "msg":
            m: Message = payload
            target = members[m.to]
            if target.up and target.node is not None and (m.frm, m.to) not in self.blocked:
                target.node.deliver([m])
                self.delivered += 1
            return
        if kind == "snap":
            m, incarnation = payload
            pair, delivered = (m.frm, m.to), False
            target = members[m.to]
            if target.up and target.node is not None and pair not in self.blocked:
                target.node.deliver([m])
                delivered = True
                self.snapshots_sent += 1
        else:
            pair, incarnation = payload
            delivered = False
        self._snapshots_in_flight.discard(pair)
        sender = members[pair[0]]
        if sender.up and sender.node is not None and sender.incarnation == incarnation:
            sender.node.report_snapshot(pair[1], delivered)

    async def leg(self, frm: int, to: int, timeout_s: float) -> None:
        """One direction of an RPC: a delay, or a timeout when the message is lost."""
        if self._lost(frm, to):
            await trio.sleep(timeout_s)
            raise ProposalTimeout(f"forwarding {frm}->{to}: no answer (lost)")
        await trio.sleep(self._delay())

    async def forward(self, frm: int, leader: int, entry: bytes) -> int:
        """A follower's `forward` (RaftNode.forward), with Forwarder's outcomes: NotLeader and
        ProposalLost when certain, ProposalTimeout when the fate is unknown."""
        timeout_s = 0.5
        await self.leg(frm, leader, timeout_s)
        target = self.sim.members.get(leader)
        if target is None or not target.up:
            raise ProposalTimeout(f"forwarding to node {leader}: unavailable")
        outcome: dict[str, Any] = {}
        done = trio.Event()

        async def serve(node: RaftNode[MemoryTxn]) -> None:
            try:
                outcome["index"] = await accept_forwarded(node, entry)
            except (NotLeader, ProposalLost, ProposalTimeout, ValueError) as exc:
                outcome["error"] = exc
            finally:
                done.set()  # also when the leader crashed mid-call: no outcome

        assert target.nursery is not None and target.node is not None
        target.nursery.start_soon(serve, target.node)
        with trio.move_on_after(timeout_s * 4):
            await done.wait()
        await self.leg(leader, frm, timeout_s)
        if "index" in outcome:
            return int(outcome["index"])
        error = outcome.get("error")
        if isinstance(error, NotLeader | ProposalLost):
            raise error
        raise ProposalTimeout(f"forwarding to node {leader}: {error or 'no answer'}")


    async def read_point(self, frm: int, leader: int, timeout_s: float) -> int:
        """A follower's `ask_read_point`: the leader's read point from its lease, taken when the
        call arrives (as its wire reader does), or ConnectionError (lost, down, no lease now)."""
        try:
            await self.leg(frm, leader, timeout_s)
            target = self.sim.members.get(leader)
            point = None if target is None or not target.up or target.node is None else target.node.lease_read_point()
            await self.leg(leader, frm, timeout_s)
        except ProposalTimeout as exc:
            raise ConnectionError(str(exc)) from None
        if point is None:
            raise ConnectionError(f"node {leader} gave no read point")
        self.read_points += 1
        return point


class Simulation:
    def __init__(self, seed: int, duration_s: float, *, sync: bool = True, scenario: Scenario | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.sc = Scenario.draw(self.rng, duration_s) if scenario is None else scenario
        self.sc.sync = sync
        self.settings = self.sc.settings()
        self.inv = Invariants()
        self.net = SimNetwork(self)
        self.members: dict[int, Member] = {}
        self.nodes = self.members  # what Invariants.after_event reads
        self._stamp = 0
        self.history: list[list[Any]] = []
        self.hints: dict[int, int] = {}
        self.applied_ops: dict[tuple[int, int], int] = {}  # (node, client op id) -> index
        self.crashes = 0
        self.stalls = 0
        self.follower_puts = 0
        self.nursery: trio.Nursery | None = None
        self.load: trio.Nursery | None = None
        """The clients' nursery: the run heals once all in it returned."""
        voters = tuple(range(1, self.sc.n_nodes + 1))
        for i in voters:
            self.members[i] = Member(self, i)
        self.voters = voters

    def stamp(self) -> int:
        """Strictly increasing: call and return times in the history never tie."""
        self._stamp += 1
        return self._stamp

    # --- checks -------------------------------------------------------------------------------------
    def on_sm_apply(self, member: Member, index: int, op_id: int) -> None:
        """No client operation may be applied twice (at two indexes) on one member: a resent
        forwarded entry must be recognised, whichever leader appended its copies."""
        seen = self.applied_ops.setdefault((member.id, op_id), index)
        if seen != index:
            raise SimFailure(f"node {member.id} applied operation {op_id} twice: at {seen} and at {index}")

    def _observe_readys(self, member: Member, node: RaftNode[MemoryTxn]) -> None:
        """The invariants after every Ready, as the core stands once the driver advanced it
        (not in the last steps of a crashed incarnation, which nothing can observe)."""
        raw = node.raw
        advance = raw.advance

        def advance_and_check(rd: Ready) -> None:
            advance(rd)
            if member.up and member.node is node:
                self.inv.after_ready(member, rd)

        raw.advance = advance_and_check  # type: ignore[method-assign]

    # --- members ------------------------------------------------------------------------------------
    async def run_member(self, member: Member) -> None:
        """One incarnation, from boot to crash; the disk keeps what it synced."""
        member.incarnation += 1
        member.storage = MemoryReplicaStorage(member.disk, observer=member)
        member.sm = SimKV(member)
        member.disk_calls = SimDiskCalls(member.disk, member.disk_rng, self.sc.disk_latency_s)
        incarnation = member.incarnation
        node = RaftNode(member.id, member.storage, member.sm, settings=self.settings, bootstrap_voters=self.voters,
                        seed=self.rng.getrandbits(32), disk=member.disk_calls,
                        send=lambda messages: self.net.send(member.id, incarnation, messages),
                        forward=lambda leader, entry: self.net.forward(member.id, leader, entry))
        if self.sc.wire_reads:
            node.ask_read_point = partial(self.net.read_point, member.id)
        self._observe_readys(member, node)
        member.node = node
        member.applied = member.storage.applied_index()
        self.inv.on_boot(member)
        member.up = True
        with trio.CancelScope() as scope:
            member.scope = scope
            async with trio.open_nursery() as nursery:
                member.nursery = nursery
                await nursery.start(node.run)
                await trio.sleep_forever()
        member.up = False
        member.add_totals()
        member.disk.crash(member.disk_rng)
        member.node = member.sm = None
        member.nursery = member.scope = None
        member.running = False

    def crash(self, member: Member) -> None:
        if not member.up or member.scope is None:
            return  # crashed already
        self.crashes += 1
        member.up = False  # from now on it sends nothing and receives nothing
        for scope in member.attached.values():
            scope.cancel()
        member.scope.cancel()

    def _stall(self, leader: Member, ids: list[int]) -> None:
        """As the leader's disk stalls, its messages are cut off both ways (delayed, in a real
        network): nothing from a newer leader reaches it before it looks at its reads again. Once
        the faults stopped (healing), a stall that only now began cuts nothing off."""
        if not self.net.faults or self.load is None:
            return
        self.stalls += 1
        self.net.blocked.clear()
        self.net.blocked |= {(leader.id, i) for i in ids if i != leader.id}
        self.net.blocked |= {(i, leader.id) for i in ids if i != leader.id}
        self.load.start_soon(self._read_behind_a_stall, leader, self.sc.n_clients + self.stalls)

    async def _read_behind_a_stall(self, old: Member, client: int) -> None:
        """A client of its own puts through the leader elected meanwhile, then gets the key from
        the stalled one: an answer from its expired lease is a stale read the checker sees."""
        deadline = trio.current_time() + 0.6
        while (new := self.leader()) is None or new is old:
            if trio.current_time() > deadline:
                return
            await trio.sleep(0.005)
        key = KEYS[client % len(KEYS)]
        await self._put(client, new, key)
        if old.up:
            await self._get(client, old, key)

    def boot(self, member: Member) -> None:
        assert self.nursery is not None and not member.running
        member.running = True
        self.nursery.start_soon(self.run_member, member)

    async def _restart_later(self, member: Member, delay_s: float) -> None:
        await trio.sleep(delay_s)
        if self.net.faults and not member.running:
            self.boot(member)

    def leader(self) -> Member | None:
        leaders = [m for m in self.members.values() if m.raw is not None and m.raw.is_leader]
        return max(leaders, key=lambda m: m.raw.raft.term) if leaders else None  # type: ignore[union-attr]

    # --- clients ------------------------------------------------------------------------------------
    async def client(self, c: int, until: float) -> None:
        rng = random.Random(self.rng.getrandbits(32))
        while trio.current_time() < until:
            await trio.sleep(rng.uniform(0.002, 0.03))
            up = [m for m in self.members.values() if m.up]
            if not up:
                continue
            hinted = self.members.get(self.hints.get(c, 0))
            member = hinted if hinted in up and rng.random() < 0.6 else rng.choice(up)
            key = rng.choice(KEYS)
            if rng.random() < 0.5:
                await self._put(c, member, key)
            else:
                await self._get(c, member, key)

    async def _put(self, c: int, member: Member, key: str) -> None:
        call = self.stamp()
        value = f"{c}.{call}"
        rec: list[Any] = [c, "put", key, value, None, None, None, call]
        self.history.append(rec)
        if member.raw is not None and not member.raw.is_leader:
            self.follower_puts += 1
        try:
            with member.attach():
                assert member.node is not None
                await member.node.propose(encode_put(call, key, value))
            rec[5] = self.stamp()
        except (NotLeader, ProposalLost) as exc:
            rec[6] = "dropped"  # certainly not applied
            if isinstance(exc, NotLeader) and exc.leader_id:
                self.hints[c] = exc.leader_id
        except (ProposalTimeout, Crashed):
            rec[4], rec[5] = UNKNOWN, math.inf

    async def _get(self, c: int, member: Member, key: str) -> None:
        call = self.stamp()
        rec: list[Any] = [c, "get", key, None, None, None, None, call]
        self.history.append(rec)
        try:
            with member.attach():
                assert member.node is not None and member.sm is not None
                await member.node.read_barrier()
                rec[4], rec[5] = member.sm.get(key), self.stamp()  # no await in between
        except (NotLeader, Crashed) as exc:
            rec[6] = "dropped"
            if isinstance(exc, NotLeader) and exc.leader_id:
                self.hints[c] = exc.leader_id

    # --- faults -------------------------------------------------------------------------------------
    async def inject_faults(self, until: float) -> None:
        rng = random.Random(self.rng.getrandbits(32))
        sc = self.sc
        while trio.current_time() < until:
            await trio.sleep(rng.uniform(sc.fault_every_s / 2, sc.fault_every_s * 1.5))
            ids = list(self.members)
            up = [m for m in self.members.values() if m.up]
            down = [m for m in self.members.values() if not m.running]
            leader = self.leader()
            r = rng.random()
            if r < 0.25 and sc.partitions:
                self.net.blocked.clear()
                group = {leader.id} if leader is not None and rng.random() < 0.5 else {
                    i for i in ids if rng.random() < 0.5}
                one_way = rng.random() < 0.2
                for a in sorted(group):
                    for b in ids:
                        if b not in group:
                            self.net.blocked.add((a, b))
                            if not one_way:
                                self.net.blocked.add((b, a))
            elif r < 0.4:
                self.net.blocked.clear()
            elif r < 0.65 and sc.stalls and leader is not None and leader.disk_calls is not None:
                leader.disk_calls.stall_next = (rng.uniform(0.7, 1.1), partial(self._stall, leader, ids))
            elif sc.crashes:
                if down and (rng.random() < 0.3 or not up):
                    self.boot(rng.choice(down))
                elif up:
                    victim = leader if leader is not None and rng.random() < 0.5 else rng.choice(up)
                    if rng.random() < 0.5 and victim.disk_calls is not None:
                        # in the middle of its next write: lost, torn or complete
                        victim.disk_calls.crash_next = lambda victim=victim: self.crash(victim)  # type: ignore[misc]
                    else:
                        self.crash(victim)
                    assert self.nursery is not None
                    self.nursery.start_soon(self._restart_later, victim, rng.uniform(0.05, 1.5))
            self.inv.after_event(self)

    # --- the run ------------------------------------------------------------------------------------
    async def main(self) -> None:
        sc = self.sc
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.net.run)
            for member in self.members.values():
                self.boot(member)
            until = trio.current_time() + sc.duration_s
            async with trio.open_nursery() as load:
                self.load = load
                for c in range(sc.n_clients):
                    load.start_soon(self.client, c, until)
                load.start_soon(self.inject_faults, until)
            await self.heal()
            nursery.cancel_scope.cancel()

    async def heal(self) -> None:
        """Stop the faults, restart every member, and wait until all have applied everything."""
        self.net.faults = False
        self.net.blocked.clear()
        with trio.move_on_after(60.0):
            while not self.converged():
                for member in self.members.values():
                    if not member.running:
                        self.boot(member)
                await trio.sleep(0.05)
            return
        raise SimFailure(f"no progress after healing: {self.describe()}")

    def converged(self) -> bool:
        leader = self.leader()
        if leader is None or leader.raw is None or leader.node is None:
            return False
        log = leader.raw.raft.log
        commit = log.committed
        if log.zero_term_on_compacted(commit) != leader.raw.raft.term:
            return False
        return all(m.up and m.node is not None and m.node.applied >= commit for m in self.members.values())

    def final_checks(self) -> None:
        states = {m.id: dict(m.disk.table("kv")) for m in self.members.values()}
        first = states[min(states)]
        for node_id, state in states.items():
            if state != first:
                raise SimFailure(f"members disagree after healing: node {min(states)} has {first}, "
                                 f"node {node_id} has {state}")
        try:
            result = check_history(self.operations(), max_steps=500_000)
        except CheckBudgetExceeded as exc:
            raise SimFailure(f"linearizability check exceeded its budget: {exc}") from None
        if not result.ok:
            raise SimFailure(result.explain())

    def operations(self) -> list[Operation]:
        ops = []
        for client, op, key, value, output, ret, status, call in self.history:
            if status == "dropped" or (op == "get" and (ret is None or math.isinf(ret))):
                continue
            if ret is None:  # still in flight at the end: unknown
                output, ret = UNKNOWN, math.inf
            ops.append(Operation(client, op, key, value, output, call, ret))
        return ops

    def scenario_line(self) -> str:
        sc = self.sc
        return (f"scenario: {sc.n_nodes} nodes, drop {sc.p_drop}, dup {sc.p_dup}, delay <= {sc.max_delay_s}s, "
                f"crashes {sc.crashes}, partitions {sc.partitions}, persist_in_thread {sc.persist_in_thread}, "
                f"snapshot every {sc.snapshot_entries} (+{sc.catch_up_entries}), sync {sc.sync}, wire reads {sc.wire_reads}")

    def describe(self) -> str:
        parts = []
        for m in self.members.values():
            if m.raw is None:
                parts.append(f"{m.id}:down")
                continue
            r = m.raw.raft
            assert m.node is not None
            parts.append(f"{m.id}:{r.state.name} t{r.term} lead={r.lead} commit={r.log.committed} "
                         f"applied={m.node.applied} last={r.log.last_index()}")
        return f"t={trio.current_time():.3f}s " + "; ".join(parts)

    def stats(self) -> dict[str, int]:
        """What the run exercised, over every incarnation of every member."""
        out = {"elections": len(self.inv.leader_of_term), "committed": self.inv.committed_hi,
               "operations": len(self.operations()), "follower_puts": self.follower_puts, "crashes": self.crashes,
               "stalls": self.stalls, "wire_read_points": self.net.read_points}
        for m in self.members.values():
            for name, n in m.totals().items():
                out[name] = out.get(name, 0) + n
        return out


def run_seed(seed: int, duration_s: float = 4.0, *, sync: bool = True) -> Simulation:
    """Run one seed; raise SimFailure naming the seed and how to replay it."""
    sim = Simulation(seed, duration_s, sync=sync)
    # trio's scheduler shuffles each batch of runnable tasks; make that the seed's shuffle too
    # (the hook pytest-trio and Hypothesis use).
    setattr(trio._core._run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)  # noqa: B010 - a Final we must set
    trio._core._run._r.seed(seed)
    try:
        trio.run(sim.main, clock=trio.testing.MockClock(autojump_threshold=0))
        sim.final_checks()
    except BaseException as exc:  # an invariant, a driver assertion, or a stuck cluster
        failure = _first_failure(exc)
        if failure is None:
            raise
        what = str(failure) if isinstance(failure, SimFailure) else "".join(traceback.format_exception(failure))
        raise SimFailure(f"seed {seed} failed: {what}\n{sim.scenario_line()}\n"
                         f"replay: pytest tests/raft/test_driver_simulation.py --driver-seed {seed} "
                         f"--driver-seconds {duration_s:g}") from exc
    return sim


def _first_failure(exc: BaseException) -> BaseException | None:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_failure(inner)
            if found is not None:
                return found
        return None
    return None if isinstance(exc, trio.Cancelled) or not isinstance(exc, Exception) else exc


__all__ = ["Scenario", "SimFailure", "Simulation", "run_seed"]
