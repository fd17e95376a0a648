"""The leader's side of the Raft core: replication, commit, reads, leases and transfers.

Split from core.py only to keep files short: `Leader` is a mixin of `core.Raft` and shares its
state; nothing here runs unless that core is the leader (or answers as one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .codec import decode_conf_change
from .config import ReadOnlyOption
from .membership import InvalidConfChange, apply_conf_change, validate_conf_change
from .messages import NONE, ConfChange, ConfChangeType, Entry, EntryType, Message, ReadState, StateType
from .messages import MessageType as MT
from .progress import NEVER_TICK, Progress, ProgressState
from .quorum import VoteResult, committed_index, vote_result
from .storage import LogCompacted, SnapshotTemporarilyUnavailable

if TYPE_CHECKING:
    from .config import Config
    from .log import RaftLog
    from .membership import ConfHistory
    from .readonly import ReadOnly


class ProposalDropped(Exception):
    """The proposal was not appended. `leader_hint` is the leader this node knows of (or NONE)."""

    def __init__(self, reason: str, leader_hint: int = NONE) -> None:
        super().__init__(reason)
        self.leader_hint = leader_hint


class Leader:
    if TYPE_CHECKING:
        id: int
        cfg: Config
        log: RaftLog
        term: int
        lead: int
        state: StateType
        prs: dict[int, Progress]
        voters: frozenset[int]
        conf: ConfHistory
        ticks: int
        lead_transferee: int
        pending_conf_index: int
        read_only: ReadOnly
        read_states: list[ReadState]
        pending_read_index_messages: list[Message]
        lease_disabled: bool
        lease_reads_allowed: bool
        append_pending: bool
        election_elapsed: int

        def _send(self, m: Message) -> None: ...
        def _quorum_active(self) -> bool: ...
        def _sync_conf(self, first_written: int, ents: list[Entry]) -> None: ...
        def become_follower(self, term: int, lead: int) -> None: ...

    def lease_valid(self) -> bool:
        """Whether the leader may answer a read alone.

        Each acknowledged heartbeat tells the leader that its follower, on receipt, restarted an
        election_tick-long promise not to vote for anyone else. Once a quorum acknowledged heartbeats
        sent at tick >= s, no other leader can exist before s + election_tick of the slowest voter's
        ticks; we claim only s + lease_ticks of ours. A transfer in this term voids the lease, since
        TimeoutNow makes voters break their promise.
        """
        if (self.cfg.read_only_option != ReadOnlyOption.LEASE_BASED or self.lease_disabled
                or not self.lease_reads_allowed):
            return False
        if self.state != StateType.LEADER or self.lead_transferee != NONE:
            return False
        acks = {i: (self.ticks if i == self.id else pr.lease_ack_tick) for i, pr in self.prs.items()}
        since = committed_index(self.voters, acks, missing=NEVER_TICK)
        return self.ticks < since + self.cfg.effective_lease_ticks

    def _step_leader(self, m: Message) -> None:
        if m.type == MT.BEAT:
            self._bcast_heartbeat(self.read_only.last_pending_request_ctx())
            return
        if m.type == MT.CHECK_QUORUM:
            if not self._quorum_active():
                self.become_follower(self.term, NONE)
            return
        if m.type == MT.READ_INDEX:
            self._leader_read_index(m)
            return
        if m.type == MT.TRANSFER_LEADER:
            self._handle_transfer_leader(m.index)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return  # not (or no longer) a member
        if m.type == MT.APP_RESP:
            self._handle_append_response(m, pr)
        elif m.type == MT.HEARTBEAT_RESP:
            self._handle_heartbeat_response(m, pr)
        elif m.type == MT.SNAP_STATUS:
            if pr.state == ProgressState.SNAPSHOT:
                if m.reject:
                    pr.pending_snapshot = 0
                pr.become_probe()
                pr.probe_sent = True  # wait for the follower's answer before probing again
        elif m.type == MT.UNREACHABLE and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._maybe_send_append(m.frm, True)
            return
        old_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and pr.match + 1 >= self.log.first_index():
            pr.become_probe()
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self._maybe_commit():
            pass
        elif old_paused and self.state == StateType.LEADER:
            self._maybe_send_append(m.frm, True)
        if self.state != StateType.LEADER or m.frm not in self.prs:
            return
        while self._maybe_send_append(m.frm, False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send_timeout_now(m.frm)

    def _handle_heartbeat_response(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        pr.probe_sent = False
        if pr.lease_ack_tick < m.index <= self.ticks:
            pr.lease_ack_tick = m.index
        if (
            pr.state == ProgressState.SNAPSHOT
            and self.ticks - pr.snapshot_sent_tick >= self.cfg.effective_snapshot_retry_ticks
        ):
            pr.become_probe()  # the snapshot (or its answer) was lost: probe, and resend if needed
        if pr.state == ProgressState.REPLICATE and pr.inflights.full():
            pr.inflights.free_first_one()
        if pr.match < self.log.last_index():
            self._maybe_send_append(m.frm, True)
        if not m.context:
            return
        acks = self.read_only.recv_ack(m.frm, m.context)
        if acks is None or vote_result(self.voters, dict.fromkeys(acks, True)) != VoteResult.WON:
            return
        for rs in self.read_only.advance(m.context):
            self._respond_read(rs.request, rs.index)

    def _leader_read_index(self, m: Message) -> None:
        point = self.lease_read_point()
        if point is not None:
            self._respond_read(m, point)
            return
        if self.log.zero_term_on_compacted(self.log.committed) != self.term:
            # Until an entry of ours commits we do not know the true commit index (§6.4 step 1).
            if len(self.pending_read_index_messages) < self.cfg.max_pending_reads:
                self.pending_read_index_messages.append(m)
            return
        if self.read_only.add_request(self.log.committed, m):
            if self.id in self.voters:
                self.read_only.recv_ack(self.id, m.context)
            self._bcast_heartbeat(m.context)

    def lease_read_point(self) -> int | None:
        """The commit index where a read may be answered at once: a group of one, or an entry of
        this term committed and the lease valid; None where it needs a heartbeat round (or this
        node does not lead). The caller must have ticked up to the present: a lease is measured
        in ticks."""
        if self.state != StateType.LEADER:
            return None
        if self.voters == {self.id}:
            return self.log.committed
        if self.log.zero_term_on_compacted(self.log.committed) != self.term or not self.lease_valid():
            return None
        return self.log.committed

    def _respond_read(self, m: Message, index: int) -> None:
        if m.frm in (NONE, self.id):
            self.read_states.append(ReadState(index, m.context))
        else:
            self._send(Message(MT.READ_INDEX_RESP, to=m.frm, index=index, context=m.context))

    def _handle_transfer_leader(self, transferee: int) -> None:
        if transferee not in self.voters or transferee == self.id or transferee == self.lead_transferee:
            return
        self.election_elapsed = 0  # the transfer must finish within one election timeout
        self.lead_transferee = transferee
        if self.prs[transferee].match == self.log.last_index():
            self._send_timeout_now(transferee)
        else:
            self._maybe_send_append(transferee, True)

    def _send_timeout_now(self, to: int) -> None:
        self.lease_disabled = True
        self._send(Message(MT.TIMEOUT_NOW, to=to))

    def propose(self, entries: list[Entry]) -> int:
        """Append entries (term and index are assigned here); returns the index of the last one."""
        if self.state != StateType.LEADER:
            raise ProposalDropped("not the leader", self.lead)
        if self.id not in self.voters:
            raise ProposalDropped("this leader is being removed")
        if self.lead_transferee != NONE:
            raise ProposalDropped("leadership transfer in progress", self.lead_transferee)
        assert 0 < len(entries) <= self.cfg.max_proposal_batch, len(entries)
        if self.log.last_index() - self.log.committed + len(entries) > self.cfg.max_uncommitted_entries:
            raise ProposalDropped("too many uncommitted entries", self.id)
        confs = [decode_conf_change(e.data) for e in entries if e.type == EntryType.CONF_CHANGE]
        if confs:
            if self.pending_conf_index > self.log.committed:
                raise ProposalDropped("a membership change is pending", self.id)
            self._validate_conf_changes(confs)
        last = self._append_entries(entries)
        if confs:
            self.pending_conf_index = last
        self.append_pending = True
        return last

    def _validate_conf_changes(self, confs: list[ConfChange]) -> None:
        """One change at a time (thesis §4.1), with one exception: a leader that is the only voter
        may add several voters in one proposal. Its configuration's one quorum is itself, and it
        holds the whole batch durably before any follower sees any of it (the driver sends no
        append early for a Ready that carries a change), so no node can use the old configuration
        once a node uses a newer one. What it saves: a forming cluster never rests at two voters,
        which one wiped disk leaves without a quorum for good (design note 146)."""
        cs = self.conf.current()
        if len(confs) > 1 and (set(cs.voters) != {self.id}
                               or any(cc.type != ConfChangeType.ADD_NODE for cc in confs)):
            raise ProposalDropped("only a leader that is the only voter adds several voters at once", self.id)
        for cc in confs:
            try:
                validate_conf_change(cs, cc)
            except InvalidConfChange as e:
                raise ProposalDropped(str(e), self.id) from None
            cs = apply_conf_change(cs, cc)

    def _append_entries(self, entries: list[Entry]) -> int:
        li = self.log.last_index()
        ents = [Entry(self.term, li + 1 + i, e.type, e.data) for i, e in enumerate(entries)]
        self.log.append(ents)
        self._sync_conf(ents[0].index, ents)
        if self.id in self.prs:
            self.prs[self.id].maybe_update(self.log.last_index())
        self._maybe_commit()
        return self.log.last_index()

    def _maybe_commit(self) -> bool:
        if self.state != StateType.LEADER:
            return False
        mci = committed_index(self.voters, {i: pr.match for i, pr in self.prs.items()})
        if not self.log.maybe_commit(mci, self.term):
            return False
        self._bcast_append()
        if self.pending_read_index_messages:
            pending, self.pending_read_index_messages = self.pending_read_index_messages, []
            for m in pending:
                self._leader_read_index(m)
        if self.id not in self.voters and self.log.committed >= self.conf.current_index():
            self._step_down_removed()
        return True

    def _step_down_removed(self) -> None:
        """Our removal is committed: hand over to the most up-to-date voter and step down."""
        best = max((i for i in self.voters), key=lambda i: (self.prs[i].match, -i), default=NONE)
        if best != NONE and self.prs[best].match == self.log.last_index():
            self._send_timeout_now(best)
        self.become_follower(self.term, NONE)

    def flush_appends(self) -> None:
        """Send what proposals appended since the last Ready, one message per follower (batching)."""
        if self.append_pending and self.state == StateType.LEADER:
            self._bcast_append()
        self.append_pending = False

    def _bcast_append(self) -> None:
        for i in self.prs:
            if i != self.id:
                self._maybe_send_append(i, True)

    def _bcast_heartbeat(self, ctx: bytes) -> None:
        for i, pr in self.prs.items():
            if i != self.id:
                commit = min(pr.match, self.log.committed)
                self._send(Message(MT.HEARTBEAT, to=i, commit=commit, index=self.ticks, context=ctx))

    def _maybe_send_append(self, to: int, send_if_empty: bool) -> bool:
        pr = self.prs[to]
        if pr.is_paused():
            return False
        prev = pr.next - 1
        try:
            prev_term = self.log.term(prev)
            ents = self.log.entries(pr.next, self.cfg.max_size_per_msg_bytes)
        except LogCompacted:
            return self._send_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        if ents and pr.state == ProgressState.REPLICATE:
            pr.optimistic_update(ents[-1].index)
            pr.inflights.add(ents[-1].index)
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = True
        self._send(
            Message(
                MT.APP, to=to, index=prev, log_term=prev_term, entries=tuple(ents), commit=self.log.committed
            )
        )
        return True

    def _send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            return False  # do not ship a snapshot to a node that does not answer
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailable:
            return False
        assert not snap.is_empty, "log compacted without a snapshot"
        pr.become_snapshot(snap.meta.index, self.ticks)
        self._send(Message(MT.SNAP, to=to, snapshot=snap))
        return True
