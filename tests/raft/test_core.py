"""Unit tests of the pure core, following the Raft paper section by section where it applies."""

from __future__ import annotations

import pytest

from awsomefsd.meta.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    ProposalDropped,
    RawNode,
    Snapshot,
    SnapshotMeta,
    StateType,
)
from awsomefsd.meta.raft.codec import encode_conf_change
from awsomefsd.meta.raft.messages import EntryType
from awsomefsd.meta.replication.driver import _split_early

MT = MessageType


class Cluster:
    """Cores wired through a queue; the test decides what gets delivered."""

    def __init__(self, n: int, learners: int = 0, **cfg: object) -> None:
        self.nodes: dict[int, RawNode] = {}
        self.storage: dict[int, MemoryStorage] = {}
        self.dropped: set[int] = set()
        voters = tuple(range(1, n + 1))
        conf = ConfState(voters, tuple(range(n + 1, n + learners + 1)))
        for i in range(1, n + learners + 1):
            st = MemoryStorage()
            st.apply_snapshot(Snapshot(SnapshotMeta(1, 1, conf)))
            st.set_hard_state(HardState(1, 0, 1))
            self.storage[i] = st
            self.nodes[i] = RawNode(Config(id=i, random_below=lambda n: 0, applied=1, **cfg), st)  # type: ignore[arg-type]

    def drain(self, i: int) -> list[Message]:
        node, st = self.nodes[i], self.storage[i]
        out: list[Message] = []
        while node.has_ready():
            rd = node.ready()
            if rd.snapshot:
                st.apply_snapshot(rd.snapshot)
            st.append(rd.entries)
            if rd.hard_state:
                st.set_hard_state(rd.hard_state)
            out.extend(rd.messages)
            node.advance(rd)
        return out

    def stabilize(self) -> None:
        for _ in range(100):
            msgs = [m for i in self.nodes for m in self.drain(i)]
            if not msgs:
                return
            for m in msgs:
                if m.to not in self.dropped and m.frm not in self.dropped:
                    self.nodes[m.to].step(m)
        raise AssertionError("did not stabilize")

    def elect(self, i: int) -> None:
        self.nodes[i].campaign()
        self.stabilize()
        assert self.nodes[i].is_leader


def test_5_2_a_node_votes_once_per_term() -> None:
    c = Cluster(3, pre_vote=False, check_quorum=False)
    n = c.nodes[3]
    n.step(Message(MT.VOTE, to=3, frm=1, term=2, index=1, log_term=1))
    n.step(Message(MT.VOTE, to=3, frm=2, term=2, index=1, log_term=1))
    resps = [m for m in c.drain(3) if m.type == MT.VOTE_RESP]
    assert [(m.to, m.reject) for m in resps] == [(1, False), (2, True)]
    assert c.storage[3].hard_state.vote == 1  # the vote is persisted before the response leaves


def test_5_4_1_votes_only_for_an_up_to_date_log() -> None:
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.elect(1)
    c.nodes[1].propose(b"x")
    c.stabilize()
    n = c.nodes[3]
    n.step(Message(MT.VOTE, to=3, frm=2, term=5, index=2, log_term=2))  # shorter log, same last term
    assert [m.reject for m in c.drain(3) if m.type == MT.VOTE_RESP] == [True]


def test_5_3_fast_backoff_skips_a_whole_term_per_round_trip() -> None:
    c = Cluster(3, pre_vote=False)
    c.elect(1)
    # Node 3 holds 50 entries of a stale term after index 2; the leader's log has term 2 there.
    st = c.storage[3]
    st.append([Entry(1, i, data=b"stale") for i in range(3, 53)])
    c.nodes[3] = RawNode(Config(id=3, random_below=lambda n: 0, applied=1, pre_vote=False), st)
    c.nodes[1].propose(b"new")
    rounds = 0
    while rounds < 10:
        msgs = [m for i in c.nodes for m in c.drain(i)]
        if not msgs:
            break
        rounds += 1
        for m in msgs:
            c.nodes[m.to].step(m)
    assert rounds < 10
    assert [e.data for e in c.nodes[3].raft.log.all_entries()][-1] == b"new"


def test_inflight_window_bounds_what_an_unresponsive_follower_costs() -> None:
    c = Cluster(3, max_inflight_msgs=4, pre_vote=False)
    c.elect(1)
    c.dropped = {3}
    apps_to_3 = 0
    for i in range(50):
        c.nodes[1].propose(b"%d" % i)
        for m in c.drain(1):
            apps_to_3 += m.to == 3 and m.type == MT.APP and bool(m.entries)
            if m.to == 2:
                c.nodes[2].step(m)
        for m in c.drain(2):
            c.nodes[1].step(m)
    assert apps_to_3 == 4


def test_proposals_between_readies_leave_in_one_message_per_follower() -> None:
    c = Cluster(3)
    c.elect(1)
    for i in range(20):
        c.nodes[1].propose(b"%d" % i)
    apps = [m for m in c.drain(1) if m.type == MT.APP]
    assert sorted(m.to for m in apps) == [2, 3]
    assert all(len(m.entries) == 20 for m in apps)


def test_proposals_are_refused_with_a_reason() -> None:
    c = Cluster(3, max_uncommitted_entries=5)
    with pytest.raises(ProposalDropped, match="not the leader"):
        c.nodes[2].propose(b"x")
    c.elect(1)
    with pytest.raises(ProposalDropped) as e:
        c.nodes[2].propose(b"x")
    assert e.value.leader_hint == 1
    with pytest.raises(ProposalDropped, match="voter"):
        c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 2))
    c.dropped = {2, 3}
    for i in range(5):
        c.nodes[1].propose(b"%d" % i)
    with pytest.raises(ProposalDropped, match="uncommitted"):
        c.nodes[1].propose(b"over")


def test_membership_follows_the_log_and_reverts_on_truncation() -> None:
    """A follower uses the newest configuration in its log, committed or not (thesis §4.1)."""
    c = Cluster(3, pre_vote=False)
    c.elect(1)
    f = c.nodes[3].raft
    cc = Entry(2, 3, EntryType.CONF_CHANGE, encode_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 2)))
    f.step(Message(MT.APP, to=3, frm=1, term=2, index=2, log_term=2, entries=(cc,), commit=2))
    assert f.voters == {1, 3}
    # A new leader of term 3 overwrites index 3: the change is gone, so is its configuration.
    f.step(Message(MT.APP, to=3, frm=2, term=3, index=2, log_term=2, entries=(Entry(3, 3),), commit=2))
    assert f.voters == {1, 2, 3}
    assert c.nodes[3].conf_state_at(2) == ConfState((1, 2, 3))


def test_a_lone_leader_adds_two_voters_in_one_proposal_and_nobody_else_adds_several() -> None:
    """Design note 146: a forming cluster goes from one voter to three without resting at two."""
    c = Cluster(1, learners=3)
    c.elect(1)
    add = [ConfChange(ConfChangeType.ADD_NODE, n) for n in (2, 3)]
    with pytest.raises(ProposalDropped, match="only voter"):
        c.nodes[1].propose_conf_change(add[0], ConfChange(ConfChangeType.REMOVE_NODE, 4))
    c.nodes[1].propose_conf_change(*add)
    assert c.nodes[1].raft.voters == {1, 2, 3}  # in force on append
    c.dropped = {2}
    c.stabilize()  # node 3's acknowledgement with the leader's own is a quorum of three
    assert c.nodes[1].raft.log.committed == c.nodes[1].raft.log.last_index()
    assert c.nodes[3].raft.voters == {1, 2, 3} and c.nodes[3].raft.learners == {4}
    with pytest.raises(ProposalDropped, match="only voter"):  # three voters: one change at a time
        c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4), ConfChange(ConfChangeType.REMOVE_NODE, 2))
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4))
    assert c.nodes[1].raft.voters == {1, 2, 3, 4}


def test_the_driver_sends_no_append_before_a_new_configuration_is_durable() -> None:
    """The lone leader's batch is safe only if it is on the leader's disk before any follower can
    use it: the driver's early appends (sent while the leader persists) wait for a change."""
    c = Cluster(1, learners=2)
    c.elect(1)
    term = c.nodes[1].raft.term
    c.nodes[1].propose(b"x")
    rd = c.nodes[1].ready()
    early, _late = _split_early(rd, term)
    assert {m.to for m in early if m.type == MT.APP} == {2, 3}
    c.storage[1].append(rd.entries)
    c.nodes[1].advance(rd)
    c.nodes[1].propose_conf_change(*(ConfChange(ConfChangeType.ADD_NODE, n) for n in (2, 3)))
    rd = c.nodes[1].ready()
    early, late = _split_early(rd, term)
    assert early == [] and {m.to for m in late if m.type == MT.APP} == {2, 3}


def test_learners_never_campaign() -> None:
    st = MemoryStorage()
    st.apply_snapshot(Snapshot(SnapshotMeta(1, 1, ConfState((1,), (2,)))))
    n = RawNode(Config(id=2, random_below=lambda n: 0), st)
    for _ in range(100):
        n.tick()
    assert n.raft.state == StateType.FOLLOWER and not n.has_ready()


def test_single_voter_commits_alone_and_reads_at_once() -> None:
    c = Cluster(1)
    c.elect(1)
    c.nodes[1].propose(b"x")
    c.nodes[1].read_index(b"r")
    rd = c.nodes[1].ready()
    assert [e.data for e in rd.committed_entries] == [b"x"]
    assert [(s.index, s.request_ctx) for s in rd.read_states] == [(3, b"r")]


def test_local_messages_cannot_come_from_the_network() -> None:
    c = Cluster(3)
    with pytest.raises(ValueError):
        c.nodes[1].step(Message(MT.HUP))


def test_config_is_validated() -> None:
    st = MemoryStorage()
    for bad in (
        {"id": 0},
        {"id": 1, "election_tick": 1, "heartbeat_tick": 1},
        {"id": 1, "lease_ticks": 10},
        {"id": 1, "check_quorum": False, "read_only_option": 1},
    ):
        with pytest.raises(AssertionError):
            RawNode(Config(random_below=lambda n: 0, **bad), st)  # type: ignore[arg-type]
