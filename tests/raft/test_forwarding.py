"""A follower's resend loop (forwarding.propose_via_leader) on a stand-in node, step by step: once
an entry may have been appended somewhere, no later refusal of one of its copies may tell the
caller that it was certainly not applied."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from awsomefsd.meta.raft import Entry
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.meta.replication.forwarding import propose_via_leader
from awsomefsd.meta.replication.proposals import Proposal, Proposals
from awsomefsd.meta.replication.settings import NodeSettings


@dataclass
class _Raw:
    leader_id: int = 2


@dataclass
class StandInNode:
    """What propose_via_leader uses of a RaftNode; the test plays the leader changes."""

    id: int = 1
    raw: _Raw = field(default_factory=_Raw)
    settings: NodeSettings = field(default_factory=lambda: NodeSettings(tick_ms=10))
    forward_retries: int = 0
    proposals: Proposals = field(default_factory=lambda: Proposals(1, 7, lambda: None))
    refuse_own_copy_with: type[Exception] = NotLeader
    own_copies: int = 0

    async def submit(self, p: Proposal, timeout_s: float | None = None) -> Any:
        """Our own copy, appended while we led, is refused: we lost the lead before handing it to
        the core (NotLeader), or another entry took its index (ProposalLost)."""
        self.own_copies += 1
        self.raw.leader_id = 3
        raise NotLeader(3) if self.refuse_own_copy_with is NotLeader else ProposalLost("overwritten")


@pytest.mark.parametrize("refusal", [NotLeader, ProposalLost])
async def test_a_copy_refused_after_an_unknown_forward_is_not_a_certain_failure(
    refusal: type[Exception], autojump_clock: trio.testing.MockClock
) -> None:
    """Node 2 leads and appends our entry, but its reply is lost; we lead for a moment and our
    own copy is refused; then node 3 leads and commits node 2's copy, which we apply. The caller
    must get the result of that apply, not NotLeader or ProposalLost."""
    node = StandInNode(refuse_own_copy_with=refusal)
    sent: list[bytes] = []

    async def forward(leader: int, entry: bytes) -> int:
        if leader == 2:
            sent.append(entry)
            node.raw.leader_id = node.id  # node 2 dies after appending; we win the election
            raise ProposalTimeout("reply lost")
        await trio.sleep(0.5)  # node 3 appends one more copy (a duplicate) and answers
        return 6

    async def apply_node_2s_copy() -> None:
        while node.raw.leader_id != 3:
            await trio.sleep(0.01)
        await trio.sleep(0.1)
        pid = next(iter(node.proposals.forwarded))
        node.proposals.resolve([Entry(2, 5, sent[0])], [(5, "applied at 5", pid)], set())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(apply_node_2s_copy)
        result = await propose_via_leader(node, forward, b"mknod", timeout_s=5.0)  # type: ignore[arg-type]
    assert result == "applied at 5"
    assert node.own_copies == 1 and node.forward_retries >= 2


async def test_a_forward_to_a_leader_that_stopped_answering_goes_to_the_new_one(
    autojump_clock: trio.testing.MockClock
) -> None:
    """Node 2 is paused mid-call (SIGSTOP): its connection stays open and answers nothing. Node 3 is
    elected a second later. The entry must be sent to node 3 at once, not after the call's deadline
    (nor be declared of unknown fate when the proposal's timeout runs out first)."""
    node = StandInNode()
    calls: list[tuple[int, float]] = []

    async def forward(leader: int, entry: bytes) -> int:
        calls.append((leader, trio.current_time()))
        if leader == 2:
            await trio.sleep_forever()
        pid = next(iter(node.proposals.forwarded))
        node.proposals.resolve([Entry(3, 9, entry)], [(9, "applied at 9", pid)], set())
        return 9

    async def elect_node_3() -> None:
        await trio.sleep(1.0)
        node.raw.leader_id = 3

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(elect_node_3)
        result = await propose_via_leader(node, forward, b"mknod", timeout_s=5.0)  # type: ignore[arg-type]
    assert result == "applied at 9"
    assert [leader for leader, _ in calls] == [2, 3]
    assert calls[1][1] - start < 1.5, "the entry waited for the paused leader's call"
    assert node.forward_retries == 1
