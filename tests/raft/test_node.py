"""The node driver's answers to its callers, on three real members in one trio loop (LMDB storage,
gRPC transport on loopback): NotLeader with a hint, a proposal overwritten by a new leader
(ProposalLost), one whose fate is unknown (ProposalTimeout), a read on a cut-off leader, and a
follower's proposal forwarded to the leader over gRPC (Member.Forward), resends applied once.

The partition is fault injection in the test: messages from or to an isolated node are dropped
where the node hands them to its transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from awsomefsd.cluster.rpc import MemberService, ask_read_point
from awsomefsd.meta.raft import Message
from awsomefsd.meta.replication.driver import RaftNode
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.meta.replication.forwarding import Forwarder, accept_forwarded
from awsomefsd.meta.replication.lmdb_storage import LmdbRaftStorage
from awsomefsd.meta.replication.proposals import FORWARDED, HEADER
from awsomefsd.meta.replication.settings import NodeSettings
from awsomefsd.meta.replication.transport import RaftTransport, TransportLimits
from tests.support.ports import free_port
from tests.support.raft_kv import KVStateMachine, encode_put

SETTINGS = NodeSettings(tick_ms=20, election_ticks=10, heartbeat_ticks=2)
DEADLINE_S = 15.0


class Cluster:
    def __init__(self, root: Path, *, forwarding: bool = False, wire_reads: bool = False) -> None:
        self.addrs = {i: f"127.0.0.1:{free_port('127.0.0.1')}" for i in (1, 2, 3)}
        self.isolated: set[int] = set()
        self.sms = {i: KVStateMachine(root / f"n{i}") for i in self.addrs}
        self.transports = {
            i: RaftTransport(i, {j: a for j, a in self.addrs.items() if j != i},
                             staging_dir=root / f"n{i}" / "incoming", insecure=True,
                             limits=TransportLimits(backoff_min_s=0.02, backoff_max_s=0.2))
            for i in self.addrs
        }
        self.nodes = {
            i: RaftNode(i, LmdbRaftStorage(env=self.sms[i].env), self.sms[i], settings=SETTINGS,
                        bootstrap_voters=(1, 2, 3), seed=i, send=self._sender(i),
                        forward=Forwarder(self.transports[i].channel_to, wire=self.transports[i].forward)
                        if forwarding else None)
            for i in self.addrs
        }
        if wire_reads:  # as the daemon wires them (daemon/member.py)
            for i, node in self.nodes.items():
                self.transports[i].read_point = node.lease_read_point
                node.ask_read_point = partial(ask_read_point, self.transports[i], lambda: True)

    def _sender(self, i: int) -> Callable[[Sequence[Message]], None]:
        transport = self.transports[i]

        def send(messages: Sequence[Message]) -> None:
            if i in self.isolated:
                return
            transport.send([m for m in messages if m.to not in self.isolated])

        return send

    async def follower_of(self, leader: RaftNode) -> RaftNode:
        """A follower that knows `leader` (it learns it from its first heartbeat; before that its
        proposals cannot be forwarded and fail with NotLeader)."""
        follower = next(n for n in self.nodes.values() if n is not leader)
        with trio.fail_after(DEADLINE_S):
            while follower.raw.leader_id != leader.id:
                await trio.sleep(SETTINGS.tick_ms / 1000)
        return follower

    async def leader(self, exclude: frozenset[int] = frozenset()) -> RaftNode:
        with trio.fail_after(DEADLINE_S):
            while True:
                leads = [n for i, n in self.nodes.items() if i not in exclude and n.raw.is_leader]
                if len(leads) == 1:
                    return leads[0]
                await trio.sleep(SETTINGS.tick_ms / 1000)


@asynccontextmanager
async def cluster(root: Path, *, forwarding: bool = False, wire_reads: bool = False) -> AsyncIterator[Cluster]:
    c = Cluster(root, forwarding=forwarding, wire_reads=wire_reads)
    async with trio.open_nursery() as nursery:
        for i in c.addrs:
            bindings = [MemberService(c.nodes[i]).binding()] if forwarding else []
            accept = partial(accept_forwarded, c.nodes[i]) if forwarding else None
            await nursery.start(partial(c.transports[i].run, c.nodes[i], c.addrs[i], extra_bindings=bindings,
                                        accept_forward=accept))
            await nursery.start(c.nodes[i].run)
        yield c
        nursery.cancel_scope.cancel()
    for sm in c.sms.values():
        sm.env.close()


async def test_follower_refuses_with_the_leader_hint(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        assert await leader.propose(encode_put("k", "v")) > 0
        follower = await c.follower_of(leader)
        with pytest.raises(NotLeader) as err:
            await follower.propose(encode_put("k", "w"))
        assert err.value.leader_id == leader.id
        await follower.read_barrier()  # forwarded to the leader, answered, applied locally
        assert c.sms[follower.id].get("k") == "v"


async def test_a_follower_reads_at_the_leaders_lease_point_asked_on_the_wire(tmp_path: Path) -> None:
    """A follower's read barrier asks the leader for its read point on the wire (design note 153),
    which the leader's wire reader answers from its lease: every write the leader acknowledged
    before the read is applied on the follower when the barrier returns (the follower may not even
    have heard of its commit yet). A leader that has no lease to answer from says so, and the
    read goes through Raft's ReadIndex, still seeing every acknowledged write."""
    async with cluster(tmp_path, wire_reads=True) as c:
        leader = await c.leader()
        follower = await c.follower_of(leader)
        with trio.fail_after(DEADLINE_S):  # the wire connections open after the first Raft frames
            while leader.lease_read_point() is None or not c.transports[leader.id].read_points_answered:
                await follower.read_barrier()
        asked, answered = c.transports[follower.id].calls.read_points_asked, c.transports[leader.id].read_points_answered
        for n in range(30):
            await leader.propose(encode_put("k", f"v{n}"))
            await follower.read_barrier()
            assert c.sms[follower.id].get("k") == f"v{n}", "a read on the follower missed an acknowledged write"
        # Each read asked the leader; a loaded machine may find its lease lapsed now and then (a
        # tick overdue), and that read went through ReadIndex: the reads above hold either way.
        assert c.transports[follower.id].calls.read_points_asked - asked == 30
        assert c.transports[leader.id].read_points_answered - answered >= 1

        leader._lease_reads_yet = lambda: False  # as before every member's build keeps the lease's promise
        leader.raw.raft.lease_reads_allowed = False
        answered = c.transports[leader.id].read_points_answered
        for n in range(5):
            await leader.propose(encode_put("k", f"w{n}"))
            await follower.read_barrier()
            assert c.sms[follower.id].get("k") == f"w{n}"
        assert c.transports[leader.id].read_points_answered == answered, "a read point without a lease"


async def test_a_read_asked_before_any_leader_is_known_completes_once_one_is(tmp_path: Path) -> None:
    """A follower without a leader drops a read index request: a read asked then (a member that
    has just started, an election under way) waits until a leader is known instead of waiting out
    its timeout. Asked on all three members at start, at most one of which will lead."""
    async with cluster(tmp_path) as c:
        done: dict[int, float] = {}

        async def read(node: RaftNode) -> None:
            started = trio.current_time()
            await node.read_barrier(timeout_s=DEADLINE_S)
            done[node.id] = trio.current_time() - started

        async with trio.open_nursery() as nursery:
            for node in c.nodes.values():
                nursery.start_soon(read, node)
        assert sorted(done) == [1, 2, 3]
        assert max(done.values()) < DEADLINE_S / 3, done


async def test_cut_off_leader_times_out_loses_and_refuses_reads(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        old = await c.leader()
        await old.propose(encode_put("k", "before"))
        c.isolated.add(old.id)
        outcomes: dict[str, BaseException] = {}

        async def propose(name: str, timeout_s: float) -> None:
            try:
                await old.propose(encode_put("k", name), timeout_s=timeout_s)
            except (ProposalLost, ProposalTimeout) as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(propose, "short", 0.2)
            nursery.start_soon(propose, "long", DEADLINE_S)
            await refuses_reads_once_its_lease_ends(old, cut_at=trio.current_time())
            new = await c.leader(exclude=frozenset({old.id}))
            for n in range(5):  # take the indexes the cut-off leader had appended at
                await new.propose(encode_put("k", f"new{n}"))
            c.isolated.clear()
        assert isinstance(outcomes["short"], ProposalTimeout), outcomes
        assert isinstance(outcomes["long"], ProposalLost), outcomes
        await old.read_barrier()
        assert c.sms[old.id].get("k") == "new4"


async def refuses_reads_once_its_lease_ends(leader: RaftNode, cut_at: float) -> None:
    """A leader cut off at `cut_at` answers reads from its lease at most for an election timeout
    (the lease is shorter), then no quorum confirms one: NotLeader. (Expecting NotLeader at once
    failed whenever the lease still held: a valid lease read, not a fault.)"""
    lease_bound_s = 2 * SETTINGS.election_ticks * SETTINGS.tick_ms / 1000  # twice: the loop may be late
    while True:
        try:
            await leader.read_barrier(timeout_s=0.3)
        except NotLeader:
            return
        assert trio.current_time() - cut_at < lease_bound_s, "a cut-off leader answered reads past its lease"
        await trio.sleep(SETTINGS.tick_ms / 1000)


@pytest.mark.serial  # proposals must apply within a wall-clock deadline, elections on wall-clock time
async def test_concurrent_proposals_apply_everywhere_with_pipelined_and_deferred_applies(tmp_path: Path) -> None:
    """Under concurrent load the leader's apply-only Readys run behind its loop and the followers'
    wait for their next append; every command still lands once, in order, on every member, and a
    follower's deferred applies are flushed on their own once the load stops."""
    async with cluster(tmp_path) as c:
        leader = await c.leader()
        results: list[int] = []

        async def proposer(slot: int) -> None:
            for n in range(40):
                results.append(await leader.propose(encode_put(f"p{slot}", str(n))))

        async with trio.open_nursery() as nursery:
            for slot in range(16):
                nursery.start_soon(proposer, slot)
        assert len(results) == len(set(results)) == 16 * 40
        assert leader.pipelined_applies > 0
        last = max(results)
        with trio.fail_after(DEADLINE_S):
            while not all(n.applied >= last for n in c.nodes.values()):
                await trio.sleep(0.005)
        for i in c.nodes:
            assert [c.sms[i].get(f"p{slot}") for slot in range(16)] == ["39"] * 16


@pytest.mark.parametrize("path", ["wire", "grpc"])
async def test_a_follower_forwards_to_the_leader_and_a_resent_entry_applies_once(tmp_path: Path, path: str) -> None:
    """Forward on the Raft wire, and Member.Forward on real gRPC (a peer without the wire): a
    follower's proposal is ordered by the leader and answered from the follower's own apply; a
    Forward that reaches a follower comes back as NotLeader with the hint; an entry sent again
    after a newer write to the same key is not applied again."""
    async with cluster(tmp_path, forwarding=True) as c:
        def forwarder(i: int) -> Forwarder:
            return Forwarder(c.transports[i].channel_to, wire=c.transports[i].forward if path == "wire" else None)

        leader = await c.leader()
        follower = await c.follower_of(leader)
        index = await follower.propose(encode_put("k", "via-follower"))
        assert c.sms[follower.id].get("k") == "via-follower"  # answered from its own apply
        assert index > 0

        await connected(c.transports[follower.id], leader.id)
        to_leader = forwarder(follower.id)
        entry = HEADER.pack(7, FORWARDED | 1) + encode_put("dup", "old")
        first = await to_leader(leader.id, entry)
        await leader.propose(encode_put("dup", "new"))
        second = await to_leader(leader.id, entry)  # the resend a lost reply would cause
        assert second > first
        await follower.read_barrier()
        assert c.sms[follower.id].get("dup") == c.sms[leader.id].get("dup") == "new"

        await connected(c.transports[leader.id], follower.id)
        to_follower = forwarder(leader.id)
        with pytest.raises(NotLeader) as err:
            await to_follower(follower.id, entry)
        assert err.value.leader_id == leader.id
        assert (to_leader.over_grpc, to_follower.over_grpc) == ((0, 0) if path == "wire" else (2, 1))


async def connected(transport: RaftTransport, peer: int) -> None:
    """Until `transport` has its wire connection to `peer` open."""
    with trio.fail_after(DEADLINE_S):
        while transport.stats()[peer]["sent_frames"] == transport.stats()[peer]["legacy_frames"]:
            await trio.sleep(0.02)


async def test_a_leader_only_proposal_is_never_forwarded(tmp_path: Path) -> None:
    """`forward=False` (a leader's own decision, e.g. expiring a member by its clock): on a node
    that does not lead it fails with NotLeader and reaches no log, though forwarding is on. A
    paused leader that woke up and forwarded its stale expiry to the new leader expired a healthy
    member (a nemesis run)."""
    async with cluster(tmp_path, forwarding=True) as c:
        leader = await c.leader()
        follower = await c.follower_of(leader)
        with pytest.raises(NotLeader) as err:
            await follower.propose(encode_put("stale", "decision"), forward=False)
        assert err.value.leader_id == leader.id
        await leader.propose(encode_put("after", "it"))  # everything before this is applied everywhere
        for node in c.nodes.values():
            await node.read_barrier()
            assert c.sms[node.id].get("after") == "it" and c.sms[node.id].get("stale") is None
        assert await leader.propose(encode_put("own", "decision"), forward=False) > 0  # the leader's own: fine
