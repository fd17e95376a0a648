"""The driver's settings: its clock, its timeouts, when it snapshots, how it batches."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSettings:
    tick_ms: int = 50
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    proposal_timeout_s: float = 10.0
    read_timeout_s: float = 5.0
    snapshot_entries: int = 10_000
    """Take a snapshot (and compact the log) every this many applied entries."""
    catch_up_entries: int = 1_000
    """Entries kept behind a snapshot so a briefly lagging follower catches up from the log."""
    max_batch: int = 1024
    persist_in_thread: bool = True
    """Run a leader's write transactions (and their fsync) in a worker thread, so its loop keeps
    taking messages and proposals meanwhile; False persists on the loop (a state machine whose
    memory the trio thread owns needs that)."""

    def __post_init__(self) -> None:
        assert 1 <= self.tick_ms <= 10_000
        assert 0 < self.heartbeat_ticks < self.election_ticks
        assert self.snapshot_entries > 0 and self.catch_up_entries >= 0
        assert 0 < self.max_batch <= 4096
