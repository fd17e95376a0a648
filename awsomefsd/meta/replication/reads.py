"""Linearizable reads by ReadIndex.

`barrier()` asks the core for a read index (confirmed by a heartbeat quorum, or the lease when
configured) and returns once the local state machine has applied up to it: any read transaction
opened after that sees every write acknowledged before the call. A barrier not confirmed within
its timeout raises NotLeader (with the leader this node knows of): the read may go elsewhere.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from awsomefsd.meta.raft import RawNode, ReadState
from awsomefsd.meta.replication.errors import NotLeader

_CTX = struct.Struct("<QQ")  # boot nonce, sequence: unique to this process, no randomness needed


@dataclass
class _Read:
    ctx: bytes
    done: trio.Event = field(default_factory=trio.Event)
    index: int = -1


class ReadBarriers:
    """Reads on their way: queued for the core, waiting for their read index, then for the apply.
    Only the driver loop hands them to the core and serves them; any task may wait on one."""

    def __init__(self, nonce: int, wake: Callable[[], None]) -> None:
        self._nonce = nonce
        self._seq = 0
        self._wake = wake
        self._queue: list[_Read] = []
        self._by_ctx: dict[bytes, _Read] = {}
        self._waiting: list[_Read] = []

    @property
    def queued(self) -> int:
        """Barriers not yet handed to the core."""
        return len(self._queue)

    async def barrier(self, timeout_s: float, leader_id: Callable[[], int]) -> None:
        self._seq += 1
        r = _Read(_CTX.pack(self._nonce, self._seq))
        self._queue.append(r)
        self._wake()
        with trio.move_on_after(timeout_s):
            await r.done.wait()
        self._by_ctx.pop(r.ctx, None)
        if not r.done.is_set():
            raise NotLeader(leader_id())

    async def applied_past(self, index: int, applied: int, timeout_s: float, leader_id: Callable[[], int]) -> None:
        """For a read index known without the core (a leader's lease): return once `index` is
        applied (`applied`: the index applied now); a checkpoint either way."""
        if applied >= index:
            await trio.lowlevel.checkpoint()
            return
        r = _Read(b"", index=index)
        self._waiting.append(r)
        with trio.move_on_after(timeout_s):
            await r.done.wait()
        if not r.done.is_set():
            raise NotLeader(leader_id())

    def hand_to(self, raw: RawNode) -> None:
        """Give the queued reads to the core, once it knows a leader: a follower without one drops
        a read index request unanswered, so a read handed over then (a member that has just
        started, an election under way) would wait out its whole timeout for nothing."""
        if not raw.leader_id:
            return
        reads, self._queue = self._queue, []
        for r in reads:
            self._by_ctx[r.ctx] = r
            raw.read_index(r.ctx)

    def confirmed(self, read_states: Sequence[ReadState]) -> None:
        """The core's answers (from a Ready): each read now waits for its index to be applied."""
        for rs in read_states:
            r = self._by_ctx.pop(rs.request_ctx, None)
            if r is not None:
                r.index = rs.index
                self._waiting.append(r)

    def serve(self, applied: int) -> None:
        still = []
        for r in self._waiting:
            if applied >= r.index:
                r.done.set()
            else:
                still.append(r)
        self._waiting = still
