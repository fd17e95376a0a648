"""The leader's next membership change (awsomefsd/cluster/voters.py): a forming cluster never sits at
two voters while a third node is on its way, and a node that joined again after losing its state
takes its old member's vote away at once."""

from __future__ import annotations

from awsomefsd.cluster.voters import LONE_LEARNER_WAIT_S, MembershipView, next_changes
from awsomefsd.meta.raft import ConfChangeType
from awsomefsd.meta.records import Member

ADD_NODE, ADD_LEARNER, REMOVE_NODE = ConfChangeType.ADD_NODE, ConfChangeType.ADD_LEARNER, ConfChangeType.REMOVE_NODE


def member(n: int, address: str, *, state: str = "active", expired: bool = False) -> Member:
    return Member(n, f"node-{n}", address, address, "", state, 1, expired, 0)  # type: ignore[arg-type]


def view(voters: set[int], learners: set[int], members: list[Member], caught_up_s: dict[int, float],
         target: int = 3) -> MembershipView:
    return MembershipView(me=1, voters=frozenset(voters), learners=frozenset(learners),
                          members={m.node: m for m in members}, target=target, caught_up_s=caught_up_s)


def planned(v: MembershipView) -> list[tuple[ConfChangeType, int]]:
    return [(cc.type, cc.node_id) for cc in next_changes(v)]


THREE = [member(1, "a:1"), member(2, "b:1"), member(3, "c:1")]


def test_the_founder_waits_for_a_second_caught_up_learner_then_promotes_both_at_once() -> None:
    assert planned(view({1}, {2, 3}, THREE, {2: 3.0})) == []
    assert planned(view({1}, {2, 3}, THREE, {2: 3.0, 3: 0.1})) == [(ADD_NODE, 2), (ADD_NODE, 3)]
    assert planned(view({1, 2, 3}, set(), THREE, {})) == []
    five = [*THREE, member(4, "d:1"), member(5, "e:1")]
    assert planned(view({1}, {2, 3, 4, 5}, five, {5: 9.0, 2: 1.0, 3: 2.0}, target=5)) == [
        (ADD_NODE, 5), (ADD_NODE, 3), (ADD_NODE, 2)]


def test_a_lone_learner_is_promoted_once_it_has_waited_long_enough_two_nodes_are_a_cluster_too() -> None:
    two = THREE[:2]
    assert planned(view({1}, {2}, two, {2: LONE_LEARNER_WAIT_S - 1})) == []
    assert planned(view({1}, {2}, two, {2: LONE_LEARNER_WAIT_S})) == [(ADD_NODE, 2)]
    assert planned(view({1}, {2}, two, {2: 0.0}, target=2)) == [(ADD_NODE, 2)]


def test_more_voters_promote_one_at_a_time_at_once_and_an_expired_learner_never() -> None:
    members = [*THREE[:2], member(3, "c:1", expired=True)]
    assert planned(view({1, 2}, {3}, members, {3: 99.0})) == []
    assert planned(view({1, 2}, {3}, THREE, {3: 0.0})) == [(ADD_NODE, 3)]
    assert planned(view({1, 2}, {3}, THREE, {})) == []  # not caught up yet
    five = [*THREE, member(4, "d:1"), member(5, "e:1")]
    assert planned(view({1, 2, 3}, {4, 5}, five, {4: 1.0, 5: 1.0}, target=5)) == [(ADD_NODE, 4)]


def test_a_wiped_node_joining_at_its_address_takes_its_old_members_vote_away_at_once() -> None:
    again = [*THREE, member(4, "c:1")]  # node 3's successor; node 3's lease has not lapsed
    assert planned(view({1, 2, 3}, set(), again, {})) == [(REMOVE_NODE, 3)]
    # out of the configuration, the old member is not added back; its successor is
    assert planned(view({1, 2}, set(), again, {})) == [(ADD_LEARNER, 4)]
    assert planned(view({1, 2}, {4}, again, {4: 0.0})) == [(ADD_NODE, 4)]
    wiped_twice = [*again, member(5, "c:1")]  # the successor wiped too before its promotion
    assert planned(view({1, 2}, {4}, wiped_twice, {4: 5.0})) == [(REMOVE_NODE, 4)]


def test_removed_members_leave_first_and_the_leader_never_removes_itself_for_an_address() -> None:
    members = [member(1, "a:1"), member(2, "b:1", state="removed"), member(3, "c:1"), member(9, "a:1")]
    assert planned(view({1, 2, 3}, set(), members, {})) == [(REMOVE_NODE, 2)]
    assert planned(view({1, 3}, set(), members, {})) == [(ADD_LEARNER, 9)]
