"""The values the Raft core exchanges with its caller: messages, entries, hard state, snapshots.

Everything here is plain data. Entries and snapshots are immutable because the same object may sit
in the unstable log, in an outgoing message and in a Ready at once; a message is mutable only while
the core builds it. The binary form lives in `codec.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

NONE = 0
"""Node id meaning "nobody" (no vote, no leader). Real node ids are positive."""


class MessageType(enum.IntEnum):
    """Message kinds. HUP, BEAT, CHECK_QUORUM, UNREACHABLE and SNAP_STATUS never leave the node."""

    HUP = 0
    BEAT = 1
    PROP = 2
    APP = 3
    APP_RESP = 4
    VOTE = 5
    VOTE_RESP = 6
    PRE_VOTE = 7
    PRE_VOTE_RESP = 8
    SNAP = 9
    HEARTBEAT = 10
    HEARTBEAT_RESP = 11
    UNREACHABLE = 12
    SNAP_STATUS = 13
    CHECK_QUORUM = 14
    TRANSFER_LEADER = 15
    TIMEOUT_NOW = 16
    READ_INDEX = 17
    READ_INDEX_RESP = 18


LOCAL_MESSAGES = frozenset(
    {
        MessageType.HUP,
        MessageType.BEAT,
        MessageType.UNREACHABLE,
        MessageType.SNAP_STATUS,
        MessageType.CHECK_QUORUM,
    }
)
RESPONSE_MESSAGES = frozenset(
    {
        MessageType.APP_RESP,
        MessageType.VOTE_RESP,
        MessageType.PRE_VOTE_RESP,
        MessageType.HEARTBEAT_RESP,
        MessageType.UNREACHABLE,
        MessageType.READ_INDEX_RESP,
    }
)


def vote_response_type(t: MessageType) -> MessageType:
    """The response kind for a (pre-)vote request."""
    if t == MessageType.VOTE:
        return MessageType.VOTE_RESP
    if t == MessageType.PRE_VOTE:
        return MessageType.PRE_VOTE_RESP
    raise ValueError(f"not a vote message: {t!r}")


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. `data` is opaque to the core except for CONF_CHANGE entries (a ConfChange)."""

    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""

    def size_bytes(self) -> int:
        """Approximate wire size, used to bound message and Ready sizes."""
        return len(self.data) + 24


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it leaves the node."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


EMPTY_HARD_STATE = HardState()


@dataclass(frozen=True, slots=True)
class ConfState:
    """A membership configuration: voters count in quorums, learners only receive the log."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        assert not set(self.voters) & set(self.learners), "a node is either voter or learner"
        assert all(i > 0 for i in self.voters + self.learners), "node ids are positive"

    @staticmethod
    def of(voters: set[int] | frozenset[int], learners: set[int] | frozenset[int]) -> ConfState:
        return ConfState(tuple(sorted(voters)), tuple(sorted(learners)))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """State-machine image at `meta.index`. `data` is opaque; a transport may stream it separately."""

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""

    @property
    def is_empty(self) -> bool:
        return self.meta.index == 0


EMPTY_SNAPSHOT = Snapshot()


class ConfChangeType(enum.IntEnum):
    ADD_NODE = 0  # add a voter, or promote a learner
    ADD_LEARNER = 1
    REMOVE_NODE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One membership change; only one proposal of changes may be uncommitted at a time, and it
    holds one change unless it adds voters to a leader that is the only one (design note 146)."""

    type: ConfChangeType
    node_id: int
    context: bytes = b""


@dataclass(slots=True)
class Message:
    """A Raft message. Field use per kind follows etcd-raft.

    HEARTBEAT carries the leader's tick counter in `index` and HEARTBEAT_RESP echoes it: that is how
    the leader measures its lease without a clock (see core.Raft.lease_valid).
    """

    type: MessageType
    to: int = NONE
    frm: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    snapshot: Snapshot | None = None
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""


class StateType(enum.IntEnum):
    FOLLOWER = 0
    CANDIDATE = 1
    LEADER = 2
    PRE_CANDIDATE = 3


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the caller may want to observe (never persisted)."""

    lead: int
    state: StateType


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the local applied index reaches `index`."""

    index: int
    request_ctx: bytes


@dataclass(slots=True)
class Ready:
    """Work for the caller, in this order: persist `snapshot`, `entries` and `hard_state` (durably);
    then send `messages`; then apply `snapshot` and `committed_entries`; then call advance(ready)."""

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    read_states: list[ReadState] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    must_sync: bool = False
