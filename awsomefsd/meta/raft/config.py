"""Settings of one Raft core, checked once at construction. Time is counted in ticks."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from .messages import NONE


class ReadOnlyOption(enum.IntEnum):
    SAFE = 0
    """ReadIndex confirms leadership with a heartbeat round to a quorum for every batch of reads."""
    LEASE_BASED = 1
    """The leader answers reads alone while its lease holds; needs check_quorum and bounded clock
    drift: `lease_ticks` ticks of the leader must not outlast `election_tick` ticks of any voter."""


MAX_ELECTION_TICK = 10_000
MAX_INFLIGHT_MSGS = 4096
MAX_PROPOSAL_BATCH = 4096


@dataclass(frozen=True)
class Config:
    id: int
    random_below: Callable[[int], int]
    """Injected randomness: returns an int in [0, n). Only the election timeout uses it."""
    election_tick: int = 10
    heartbeat_tick: int = 1
    applied: int = 0
    """Last index the state machine applied (after a restart); committed entries after it are
    handed out again, so applying must be idempotent by index (see replication.apply)."""
    max_size_per_msg_bytes: int = 1 << 20
    max_committed_size_per_ready_bytes: int = 8 << 20
    max_inflight_msgs: int = 256
    max_uncommitted_entries: int = 10_000
    """Proposals are refused while the leader holds this many uncommitted entries."""
    max_proposal_batch: int = 1024
    max_pending_reads: int = 10_000
    check_quorum: bool = True
    pre_vote: bool = True
    read_only_option: ReadOnlyOption = ReadOnlyOption.SAFE
    lease_ticks: int = 0
    """How long (in the leader's ticks) a quorum's heartbeat acknowledgement keeps the lease; 0 means
    election_tick * 3 // 4. Must be below election_tick to leave room for clock drift."""
    snapshot_retry_ticks: int = 0
    """A snapshot unanswered for this many ticks is assumed lost and retried; 0 means 4 * election."""

    def validate(self) -> None:
        assert self.id != NONE and self.id > 0, "node id must be positive"
        assert 0 < self.heartbeat_tick < self.election_tick <= MAX_ELECTION_TICK, (
            self.heartbeat_tick,
            self.election_tick,
        )
        assert 0 < self.max_inflight_msgs <= MAX_INFLIGHT_MSGS
        assert 0 < self.max_proposal_batch <= MAX_PROPOSAL_BATCH
        assert self.max_size_per_msg_bytes > 0 and self.max_committed_size_per_ready_bytes > 0
        assert self.max_uncommitted_entries > 0 and self.max_pending_reads > 0
        assert self.applied >= 0
        if self.read_only_option == ReadOnlyOption.LEASE_BASED:
            assert self.check_quorum, "lease-based reads need check_quorum"
        assert 0 <= self.lease_ticks < self.election_tick, "the lease must be shorter than the election"

    @property
    def effective_lease_ticks(self) -> int:
        return self.lease_ticks or self.election_tick * 3 // 4

    @property
    def effective_snapshot_retry_ticks(self) -> int:
        return self.snapshot_retry_ticks or 4 * self.election_tick
