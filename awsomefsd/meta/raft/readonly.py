"""ReadIndex bookkeeping on the leader (Raft thesis §6.4).

A read request is stamped with the commit index at arrival; it may be answered once a quorum has
acknowledged a heartbeat sent after it arrived, which proves no newer leader had committed anything
then. Requests are answered in arrival order: an acknowledgement for a later request covers every
earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .messages import Message


@dataclass(slots=True)
class ReadIndexStatus:
    request: Message
    index: int
    acks: set[int] = field(default_factory=set)


class ReadOnly:
    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: list[bytes] = []

    def add_request(self, index: int, m: Message) -> bool:
        """Track a request; False if it is a duplicate or the queue is full (the request is dropped)."""
        ctx = m.context
        if ctx in self.pending or len(self.queue) >= self.max_pending:
            return False
        self.pending[ctx] = ReadIndexStatus(m, index)
        self.queue.append(ctx)
        return True

    def recv_ack(self, node_id: int, ctx: bytes) -> set[int] | None:
        rs = self.pending.get(ctx)
        if rs is None:
            return None
        rs.acks.add(node_id)
        return rs.acks

    def advance(self, ctx: bytes) -> list[ReadIndexStatus]:
        """Pop every request up to and including `ctx` (all are confirmed by the same quorum)."""
        if ctx not in self.pending:
            return []
        i = self.queue.index(ctx)
        done = [self.pending.pop(c) for c in self.queue[: i + 1]]
        del self.queue[: i + 1]
        return done

    def last_pending_request_ctx(self) -> bytes:
        return self.queue[-1] if self.queue else b""
