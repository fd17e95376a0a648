"""The cluster in the state machine: members, the CA, the join verifier, liveness leases,
allocation groups and per-file write leases.

Everything a member must agree on lives here, replicated by the same log as the namespace, so any
member can answer a join, every member knows every other's address, and fencing decisions are
ordered with the writes they fence. Time never enters: the leader measures lease expiry on its own
clock and proposes `ExpireNode`; applying it is then deterministic everywhere.

A member record (JSON in table `members`): name, address, join_address, serial (hex, "" until the
certificate is issued), state ("active" | "removed"), epoch (liveness-lease generation), expired
(bool: the leader declared its lease over; it must renew with the current epoch to come back),
joined_ns.
"""

from __future__ import annotations

import errno
import json
from functools import lru_cache
from typing import Any

import lmdb

from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Member, u64

MAX_MEMBERS = 1024
LINK_MAX = 65_000
"""ext4's EXT4_LINK_MAX: a file's hard links stop there (EMLINK), and so did a directory's
subdirectories (2 + 64,998) before UNLIMITED_SUBDIRS_LEVEL."""
MAX_NLINK = (1 << 32) - 1
"""The inode stores its link count in 32 bits."""
MAX_CLAIM_GROUPS = 64
CLUSTER_KEYS = (b"ca_cert", b"ca_key", b"join_verifier", b"voters_target", b"ag_first_block", b"ag_blocks",
                b"ag_count")


class ClusterTables:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.members_db = store.db["members"]
        self.groups_db = store.db["groups"]
        self.leases_db = store.db["wleases"]
        self.meta_db = store.db["meta"]

    # -- reading (any node, any transaction) -----------------------------------------------------
    def initialised(self, txn: lmdb.Transaction[bytes]) -> bool:
        return txn.get(b"ca_cert", db=self.meta_db) is not None

    def value(self, txn: lmdb.Transaction[bytes], key: bytes) -> bytes | None:
        raw = txn.get(key, db=self.meta_db)
        return None if raw is None else bytes(raw)

    def number(self, txn: lmdb.Transaction[bytes], key: bytes) -> int:
        """A counter or parameter every initialised cluster has (written by InitCluster)."""
        raw = txn.get(key, db=self.meta_db)
        assert raw is not None, f"cluster parameter {key!r} missing"
        return int.from_bytes(raw, "big")

    def member(self, txn: lmdb.Transaction[bytes], node: int) -> dict[str, Any] | None:
        raw = txn.get(u64(node), db=self.members_db)
        return None if raw is None else json.loads(bytes(raw))

    def members(self, txn: lmdb.Transaction[bytes]) -> dict[int, dict[str, Any]]:
        return {int.from_bytes(k, "big"): json.loads(bytes(v)) for k, v in txn.cursor(self.members_db)}

    def active_members(self, txn: lmdb.Transaction[bytes]) -> list[int]:
        """Members in the cluster now (empty on a single node: no cluster). Asked by every unlink
        that leaves an orphan, in its prediction and in each member's apply: a record's state is
        decoded once per distinct record (`_member_state`), not at every unlink."""
        return sorted(int.from_bytes(k, "big") for k, v in txn.cursor(self.members_db)
                      if _member_state(bytes(v)) == "active")

    def revoked_serials(self, txn: lmdb.Transaction[bytes]) -> set[int]:
        return {int(m["serial"], 16) for m in self.members(txn).values() if m["state"] == "removed" and m["serial"]}

    def lease_holder(self, txn: lmdb.Transaction[bytes], ino: int) -> int:
        raw = txn.get(u64(ino), db=self.leases_db)
        return 0 if raw is None else int.from_bytes(raw, "big")

    def leases_of(self, txn: lmdb.Transaction[bytes], node: int) -> list[int]:
        want = u64(node)
        return [int.from_bytes(k, "big") for k, v in txn.cursor(self.leases_db) if bytes(v) == want]

    def groups_of(self, txn: lmdb.Transaction[bytes], node: int) -> list[int]:
        want = u64(node)
        return [int.from_bytes(k, "big") for k, v in txn.cursor(self.groups_db) if bytes(v) == want]

    # -- applying --------------------------------------------------------------------------------
    def _put(self, txn: lmdb.Transaction[bytes], node: int, record: dict[str, Any]) -> None:
        txn.put(u64(node), json.dumps(record, sort_keys=True).encode(), db=self.members_db)

    def _require(self, txn: lmdb.Transaction[bytes], node: int) -> dict[str, Any]:
        record = self.member(txn, node)
        if record is None:
            raise FsError(errno.ENOENT, f"no member {node}")
        return record

    def init_cluster(self, txn: lmdb.Transaction[bytes], cmd: cc.InitCluster) -> int:
        if self.initialised(txn):
            raise FsError(errno.EEXIST, "the cluster is already initialised")
        if not 1 <= cmd.voters_target <= 7 or cmd.ag_blocks <= 0 or cmd.founder <= 0:
            raise FsError(errno.EINVAL, "bad cluster parameters")
        for key, value in zip(CLUSTER_KEYS, (cmd.ca_cert_pem, cmd.ca_key_pem, cmd.verifier,
                                             u64(cmd.voters_target), u64(cmd.ag_first_block), u64(cmd.ag_blocks),
                                             u64(cmd.ag_count))):
            txn.put(key, value, db=self.meta_db)
        txn.put(b"member_next", u64(cmd.founder + 1), db=self.meta_db)
        self._put(txn, cmd.founder, _record(self._unique_name(txn, cmd.name, cmd.founder), cmd.address,
                                            cmd.join_address, cmd.now_ns))
        return cmd.founder

    def add_member(self, txn: lmdb.Transaction[bytes], cmd: cc.AddMember) -> int:
        if not self.initialised(txn):
            raise FsError(errno.EINVAL, "not a cluster")
        if sum(1 for _ in txn.cursor(self.members_db)) >= MAX_MEMBERS:
            raise FsError(errno.ENOSPC, f"the cluster already has {MAX_MEMBERS} members")
        node = self.number(txn, b"member_next")
        txn.put(b"member_next", u64(node + 1), db=self.meta_db)
        self._put(txn, node, _record(self._unique_name(txn, cmd.name, node), cmd.address, cmd.join_address,
                                     cmd.now_ns))
        return node

    def _unique_name(self, txn: lmdb.Transaction[bytes], wanted: str, node: int) -> str:
        """The name a new member is shown by: its own (the host name by default) unless an active
        member has it already (two nodes on one host, cloned machines), then `name-<node id>`; an
        unnamed node is `node-<id>`. Decided at apply, so every member shows the same names."""
        taken = {record["name"] for record in self.members(txn).values() if record["state"] == "active"}
        if wanted and wanted not in taken:
            return wanted
        return f"{wanted or 'node'}-{node}"

    def set_member_cert(self, txn: lmdb.Transaction[bytes], cmd: cc.SetMemberCert) -> None:
        record = self._require(txn, cmd.node)
        int(cmd.serial_hex, 16)  # ValueError is a bug in the proposer, not a user error
        record["serial"] = cmd.serial_hex
        self._put(txn, cmd.node, record)

    def update_address(self, txn: lmdb.Transaction[bytes], cmd: cc.UpdateMemberAddress) -> None:
        record = self._require(txn, cmd.node)
        record["address"], record["join_address"] = cmd.address, cmd.join_address
        self._put(txn, cmd.node, record)

    def remove_member(self, txn: lmdb.Transaction[bytes], cmd: cc.RemoveMember) -> None:
        record = self._require(txn, cmd.node)
        if record["state"] == "removed":
            raise FsError(errno.ENOENT, f"node {cmd.node} was already removed")
        record["state"] = "removed"
        self._put(txn, cmd.node, record)

    def log_level(self, txn: lmdb.Transaction[bytes]) -> int | None:
        """The cluster's log level (meta/levels.py, LOG_LEVEL); None if it never recorded one."""
        raw = txn.get(b"log_level", db=self.meta_db)
        return None if raw is None else int.from_bytes(raw, "big")

    def dir_link_limit(self, txn: lmdb.Transaction[bytes]) -> int:
        """The link count at which a directory takes no more subdirectories (mkdir: EMLINK)."""
        if self.initialised(txn) and (self.log_level(txn) or levels.BASE_LOG_LEVEL) < levels.UNLIMITED_SUBDIRS_LEVEL:
            return LINK_MAX
        return MAX_NLINK

    def set_log_level(self, txn: lmdb.Transaction[bytes], cmd: c.SetLogLevel) -> int | None:
        """The level after it (None: never recorded, and not now either)."""
        current = self.log_level(txn)
        if sorted(cmd.members) != self.active_members(txn):
            return current
        if current is None or cmd.level > current:
            txn.put(b"log_level", u64(cmd.level), db=self.meta_db)
            return cmd.level
        return current

    def set_verifier(self, txn: lmdb.Transaction[bytes], cmd: cc.SetJoinVerifier) -> None:
        if not self.initialised(txn):
            raise FsError(errno.EINVAL, "not a cluster")
        txn.put(b"join_verifier", cmd.verifier, db=self.meta_db)

    def renew_lease(self, txn: lmdb.Transaction[bytes], cmd: cc.RenewLease) -> bool:
        record = self.member(txn, cmd.node)
        if record is None or record["state"] != "active" or record["epoch"] != cmd.epoch:
            return False
        if record["expired"]:
            record["expired"] = False
            self._put(txn, cmd.node, record)
        return True

    def expire_node(self, txn: lmdb.Transaction[bytes], cmd: cc.ExpireNode) -> list[int]:
        """Free the node's groups and write leases; its next renewal must use the next epoch."""
        record = self._require(txn, cmd.node)
        record["epoch"] += 1
        record["expired"] = True
        self._put(txn, cmd.node, record)
        groups = self.groups_of(txn, cmd.node)
        for group in groups:
            txn.delete(group.to_bytes(4, "big"), db=self.groups_db)
        for ino in self.leases_of(txn, cmd.node):
            txn.delete(u64(ino), db=self.leases_db)
        return groups

    def claim_groups(self, txn: lmdb.Transaction[bytes], cmd: cc.ClaimGroups, ag_count: int) -> tuple[int, ...]:
        self._check_epoch(txn, cmd.node, cmd.epoch)
        if not 0 < cmd.count <= MAX_CLAIM_GROUPS:
            raise FsError(errno.EINVAL, f"claim of {cmd.count} groups")
        owned = {int.from_bytes(k, "big") for k, _ in txn.cursor(self.groups_db)}
        granted = tuple(g for g in range(ag_count) if g not in owned)[: cmd.count]
        for group in granted:
            txn.put(group.to_bytes(4, "big"), u64(cmd.node), db=self.groups_db)
        return granted

    def acquire_lease(self, txn: lmdb.Transaction[bytes], cmd: cc.AcquireWriteLease) -> int:
        self._check_epoch(txn, cmd.node, cmd.epoch)
        holder = self.lease_holder(txn, cmd.ino)
        if holder == 0:
            txn.put(u64(cmd.ino), u64(cmd.node), db=self.leases_db)
            return cmd.node
        return holder

    def grant_new_lease(self, txn: lmdb.Transaction[bytes], ino: int, node: int) -> None:
        """The write lease of a file created this moment (Mknod's `lease_to`; inside a Fenced command,
        whose epoch check covers the node)."""
        assert self.lease_holder(txn, ino) == 0, f"a new inode {ino} already has a lease holder"
        txn.put(u64(ino), u64(node), db=self.leases_db)

    def release_lease(self, txn: lmdb.Transaction[bytes], cmd: cc.ReleaseWriteLease) -> bool:
        if self.lease_holder(txn, cmd.ino) != cmd.node:
            return False
        txn.delete(u64(cmd.ino), db=self.leases_db)
        return True

    def drop_leases_of_inode(self, txn: lmdb.Transaction[bytes], ino: int) -> None:
        txn.delete(u64(ino), db=self.leases_db)

    def check_fenced(self, txn: lmdb.Transaction[bytes], cmd: c.Fenced) -> None:
        """Refuse a command from an expired epoch (the space it maps is checked as each carried
        command is applied: `check_owned`)."""
        self._check_epoch(txn, cmd.node, cmd.epoch)

    def check_owned(self, txn: lmdb.Transaction[bytes], node: int, ranges: list[tuple[int, int]]) -> None:
        """Refuse new device ranges (start, count) outside `node`'s allocation groups: space
        another node may already be writing."""
        if not ranges:
            return
        first = self.number(txn, b"ag_first_block")
        size = self.number(txn, b"ag_blocks")
        owner = u64(node)
        for start, count in ranges:
            # each group the range touches, looked up: listing the node's groups scanned the whole
            # table at every WriteData on every member, a cost that grew with the device
            lowest, highest = (start - first) // size, (start + count - 1 - first) // size
            if lowest < 0 or highest >= 1 << 32 or any(
                    txn.get(group.to_bytes(4, "big"), db=self.groups_db) != owner for group in range(lowest, highest + 1)):
                raise FsError(errno.EIO, f"extent {start}+{count} is outside node {node}'s groups")

    def epoch_is_current(self, txn: lmdb.Transaction[bytes], node: int, epoch: int) -> bool:
        """Is `node` an active member whose liveness lease is `epoch` and not expired?"""
        record = self.member(txn, node)
        return record is not None and record["state"] == "active" and _lease_current(record, epoch)

    def _check_epoch(self, txn: lmdb.Transaction[bytes], node: int, epoch: int) -> None:
        record = self.member(txn, node)
        if record is None or record["state"] != "active":
            raise FsError(errno.EIO, f"node {node} is not a member")
        if not _lease_current(record, epoch):
            raise FsError(errno.EIO, f"node {node}'s lease epoch {epoch} has expired", cause="lease")


def _lease_current(record: dict[str, Any], epoch: int) -> bool:
    """A member record's liveness lease is `epoch` and not expired."""
    return bool(record["epoch"] == epoch and not record["expired"])


def _record(name: str, address: str, join_address: str, now_ns: int) -> dict[str, Any]:
    return {"name": name, "address": address, "join_address": join_address, "serial": "", "state": "active",
            "epoch": 1, "expired": False, "joined_ns": now_ns}


def member_from_record(node: int, record: dict[str, Any]) -> Member:
    """The typed form of a member record (JSON in table `members`)."""
    return Member(
        node=node, name=record["name"], address=record["address"], join_address=record["join_address"],
        serial=record["serial"], state=record["state"], epoch=int(record["epoch"]), expired=bool(record["expired"]),
        joined_ns=record["joined_ns"],
    )


@lru_cache(maxsize=4 * MAX_MEMBERS)
def _member_state(raw: bytes) -> str:
    """A member record's state: a function of its bytes alone, so a record decoded once need not
    be again (a record that changes is new bytes)."""
    return str(json.loads(raw)["state"])
