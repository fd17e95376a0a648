"""How a proposal or a read can fail. Each says what the caller may assume about its command."""

from __future__ import annotations


class NotLeader(Exception):
    """This node cannot order commands; `leader_id` is the leader it knows of (0: none yet).
    The command was certainly not appended: retrying (there) is safe."""

    def __init__(self, leader_id: int) -> None:
        super().__init__(f"not the leader (leader: {leader_id or 'unknown'})")
        self.leader_id = leader_id


class ProposalLost(Exception):
    """The command was certainly not applied (another entry took its place): retrying is safe."""


class ProposalTimeout(Exception):
    """The command's outcome is unknown: not applied in time (it may still be applied later), or
    applied by a snapshot this node installed (its result was never seen here)."""


__all__ = ["NotLeader", "ProposalLost", "ProposalTimeout"]
