"""The driver's gathering before a turn (`RaftNode._gather`, design note 151): with a blocking fsync
it yields to the scheduler so that proposals and appends share the next transaction; a turn that
writes nothing (only reads and heartbeats in the inbox, no proposal queued) goes at once, since a
follower's read barrier crosses the loop three times."""

from __future__ import annotations

from pathlib import Path

import trio

from awsomefsd.meta.raft import Message, MessageType
from awsomefsd.meta.replication.driver import RaftNode
from awsomefsd.meta.replication.lmdb_storage import LmdbRaftStorage
from awsomefsd.meta.replication.settings import NodeSettings
from tests.support.raft_kv import KVStateMachine


def node_on_its_loop(tmp_path: Path) -> RaftNode:
    sm = KVStateMachine(tmp_path / "n1")
    return RaftNode(1, LmdbRaftStorage(env=sm.env), sm, bootstrap_voters=(1, 2, 3), seed=1,
                    settings=NodeSettings(persist_in_thread=False), send=lambda _messages: None)


async def gathers(node: RaftNode) -> bool:
    """Does the turn's gathering yield to the scheduler (run in an already cancelled scope, its
    first checkpoint ends it)?"""
    finished = False
    with trio.CancelScope() as scope:
        scope.cancel()
        await node._gather()
        finished = True
    return not finished


async def test_a_turn_with_only_reads_and_heartbeats_goes_at_once(tmp_path: Path) -> None:
    node = node_on_its_loop(tmp_path)
    assert not await gathers(node), "nothing arrived"
    for kind in (MessageType.READ_INDEX, MessageType.READ_INDEX_RESP, MessageType.HEARTBEAT,
                 MessageType.HEARTBEAT_RESP):
        node.deliver([Message(kind, to=1, frm=2, term=1)])
    assert not await gathers(node), "reads and heartbeats share no transaction"


async def test_a_turn_with_an_append_or_a_proposal_gathers(tmp_path: Path) -> None:
    node = node_on_its_loop(tmp_path)
    node.deliver([Message(MessageType.READ_INDEX, to=1, frm=2, term=1), Message(MessageType.APP, to=1, frm=2, term=1)])
    assert await gathers(node), "an append: more may come for the same fsync"
    node._inbox.clear()
    node.proposals.queued.append(object())  # type: ignore[arg-type]  # what `propose` queues for the loop
    assert await gathers(node), "a proposal: others may share its fsync"
