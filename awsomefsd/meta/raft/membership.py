"""Membership: single-server changes, in force from the moment they are appended (thesis §4.1);
the one exception, several voters added at once to a leader that is the only one, is checked where
proposals are (leader.py `_validate_conf_changes`, design note 146).

A node uses the latest configuration in its log, committed or not. That is what keeps quorums of
consecutive configurations overlapping, so a node that is slow to *apply* a change can never use an
older configuration than its log implies. The price is that a follower whose log is truncated must
fall back to the configuration in the remaining log; `ConfHistory` keeps the configurations above
the last snapshot for that.
"""

from __future__ import annotations

from .messages import ConfChange, ConfChangeType, ConfState

MAX_MEMBERS = 1024


class InvalidConfChange(Exception):
    """The change makes no sense against the current configuration (refused at proposal time)."""


def validate_conf_change(cs: ConfState, cc: ConfChange) -> None:
    voters, learners = set(cs.voters), set(cs.learners)
    if cc.node_id <= 0:
        raise InvalidConfChange(f"bad node id {cc.node_id}")
    if cc.type == ConfChangeType.ADD_NODE:
        if cc.node_id in voters:
            raise InvalidConfChange(f"{cc.node_id} is already a voter")
    elif cc.type == ConfChangeType.ADD_LEARNER:
        if cc.node_id in voters:
            raise InvalidConfChange(f"{cc.node_id} is a voter; demotion is not supported")
        if cc.node_id in learners:
            raise InvalidConfChange(f"{cc.node_id} is already a learner")
    elif cc.type == ConfChangeType.REMOVE_NODE:
        if cc.node_id not in voters | learners:
            raise InvalidConfChange(f"{cc.node_id} is not a member")
        if voters == {cc.node_id}:
            raise InvalidConfChange("cannot remove the last voter")
    if len(voters | learners | {cc.node_id}) > MAX_MEMBERS:
        raise InvalidConfChange("too many members")


def apply_conf_change(cs: ConfState, cc: ConfChange) -> ConfState:
    """The configuration after `cc`. Deterministic; an invalid change leaves `cs` as it is, so every
    replica computes the same configuration from the same log."""
    try:
        validate_conf_change(cs, cc)
    except InvalidConfChange:
        return cs
    voters, learners = set(cs.voters), set(cs.learners)
    if cc.type == ConfChangeType.ADD_NODE:
        learners.discard(cc.node_id)
        voters.add(cc.node_id)
    elif cc.type == ConfChangeType.ADD_LEARNER:
        learners.add(cc.node_id)
    else:
        voters.discard(cc.node_id)
        learners.discard(cc.node_id)
    return ConfState.of(voters, learners)


class ConfHistory:
    """The configuration at the snapshot (`base`) and after each change entry above it."""

    def __init__(self, base_index: int, base: ConfState) -> None:
        self.base_index = base_index
        self.base = base
        self.changes: list[tuple[int, ConfState]] = []

    def current(self) -> ConfState:
        return self.changes[-1][1] if self.changes else self.base

    def current_index(self) -> int:
        """Index of the entry that introduced the configuration in force."""
        return self.changes[-1][0] if self.changes else self.base_index

    def append(self, index: int, cc: ConfChange) -> None:
        assert index > self.current_index(), (index, self.current_index())
        self.changes.append((index, apply_conf_change(self.current(), cc)))

    def truncate_from(self, index: int) -> bool:
        """Forget changes at or after `index` (their entries were overwritten). True if any were."""
        n = len(self.changes)
        while self.changes and self.changes[-1][0] >= index:
            self.changes.pop()
        return len(self.changes) != n

    def at(self, index: int) -> ConfState:
        """The configuration in force at log index `index` (for snapshots taken at that index)."""
        assert index >= self.base_index, f"index {index} is below the snapshot at {self.base_index}"
        cs = self.base
        for i, c in self.changes:
            if i > index:
                break
            cs = c
        return cs

    def reset(self, base_index: int, base: ConfState) -> None:
        self.base_index = base_index
        self.base = base
        self.changes = []
