"""The commands of the cluster's membership and what members own: members and their
certificates, the join token, liveness leases, allocation groups, write leases and the holders of
orphans (their semantics: meta/cluster_sm.py). Apart from the filesystem's commands
(meta/commands.py), whose base `Command` and wrappers (`Fenced`, `Batch`) they share; the log
level's command, `SetLogLevel`, stays there with the levels.
"""

from __future__ import annotations

from dataclasses import dataclass

from awsomefsd.meta.commands import Command


@dataclass(frozen=True, slots=True)
class InitCluster(Command[int]):
    """Once, by `awsomefsd init`: the CA every member can issue certificates with, the join token's
    verifier, and how many voters the cluster aims for. Replicated so that any member answers joins."""

    ca_cert_pem: bytes
    ca_key_pem: bytes
    verifier: bytes
    voters_target: int
    ag_first_block: int
    ag_blocks: int
    ag_count: int
    founder: int
    name: str
    address: str
    join_address: str
    now_ns: int


@dataclass(frozen=True, slots=True)
class AddMember(Command[int]):
    """A node proved the join token: give it the next node id (the result)."""

    name: str
    address: str
    join_address: str
    now_ns: int


@dataclass(frozen=True, slots=True)
class SetMemberCert(Command[None]):
    node: int
    serial_hex: str


@dataclass(frozen=True, slots=True)
class UpdateMemberAddress(Command[None]):
    """A member restarted with another listen address."""

    node: int
    address: str
    join_address: str


@dataclass(frozen=True, slots=True)
class RemoveMember(Command[None]):
    """`awsomefsd node remove`: revoke its certificate now; its groups and write leases follow by
    ExpireNode once its liveness lease has certainly ended."""

    node: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class SetJoinVerifier(Command[None]):
    """`awsomefsd token rotate`: proofs made with the previous token stop verifying."""

    verifier: bytes


@dataclass(frozen=True, slots=True)
class RenewLease(Command[bool]):
    """A node's liveness lease, renewed through the leader; refused (False) after ExpireNode."""

    node: int
    epoch: int


@dataclass(frozen=True, slots=True)
class ExpireNode(Command[list[int]]):
    """Proposed by the leader after the node's lease ended plus a margin: its allocation groups and
    write leases are free for others, and its lease epoch moves on (a renewal with the old epoch
    is refused, so a node that wakes up must start again)."""

    node: int
    now_ns: int


@dataclass(frozen=True, slots=True)
class ClaimGroups(Command[tuple[int, ...]]):
    """Grant `count` unowned allocation groups to `node` (lowest numbers first); result: the groups."""

    node: int
    epoch: int
    count: int


@dataclass(frozen=True, slots=True)
class AcquireWriteLease(Command[int]):
    """Result: the holder after the command. Equal to `node`: granted. Another node: that node holds
    it and is asked (by this very command, which it applies too) to flush and release it."""

    ino: int
    node: int
    epoch: int


@dataclass(frozen=True, slots=True)
class ReleaseWriteLease(Command[bool]):
    ino: int
    node: int


@dataclass(frozen=True, slots=True)
class ReleaseOrphans(Command[int]):
    """`node` holds none of these unlinked inodes open. In a cluster an orphan is deleted once every
    member that was active when it lost its last name has said so (POSIX: an unlinked file stays
    readable through the handles open on it, on whichever node)."""

    node: int
    inos: tuple[int, ...]
    now_ns: int
