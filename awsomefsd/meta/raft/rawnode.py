"""The caller's handle on one Raft core: feed it inputs, then drain a Ready and advance().

Contract for one Ready, in order: (1) persist `snapshot`, `entries` and `hard_state` durably (one
write transaction is fine: group commit); (2) send `messages`; (3) apply `snapshot`, then
`committed_entries`, in order, recording each applied index atomically with its effect; (4) call
advance(ready). Only one Ready is outstanding at a time. Proposals made between two Readys leave
in one append message per follower, so the caller batches simply by proposing several commands
before asking for the next Ready.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .codec import encode_conf_change
from .config import Config
from .core import Raft
from .messages import (
    LOCAL_MESSAGES,
    NONE,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Ready,
    SoftState,
    StateType,
)
from .progress import ProgressState
from .storage import RaftStorage


@dataclass(frozen=True)
class PeerStatus:
    match: int
    next: int
    state: ProgressState
    is_learner: bool


@dataclass(frozen=True)
class Status:
    id: int
    hard_state: HardState
    soft_state: SoftState
    applied: int
    last_index: int
    progress: dict[int, PeerStatus]
    conf_state: ConfState
    lead_transferee: int


class RawNode:
    def __init__(self, config: Config, storage: RaftStorage) -> None:
        self.raft = Raft(config, storage)
        self._prev_soft = self.raft.soft_state()
        self._prev_hard = self.raft.hard_state()
        self._outstanding = False

    # --- inputs -----------------------------------------------------------------------------------
    def tick(self) -> None:
        self.raft.tick()

    def campaign(self) -> None:
        """Start an election now (bootstrap and tests). Breaks lease promises: see docs/raft.md."""
        self.raft.hup(transfer=False)

    def propose(self, data: bytes) -> int:
        """Append one command on the leader; returns its index. Raises ProposalDropped otherwise."""
        return self.raft.propose([Entry(0, 0, EntryType.NORMAL, data)])

    def propose_batch(self, commands: Sequence[bytes]) -> int:
        """Append several commands at once (at most Config.max_proposal_batch); returns the last index."""
        return self.raft.propose([Entry(0, 0, EntryType.NORMAL, d) for d in commands])

    def propose_conf_change(self, *changes: ConfChange) -> int:
        """Propose a membership change (several only to add voters to a leader that is the only
        one); in force on every node as soon as it is appended there."""
        return self.raft.propose([Entry(0, 0, EntryType.CONF_CHANGE, encode_conf_change(cc)) for cc in changes])

    def step(self, m: Message) -> None:
        """Hand over a message from a peer. Local-only kinds are refused: they come from our calls."""
        if m.type in LOCAL_MESSAGES:
            raise ValueError(f"{m.type.name} is local-only")
        self.raft.step(m)

    def read_index(self, request_ctx: bytes) -> None:
        """Ask for a linearizable read point; answered by a ReadState with the same (unique) context."""
        self.raft.step(Message(MessageType.READ_INDEX, context=request_ctx))

    def lease_read_index(self) -> int | None:
        """A leader's read point from its lease, without a Ready: what `read_index` would answer at
        once, or None where it would need a heartbeat round (or is no leader). Only as current as
        the last `tick`: the caller ticks up to the present first."""
        return self.raft.lease_read_point()

    def transfer_leader(self, transferee: int) -> None:
        self.raft.step(Message(MessageType.TRANSFER_LEADER, index=transferee))

    def report_unreachable(self, node_id: int) -> None:
        self.raft.step(Message(MessageType.UNREACHABLE, frm=node_id))

    def report_snapshot(self, node_id: int, delivered: bool) -> None:
        self.raft.step(Message(MessageType.SNAP_STATUS, frm=node_id, reject=not delivered))

    # --- outputs ----------------------------------------------------------------------------------
    def has_ready(self) -> bool:
        r = self.raft
        return bool(
            r.soft_state() != self._prev_soft
            or r.hard_state() != self._prev_hard
            or r.log.unstable.entries
            or r.log.unstable.snapshot is not None
            or r.msgs
            or r.read_states
            or r.append_pending
            or r.log.has_next_committed_entries()
        )

    def ready(self) -> Ready:
        assert not self._outstanding, "advance() the previous Ready first"
        r = self.raft
        r.flush_appends()
        rd = Ready(
            entries=r.log.unstable_entries(),
            committed_entries=r.log.next_committed_entries(),
            messages=r.msgs,
            read_states=r.read_states,
            snapshot=r.log.unstable.snapshot,
        )
        r.msgs = []
        r.read_states = []
        soft = r.soft_state()
        if soft != self._prev_soft:
            rd.soft_state = soft
        hard = r.hard_state()
        if hard != self._prev_hard:
            rd.hard_state = hard
        rd.must_sync = (
            bool(rd.entries or (hard.term, hard.vote) != (self._prev_hard.term, self._prev_hard.vote))
            or rd.snapshot is not None
        )
        self._outstanding = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The caller persisted, sent and applied everything in `rd`."""
        assert self._outstanding, "advance() without ready()"
        log = self.raft.log
        if rd.soft_state is not None:
            self._prev_soft = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            log.stable_snap_to(rd.snapshot.meta.index)
            log.applied_to(rd.snapshot.meta.index)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)
        if rd.entries:
            log.stable_to(rd.entries[-1].index, rd.entries[-1].term)
        self._outstanding = False

    # --- queries ----------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.raft.state == StateType.LEADER

    @property
    def leader_id(self) -> int:
        return self.raft.lead if self.raft.lead else NONE

    def conf_state_at(self, index: int) -> ConfState:
        """Membership in force at `index`: what a snapshot taken at `index` must record."""
        return self.raft.conf.at(index)

    def status(self) -> Status:
        r = self.raft
        progress = (
            {i: PeerStatus(p.match, p.next, p.state, p.is_learner) for i, p in r.prs.items()}
            if r.state == StateType.LEADER
            else {}
        )
        return Status(
            r.id,
            r.hard_state(),
            r.soft_state(),
            r.log.applied,
            r.log.last_index(),
            progress,
            r.conf_state(),
            r.lead_transferee,
        )
