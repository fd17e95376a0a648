"""Volumes and snapshots in the state machine: quota'd directory trees, copied by reference.

A volume is a directory under `/.volumes` whose inodes carry the volume's id; every block and inode
they gain or lose is charged to the volume, and a charge past the quota fails with EDQUOT. A
snapshot is a read-only copy of a volume's tree under `/.snapshots` that shares the data extents
(reference counts in the space map), so it costs metadata only; a clone copies a volume or snapshot
tree the same way into a new, writable volume.
"""

from __future__ import annotations

import errno
import json
import stat
from collections.abc import Callable
from typing import Any

import lmdb

from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta import filemap
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.namespace import Namespace
from awsomefsd.meta.records import (
    SNAPSHOTS_INO,
    VOLUMES_INO,
    Inode,
    Volume,
    fmap_key,
    snapshot_dir_name,
    u64,
    volume_dir_name,
    xattr_key,
)
from awsomefsd.meta.space import SpaceMap

MAX_TREE_INODES = 1_000_000
Counter = Callable[["lmdb.Transaction[bytes]", bytes, int], int]  # quoted: not subscriptable at runtime


class VolumeTables:
    def __init__(self, store: Any, ns: Namespace, space: SpaceMap) -> None:
        self.db = store.db["volumes"]
        self.names = store.db["volnames"]
        self.store = store
        self.ns = ns
        self.space = space

    # -- records --------------------------------------------------------------------------------
    def get(self, txn: lmdb.Transaction[bytes], volume: int) -> dict[str, Any] | None:
        data = txn.get(u64(volume), db=self.db)
        return None if data is None else json.loads(data)

    def put(self, txn: lmdb.Transaction[bytes], volume: int, record: dict[str, Any]) -> None:
        txn.put(u64(volume), json.dumps(record, sort_keys=True).encode(), db=self.db)

    def by_name(self, txn: lmdb.Transaction[bytes], kind: str, name: str) -> int | None:
        data = txn.get(f"{kind}:{name}".encode(), db=self.names)
        return None if data is None else int.from_bytes(data, "big")

    def all(self, txn: lmdb.Transaction[bytes]) -> list[tuple[int, dict[str, Any]]]:
        return [(int.from_bytes(k, "big"), json.loads(v)) for k, v in txn.cursor(self.db)]

    def is_volume_root(self, txn: lmdb.Transaction[bytes], inode: Inode) -> bool:
        return inode.is_dir and inode.parent in (VOLUMES_INO, SNAPSHOTS_INO) and inode.volume != 0

    def check_writable(self, txn: lmdb.Transaction[bytes], volume: int) -> None:
        if volume == 0:
            return
        record = self.get(txn, volume)
        if record is not None and record["kind"] == "snapshot":
            raise FsError(errno.EROFS)

    def charge(self, txn: lmdb.Transaction[bytes], volume: int, *, blocks: int, inodes: int, enforce: bool = True) -> None:
        """Account blocks and inodes to a volume; past its quota, EDQUOT (only for growth)."""
        if volume == 0:
            return
        record = self.get(txn, volume)
        if record is None:
            return  # the volume is being deleted
        if record["kind"] == "snapshot" and enforce:
            raise FsError(errno.EROFS)
        used_blocks = record["used_blocks"] + blocks
        used_inodes = record["used_inodes"] + inodes
        if enforce and blocks > 0 and record["capacity"] and used_blocks * BLOCK_SIZE > record["capacity"]:
            raise FsError(errno.EDQUOT)
        if enforce and inodes > 0 and record["inode_limit"] and used_inodes > record["inode_limit"]:
            raise FsError(errno.EDQUOT)
        record["used_blocks"] = max(used_blocks, 0)
        record["used_inodes"] = max(used_inodes, 0)
        self.put(txn, volume, record)

    # -- commands -------------------------------------------------------------------------------
    def create_volume(self, txn: lmdb.Transaction[bytes], cmd: c.CreateVolume, counter: Counter) -> dict[str, Any]:
        existing = self.by_name(txn, "v", cmd.name)
        if existing is not None:
            record = self.get(txn, existing)
            assert record is not None
            return {"id": existing, **record}
        if self.get(txn, cmd.volume) is not None or self.ns.get_inode(txn, cmd.ino) is not None:
            raise FsError(errno.EEXIST, "volume id or inode proposed twice")
        source_root = 0
        if cmd.source_kind:
            source = self.get(txn, cmd.source_id)
            if source is None or source["kind"] != cmd.source_kind:
                raise FsError(errno.ENOENT, "content source not found")
            if cmd.capacity_bytes and source["used_blocks"] * BLOCK_SIZE > cmd.capacity_bytes:
                raise FsError(errno.EDQUOT, "content source is larger than the capacity")
            source_root = source["root"]
        record = {
            "kind": "volume", "name": cmd.name, "root": cmd.ino, "capacity": cmd.capacity_bytes,
            "inode_limit": cmd.inode_limit, "used_blocks": 0, "used_inodes": 0, "created_ns": cmd.now_ns,
            "source_kind": cmd.source_kind, "source_id": cmd.source_id,
        }
        root = Inode(cmd.ino, stat.S_IFDIR | 0o777, 0, 0, 2, 0, cmd.now_ns, cmd.now_ns, cmd.now_ns,
                     volume=cmd.volume, parent=VOLUMES_INO)
        self._attach_root(txn, VOLUMES_INO, volume_dir_name(cmd.volume), root, cmd.now_ns, counter)
        if source_root:
            blocks, inodes = self._copy_tree(txn, source_root, root, cmd.volume, counter)
            record["used_blocks"], record["used_inodes"] = blocks, inodes
        self.put(txn, cmd.volume, record)
        txn.put(f"v:{cmd.name}".encode(), u64(cmd.volume), db=self.names)
        return {"id": cmd.volume, **record}

    def resize_volume(self, txn: lmdb.Transaction[bytes], cmd: c.ResizeVolume) -> dict[str, Any]:
        record = self.get(txn, cmd.volume)
        if record is None or record["kind"] != "volume":
            raise FsError(errno.ENOENT)
        if cmd.capacity_bytes and cmd.capacity_bytes < record["capacity"]:
            raise FsError(errno.EINVAL, "volumes do not shrink")
        record["capacity"] = cmd.capacity_bytes
        self.put(txn, cmd.volume, record)
        return {"id": cmd.volume, **record}

    # -- another site's volumes (meta/sites/volumes.py; design note 52) -----------------------------
    def receive_volume(self, txn: lmdb.Transaction[bytes], number: int, name: str, origin: str, capacity: int,
                       inode_limit: int, now_ns: int) -> str:
        """Make the record and the root directory (inode `number`, not yet in /.volumes: the
        replicated tree shows it there) of a volume another site created. A name this site's own
        volume holds stays this site's (a CSI retry here must find its own volume): the other's
        is recorded as `<name>.site-<origin>`. Returns the name recorded."""
        taken, extra = name, 1
        while self.by_name(txn, "v", taken) is not None:
            taken = f"{name}.site-{origin}" + ("" if extra == 1 else f"-{extra}")
            extra += 1
        root = Inode(number, stat.S_IFDIR | 0o777, 0, 0, 0, 0, now_ns, now_ns, now_ns, volume=number,
                     parent=VOLUMES_INO)  # nlink 0: no entry shows it yet (meta/sites/view.py counts it when one does)
        self.ns.put_inode(txn, root)
        self.put(txn, number, {
            "kind": "volume", "name": taken, "root": number, "capacity": capacity, "inode_limit": inode_limit,
            "used_blocks": 0, "used_inodes": 0, "created_ns": now_ns, "source_kind": "", "source_id": 0,
        })
        txn.put(f"v:{taken}".encode(), u64(number), db=self.names)
        return taken

    def grow(self, txn: lmdb.Transaction[bytes], volume: int, capacity: int, inode_limit: int) -> None:
        """Another site's quotas for a volume: the larger stands. A quota only ever rises (the CSI
        expansion refuses a smaller number; a volume made with none, 0, may be given one), so
        taking the larger number on both sites ends both at the newest."""
        record = self.get(txn, volume)
        if record is None:  # deleted here (concurrently: the delete stands)
            return
        record["capacity"] = max(record["capacity"], capacity)
        record["inode_limit"] = max(record["inode_limit"], inode_limit)
        self.put(txn, volume, record)

    def drop_record(self, txn: lmdb.Transaction[bytes], volume: int) -> None:
        """The volume is gone (its tree stays with the replicated tree until both sites forget
        the delete); charges to it become no-ops, and its name is free."""
        record = self.get(txn, volume)
        if record is None:
            return
        txn.delete(u64(volume), db=self.db)
        txn.delete(f"{record['kind'][0]}:{record['name']}".encode(), db=self.names)

    def create_snapshot(self, txn: lmdb.Transaction[bytes], cmd: c.CreateSnapshot, counter: Counter) -> dict[str, Any]:
        existing = self.by_name(txn, "s", cmd.name)
        if existing is not None:
            record = self.get(txn, existing)
            assert record is not None
            if record["source_id"] != cmd.volume:
                raise FsError(errno.EEXIST, "snapshot name taken by another volume's snapshot")
            return {"id": existing, **record}
        source = self.get(txn, cmd.volume)
        if source is None or source["kind"] != "volume":
            raise FsError(errno.ENOENT)
        if self.get(txn, cmd.snapshot) is not None:
            raise FsError(errno.EEXIST, "snapshot id proposed twice")
        root_ino = counter(txn, b"ino_next", 1)
        root = Inode(root_ino, stat.S_IFDIR | 0o555, 0, 0, 2, 0, cmd.now_ns, cmd.now_ns, cmd.now_ns,
                     volume=cmd.snapshot, parent=SNAPSHOTS_INO)
        self._attach_root(txn, SNAPSHOTS_INO, snapshot_dir_name(cmd.snapshot), root, cmd.now_ns, counter)
        blocks, inodes = self._copy_tree(txn, source["root"], root, cmd.snapshot, counter)
        record = {
            "kind": "snapshot", "name": cmd.name, "root": root_ino, "capacity": 0, "inode_limit": 0,
            "used_blocks": blocks, "used_inodes": inodes, "created_ns": cmd.now_ns,
            "source_kind": "volume", "source_id": cmd.volume,
        }
        self.put(txn, cmd.snapshot, record)
        txn.put(f"s:{cmd.name}".encode(), u64(cmd.snapshot), db=self.names)
        return {"id": cmd.snapshot, **record}

    def delete_volume(self, txn: lmdb.Transaction[bytes], cmd: c.DeleteVolume, delete_inode: Callable[..., None]) -> bool:
        return self._delete(txn, cmd.volume, "volume", cmd.now_ns, delete_inode)

    def delete_snapshot(self, txn: lmdb.Transaction[bytes], cmd: c.DeleteSnapshot, delete_inode: Callable[..., None]) -> bool:
        return self._delete(txn, cmd.snapshot, "snapshot", cmd.now_ns, delete_inode)

    # -- trees ----------------------------------------------------------------------------------
    def _attach_root(
        self, txn: lmdb.Transaction[bytes], container: int, name: bytes, root: Inode, now_ns: int, counter: Counter
    ) -> None:
        parent = self.ns.require_inode(txn, container)
        self.ns.put_inode(txn, root)
        self.ns.add_entry(txn, container, name, root.ino, counter(txn, b"cookie_next", 1))
        parent.nlink += 1
        parent.mtime_ns = parent.ctime_ns = now_ns
        self.ns.put_inode(txn, parent)

    def _copy_tree(
        self, txn: lmdb.Transaction[bytes], src_root: int, dst_root: Inode, volume: int, counter: Counter
    ) -> tuple[int, int]:
        """Copy the tree below src_root under dst_root, sharing data; returns (blocks, inodes)."""
        fmap = self.store.db["fmap"]
        copied: dict[int, int] = {}  # source inode -> copy, so hard links stay links
        blocks = inodes = 0
        stack = [(src_root, dst_root.ino)]
        while stack:
            src_dir, dst_dir = stack.pop()
            for name, child in list(self.ns.names(txn, src_dir)):
                if child in copied:
                    new_ino = copied[child]
                    node = self.ns.require_inode(txn, new_ino)
                    node.nlink += 1
                    self.ns.put_inode(txn, node)
                else:
                    inodes += 1
                    if inodes > MAX_TREE_INODES:
                        raise FsError(errno.EFBIG, "tree too large to copy in one command")
                    src = self.ns.require_inode(txn, child)
                    new_ino = counter(txn, b"ino_next", 1)
                    copied[child] = new_ino
                    # unwritten extents are not shared (meta/ranges.py): the copy has a hole there
                    shared = [ext for ext in filemap.all_extents(txn, fmap, child) if not ext.unwritten]
                    node = Inode(new_ino, src.mode, src.uid, src.gid, 2 if src.is_dir else 1, src.size,
                                 src.atime_ns, src.mtime_ns, src.ctime_ns, rdev=src.rdev, volume=volume,
                                 blocks=sum(ext.count for ext in shared), parent=dst_dir if src.is_dir else 0)
                    self.ns.put_inode(txn, node)
                    blocks += node.blocks
                    for key, value in list(self.ns.xattrs(txn, child)):
                        txn.put(xattr_key(new_ino, key[8:]), value, db=self.ns.xattr_db)
                    if src.is_symlink:
                        txn.put(u64(new_ino), self.ns.symlink_target(txn, child), db=self.ns.symlinks)
                    for ext in shared:
                        self.space.share(txn, ext.dev_block, ext.count)
                        txn.put(fmap_key(new_ino, ext.file_block), ext.pack_value(), db=fmap)
                    if src.is_dir:
                        stack.append((child, new_ino))
                        dst_parent = self.ns.require_inode(txn, dst_dir)
                        dst_parent.nlink += 1
                        self.ns.put_inode(txn, dst_parent)
                self.ns.add_entry(txn, dst_dir, name, new_ino, counter(txn, b"cookie_next", 1))
        return blocks, inodes

    def _delete(
        self, txn: lmdb.Transaction[bytes], volume: int, kind: str, now_ns: int, delete_inode: Callable[..., None]
    ) -> bool:
        record = self.get(txn, volume)
        if record is None:
            return False
        if record["kind"] != kind:
            raise FsError(errno.EINVAL, f"{volume} is not a {kind}")
        container = VOLUMES_INO if kind == "volume" else SNAPSHOTS_INO
        name = volume_dir_name(volume) if kind == "volume" else snapshot_dir_name(volume)
        seen: set[int] = set()
        stack = [record["root"]]
        order: list[int] = []
        while stack:
            ino = stack.pop()
            order.append(ino)
            for entry_name, child in list(self.ns.names(txn, ino)):
                self.ns.remove_entry(txn, ino, entry_name)
                if child in seen:
                    continue
                seen.add(child)
                stack.append(child)
        self.drop_record(txn, volume)  # first: charges during the teardown become no-ops
        for ino in order:
            inode = self.ns.get_inode(txn, ino)
            if inode is not None:
                delete_inode(txn, inode, now_ns)
        parent = self.ns.require_inode(txn, container)
        self.ns.remove_entry(txn, container, name)
        parent.nlink -= 1
        parent.mtime_ns = parent.ctime_ns = now_ns
        self.ns.put_inode(txn, parent)
        return True


def volume_from_record(number: int, record: dict[str, Any]) -> Volume:
    """The typed form of a volume record (JSON in table `volumes`, or a command's result)."""
    return Volume(
        id=number, kind=record["kind"], name=record["name"], root=record["root"],
        capacity_bytes=record["capacity"], inode_limit=record["inode_limit"], used_blocks=record["used_blocks"],
        used_inodes=record["used_inodes"], created_ns=record["created_ns"], source_kind=record["source_kind"] or "",
        source_id=record["source_id"],
    )
