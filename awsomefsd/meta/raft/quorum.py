"""Majority arithmetic. Membership changes one server at a time, so one majority is all we need."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping


class VoteResult(enum.IntEnum):
    PENDING = 0
    LOST = 1
    WON = 2


def quorum_size(n_voters: int) -> int:
    return n_voters // 2 + 1


def committed_index(voters: Collection[int], acked: Mapping[int, int], missing: int = 0) -> int:
    """The largest value that a majority of voters has reached (or exceeded).

    Used for the commit index (acked = match indexes) and for the leader lease (acked = ticks at
    which acknowledged heartbeats were sent). An empty configuration commits nothing.
    """
    if not voters:
        return missing
    values = sorted((acked.get(v, missing) for v in voters), reverse=True)
    return values[quorum_size(len(values)) - 1]


def vote_result(voters: Collection[int], votes: Mapping[int, bool]) -> VoteResult:
    if not voters:
        return VoteResult.LOST  # nobody to vote: no election can be won
    granted = sum(1 for v in voters if votes.get(v) is True)
    rejected = sum(1 for v in voters if votes.get(v) is False)
    q = quorum_size(len(voters))
    if granted >= q:
        return VoteResult.WON
    if len(voters) - rejected >= q:
        return VoteResult.PENDING
    return VoteResult.LOST
