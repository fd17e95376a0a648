"""Proposals: the id each entry carries, the queue handed to the core in batches, the answers.

Every command is prefixed with its proposal id, (boot nonce, sequence), so that the proposer
recognises its own entry when it is applied; if a different entry is applied at the index it was
given, the proposal was certainly lost (a new leader overwrote it) and `ProposalLost` says retrying
is safe. A proposal not applied within its timeout raises `ProposalTimeout`: its fate is unknown.

Queued commands are handed to the core in one batch per Ready (`hand_to`), so concurrent proposers
share appends and fsyncs; at most `max_batch` go in one batch.

De-duplication: an entry a follower forwards (FORWARDED set in its sequence) may be appended twice,
because the follower sends it again whenever it cannot tell whether the leader appended it. The
apply step (apply.py) lets only its first copy reach the state machine (the storage records the
ids applied, `first_application`); a later copy yields DUPLICATE, and its proposer takes its
result from the first.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from awsomefsd.meta.raft import Entry, ProposalDropped, RawNode
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout

HEADER = struct.Struct("<QQ")  # boot nonce, sequence number of the proposing process
FORWARDED = 1 << 63
"""Sequence bit of entries a follower forwarded: they may arrive twice and are de-duplicated."""
DUPLICATE: Any = type("Duplicate", (), {"__repr__": lambda self: "DUPLICATE"})()
"""The apply result of a second copy of a forwarded entry: nothing was applied."""
MAX_QUEUED_PROPOSALS = 100_000

ProposalId = tuple[int, int]
Outcome = tuple[int, Any, ProposalId | None]
"""(index, state machine result or DUPLICATE, proposal id) of one applied entry."""


def proposal_id(data: bytes) -> ProposalId | None:
    """The id an entry's data starts with; None for the empty entry a new leader appends."""
    if len(data) < HEADER.size:
        return None
    pid: ProposalId = HEADER.unpack_from(data)
    return pid


def is_forwarded(pid: ProposalId) -> bool:
    return bool(pid[1] & FORWARDED)


@dataclass
class Proposal:
    pid: ProposalId
    data: bytes
    done: trio.Event = field(default_factory=trio.Event)
    index: int = 0
    result: Any = None
    error: BaseException | None = None
    call: trio.CancelScope | None = None
    """A follower's Forward call in flight for it: abandoned once the proposal is answered here
    (on a link that has just healed, the call may hang until its deadline)."""

    def entry(self) -> bytes:
        return HEADER.pack(*self.pid) + self.data

    def answered(self) -> None:
        self.done.set()
        if self.call is not None:
            self.call.cancel()


class Proposals:
    """This node's proposals, from the queue to their answers. Only the driver loop hands them to
    the core and resolves them; any task may submit."""

    def __init__(self, node_id: int, nonce: int, wake: Callable[[], None]) -> None:
        assert 0 < nonce < 1 << 64
        self.node_id = node_id
        self.nonce = nonce
        self._wake = wake
        self._seq = 0
        self.queued: list[Proposal] = []
        self.by_index: dict[int, Proposal] = {}
        self.forwarded: dict[ProposalId, Proposal] = {}
        """A follower's forwarded proposals, answered from its own apply of their entries."""

    def next_id(self, *, forwarded: bool = False) -> ProposalId:
        self._seq += 1
        return self.nonce, self._seq | (FORWARDED if forwarded else 0)

    async def submit(self, p: Proposal, timeout_s: float) -> Any:
        """Queue `p` for the next batch and wait for its answer (see the module docstring)."""
        if len(self.queued) >= MAX_QUEUED_PROPOSALS:
            raise NotLeader(self.node_id)  # overloaded: the caller backs off and retries
        self.queued.append(p)
        self._wake()
        with trio.move_on_after(timeout_s):
            await p.done.wait()
        if not p.done.is_set():
            if p.index == 0 and p in self.queued:
                self.queued.remove(p)
                raise ProposalLost("never handed to the core")
            raise ProposalTimeout(f"entry {p.index} not applied in time")
        if p.error is not None:
            raise p.error
        return p.result

    def hand_to(self, raw: RawNode, max_batch: int) -> None:
        """One batch of queued commands to the core (max_batch bounds what one fsync carries)."""
        if not self.queued:
            return
        batch = self.queued[:max_batch]
        del self.queued[: len(batch)]
        try:
            last = raw.propose_batch([p.entry() for p in batch])
        except ProposalDropped as exc:
            leader = exc.leader_hint or raw.leader_id
            batch += self.queued  # whatever refused this batch refuses the rest too
            self.queued = []
            for p in batch:
                p.error = NotLeader(leader if leader != self.node_id else 0)
                p.done.set()
        else:
            for i, p in enumerate(batch):
                p.index = last - len(batch) + 1 + i
                self.by_index[p.index] = p

    def fail_queued(self, leader_id: int) -> None:
        """Lost leadership: commands not yet handed to the core go back to their callers."""
        queued, self.queued = self.queued, []
        for p in queued:
            p.error = NotLeader(leader_id)
            p.done.set()

    def answer_covered(self, applied: int, applied_at: Callable[[bytes], int | None]) -> None:
        """An installed snapshot applied entries this node never applied one by one, so nothing
        answers their proposers: answer them now (outcome unknown: applied, result not seen).
        Otherwise each waited out its timeout, long after the cut-off node that proposed it had
        caught up (a write on a node healed from a partition stalled up to 10 s).

        Forwarded proposals are covered when the snapshot's state records their id as applied;
        any other in flight at or below `applied` is covered too (whether the entry there is
        ours, a snapshot cannot tell)."""
        for pid in [pid for pid in self.forwarded if applied_at(HEADER.pack(*pid)) is not None]:
            self._answer_unseen(self.forwarded.pop(pid), "was applied by an installed snapshot")
        for index in [index for index in self.by_index if index <= applied]:
            self._answer_unseen(self.by_index.pop(index), f"entry {index} is covered by an installed snapshot")

    @staticmethod
    def _answer_unseen(p: Proposal, why: str) -> None:
        p.error = ProposalTimeout(f"{why}: its result could not be seen")
        p.answered()

    def resolve(self, committed: list[Entry], outcome: list[Outcome], skipped: set[int],
                up_to: int | None = None) -> None:
        """Answer the proposals at the applied indexes (those up to `up_to` only, if given)."""
        results = {index: (result, pid) for index, result, pid in outcome}
        if self.forwarded:
            for index, result, pid in outcome:
                if result is DUPLICATE:
                    continue
                fwd = self.forwarded.pop(pid, None) if pid is not None and (up_to is None or index <= up_to) else None
                if fwd is not None:
                    fwd.result = result
                    fwd.answered()
        for e in committed:
            if up_to is not None and e.index > up_to:
                break
            p = self.by_index.pop(e.index, None)
            if p is None:
                continue
            got = results.get(e.index)
            if got is not None and got[1] == p.pid:
                p.result = got[0]
            elif e.index in skipped:
                # Applied earlier (an installed snapshot covered it): ours or not, we cannot tell.
                p.error = ProposalTimeout(f"entry {e.index} was applied before its result could be seen")
            else:
                p.error = ProposalLost(f"entry {e.index} holds another command")
            p.done.set()
