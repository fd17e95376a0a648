"""The Raft state machine: a pure function of (state, input) -> (state, outputs).

Inputs are messages (`step`), clock ticks (`tick`) and local requests (`propose`, `read_index`,
`transfer_leader`). Outputs accumulate in `msgs`, `read_states` and the log's unstable tail, and
leave through `RawNode.ready()`. Nothing here reads a clock, draws randomness (the election jitter
comes from `Config.random_below`), or does I/O, so a seeded simulator replays it exactly.

Differences from etcd-raft worth knowing: membership changes take effect when appended (see
membership.py); proposals are never forwarded (ProposalDropped names the leader instead, so a caller
never has a command applied twice); lease reads rest on a measured heartbeat quorum, not on
check-quorum alone (see `lease_valid`).
"""

from __future__ import annotations

from .codec import decode_conf_change
from .config import Config, ReadOnlyOption
from .leader import Leader
from .log import RaftLog
from .membership import ConfHistory
from .messages import (
    NONE,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    ReadState,
    Snapshot,
    SoftState,
    StateType,
    vote_response_type,
)
from .messages import MessageType as MT
from .progress import Progress
from .quorum import VoteResult, quorum_size, vote_result
from .readonly import ReadOnly
from .storage import RaftStorage

CAMPAIGN_TRANSFER = b"CampaignTransfer"


class Raft(Leader):
    def __init__(self, config: Config, storage: RaftStorage) -> None:
        config.validate()
        self.id = config.id
        self.cfg = config
        self.log = RaftLog(storage, config.max_committed_size_per_ready_bytes)
        hs, cs = storage.initial_state()
        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.state = StateType.FOLLOWER
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.prs: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.voters: frozenset[int] = frozenset()
        self.learners: frozenset[int] = frozenset()
        self.conf = ConfHistory(self.log.first_index() - 1, cs)
        for e in self.log.all_entries():
            if e.type == EntryType.CONF_CHANGE:
                self.conf.append(e.index, decode_conf_change(e.data))
        self._set_config(self.conf.current())
        self.ticks = 0
        """Ticks since this core started: the leader's clock for lease measurements."""
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self.ticks_since_leader_contact = 0
        """Lease promise: in LEASE_BASED mode no vote is granted until this reaches election_tick.
        It starts at 0, so a restarted node also keeps a promise it may have made before the crash."""
        self.lead_transferee = NONE
        self.pending_conf_index = 0
        self.read_only = ReadOnly(config.max_pending_reads)
        self.pending_read_index_messages: list[Message] = []
        self.lease_disabled = False
        self.lease_reads_allowed = True
        """Whether a leader may answer reads from its lease (with LEASE_BASED); the caller turns it
        off until every member keeps the promise the lease rests on (a rolling upgrade)."""
        self.append_pending = False
        if hs != HardState():
            assert self.log.committed <= hs.commit <= self.log.last_index(), (
                f"commit {hs.commit} out of range [{self.log.committed}, {self.log.last_index()}]"
            )
            self.log.committed = hs.commit
            self.term = hs.term
            self.vote = hs.vote
        if config.applied:
            self.log.applied_to(config.applied)
        self.become_follower(self.term, NONE)

    # --- observation ------------------------------------------------------------------------------
    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.state)

    def conf_state(self) -> ConfState:
        return self.conf.current()

    def promotable(self) -> bool:
        """May this node campaign? A voter may; so may a node whose removal is appended but not
        known committed: it may hold the only copy of that change, and must be able to win an
        election (counting only the others' votes) to commit it and then step down."""
        if self.id in self.voters:
            return True
        return self.id not in self.learners and self.id in self.conf.at(self.log.committed).voters

    # --- configuration ----------------------------------------------------------------------------
    def _set_config(self, cs: ConfState) -> None:
        self.voters = frozenset(cs.voters)
        self.learners = frozenset(cs.learners)

    def _sync_conf(self, first_written: int, ents: tuple[Entry, ...] | list[Entry]) -> None:
        """Entries from `first_written` on replaced the log's tail: recompute the configuration."""
        changed = self.conf.truncate_from(first_written)
        for e in ents:
            if e.index >= first_written and e.type == EntryType.CONF_CHANGE:
                self.conf.append(e.index, decode_conf_change(e.data))
                changed = True
        if changed:
            self._switch_config(self.conf.current())

    def _switch_config(self, cs: ConfState) -> None:
        self._set_config(cs)
        if self.state != StateType.LEADER:
            return
        last = self.log.last_index()
        members = self.voters | self.learners
        for i in list(self.prs):
            if i not in members:
                del self.prs[i]
        for i in members:
            pr = self.prs.get(i)
            if pr is None:
                pr = Progress(last + 1, 0, self.cfg.max_inflight_msgs, i in self.learners)
                pr.recent_active = True
                self.prs[i] = pr
            pr.is_learner = i in self.learners
        if self.lead_transferee not in self.voters:
            self.lead_transferee = NONE
        self._maybe_commit()  # a smaller quorum may already hold newer entries

    # --- state transitions ------------------------------------------------------------------------
    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.cfg.election_tick + self.cfg.random_below(
            self.cfg.election_tick
        )
        self.lead_transferee = NONE
        self.votes = {}
        last = self.log.last_index()
        self.prs = {}
        for i in self.voters | self.learners:
            pr = Progress(last + 1, 0, self.cfg.max_inflight_msgs, i in self.learners)
            if i == self.id:
                pr.match = last
                pr.recent_active = True
            self.prs[i] = pr
        self.pending_conf_index = 0
        self.read_only = ReadOnly(self.cfg.max_pending_reads)
        self.pending_read_index_messages = []
        self.lease_disabled = False
        self.append_pending = False

    def become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.lead = lead
        self.state = StateType.FOLLOWER

    def _become_pre_candidate(self) -> None:
        assert self.state != StateType.LEADER, "invalid transition [leader -> pre-candidate]"
        self.votes = {}
        self.lead = NONE
        self.state = StateType.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        assert self.state != StateType.LEADER, "invalid transition [leader -> candidate]"
        self._reset(self.term + 1)
        self.vote = self.id
        self.state = StateType.CANDIDATE

    def _become_leader(self) -> None:
        assert self.state == StateType.CANDIDATE, "only a candidate becomes leader"
        self._reset(self.term)
        self.lead = self.id
        self.state = StateType.LEADER
        pr = self.prs.get(self.id)
        if pr is not None:
            pr.become_replicate()
        # Entries of earlier terms are only committed with one of ours (§5.4.2), and no membership
        # change may be proposed before they are: that closes the single-server-change bug.
        self.pending_conf_index = self.log.last_index()
        self._append_entries([Entry(term=0, index=0)])
        self.append_pending = True

    # --- clock ------------------------------------------------------------------------------------
    def tick(self) -> None:
        self.ticks += 1
        self.ticks_since_leader_contact += 1
        if self.state == StateType.LEADER:
            self.ticks_since_leader_contact = 0
            self._tick_heartbeat()
        else:
            self._tick_election()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self.hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                if not self._quorum_active():
                    self.become_follower(self.term, NONE)
                    return
                for i, pr in self.prs.items():
                    if i != self.id:
                        pr.recent_active = False
            self.lead_transferee = NONE  # a transfer that did not finish in an election timeout failed
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat(self.read_only.last_pending_request_ctx())

    def _quorum_active(self) -> bool:
        active = sum(1 for i in self.voters if i == self.id or (i in self.prs and self.prs[i].recent_active))
        return bool(self.voters) and active >= quorum_size(len(self.voters))

    def _in_lease(self) -> bool:
        """True while this node promised not to help elect anyone but the current leader."""
        if not self.cfg.check_quorum:
            return False
        if self.state == StateType.LEADER:
            return True
        if self.cfg.read_only_option == ReadOnlyOption.LEASE_BASED:
            return self.ticks_since_leader_contact < self.cfg.election_tick
        return self.lead != NONE and self.election_elapsed < self.cfg.election_tick

    # --- elections --------------------------------------------------------------------------------
    def hup(self, transfer: bool) -> None:
        if self.state == StateType.LEADER or not self.promotable():
            return
        if self.cfg.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            vote_msg, term = MT.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            vote_msg, term = MT.VOTE, self.term
        if self._poll(self.id, True) == VoteResult.WON:
            if pre:
                self._campaign(pre=False, transfer=False)
            else:
                self._become_leader()
            return
        last, last_term = self.log.last_index(), self.log.last_term()
        ctx = CAMPAIGN_TRANSFER if transfer else b""
        for i in sorted(self.voters):
            if i != self.id:
                self._send(Message(vote_msg, to=i, term=term, index=last, log_term=last_term, context=ctx))

    def _poll(self, node_id: int, granted: bool) -> VoteResult:
        self.votes.setdefault(node_id, granted)
        return vote_result(self.voters, self.votes)

    def _handle_vote_request(self, m: Message) -> None:
        resp = vote_response_type(m.type)
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (m.type == MT.PRE_VOTE and m.term > self.term)
        )
        if (
            self.cfg.read_only_option == ReadOnlyOption.LEASE_BASED
            and m.context != CAMPAIGN_TRANSFER
            and self.vote != m.frm
            and self._in_lease()
        ):
            can_vote = False
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            self._send(Message(resp, to=m.frm, term=m.term))
            if m.type == MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp, to=m.frm, term=self.term, reject=True))

    # --- messages in ------------------------------------------------------------------------------
    def step(self, m: Message) -> None:
        if m.term > self.term and m.term != 0:
            if m.type in (MT.VOTE, MT.PRE_VOTE) and m.context != CAMPAIGN_TRANSFER and self._in_lease():
                return  # we heard from a live leader: do not let this candidate disrupt it
            if m.type == MT.PRE_VOTE or (m.type == MT.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change our term
            elif m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term and m.term != 0:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (MT.HEARTBEAT, MT.APP):
                self._send(Message(MT.APP_RESP, to=m.frm))  # tells a stale leader about our term
            elif m.type == MT.PRE_VOTE:
                self._send(Message(MT.PRE_VOTE_RESP, to=m.frm, term=self.term, reject=True))
            return
        if m.type == MT.HUP:
            self.hup(transfer=False)
        elif m.type in (MT.VOTE, MT.PRE_VOTE):
            self._handle_vote_request(m)
        elif m.type == MT.PROP:
            return  # proposals are local calls (propose); a remote one is ignored, never applied twice
        elif self.state == StateType.LEADER:
            self._step_leader(m)
        elif self.state == StateType.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _step_candidate(self, m: Message) -> None:
        if m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
            self.become_follower(m.term, m.frm)
            self._step_follower(m)
        elif m.type == (MT.PRE_VOTE_RESP if self.state == StateType.PRE_CANDIDATE else MT.VOTE_RESP):
            res = self._poll(m.frm, not m.reject)
            if res == VoteResult.WON:
                if self.state == StateType.PRE_CANDIDATE:
                    self._campaign(pre=False, transfer=False)
                else:
                    self._become_leader()
                    self.flush_appends()
            elif res == VoteResult.LOST:
                self.become_follower(self.term, NONE)

    def _step_follower(self, m: Message) -> None:
        if m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
            self.election_elapsed = 0
            self.ticks_since_leader_contact = 0
            self.lead = m.frm
            if m.type == MT.APP:
                self._handle_append_entries(m)
            elif m.type == MT.HEARTBEAT:
                self.log.commit_to(m.commit)
                self._send(Message(MT.HEARTBEAT_RESP, to=m.frm, index=m.index, context=m.context))
            else:
                self._handle_snapshot(m)
        elif m.type == MT.TRANSFER_LEADER:
            if self.lead != NONE:
                self._send(Message(MT.TRANSFER_LEADER, to=self.lead, index=m.index))
        elif m.type == MT.TIMEOUT_NOW:
            self.hup(transfer=True)
        elif m.type == MT.READ_INDEX:
            if self.lead != NONE:
                self._send(Message(MT.READ_INDEX, to=self.lead, context=m.context))
        elif m.type == MT.READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))

    def _handle_append_entries(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(Message(MT.APP_RESP, to=m.frm, index=self.log.committed))
            return
        last_new, ok, first_written = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if ok:
            if first_written:
                self._sync_conf(first_written, m.entries)
            self._send(Message(MT.APP_RESP, to=m.frm, index=last_new))
            return
        # Tell the leader where our log may match so it skips a whole term per round trip.
        hint_index, hint_term = self.log.find_conflict_by_term(
            min(m.index, self.log.last_index()), m.log_term
        )
        self._send(
            Message(
                MT.APP_RESP, to=m.frm, index=m.index, reject=True, reject_hint=hint_index, log_term=hint_term
            )
        )

    def _handle_snapshot(self, m: Message) -> None:
        s = m.snapshot
        assert s is not None and not s.is_empty, "MsgSnap without a snapshot"
        if self._restore(s):
            self._send(Message(MT.APP_RESP, to=m.frm, index=self.log.last_index()))
        else:
            self._send(Message(MT.APP_RESP, to=m.frm, index=self.log.committed))

    def _restore(self, s: Snapshot) -> bool:
        if s.meta.index <= self.log.committed:
            return False
        assert self.state == StateType.FOLLOWER, "only a follower installs a snapshot"
        if self.log.match_term(s.meta.index, s.meta.term):
            self.log.commit_to(s.meta.index)  # we already hold the snapshot's entries
            return False
        self.log.restore(s)
        self.conf.reset(s.meta.index, s.meta.conf_state)
        self._switch_config(s.meta.conf_state)
        return True

    # --- messages out -----------------------------------------------------------------------------
    def _send(self, m: Message) -> None:
        m.frm = self.id
        if m.type in (MT.VOTE, MT.VOTE_RESP, MT.PRE_VOTE, MT.PRE_VOTE_RESP):
            assert m.term != 0, f"term should be set when sending {m.type.name}"
        else:
            assert m.term == 0, f"term should not be set when sending {m.type.name}"
            if m.type not in (MT.PROP, MT.READ_INDEX):
                m.term = self.term
        self.msgs.append(m)
