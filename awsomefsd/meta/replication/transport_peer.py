"""What the Raft transport keeps per peer, the limits it works within, and what it needs from the
node driver (transport.py)."""

from __future__ import annotations

import collections
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
import trio

from awsomefsd.meta.raft import Message
from awsomefsd.meta.replication.transport_grpc import MAX_FRAME_MESSAGES, MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class TransportLimits:
    queue_messages: int = 4096
    """Messages waiting per peer; beyond that new ones are dropped (Raft retransmits)."""
    max_frame_messages: int = 1024
    max_frame_bytes: int = 8 << 20
    backoff_min_s: float = 0.05
    backoff_max_s: float = 1.0
    snapshot_timeout_s: float = 300.0
    keepalive_ms: int = 2000

    def __post_init__(self) -> None:
        assert 0 < self.queue_messages <= 1 << 20
        assert 0 < self.max_frame_messages <= MAX_FRAME_MESSAGES
        assert 0 < self.max_frame_bytes <= MAX_MESSAGE_BYTES // 2
        assert 0 < self.backoff_min_s <= self.backoff_max_s <= 60
        assert 0 < self.snapshot_timeout_s <= 3600
        assert 100 <= self.keepalive_ms <= 600_000


DEFAULT_LIMITS = TransportLimits()
WIRE_PROBE_S = 2.0
"""While a peer is sent to over gRPC, how often its wire is tried again: first after
WIRE_PROBE_FIRST_S, then 1.5 times as long each time, up to this. A refused wire is mostly a
member of this build restarting (its gRPC listener may answer first): every wire call to it waited
out the probe (a nemesis run: a restarted member's open took 2 s)."""
WIRE_PROBE_FIRST_S = 0.1
WIRE_HEARD_S = 0.5
"""A leader heard on the wire this recently (its heartbeats come every 0.1 s) is asked for read points there."""
GRPC_POLL_S = 0.2
"""How long a gRPC stream's frame generator waits on the queue before it looks whether its
stream still lives."""


class RaftPeerHandler(Protocol):
    """What the transport needs from the node driver. All but `snapshot_chunks` run on trio."""

    def deliver(self, messages: list[Message]) -> None:
        """Accept messages from a peer without blocking (the driver queues them)."""
        ...

    def report_unreachable(self, peer_id: int) -> None: ...

    def report_snapshot(self, peer_id: int, delivered: bool) -> None: ...

    def snapshot_chunks(self) -> Iterator[bytes]:
        """A consistent copy of the state machine in bounded chunks; runs in a worker thread."""
        ...


class PeerLink:
    """Sending state for one peer; the queue is shared between the trio thread and, while the peer
    is sent to over gRPC (an older build), a worker thread."""

    def __init__(self, peer_id: int, address: str, limit: int) -> None:
        self.id = peer_id
        self.address = address
        self.queue: queue.Queue[Message] = queue.Queue(maxsize=limit)
        self.generation = 0
        """Which gRPC stream's frame generator may take from `queue` (transport.py, `_frames`)."""
        self.taking = threading.Lock()
        """Held by a gRPC frame generator while it takes from `queue`: a stream that ended waits
        for it, so no generator of a dead stream takes (and loses) what a new connection should send."""
        self.dropped = 0
        self.sent_frames = 0
        self.failures = 0
        self.snapshot_in_flight = False
        self.removed = False
        self.channel: grpc.Channel | None = None
        self.queued = trio.Event()
        """Set by `send` when it queues something: wakes the wire sender."""
        self.idle = trio.Event()
        """Set while the wire sender has written everything queued (or is not running)."""
        self.idle.set()
        self.writing_since = math.inf
        """When the wire sender was woken with something to write (inf: it is idle): a sender
        busy for long is stuck on a full socket, and `RaftTransport.sent` does not wait for it."""
        self.outbox: collections.deque[bytes] = collections.deque()
        """Wire frames of forwarded entries and their answers (wire_calls.py), sent before Raft's."""
        self.connection: trio.CancelScope | None = None
        """The wire connection's scope while one is open: cancelled to drop it (a new address)."""
        self.on_grpc = False
        """True while a gRPC stream (not the wire) carries this peer's messages."""
        self.legacy_frames = 0
        """Frames sent over gRPC because the peer's wire did not answer (an older build)."""

    def wake(self) -> None:
        """Something was queued: wake the wire sender, which is busy until it has written it."""
        self.queued.set()
        if self.idle.is_set():
            self.idle = trio.Event()
            self.writing_since = time.monotonic()

    def take_batch(self, limits: TransportLimits, first: Message | None) -> list[Message]:
        """`first` and what else is queued, up to the frame limits (empty: nothing queued)."""
        if first is None:
            try:
                first = self.queue.get_nowait()
            except queue.Empty:
                return []
        batch = [first]
        size = sum(e.size_bytes() for e in first.entries)
        while len(batch) < limits.max_frame_messages and size < limits.max_frame_bytes:
            try:
                m = self.queue.get_nowait()
            except queue.Empty:
                break
            batch.append(m)
            size += sum(e.size_bytes() for e in m.entries)
        return batch

    def discard_queued(self) -> None:
        """The connection ended: what was queued for it is stale (the core resends what matters)."""
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def retire_grpc_frames(self) -> None:
        """Stop the frame generator of this peer's gRPC stream, waiting (at most one queue poll)
        for a take it is in the middle of: a failed call's generator, left in grpc's thread, took
        what was queued after the next connection had opened, and lost it (CI on 8063a35)."""
        self.generation += 1
        with self.taking:
            pass
