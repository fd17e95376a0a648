"""Which change the leader makes next to the Raft configuration (pure: the leader's duty calls it
every tick with what it sees, tests call it with what they choose).

The Raft core changes one member at a time (thesis §4.1), so a configuration passes through every
size between where it is and where it goes. Two of those sizes lose the cluster for good when one
more node loses its disk, because the node that comes back is a new member that only a leader can
admit (design note 146):
- *two voters*, of which one is wiped: the other alone is no quorum. A forming cluster passed through
  two voters for as long as its third node took to catch up (seconds), and a test that wiped a pod
  right after the three had mounted found it wedged. Now the founder stays the only voter until two
  learners are caught up and then promotes both in one proposal (the core allows several voters
  added at once to a leader that is the only one: Raft._validate_conf_changes), unless a lone
  learner has waited `LONE_LEARNER_WAIT_S`: a cluster that really has two nodes;
- *a dead voter kept* while its successor (the same node, wiped, joining again at its address) is a
  learner: a second wipe before the old member's lease expired (lease + margin, 12 s) left two of
  three voters gone. Now a member that a newer one at its address replaced leaves the configuration
  at once (and is not added back as a learner). Its member record still waits for its lease to
  lapse (fencing needs that); its Raft vote need not: removing a voter never costs safety, and a
  dead one's vote only costs availability.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from awsomefsd.meta.raft import ConfChange, ConfChangeType
from awsomefsd.meta.records import Member

LONE_LEARNER_WAIT_S = 20.0
"""How long a founder with one caught-up learner waits for a second before promoting it alone."""
CAUGHT_UP_ENTRIES = 64
"""A learner this close to the leader's last index is promoted (its first quorum will not stall)."""


@dataclass(frozen=True)
class MembershipView:
    """What the leader knows at one tick."""

    me: int
    voters: frozenset[int]
    learners: frozenset[int]
    members: Mapping[int, Member]
    target: int
    """How many voters the cluster wants (ClusterInfo.voters_target)."""
    caught_up_s: Mapping[int, float]
    """For each learner whose log is within CAUGHT_UP_ENTRIES of the leader's: for how long."""


def successors(members: Mapping[int, Member]) -> dict[int, int]:
    """Each member that a newer active member joined at the address of (the same node after it lost
    its state), with the newest such member. Two live members never share an address (design note
    53); names may be shared (hosts cloned, namespaces on one host), so a name says nothing."""
    newest: dict[str, int] = {}
    for n, record in members.items():
        if record.active and record.address:
            newest[record.address] = max(newest.get(record.address, 0), n)
    return {n: newest[record.address] for n, record in members.items() if newest.get(record.address, 0) > n}


def replaced(view: MembershipView) -> frozenset[int]:
    """Members (not this leader) that a newer member replaced: `successors`."""
    return frozenset(n for n in successors(view.members) if n != view.me)


def promotable(view: MembershipView) -> list[int]:
    """Caught-up learners of active, unexpired members, longest caught up first."""
    ready = [n for n in view.learners if n in view.caught_up_s and n in view.members
             and view.members[n].active and not view.members[n].expired]
    return sorted(ready, key=lambda n: (-view.caught_up_s[n], n))


def next_changes(view: MembershipView) -> tuple[ConfChange, ...]:
    """The change to propose now (one, or the voters a lone founder adds at once), or none. Order:
    drop removed members, drop replaced ones, add new members as learners, promote learners while
    voters are below target."""
    for n in sorted(view.voters | view.learners):
        record = view.members.get(n)
        if record is not None and not record.active:
            return (ConfChange(ConfChangeType.REMOVE_NODE, n),)
    gone = replaced(view)
    for n in sorted((view.voters | view.learners) & gone):
        return (ConfChange(ConfChangeType.REMOVE_NODE, n),)
    for n, record in sorted(view.members.items()):
        if record.active and n not in view.voters | view.learners | gone:
            return (ConfChange(ConfChangeType.ADD_LEARNER, n, record.address.encode()),)
    wanted = view.target - len(view.voters)
    ready = promotable(view)[:wanted]
    if not ready:
        return ()
    if view.voters == {view.me} and wanted >= 2 and len(ready) == 1 and view.caught_up_s[ready[0]] < LONE_LEARNER_WAIT_S:
        return ()  # a second voter alone would be a cluster one wiped disk away from no quorum
    if view.voters != {view.me}:
        ready = ready[:1]  # the core adds several voters at once only to a lone leader
    return tuple(ConfChange(ConfChangeType.ADD_NODE, n) for n in ready)
