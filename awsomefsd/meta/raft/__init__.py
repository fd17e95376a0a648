"""A pure Raft core in the etcd-raft shape: no sockets, clocks, threads or randomness inside.

Use `RawNode`: feed it ticks, messages and proposals; drain `ready()`; persist, send, apply; then
`advance()`. See docs/raft.md for the contract and the invariants the simulator checks.
"""

from .codec import CodecError, decode_message, encode_message
from .config import Config, ReadOnlyOption
from .leader import ProposalDropped
from .messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Snapshot,
    SnapshotMeta,
    SoftState,
    StateType,
)
from .rawnode import RawNode, Status
from .storage import LogCompacted, LogUnavailable, MemoryStorage, RaftStorage, SnapshotTemporarilyUnavailable

__all__ = [
    "NONE",
    "CodecError",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Config",
    "Entry",
    "EntryType",
    "HardState",
    "LogCompacted",
    "LogUnavailable",
    "MemoryStorage",
    "Message",
    "MessageType",
    "ProposalDropped",
    "RaftStorage",
    "RawNode",
    "ReadOnlyOption",
    "ReadState",
    "Ready",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotTemporarilyUnavailable",
    "SoftState",
    "StateType",
    "Status",
    "decode_message",
    "encode_message",
]
