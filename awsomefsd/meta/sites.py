"""Cross-site replication in the state machine (design note 48): what a site records of its own
commands for its peer, and how it applies the peer's operations.

Two directions meet here, both inside the transaction of a command, so both are as durable and
as replicated (by the site's own Raft group) as the namespace they describe:
- **Capture** (`record`): after a namespace or attribute command applied, while the site is
  linked, what it did is written to the outbox in site-independent terms (crdt/ops.py): objects
  named by global ids, directory entries as nodes of the replicated tree (crdt/tree.py), each
  operation stamped by the site's hybrid logical clock. The clock is kept in the tables and
  advanced from the command's own `now_ns`, so every replica computes the same stamps.
- **Apply** (`apply_remote`): the peer's operations, in its stamp order. Moves go through the
  replicated tree (undo and redo when one arrives older than moves applied here); the directory
  entries the tree's placements imply are then made to match (`_show`), so what a site shows
  is a function of the moves it applied. Attributes and extended attributes are multi-value
  registers (crdt/register.py): the newest version shows, a concurrent loser is a conflict,
  listed in the `sconflicts` table.

Deleting is a move to the tree's TRASH: an object whose last entry went there keeps its inode
(nlink 0, not an orphan) until both sites have moved past the deletion (`forget`), because a
concurrent rename with a later stamp must be able to bring it back.

Volumes replicate as trees of their own (design note 52): a volume's root directory is an entry
of the tree's VOLUMES container, placed there by the `VolumeSet` that makes the volume and
shown as /.volumes/vol-<this site's number>; deleting the volume moves that entry into TRASH.
Snapshots are per site and never ship (/.snapshots is outside the replicated tree); a volume
cloned from one ships as a new volume with its files. File content is a register too
(ContentSet); its bytes travel beside the operation and are on this site's device before the
`ApplyRemote` that maps them.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import stat
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import MAX_LOGICAL, PACKED_BYTES, Stamp, happened_before
from awsomefsd.crdt.register import MultiValueRegister, Version
from awsomefsd.crdt.tree import (
    MAX_DEPTH,
    ROOT,
    TRASH,
    VOLUMES,
    LogEntry,
    Move,
    Placement,
    ReplicatedTree,
    conflict_name,
)
from awsomefsd.meta import commands as c
from awsomefsd.meta import filemap
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import (
    CONFLICTS_INO,
    MAX_FILE_SIZE_BYTES,
    ROOT_INO,
    SNAPSHOTS_INO,
    VOLUMES_INO,
    Applied,
    Extent,
    Inode,
    blocks_for,
    fmap_key,
    read_u64,
    u64,
    volume_dir_name,
)

if TYPE_CHECKING:
    from awsomefsd.meta.state_machine import StateMachine

SITE_TABLES = (
    "sites",  # b"peer", b"clock", b"seen", b"horizon", b"next_entry": the link and the clock
    "soutbox",  # stamp -> encoded operation: what the peer has not acknowledged yet
    "sids",  # global object id -> local ino
    "sinos",  # local ino -> global object id
    "splace",  # entry node -> placement (parent node, stamp, name): the replicated tree
    "skids",  # parent node + name + 0 + node -> b"": the tree's children, grouped by name
    "sentries",  # entry node -> object id + where it is shown (parent ino, name; ino 0: nowhere)
    "sobjents",  # object id + entry node -> b"": the entries of each object
    "snames",  # parent ino + shown name -> entry node: a local directory entry's tree node
    "slog",  # stamp -> the tree's undo log entry
    "smoves",  # entry node + stamp -> move: the moves of each node a later one may conflict with
    "sregs",  # object id + kind (+ xattr name) -> register versions
    "sconflicts",  # loser stamp + kind -> conflict record
)
REPLICATED = (c.Mknod, c.Link, c.Unlink, c.Rename, c.SetAttr, c.SetXattr, c.RemoveXattr,
              c.WriteData, c.PunchHole, c.CloneRange, c.CreateVolume, c.ResizeVolume, c.LinkTmpfile)
"""The commands whose effect ships (Preallocate does not: it changes no byte a reader sees;
DeleteVolume is captured in place of its teardown: `delete_volume`)."""
ATTRS, CONTENT, XATTR = b"a", b"c", b"x"
PEER_LAST = b"p"
"""Register key suffix: the peer's last content version of an object, shipped or superseded."""
_ENTRY_BIT = 1 << 63
"""Entry node numbers of files have this bit; a directory's entry node is its object id."""
_PLACE_HEAD = 16 + PACKED_BYTES
CONFLICTS_NAME = b".conflicts"
SKIPPED = b"skipped:"
"""Key prefix in the `sites` table: the stamps of the moves the tree's log holds as skipped."""
EDIT_DELETE = b"edit-delete:"
"""Key prefix in the `sites` table: object -> the key of its open edit-against-delete record."""
DELETED = b"deleted:"
"""Key prefix in the `sites` table: object + stamp (+ node) -> the moves that deleted one of its
entries, kept past `forget` while the object has another entry: the move into TRASH
(`_release_deleted`), or, for an entry inside a directory released with what was below it, the
entry's own move and those that took the directory away (`_release_below`)."""
KEPT_COPY = b"kept-copy:"
"""Key prefix in the `sites` table: object + loser stamp of a settled content conflict whose copy
stays until a later version from the loser's own site supersedes it (`_settle`)."""


def conflict_id(key: bytes) -> str:
    """A conflict's short name for operators: the same on both sites (its key is)."""
    return hashlib.blake2b(key, digest_size=6).hexdigest()


def site_of_cluster(cluster_id: str) -> bytes:
    """A site's id: its cluster id's 16 bytes."""
    return uuid.UUID(cluster_id).bytes


@dataclass(slots=True)
class _Dirty:
    """What one operation's tree moves touched: the name groups whose shown names may change,
    and the nodes that moved (whose old directory entries may have to go)."""

    groups: set[tuple[bytes, bytes]] = field(default_factory=set)
    nodes: set[bytes] = field(default_factory=set)


class _TableTree:
    """The replicated tree's TreeState and TreeLog on the site tables, within one transaction."""

    def __init__(self, tables: SiteTables, txn: lmdb.Transaction[bytes], dirty: _Dirty) -> None:
        self.t, self.txn, self.dirty = tables, txn, dirty
        self.meta = tables.meta

    # TreeState
    def placement(self, node: bytes) -> Placement | None:
        return self.t.placement(self.txn, node)

    def place(self, node: bytes, placement: Placement | None) -> None:
        txn, db = self.txn, self.t.db
        old = self.placement(node)
        if old is not None:
            txn.delete(old.parent + old.name + b"\0" + node, db=db["skids"])
            self.dirty.groups.add((old.parent, old.name))
        if placement is None:
            txn.delete(node, db=db["splace"])
        else:
            txn.put(node, placement.parent + placement.stamp.pack() + placement.name, db=db["splace"])
            txn.put(placement.parent + placement.name + b"\0" + node, b"", db=db["skids"])
            self.dirty.groups.add((placement.parent, placement.name))
        self.dirty.nodes.add(node)

    # TreeLog
    def entry_at(self, stamp: Stamp) -> LogEntry | None:
        raw = self.txn.get(stamp.pack(), db=self.t.db["slog"])
        return None if raw is None else _log_entry(raw)

    def entries_from(self, stamp: Stamp) -> list[LogEntry]:
        return [_log_entry(v) for _, v in _scan_from(self.txn, self.t.db["slog"], stamp.pack())]

    def truncate_from(self, stamp: Stamp) -> None:
        for key, _ in list(_scan_from(self.txn, self.t.db["slog"], stamp.pack())):
            self.txn.delete(key, db=self.t.db["slog"])
        for key, _ in list(_scan_from(self.txn, self.t.meta, SKIPPED + stamp.pack())):
            if not bytes(key).startswith(SKIPPED):
                break
            self.txn.delete(key, db=self.t.meta)

    def append(self, entry: LogEntry) -> None:
        self.txn.put(entry.move.stamp.pack(), _pack_log_entry(entry), db=self.t.db["slog"])
        if not entry.done:  # a move that would have made a cycle: listed while the log holds it
            self.txn.put(SKIPPED + entry.move.stamp.pack(), b"", db=self.t.meta)

    def moves_of(self, node: bytes) -> list[Move]:
        return [_unpack_move(bytes(v))[0] for _, v in _scan(self.txn, self.t.db["smoves"], node)]

    def add_move_of(self, move: Move) -> None:
        self.txn.put(move.node + move.stamp.pack(), _pack_move(move), db=self.t.db["smoves"])

    def forget_through(self, stamp: Stamp) -> int:
        """Drop the log up to `stamp`; a skipped move in it becomes a conflict record for good."""
        txn, db = self.txn, self.t.db
        dropped = 0
        for key, value in list(_scan(txn, db["slog"], b"")):
            if Stamp.unpack(bytes(key)) > stamp:
                break
            entry = _log_entry(value)
            if not entry.done:
                self.t.keep_skipped(txn, entry)
            txn.delete(key, db=db["slog"])
            txn.delete(entry.move.node + bytes(key), db=db["smoves"])
            dropped += 1
        return dropped


class SiteTables:
    """The site tables' semantics; the state machine calls in (`record`, `apply_remote`, ...)."""

    def __init__(self, store: Any, sm: StateMachine) -> None:
        self.db = store.db
        self.meta = store.db["sites"]
        self._sm = sm  # its counters, space map and orphan records; the namespace as `ns`
        self.ns = sm.ns
        self._site: bytes | None = None
        self._entries: list[tuple[int, bytes]] = []  # touched by the command being applied
        self._inodes: list[int] = []
        self.local_side_effects: Callable[[Applied], None] | None = None
        """Hears what capturing a local command changed besides the command's own entries: a
        name group shown again (an entry shown under a conflict name gets its name back when the
        newer one is renamed or removed), a copy kept in /.conflicts. The mount's kernel caches
        those names (60 s on a single node) and was told of nothing: a renamed-away conflict name
        stayed visible to stat."""

    # -- the link -------------------------------------------------------------------------------
    def site(self, txn: lmdb.Transaction[bytes]) -> bytes:
        """This site's id (its cluster id, which a store never changes: read once)."""
        if self._site is None:
            raw = txn.get(b"cluster_id", db=self.db["meta"])
            assert raw is not None, "a bootstrapped store has a cluster id"
            self._site = site_of_cluster(bytes(raw).decode())
        return self._site

    def peer(self, txn: lmdb.Transaction[bytes]) -> bytes | None:
        raw = txn.get(b"peer", db=self.meta)
        return None if raw is None else bytes(raw)

    def link(self, txn: lmdb.Transaction[bytes], cmd: c.LinkSite) -> int:
        """Pair with `cmd.peer`: from now on every replicated command is captured. What exists
        already is captured too, as creates from the root down (the initial sync). Returns the
        number of operations that puts in the outbox."""
        if len(cmd.peer) != 16 or cmd.peer == self.site(txn):
            raise FsError(errno.EINVAL, "a site links to another site's 16-byte id")
        current = self.peer(txn)
        if current is not None:
            raise FsError(errno.EEXIST, f"already linked to site {current.hex()}: unlink it first")
        txn.put(b"peer", cmd.peer, db=self.meta)
        txn.put(b"link", json.dumps({"peer": cmd.peer.hex(), "ca_pem": cmd.peer_ca_pem.decode(),
                                     "addresses": list(cmd.peer_addresses), "since_ns": cmd.now_ns}).encode(),
                db=self.meta)
        before = txn.stat(self.db["soutbox"])["entries"]
        self._set_ids(txn, ROOT_INO, ROOT)
        self._seed(txn, ROOT_INO, ROOT, cmd.now_ns)
        for number, record in self._sm.volumes.all(txn):
            if record["kind"] == "volume":
                self._capture_volume(txn, number, record, cmd.now_ns)
        return int(txn.stat(self.db["soutbox"])["entries"]) - int(before)

    def update_link(self, txn: lmdb.Transaction[bytes], cmd: c.UpdateSiteLink) -> None:
        """Keep what the peer says of itself now (`UpdateSiteLink`) with the link."""
        info = self.link_info(txn)
        if info is None:
            raise FsError(errno.ENOENT, "not linked to any site")
        info["addresses"], info["revoked"] = list(cmd.addresses), list(cmd.revoked)
        txn.put(b"link", json.dumps(info).encode(), db=self.meta)

    def unlink(self, txn: lmdb.Transaction[bytes], cmd: c.UnlinkSite) -> None:
        """Stop capturing; the outbox, the cursors and the tree are dropped (a new link starts over
        with an initial sync). Objects kept only for the tree are released to the orphan purge."""
        if self.peer(txn) is None:
            raise FsError(errno.ENOENT, "not linked to any site")
        for ino in self.kept_inodes(txn):
            inode = self.ns.get_inode(txn, ino)
            if inode is not None and inode.is_dir and inode.nlink == 0:
                self._release_below(txn, ino, [])  # a deleted volume's files: nothing keeps them now
        for name in SITE_TABLES:
            if name not in ("sconflicts",):
                txn.drop(self.db[name], delete=False)

    # -- capture --------------------------------------------------------------------------------
    def record(self, txn: lmdb.Transaction[bytes], cmd: object, result: Any) -> None:
        """Capture what `cmd` (applied, with `result`) did, if the site is linked."""
        peer = self.peer(txn)
        if peer is None:
            return
        self._entries, self._inodes = [], []
        self._capture(txn, cmd, result)
        if self._entries and self.local_side_effects is not None:
            self.local_side_effects(Applied(0, tuple(self._entries), tuple(self._inodes)))

    def _capture(self, txn: lmdb.Transaction[bytes], cmd: object, result: Any) -> None:
        if isinstance(cmd, c.Mknod):
            if self._replicated_dir(txn, cmd.parent):
                self._capture_new(txn, cmd.parent, cmd.name, result, cmd.now_ns)
        elif isinstance(cmd, c.Link):
            if self._replicated_dir(txn, cmd.new_parent):
                obj = self.object_of(txn, cmd.ino)
                if obj is not None:
                    self._local_move(txn, self._new_entry(txn), cmd.new_parent, cmd.new_name, obj, cmd.now_ns)
        elif isinstance(cmd, c.LinkTmpfile):  # an O_TMPFILE file appears whole: as a seeded one
            if self._replicated_dir(txn, cmd.new_parent):
                self._seed_entry(txn, cmd.new_parent, cmd.new_name, result, cmd.now_ns)
        elif isinstance(cmd, c.Unlink):
            self._capture_delete(txn, cmd.parent, cmd.name, cmd.now_ns)
        elif isinstance(cmd, c.Rename):
            self._capture_rename(txn, cmd)
        elif isinstance(cmd, c.SetAttr):
            inode: Inode = result
            if any(v is not None for v in (cmd.mode, cmd.uid, cmd.gid, cmd.atime_ns, cmd.mtime_ns)):
                self._capture_attrs(txn, inode, cmd.now_ns)
            if cmd.size is not None:
                self._capture_content(txn, inode, cmd.now_ns)
        elif isinstance(cmd, (c.SetXattr, c.RemoveXattr)):
            obj = self.object_of(txn, cmd.ino)
            if obj is not None:
                value = cmd.value if isinstance(cmd, c.SetXattr) else None
                stamp = self._tick(txn, cmd.now_ns)
                self._local_version(txn, obj, XATTR + cmd.name, stamp, None if value is None else value.hex())
                self._ship(txn, o.XattrSet(stamp, obj, cmd.name, value, self._seen(txn)))
        elif isinstance(cmd, c.WriteData):
            if cmd.touch:  # compaction (touch=False) moves bytes, it changes none
                self._capture_content(txn, result, cmd.now_ns)
        elif isinstance(cmd, c.PunchHole):
            self._capture_content(txn, result, cmd.now_ns)
        elif isinstance(cmd, c.CloneRange):
            self._capture_content(txn, self.ns.require_inode(txn, cmd.dst_ino), cmd.now_ns)
        elif isinstance(cmd, c.CreateVolume):
            self._capture_volume(txn, result["id"], result, cmd.now_ns)
        elif isinstance(cmd, c.ResizeVolume):
            obj = self.object_of(txn, result["root"])
            if obj is not None:
                self._ship(txn, o.VolumeSet(self._tick(txn, cmd.now_ns), obj, result["name"].encode(),
                                            result["capacity"], result["inode_limit"], self._seen(txn)))

    # -- volumes (design note 52) ----------------------------------------------------------------
    def replicates_volumes(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Do volumes ship? On a cluster, only once every member's build captures them alike (a
        replica capturing what another does not would hold other tables: the log level)."""
        cluster = self._sm.cluster
        if not cluster.initialised(txn):
            return True
        return (cluster.log_level(txn) or c.BASE_LOG_LEVEL) >= c.VOLUMES_LEVEL

    def _capture_volume(self, txn: lmdb.Transaction[bytes], number: int, record: dict[str, Any],
                        now_ns: int) -> None:
        """A volume new to the peer: its record, its root's entry under VOLUMES, its root's
        attributes, and what its tree holds already (a clone's files, or a link's initial sync)."""
        root = record["root"]
        if not self.replicates_volumes(txn) or self.object_of(txn, root) is not None:
            return  # not yet (a rolling upgrade), or known already (CreateVolume answered a retry)
        obj = o.global_id(self.site(txn), root)
        self._set_ids(txn, root, obj)
        self._set_ids(txn, VOLUMES_INO, VOLUMES)  # the container's id comes with the first volume either way
        self._ship(txn, o.VolumeSet(self._tick(txn, now_ns), obj, record["name"].encode(), record["capacity"],
                                    record["inode_limit"], self._seen(txn)))
        self._local_move(txn, obj, VOLUMES_INO, volume_dir_name(number), obj, now_ns)
        self._capture_attrs(txn, self.ns.require_inode(txn, root), now_ns)
        self._seed(txn, root, obj, now_ns)

    def delete_volume(self, txn: lmdb.Transaction[bytes], cmd: c.DeleteVolume) -> bool:
        """DeleteVolume of a volume that ships: its root leaves /.volumes as an rmdir would, and
        its entry moves into TRASH; its tree stays, kept as any deleted directory is until both
        sites forget the delete, so that what the other site wrote there meanwhile, not knowing,
        is judged by the edit-against-delete rule and kept in /.conflicts. False: the volume does
        not ship, and the caller tears it down at once."""
        record = self._sm.volumes.get(txn, cmd.volume)
        if self.peer(txn) is None or record is None or record["kind"] != "volume":
            return False
        root_ino = record["root"]
        obj = self.object_of(txn, root_ino)
        if obj is None:
            return False
        self._entries, self._inodes = [], []
        self._sm.volumes.drop_record(txn, cmd.volume)
        name = volume_dir_name(cmd.volume)
        if self.ns.lookup(txn, VOLUMES_INO, name) == root_ino:  # (one received half way is not shown yet)
            self.ns.remove_entry(txn, VOLUMES_INO, name)
            container = self.ns.require_inode(txn, VOLUMES_INO)
            container.nlink = max(container.nlink - 1, 2)
            container.mtime_ns = container.ctime_ns = max(container.mtime_ns, cmd.now_ns)
            self.ns.put_inode(txn, container)
        root = self.ns.require_inode(txn, root_ino)
        root.nlink = 0  # a directory no entry shows (released once both sites forget the delete)
        root.ctime_ns = cmd.now_ns
        self.ns.put_inode(txn, root)
        self._local_move(txn, obj, 0, name, obj, cmd.now_ns)
        return True

    def shipped_volumes(self, txn: lmdb.Transaction[bytes]) -> dict[str, str]:
        """The volumes that ship, by their root's global id (hex): their directory in /.volumes."""
        found = {}
        for number, record in self._sm.volumes.all(txn):
            obj = self.object_of(txn, record["root"]) if record["kind"] == "volume" else None
            if obj is not None:
                found[obj.hex()] = volume_dir_name(number).decode()
        return found

    def _volume_root(self, txn: lmdb.Transaction[bytes], obj: bytes) -> Inode | None:
        """The root directory of a volume, if `obj` is one here (a volume's number is its root's)."""
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        return inode if inode is not None and inode.parent == VOLUMES_INO and inode.volume == inode.ino else None

    def _apply_volume(self, txn: lmdb.Transaction[bytes], op: o.VolumeSet) -> None:
        root = self._volume_root(txn, op.object)
        if root is not None:
            self._sm.volumes.grow(txn, root.volume, op.capacity, op.inode_limit)
            return
        if self._ino(txn, op.object) is not None:
            raise FsError(errno.EINVAL, f"volume {op.object.hex()} names an object that is no volume here")
        number = self._sm.next_ino(txn)
        self._set_ids(txn, VOLUMES_INO, VOLUMES)  # (as in _capture_volume: a site linked at level 10 has none)
        self._sm.volumes.receive_volume(txn, number, op.name.decode(errors="replace"), op.stamp.site.hex()[:8],
                                        op.capacity, op.inode_limit, op.stamp.wall_ns)
        self._set_ids(txn, number, op.object)

    def _tree_name(self, txn: lmdb.Transaction[bytes], node: bytes, parent_ino: int, name: bytes) -> bytes:
        """The name a local move gives `node` in the tree: the name itself, but for a volume's
        root, whose shown name (vol-<number>) differs between the sites, its object id."""
        return self._entry_object(txn, node).hex().encode() if parent_ino == VOLUMES_INO else name

    def _shown_name(self, txn: lmdb.Transaction[bytes], parent: bytes, node: bytes, name: bytes) -> bytes:
        """The name this site shows `node` under: a volume's root as vol-<this site's number>."""
        if parent != VOLUMES:
            return name
        ino = self._ino(txn, self._entry_object(txn, node))
        assert ino is not None
        return volume_dir_name(self.ns.require_inode(txn, ino).volume)

    def _join_volume(self, txn: lmdb.Transaction[bytes], child: Inode, parent: Inode) -> None:
        """An object the peer made takes the volume of the directory it is first shown in (it
        came into being with no place): its blocks and itself count there from now on."""
        if child.volume == parent.volume or parent.ino == VOLUMES_INO:
            return
        volumes = self._sm.volumes
        volumes.charge(txn, child.volume, blocks=-child.blocks, inodes=-1, enforce=False)
        volumes.charge(txn, parent.volume, blocks=child.blocks, inodes=1, enforce=False)
        child.volume = parent.volume

    def keeps(self, txn: lmdb.Transaction[bytes], ino: int) -> bool:
        """Does the replicated tree keep this inode after its last name went (it may come back)?"""
        return self.peer(txn) is not None and txn.get(u64(ino), db=self.db["sinos"]) is not None

    def _capture_new(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes,
                     inode: Inode, now_ns: int) -> None:
        obj = o.global_id(self.site(txn), inode.ino)
        self._set_ids(txn, inode.ino, obj)
        stamp = self._tick(txn, now_ns)
        target = self.ns.symlink_target(txn, inode.ino) if stat.S_ISLNK(inode.mode) else b""
        self._ship(txn, o.Created(stamp, obj, inode.mode, inode.uid, inode.gid, inode.rdev, target,
                                  inode.mtime_ns, self._seen(txn)))
        node = obj if inode.is_dir else self._new_entry(txn)
        self._local_move(txn, node, parent, name, obj, now_ns)

    def _capture_delete(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes, now_ns: int) -> None:
        node = self._node_shown_at(txn, parent, name)
        if node is None:
            return
        self._local_move(txn, node, 0, name, self._entry_object(txn, node), now_ns)

    def _capture_rename(self, txn: lmdb.Transaction[bytes], cmd: c.Rename) -> None:
        if not cmd.flags & c.RENAME_EXCHANGE and self.ns.lookup(txn, cmd.old_parent, cmd.old_name) is not None \
                and not cmd.flags & c.RENAME_WHITEOUT:
            return  # two names of one file: rename(2) does nothing, and succeeds
        src = self._node_shown_at(txn, cmd.old_parent, cmd.old_name)
        dst = self._node_shown_at(txn, cmd.new_parent, cmd.new_name)
        into_replicated = self._replicated_dir(txn, cmd.new_parent)
        # Both moves of one rename go to the tree together, so that no name group is re-shown
        # between them, from a namespace the command already changed all at once.
        moves: list[tuple[bytes, int, bytes]] = []
        if cmd.flags & c.RENAME_EXCHANGE:
            if src is not None and dst is not None:
                moves = [(src, cmd.new_parent, cmd.new_name), (dst, cmd.old_parent, cmd.old_name)]
            self._local_moves(txn, moves, cmd.now_ns)
            return
        if dst is not None:
            moves.append((dst, 0, cmd.new_name))
        if src is not None:
            # moved out of the replicated tree (into a volume, say): gone, for the peer
            moves.append((src, cmd.new_parent, cmd.new_name) if into_replicated else (src, 0, cmd.old_name))
        self._local_moves(txn, moves, cmd.now_ns)
        if src is None and into_replicated:  # moved in from outside: new to the peer
            ino = self.ns.lookup(txn, cmd.new_parent, cmd.new_name)
            assert ino is not None
            self._seed_entry(txn, cmd.new_parent, cmd.new_name, self.ns.require_inode(txn, ino), cmd.now_ns)
        if cmd.flags & c.RENAME_WHITEOUT and self._replicated_dir(txn, cmd.old_parent):
            self._capture_new(txn, cmd.old_parent, cmd.old_name, self.ns.require_inode(txn, cmd.whiteout_ino),
                              cmd.now_ns)

    def _capture_attrs(self, txn: lmdb.Transaction[bytes], inode: Inode, now_ns: int) -> None:
        obj = self.object_of(txn, inode.ino)
        if obj is None:
            return
        stamp = self._tick(txn, now_ns)
        mode = stat.S_IMODE(inode.mode)
        self._local_version(txn, obj, ATTRS, stamp, [mode, inode.uid, inode.gid, inode.atime_ns, inode.mtime_ns])
        self._ship(txn, o.AttrsSet(stamp, obj, mode, inode.uid, inode.gid, inode.atime_ns, inode.mtime_ns,
                                   self._seen(txn)))

    def _capture_content(self, txn: lmdb.Transaction[bytes], inode: Inode, now_ns: int) -> None:
        obj = self.object_of(txn, inode.ino)
        if obj is None:
            return
        stamp = self._tick(txn, now_ns)
        mode = stat.S_IMODE(inode.mode)
        self._local_version(txn, obj, CONTENT, stamp, [inode.size, inode.mtime_ns, mode, inode.uid, inode.gid])
        self._ship(txn, o.ContentSet(stamp, obj, inode.size, inode.mtime_ns, mode, inode.uid, inode.gid,
                                     self._seen(txn)))
        if txn.get(EDIT_DELETE + obj, db=self.meta) is not None:
            # Written through a descriptor after its names went (a name inside a deleted
            # directory still counts in nlink). A local write saw every delete applied here, so
            # it never keeps a copy: it can only replace the one kept of an older content.
            self._edit_against_delete(txn, obj)

    def _seed(self, txn: lmdb.Transaction[bytes], ino: int, node: bytes, now_ns: int) -> None:
        """Capture the tree below directory `ino` as creates (a link's initial sync, a volume new
        to the peer)."""
        volume = self.ns.require_inode(txn, ino).volume
        for name, child in list(self.ns.names(txn, ino)):
            if child in (VOLUMES_INO, SNAPSHOTS_INO, CONFLICTS_INO):
                continue
            inode = self.ns.require_inode(txn, child)
            if inode.volume != volume:
                continue
            self._seed_entry(txn, ino, name, inode, now_ns)

    def _seed_entry(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes, inode: Inode,
                    now_ns: int) -> None:
        known = self.object_of(txn, inode.ino)
        if known is None:
            self._capture_new(txn, parent, name, inode, now_ns)
            self._capture_attrs(txn, inode, now_ns)
            obj = self.object_of(txn, inode.ino)
            assert obj is not None
            for key, value in list(self.ns.xattrs(txn, inode.ino)):
                stamp = self._tick(txn, now_ns)
                self._local_version(txn, obj, XATTR + key[8:], stamp, value.hex())
                self._ship(txn, o.XattrSet(stamp, obj, key[8:], value, self._seen(txn)))
            if inode.is_reg and inode.size:
                self._capture_content(txn, inode, now_ns)
            if inode.is_dir:
                self._seed(txn, inode.ino, self.object_of(txn, inode.ino) or b"", now_ns)
        else:  # a second name of a file seen already
            self._local_move(txn, self._new_entry(txn), parent, name, known, now_ns)

    # -- the local side of a move ---------------------------------------------------------------
    def _local_move(self, txn: lmdb.Transaction[bytes], node: bytes, parent_ino: int,
                    name: bytes, obj: bytes, now_ns: int) -> None:
        """A move the local command already made in the namespace (parent_ino 0: a delete)."""
        if txn.get(node, db=self.db["sentries"]) is None:
            self._put_entry(txn, node, obj, 0, b"")
        self._local_moves(txn, [(node, parent_ino, name)], now_ns)

    def _local_moves(self, txn: lmdb.Transaction[bytes], moves: list[tuple[bytes, int, bytes]],
                     now_ns: int) -> None:
        """Moves one local command already made in the namespace, (node, parent ino or 0 for a
        delete, name) each: recorded in the tree and the outbox, then the name groups they left
        are re-shown, where an entry shown under a conflict name may get its own name back. The
        moved entries show what the command made: each is the newest of its new group."""
        for node, _parent_ino, _name in moves:
            self._unshow_node(txn, node)
        dirty = _Dirty()
        tree = ReplicatedTree(_TableTree(self, txn, dirty), _TableTree(self, txn, dirty))
        for node, parent_ino, name in moves:
            parent = TRASH if parent_ino == 0 else self.object_of(txn, parent_ino)
            assert parent is not None, parent_ino
            stamp = self._tick(txn, now_ns)
            seen = self._seen(txn)
            tree_name = self._tree_name(txn, node, parent_ino, name)
            tree.apply_local(Move(stamp, node, parent, tree_name, seen))
            self._ship(txn, o.Moved(stamp, node, parent, tree_name, self._entry_object(txn, node), seen))
        for node, parent_ino, name in moves:
            if parent_ino:
                self._put_entry(txn, node, self._entry_object(txn, node), parent_ino, name)
                txn.put(u64(parent_ino) + name, node, db=self.db["snames"])
                placed = self.placement(txn, node)
                if placed is not None:  # newest of its group: the name the command gave it is right
                    dirty.groups.discard((placed.parent, placed.name))
            dirty.nodes.discard(node)
        self._reshow(txn, dirty, now_ns)
        for node, parent_ino, _name in moves:
            if not parent_ino:  # only a delete can leave a file with no name
                self._edit_against_delete(txn, self._entry_object(txn, node))

    # -- apply ----------------------------------------------------------------------------------
    def apply_remote(self, txn: lmdb.Transaction[bytes], cmd: c.ApplyRemote | c.ApplyRemoteSharing) -> Applied:
        """Apply a batch of the peer's operations, all or none (`_all_or_none`): an operation can
        be refused after others wrote (the batch is checked first, but state that breaks an
        invariant shows only when it is met)."""
        return self._all_or_none(txn, lambda nested: self._apply_remote(nested, cmd))

    def _all_or_none(self, txn: lmdb.Transaction[bytes],
                     apply: Callable[[lmdb.Transaction[bytes]], Applied]) -> Applied:
        """Run `apply` in a nested transaction; if it raises, nothing it wrote stays and the
        in-memory mirrors (free space, counters) are reloaded from the tables the parent
        transaction still holds.

        On a cluster, another member may hold the delegation of a directory it changed, or the
        write lease of a file: that member may have acknowledged changes there the log has not
        seen, or be compacting the file from the map before. Then it is refused whole
        (`Delegated`) and its proposer proposes it again holding those (docs/delegations.md).
        Checked after applying, in its transaction: only applying tells which entries and inodes
        a batch of the other site's changes, or a resolution's moves, touch; every replica finds
        the same."""
        nested = self._sm.store.env.begin(write=True, parent=txn)
        try:
            applied = apply(nested)
            self._sm.check_delegated(nested, *sorted({parent for parent, _ in applied.entries} | set(applied.inodes)))
        except BaseException:
            nested.abort()
            self._sm.load(txn)
            raise
        nested.commit()
        return applied

    def _apply_remote(self, txn: lmdb.Transaction[bytes], cmd: c.ApplyRemote | c.ApplyRemoteSharing) -> Applied:
        self._entries, self._inodes = [], []
        peer = self.peer(txn)
        if peer is None or cmd.peer != peer:
            raise FsError(errno.EPERM, "operations from a site this one is not linked to")
        seen = self._seen_stamp(txn)
        if cmd.after != (b"" if seen is None else seen.pack()):
            raise FsError(errno.ESTALE, "a batch that does not continue from what this site applied "
                                        "(sent twice, or by two senders)")
        try:
            batch = [o.decode(raw) for raw in cmd.operations]
        except o.BadOperation as exc:
            raise FsError(errno.EINVAL, f"from site {peer.hex()[:8]}: {exc}") from None
        contents = [op for op in batch if isinstance(op, o.ContentSet)]
        shared, shared_counts = (cmd.shared, cmd.shared_counts) if isinstance(cmd, c.ApplyRemoteSharing) \
            else ((), (0,) * len(contents))
        for extents, counts in ((cmd.extents, cmd.extent_counts), (shared, shared_counts)):
            if len(counts) != len(contents) or sum(counts) != len(extents) or any(n < 0 for n in counts):
                raise FsError(errno.EINVAL, "a batch's extents do not match its content operations")
        extents_of: dict[Stamp, _ContentBlocks] = {}
        at = shared_at = 0
        for content, count, shared_count in zip(contents, cmd.extent_counts, shared_counts):
            blocks = _ContentBlocks(cmd.extents[at:at + count], shared[shared_at:shared_at + shared_count])
            at, shared_at = at + count, shared_at + shared_count
            self._check_content(txn, content, blocks)
            extents_of[content.stamp] = blocks
        for op in batch:
            if op.stamp.site != peer:
                raise FsError(errno.EINVAL, f"an operation stamped by site {op.stamp.site.hex()[:8]}, not the peer")
            if seen is not None and op.stamp <= seen:
                raise FsError(errno.EINVAL, f"operation {op.stamp} is at or before what was applied ({seen})")
            seen = op.stamp
        conflicts = 0
        for op in batch:
            try:
                conflicts += self._apply_one(txn, op, extents_of, cmd.now_ns)
            except FsError as exc:
                raise FsError(exc.errno, f"{exc} (applying {op})") from exc
        return Applied(conflicts, tuple(self._entries), tuple(self._inodes))

    def _apply_one(self, txn: lmdb.Transaction[bytes], op: o.Operation, extents_of: dict[Stamp, _ContentBlocks],
                   now_ns: int) -> int:
        conflicts = 0
        self._observe(txn, op.stamp)
        if isinstance(op, o.Created):
            self._apply_created(txn, op)
        elif isinstance(op, o.Moved):
            conflicts += self._apply_moved(txn, op)
        elif isinstance(op, o.AttrsSet):
            conflicts += self._apply_attrs(txn, op)
        elif isinstance(op, o.XattrSet):
            conflicts += self._apply_xattr(txn, op)
        elif isinstance(op, o.ContentSet):
            conflicts += self._apply_content(txn, op, extents_of[op.stamp], now_ns)
        elif isinstance(op, o.Superseded):
            self._lost_on_the_peer(txn, op.object, Version(op.stamp, None, op.seen))
        elif isinstance(op, o.Resolved):
            self._close_resolved(txn, op.conflict, op.keep, op.stamp)
        elif isinstance(op, o.VolumeSet):
            self._apply_volume(txn, op)
        if isinstance(op, (o.AttrsSet, o.XattrSet, o.ContentSet)):
            ino = self._ino(txn, op.object)
            if ino is not None:
                self._inodes.append(ino)
        txn.put(b"seen", op.stamp.pack(), db=self.meta)
        return conflicts

    def _check_content(self, txn: lmdb.Transaction[bytes], op: o.ContentSet, blocks: _ContentBlocks) -> None:
        """Before anything is written: the bytes lie in fresh space (or are shared: checked where
        the version applies), in file order, within the size."""
        extents = blocks.mapped()
        for prev, nxt in itertools.pairwise(extents):
            if prev.end_block > nxt.file_block:
                raise FsError(errno.EINVAL, "content extents must be in file order and disjoint")
        if extents and extents[-1].end_block > blocks_for(op.size):
            raise FsError(errno.EINVAL, "content extents beyond the content's size")
        if any(ext.unwritten for ext in extents):
            raise FsError(errno.EINVAL, "content extents carry checksums")
        if op.size > MAX_FILE_SIZE_BYTES:
            raise FsError(errno.EFBIG)
        self._sm.space_check_new(txn, [(ext.dev_block, ext.count) for ext in blocks.fresh])

    def _check_shared(self, txn: lmdb.Transaction[bytes], ino: int, shared: tuple[Extent, ...]) -> None:
        """Each shared extent must be what the file's map holds at its place now, block for block
        and checksum for checksum (the receiving service read them from the map; a write here
        since moved them: EAGAIN, and the sender ships the whole version)."""
        fmap = self._sm.db["fmap"]
        for want in shared:
            found = [ext.slice(max(ext.file_block, want.file_block), min(ext.end_block, want.end_block))
                     for ext in filemap.extents_in(txn, fmap, ino, want.file_block, want.end_block)]
            block = want.file_block
            for ext in found:
                if ext.file_block != block or ext.unwritten \
                        or ext.dev_block != want.dev_block + (block - want.file_block) \
                        or ext.checksums != want.checksums[4 * (block - want.file_block):4 * (ext.end_block - want.file_block)]:
                    break
                block = ext.end_block
            if block != want.end_block:
                raise FsError(errno.EAGAIN, f"blocks {want.file_block}-{want.end_block} of inode {ino} "
                                            "changed here since they were offered for sharing")

    def _apply_created(self, txn: lmdb.Transaction[bytes], op: o.Created) -> None:
        if txn.get(op.object, db=self.db["sids"]) is not None:
            return
        ino = self._sm.next_ino(txn)
        wall = op.stamp.wall_ns
        fmt = stat.S_IFMT(op.mode)
        if fmt not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
                       stat.S_IFBLK):
            raise FsError(errno.EINVAL, f"an object of unknown type {fmt:o}")
        inode = Inode(ino, op.mode, op.uid, op.gid, 0, len(op.target), op.mtime_ns, op.mtime_ns, wall, rdev=op.rdev)
        if inode.is_dir:
            inode.nlink = 2
        self.ns.put_inode(txn, inode)
        if stat.S_ISLNK(op.mode):
            txn.put(u64(ino), op.target, db=self.db["symlinks"])
        self._set_ids(txn, ino, op.object)

    def _apply_moved(self, txn: lmdb.Transaction[bytes], op: o.Moved) -> int:
        if txn.get(op.object, db=self.db["sids"]) is None:
            raise FsError(errno.EINVAL, f"a move of entry {op.node.hex()} names an unknown object")
        if op.parent not in (ROOT, TRASH) and self.placement(txn, op.parent) is None \
                and txn.get(op.parent, db=self.db["sids"]) is None:
            raise FsError(errno.EINVAL, f"a move into unknown directory {op.parent.hex()}")
        volume_root = self._volume_root(txn, op.object)
        if (op.parent == VOLUMES) != (volume_root is not None and op.parent != TRASH):
            raise FsError(errno.EINVAL, f"entry {op.node.hex()}: only a volume's root goes into the volumes' "
                                        "container, and it goes nowhere else but the trash")
        if txn.get(op.node, db=self.db["sentries"]) is None:
            self._put_entry(txn, op.node, op.object, 0, b"")
        dirty = _Dirty()
        tree = ReplicatedTree(_TableTree(self, txn, dirty), _TableTree(self, txn, dirty))
        # Two deletes of one entry wanted the same: no conflict to list.
        found = [conflict for conflict in tree.apply(Move(op.stamp, op.node, op.parent, op.name, op.seen))
                 if not conflict.winner.parent == conflict.loser.parent == TRASH]
        for conflict in found:
            self._conflict(txn, "move", conflict.loser.stamp, conflict.winner.stamp, op.object,
                           {"node": op.node.hex(), "winner_parent": conflict.winner.parent.hex(),
                            "winner_name": conflict.winner.name.hex(), "loser_parent": conflict.loser.parent.hex(),
                            "loser_name": conflict.loser.name.hex()})
        self._reshow(txn, dirty, op.stamp.wall_ns)
        if volume_root is not None and op.parent == TRASH:
            self._sm.volumes.drop_record(txn, volume_root.volume)
        return len(found) + self._edit_against_delete(txn, op.object)

    def _apply_attrs(self, txn: lmdb.Transaction[bytes], op: o.AttrsSet) -> int:
        value = [op.mode, op.uid, op.gid, op.atime_ns, op.mtime_ns]
        shown, lost = self._remote_version(txn, op.object, ATTRS, Version(op.stamp, value, op.seen))
        if shown is not _UNCHANGED:
            ino = self._ino(txn, op.object)
            if ino is not None:
                inode = self.ns.require_inode(txn, ino)
                mode, uid, gid, atime_ns, mtime_ns = shown
                inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
                inode.uid, inode.gid, inode.atime_ns = uid, gid, atime_ns
                content = self._versions(txn, op.object + CONTENT)
                if not content or content[0].stamp < self._versions(txn, op.object + ATTRS)[0].stamp:
                    inode.mtime_ns = mtime_ns  # the newer of the two registers sets mtime
                inode.ctime_ns = max(inode.ctime_ns, op.stamp.wall_ns)
                self.ns.put_inode(txn, inode)
        return lost

    def _apply_xattr(self, txn: lmdb.Transaction[bytes], op: o.XattrSet) -> int:
        value = None if op.value is None else op.value.hex()
        shown, lost = self._remote_version(txn, op.object, XATTR + op.name, Version(op.stamp, value, op.seen))
        ino = self._ino(txn, op.object)
        if shown is not _UNCHANGED and ino is not None:
            self._sm.put_xattr_raw(txn, ino, op.name, None if shown is None else bytes.fromhex(shown))
        return lost

    def _apply_content(self, txn: lmdb.Transaction[bytes], op: o.ContentSet,
                       blocks: _ContentBlocks, now_ns: int) -> int:
        """The peer's content version: its bytes, already on our device, become the file's when it
        wins; a concurrent version that loses, ours or theirs, is kept as a sibling file named
        after its own stamp (the same name, the same bytes, on both sites); a version the file had
        already moved past is dropped (its blocks freed after the grace period). Blocks shared
        with the file's current version gain a reference, so whatever then lets go of them (the
        old version's unmapping, a drop) leaves them to the other."""
        ino = self._ino(txn, op.object)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        if blocks.shared:
            if inode is None or not inode.is_reg:
                raise FsError(errno.EAGAIN, f"blocks offered for sharing, and object {op.object.hex()} "
                                            "is no regular file here")
            self._check_shared(txn, inode.ino, blocks.shared)
        for ext in blocks.fresh:
            self._sm.space.take(txn, ext.dev_block, ext.count)
        for ext in blocks.shared:
            self._sm.space.share(txn, ext.dev_block, ext.count)
        extents = blocks.mapped()
        if inode is None or not inode.is_reg:
            self._sm.defer_free(txn, [(e.dev_block, e.count) for e in extents], now_ns)
            if inode is not None:
                raise FsError(errno.EINVAL, "file content for an object that is not a regular file")
            # Released here once its deletes were forgotten, alive on the peer a while longer
            # (written through a descriptor there): this newer content saw the deletes, and
            # settles what it saw as it did there, copies kept of it included.
            self._close_edit_delete(txn, op.object)
            self._settle_released(txn, op.object, Version(op.stamp, None, op.seen))
            return 0
        value = [op.size, op.mtime_ns, op.mode, op.uid, op.gid]
        self._lost_on_the_peer(txn, op.object, Version(op.stamp, value, op.seen))
        previous = self._versions(txn, op.object + CONTENT)
        shown, lost = self._remote_version(txn, op.object, CONTENT, Version(op.stamp, value, op.seen))
        lost_stamps = {v.stamp for v in self._versions(txn, op.object + CONTENT)[1:]} - {v.stamp for v in previous[1:]}
        fmap = self._sm.db["fmap"]
        if shown is not _UNCHANGED:
            old = list(filemap.all_extents(txn, fmap, inode.ino))
            before = previous[0] if previous else None
            if before is not None and before.stamp in lost_stamps:
                self._keep_sibling(txn, inode, old, before.value, before.stamp)
            else:
                self._sm.defer_free(txn, filemap.unmap_range(txn, fmap, inode.ino, 0, 1 << 62), now_ns)
            for ext in extents:
                filemap.map_extent(txn, fmap, inode.ino, ext)
            blocks_before, inode.blocks = inode.blocks, sum(ext.count for ext in extents)
            self._sm.volumes.charge(txn, inode.volume, blocks=inode.blocks - blocks_before, inodes=0, enforce=False)
            inode.size = op.size
            attrs = self._versions(txn, op.object + ATTRS)
            if not attrs or attrs[0].stamp < op.stamp:  # the newer of the two registers sets mtime
                inode.mtime_ns = op.mtime_ns
            inode.ctime_ns = max(inode.ctime_ns, op.stamp.wall_ns)
            self.ns.put_inode(txn, inode)
        elif op.stamp in lost_stamps:
            self._keep_sibling(txn, inode, list(extents), value, op.stamp, fresh=True)
        else:
            self._sm.defer_free(txn, [(e.dev_block, e.count) for e in extents], now_ns)
        return lost + self._edit_against_delete(txn, op.object)

    def _lost_on_the_peer(self, txn: lmdb.Transaction[bytes], obj: bytes, version: Version[Any]) -> None:
        """The peer's next content version of `obj` (shipped, or `Superseded`). The peer shows
        only its newest version's bytes, so the one before may never have reached this site;
        yet the content shown here may have lost to it there. That happened when that version
        and ours were concurrent, that one was newer, and this one saw ours (ours reached the
        peer between the two): the peer then kept ours in /.conflicts, and this version settled
        it. Record and keep the same here, or the two sites would keep different copies."""
        key = obj + PEER_LAST
        raw = txn.get(key, db=self.db["sregs"])
        self._put_versions(txn, key, (version,))
        if raw is None:
            return
        (before,) = self._decode_versions(bytes(raw))
        versions = self._versions(txn, obj + CONTENT)
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        if inode is None or not versions or not happened_before(versions[0].stamp, version.stamp, version.seen):
            return  # (a version that did not see ours beats it, or not, here as there)
        kept = self._keep_ours_the_peer_kept(txn, obj, inode, before)
        if kept is not None:
            self._settle(txn, kept, CONTENT, by=version.stamp)

    def _keep_ours_the_peer_kept(self, txn: lmdb.Transaction[bytes], obj: bytes, inode: Inode,
                                 before: Version[Any]) -> Stamp | None:
        """If the content shown here is this site's and lost on the peer to `before` (newer and
        concurrent), record that conflict and keep ours in /.conflicts as the peer did; the
        stamp of what was kept, or None."""
        versions = self._versions(txn, obj + CONTENT)
        if not versions or not inode.is_reg:
            return None
        ours = versions[0]
        if ours.stamp.site != self.site(txn) or ours.stamp > before.stamp \
                or happened_before(ours.stamp, before.stamp, before.seen) \
                or happened_before(before.stamp, ours.stamp, ours.seen) \
                or txn.get(ours.stamp.pack() + CONTENT, db=self.db["sconflicts"]) is not None:
            return None
        self._conflict(txn, "content", ours.stamp, before.stamp, obj, {})
        extents = list(filemap.all_extents(txn, self._sm.db["fmap"], inode.ino))
        self._keep_sibling(txn, inode, extents, ours.value, ours.stamp, share=True)
        return ours.stamp

    def _keep_what_the_peer_keeps(self, txn: lmdb.Transaction[bytes], obj: bytes, inode: Inode) -> None:
        """Before an object is released: if the peer's last version of it came `Superseded`,
        newer than ours and not having seen it, the peer keeps ours in /.conflicts (ours reached
        it after that version, whatever came next there). Its next version, which would have
        told this site so (`_lost_on_the_peer`), may arrive only after the release, with no
        content left here to keep: keep ours now (the random test with volumes, seed 279, found
        /.conflicts holding it on one site only)."""
        raw = txn.get(obj + PEER_LAST, db=self.db["sregs"])
        if raw is None:
            return
        (before,) = self._decode_versions(bytes(raw))
        if before.value is None:  # `Superseded`: its successor has not come yet
            self._keep_ours_the_peer_kept(txn, obj, inode, before)

    def _lost_paths(self, txn: lmdb.Transaction[bytes], ino: int) -> tuple[list[list[Move]], bool] | None:
        """How an inode none of whose names is reachable from the root lost each of them: per
        entry, the moves on its path up to the move into TRASH (its own placement, its
        directories', and that move; `_path_to_trash`), those the log still holds, and whether
        it has forgotten some (they are left out: every operation since saw them). None while a
        name is reachable (or it never had one). A deleted entry whose move the log forgot but
        the object kept (`deleted:` rows) counts as a path of that move alone."""
        if self._first_reachable(txn, ino) is not None:
            return None
        obj = self.object_of(txn, ino) or b"\xff" * 17
        tree = _TableTree(self, txn, _Dirty())
        kept = self._kept_deletes(txn, obj)
        paths: list[list[Move]] = []
        forgotten = False
        for key, _ in _scan(txn, self.db["sobjents"], obj):
            path = []
            for stamp in self._path_to_trash(txn, bytes(key[16:])):
                entry = None if stamp is None else tree.entry_at(stamp)
                moves = [entry.move] if entry is not None else None if stamp is None else kept.pop(stamp, None)
                if moves is None:
                    forgotten = True
                else:
                    path += moves
            if path:
                paths.append(path)
        paths += kept.values()
        return paths, forgotten

    def _kept_deletes(self, txn: lmdb.Transaction[bytes], obj: bytes) -> dict[Stamp, list[Move]]:
        """The `DELETED` rows of an object: per row, its first move's stamp and its moves."""
        kept: dict[Stamp, list[Move]] = {}
        start = len(DELETED) + len(obj)
        for key, raw in _scan(txn, self.meta, DELETED + obj):
            moves, at, raw = [], 0, bytes(raw)
            while at < len(raw):
                move, at = _unpack_move(raw, at)
                moves.append(move)
            kept[Stamp.unpack(bytes(key[start:start + PACKED_BYTES]))] = moves
        return kept

    @staticmethod
    def _taken_unknowingly(content: Version[Any], path: list[Move]) -> bool:
        """Did the moves of `path` take the file's name away without anyone meaning to discard
        `content`? Not when the content's writer had seen them all (it wrote a file already
        gone, through a descriptor), nor when one of them had seen the content and all the
        others (its author saw the file, with that content, where the path went away);
        otherwise the edit was not overridden knowingly, whatever the stamps say."""
        if all(happened_before(move.stamp, content.stamp, content.seen) for move in path):
            return False
        return not any(happened_before(content.stamp, last.stamp, last.seen)
                       and all(move is last or happened_before(move.stamp, last.stamp, last.seen) for move in path)
                       for last in path)

    def _path_to_trash(self, txn: lmdb.Transaction[bytes], node: bytes) -> list[Stamp | None]:
        """When `node` or one of its ancestors is under TRASH: the stamps of the placements on the
        way up, its own first, to the move into TRASH last (None for a placement forgotten: an
        ancestor released by `forget` has none left). Every one of them took part in taking the
        path away: a directory moved into one the other site removed loses its files as surely
        as the removal does. [] when not under TRASH."""
        stamps: list[Stamp | None] = []
        for _ in range(MAX_DEPTH):
            if node in (ROOT, VOLUMES):
                return []
            placed = self.placement(txn, node)
            if placed is None:
                return [*stamps, None]
            stamps.append(placed.stamp)
            if placed.parent == TRASH:
                return stamps
            node = placed.parent
        return []

    def _reachable(self, txn: lmdb.Transaction[bytes], directory: int) -> bool:
        """Is directory inode `directory` reachable from the root: is it, and each directory above
        it, shown? (A directory outside the replicated tree, /.conflicts, hangs from the root.)"""
        for _ in range(MAX_DEPTH):
            if directory in (ROOT_INO, VOLUMES_INO):
                return True
            obj = self.object_of(txn, directory)
            if obj is None:
                inode = self.ns.get_inode(txn, directory)
                return inode is not None and inode.parent == ROOT_INO and inode.nlink > 0
            shown = self._shown(txn, obj)
            if shown is None:
                return False
            directory = shown[0]
        return False

    def _first_reachable(self, txn: lmdb.Transaction[bytes], ino: int) -> tuple[int, bytes] | None:
        obj = self.object_of(txn, ino)
        for key, _ in _scan(txn, self.db["sobjents"], obj or b"\xff" * 17):
            shown = self._shown(txn, bytes(key[16:]))
            if shown is not None and self._reachable(txn, shown[0]):
                return shown
        return None

    def _files_below(self, txn: lmdb.Transaction[bytes], directory: int, limit: int = 100_000) -> list[bytes]:
        """The objects of the regular files under a directory (a deleted directory's, whose edits
        may have to be kept; a directory shown again, whose kept copies go)."""
        found: list[bytes] = []
        pending = [directory]
        while pending and len(found) < limit:
            for _name, child in list(self.ns.names(txn, pending.pop())):
                inode = self.ns.get_inode(txn, child)
                if inode is None:
                    continue
                if inode.is_dir:
                    pending.append(child)
                elif inode.is_reg:
                    obj = self.object_of(txn, child)
                    if obj is not None:
                        found.append(obj)
        return found

    def _edit_against_delete(self, txn: lmdb.Transaction[bytes], obj: bytes) -> int:
        """Edit against delete: the edit wins whatever the stamps. When a file's every name is
        deleted and the moves that took one of those names away did so without meaning to
        discard the file's content (its register's winner; `_taken_unknowingly`), that content is
        kept in /.conflicts, as a copy sharing its blocks, and listed; the delete stands. Any one is enough: a user who removed one name of
        a file without knowing of an edit did not mean to discard it, even when the edit's own
        site removed the last name afterwards. A function of the tree and the register, not of
        the order things arrived in, so both sites keep the same copies: when the file has a
        name again, or a newer content every delete saw wins the register, the copy goes. A
        delete the log has forgotten is not judged again (every operation since saw it): a copy
        kept against it stays while its content does, and the deletes still in the log are
        judged without it. Returns how many conflicts this opened."""
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        if inode is None or not inode.is_reg:
            return 0
        found = self._lost_paths(txn, inode.ino)
        paths, forgotten = ([], False) if found is None else found
        versions = self._versions(txn, obj + CONTENT)
        wanted = None
        # The moves the writer had not seen that took a path away: the newest stands for them.
        unaware = sorted(move.stamp for path in paths if versions and self._taken_unknowingly(versions[0], path)
                         for move in path if not happened_before(move.stamp, versions[0].stamp, versions[0].seen))
        if unaware:
            wanted = versions[0]
        index = EDIT_DELETE + obj  # the open record of this object, if any (no scan per command)
        raw_key = txn.get(index, db=self.meta)
        if raw_key is not None:
            if versions and bytes(raw_key) == versions[0].stamp.pack() + b"e":
                if wanted is not None:
                    return 0  # kept already
                if forgotten and not self._delete_known(txn, obj, bytes(raw_key)):
                    return 0  # kept against a delete forgotten since, which cannot be judged again: it stands
            self._close_edit_delete(txn, obj)
        if wanted is None:
            return 0
        self._conflict(txn, "edit-delete", wanted.stamp, unaware[-1], obj, {})
        txn.put(index, wanted.stamp.pack() + b"e", db=self.meta)
        extents = list(filemap.all_extents(txn, self._sm.db["fmap"], inode.ino))
        self._keep_sibling(txn, inode, extents, wanted.value, wanted.stamp, share=True, kind=b"e")
        return 1

    def _delete_known(self, txn: lmdb.Transaction[bytes], obj: bytes, key: bytes) -> bool:
        """Is the delete an edit-against-delete record (`key`) was kept against still known here
        (in the log, or kept with the object)? Known and not counted any more, it was undone or
        overridden: the verdict changed. Forgotten, it cannot be judged again."""
        raw = txn.get(key, db=self.db["sconflicts"])
        assert raw is not None, key.hex()
        winner = Stamp.unpack(bytes.fromhex(json.loads(raw)["winner"]))
        return _TableTree(self, txn, _Dirty()).entry_at(winner) is not None \
            or any(move.stamp == winner for moves in self._kept_deletes(txn, obj).values() for move in moves)

    def _close_edit_delete(self, txn: lmdb.Transaction[bytes], obj: bytes) -> None:
        """The open edit-against-delete record of `obj`, if any, closes: the file has a name
        again, or a newer content replaced the one kept (its copy goes)."""
        index = EDIT_DELETE + obj
        raw_key = txn.get(index, db=self.meta)
        if raw_key is None:
            return
        key = bytes(raw_key)
        raw = txn.get(key, db=self.db["sconflicts"])
        assert raw is not None, key.hex()
        record = json.loads(raw)
        record["open"] = False
        record["resolved"] = "the file has a name again, or its content changed"
        if record.get("kept_ino") is not None:
            self._release_kept(txn, key, record)
        txn.put(key, json.dumps(record, sort_keys=True).encode(), db=self.db["sconflicts"])
        txn.delete(index, db=self.meta)

    def _keep_sibling(self, txn: lmdb.Transaction[bytes], inode: Inode, extents: list[Extent],
                      version: list[int], stamp: Stamp, *, fresh: bool = False, share: bool = False,
                      kind: bytes = b"c") -> None:
        """Keep a losing content version as a file in /.conflicts, named after the file's object
        and the version's stamp: the same name and bytes on both sites, whatever each showed of
        the file when the conflict came. `fresh`: the extents are the peer's, mapped nowhere
        yet; `share`: they stay `inode`'s too (copy-on-write); else they move over from `inode`.
        `kind`: the conflict record (content, or edit-delete) that says where it is kept."""
        folder = self._conflicts_dir(txn, stamp.wall_ns)
        obj = self.object_of(txn, inode.ino)
        assert obj is not None
        sibling_name = conflict_name(obj.hex().encode(), stamp)
        fmap = self._sm.db["fmap"]
        existing = self.ns.lookup(txn, folder, sibling_name)
        if existing is not None:  # kept already (one version can lose twice: to an edit, to a delete)
            if fresh:
                self._sm.defer_free(txn, [(e.dev_block, e.count) for e in extents], stamp.wall_ns)
            elif not share:  # the file's reference to the bytes goes; the copy holds its own
                self._sm.defer_free(txn, filemap.unmap_range(txn, fmap, inode.ino, 0, 1 << 62), stamp.wall_ns)
            self._record_kept(txn, stamp.pack() + kind, sibling_name, existing)
            return
        size, mtime_ns, mode, uid, gid = version
        sibling = Inode(self._sm.next_ino(txn), stat.S_IFREG | mode, uid, gid, 1, size, mtime_ns, mtime_ns,
                        stamp.wall_ns, blocks=sum(e.count for e in extents))  # outside any volume
        for ext in extents:
            if share:
                if not ext.unwritten:
                    self._sm.space.share(txn, ext.dev_block, ext.count)
            elif not fresh:
                txn.delete(fmap_key(inode.ino, ext.file_block), db=fmap)
            if not (share and ext.unwritten):
                filemap.map_extent(txn, fmap, sibling.ino, ext)
        self.ns.put_inode(txn, sibling)
        self.ns.add_entry(txn, folder, sibling_name, sibling.ino, self._sm.new_cookie(txn, 0))
        self._entries.append((folder, sibling_name))
        self._inodes.append(folder)
        parent = self.ns.require_inode(txn, folder)
        parent.mtime_ns = parent.ctime_ns = max(parent.mtime_ns, stamp.wall_ns)
        self.ns.put_inode(txn, parent)
        self._record_kept(txn, stamp.pack() + kind, sibling_name, sibling.ino)

    def _record_kept(self, txn: lmdb.Transaction[bytes], key: bytes, name: bytes, ino: int) -> None:
        raw = txn.get(key, db=self.db["sconflicts"])
        if raw is not None:
            record = json.loads(raw)
            record["kept_as"] = (CONFLICTS_NAME + b"/" + name).hex()
            record["kept_ino"] = ino
            txn.put(key, json.dumps(record, sort_keys=True).encode(), db=self.db["sconflicts"])

    def _conflicts_dir(self, txn: lmdb.Transaction[bytes], now_ns: int) -> int:
        """/.conflicts, made the first time a losing content needs a place (outside the replicated
        tree: each site keeps its own, and both keep the same files in it)."""
        if self.ns.get_inode(txn, CONFLICTS_INO) is None:
            folder = Inode(CONFLICTS_INO, stat.S_IFDIR | 0o755, 0, 0, 2, 0, now_ns, now_ns, now_ns, parent=ROOT_INO)
            self.ns.put_inode(txn, folder)
            root = self.ns.require_inode(txn, ROOT_INO)
            name = CONFLICTS_NAME if self.ns.lookup(txn, ROOT_INO, CONFLICTS_NAME) is None else CONFLICTS_NAME + b".awsomefs"
            self.ns.add_entry(txn, ROOT_INO, name, CONFLICTS_INO, self._sm.new_cookie(txn, 0))
            root.nlink += 1
            self.ns.put_inode(txn, root)
            self._entries.append((ROOT_INO, name))
            self._inodes.append(ROOT_INO)
        return CONFLICTS_INO

    # -- registers ------------------------------------------------------------------------------
    def _versions(self, txn: lmdb.Transaction[bytes], key: bytes) -> list[Version[Any]]:
        raw = txn.get(key, db=self.db["sregs"])
        return [] if raw is None else self._decode_versions(bytes(raw))

    @staticmethod
    def _decode_versions(raw: bytes) -> list[Version[Any]]:
        return [Version(Stamp.unpack(bytes.fromhex(v["stamp"])), v["value"],
                        {bytes.fromhex(s): Stamp.unpack(bytes.fromhex(t)) for s, t in v["seen"].items()})
                for v in json.loads(raw)]

    def _put_versions(self, txn: lmdb.Transaction[bytes], key: bytes, versions: tuple[Version[Any], ...]) -> None:
        txn.put(key, json.dumps([{"stamp": v.stamp.pack().hex(), "value": v.value,
                                  "seen": {s.hex(): t.pack().hex() for s, t in sorted(v.seen.items())}}
                                 for v in versions]).encode(), db=self.db["sregs"])

    def _local_version(self, txn: lmdb.Transaction[bytes], obj: bytes, kind: bytes, stamp: Stamp, value: Any) -> None:
        """A local write saw every version applied here: it replaces them all, and settles their conflicts."""
        key = obj + kind
        register = MultiValueRegister(tuple(self._versions(txn, key)))
        outcome = register.apply(Version(stamp, value, self._seen(txn)))
        for settled in outcome.settled:
            self._settle(txn, settled.stamp, kind[:1], by=stamp)
        if kind == CONTENT:
            self._supersede_copies(txn, obj, stamp)
        self._put_versions(txn, key, register.versions)

    def _remote_version(self, txn: lmdb.Transaction[bytes], obj: bytes, kind: bytes,
                        version: Version[Any]) -> tuple[Any, int]:
        """Take in a peer's version; returns (the value now shown, or _UNCHANGED; conflicts made)."""
        key = obj + kind
        register = MultiValueRegister(tuple(self._versions(txn, key)))
        outcome = register.apply(version)
        self._put_versions(txn, key, register.versions)
        winner = register.winner
        assert winner is not None
        for settled in outcome.settled:
            self._settle(txn, settled.stamp, kind[:1], by=version.stamp)
        if kind == CONTENT:
            self._supersede_copies(txn, obj, version.stamp)
        for loser in outcome.lost:
            self._conflict(txn, {ATTRS: "attributes", XATTR: "xattr", CONTENT: "content"}[kind[:1]], loser.stamp,
                           winner.stamp, obj, {"xattr": kind[1:].hex()} if kind[:1] == XATTR else {})
        return (winner.value if outcome.shown else _UNCHANGED), len(outcome.lost)

    def _settle_released(self, txn: lmdb.Transaction[bytes], obj: bytes, version: Version[Any]) -> None:
        """A peer's version of a released object's register: the versions it saw are settled (their
        conflicts close, a copy its own site overwrote goes); it shows nowhere, and one it did not
        see loses to nothing (the file is gone on both sites)."""
        key = obj + CONTENT
        versions = self._versions(txn, key)
        seen = [v for v in versions if happened_before(v.stamp, version.stamp, version.seen)]
        for settled in seen:
            self._settle(txn, settled.stamp, CONTENT, by=version.stamp)
        self._supersede_copies(txn, obj, version.stamp)
        if seen:
            self._put_versions(txn, key, tuple(v for v in versions if v not in seen))

    # -- conflicts ------------------------------------------------------------------------------
    def _conflict(self, txn: lmdb.Transaction[bytes], kind: str, loser: Stamp, winner: Stamp, obj: bytes,
                  details: dict[str, str]) -> None:
        record = {"kind": kind, "object": obj.hex(), "winner": winner.pack().hex(), "loser": loser.pack().hex(),
                  "open": True, **details}
        txn.put(loser.pack() + kind[:1].encode(), json.dumps(record, sort_keys=True).encode(), db=self.db["sconflicts"])

    def _settle(self, txn: lmdb.Transaction[bytes], loser: Stamp, kind: bytes, *, by: Stamp) -> None:
        """A conflict's loser was replaced by a version that saw it. When a version from the
        loser's own site replaces it, its writer overwrote it knowingly, as it would have with no
        other site: the copy kept of it goes (else both sites could keep different copies, as each
        saw the loser lose, or not, by the order things arrived in). Settled by the other site's
        version first, the copy waits for that (`_supersede_copies`), which a site may get before
        or after the other site's version: either way the copy goes on both."""
        key = loser.pack() + kind
        raw = txn.get(key, db=self.db["sconflicts"])
        if raw is None:
            return
        record = json.loads(raw)
        record["open"] = False
        if kind == CONTENT and record.get("kept_ino") is not None:
            if by.site == loser.site:
                self._release_kept(txn, key, record)
                record["superseded_by"] = by.pack().hex()
            else:
                txn.put(KEPT_COPY + bytes.fromhex(record["object"]) + loser.pack(), b"", db=self.meta)
        txn.put(key, json.dumps(record, sort_keys=True).encode(), db=self.db["sconflicts"])

    def _supersede_copies(self, txn: lmdb.Transaction[bytes], obj: bytes, by: Stamp) -> None:
        """A content version `by` of `obj`: the copies still kept of settled losers from its own
        site, older than it, go (see `_settle`)."""
        prefix = KEPT_COPY + obj
        for index, _ in list(_scan(txn, self.meta, prefix)):
            loser = Stamp.unpack(bytes(index[len(prefix):]))
            if loser.site != by.site or loser > by:
                continue
            txn.delete(index, db=self.meta)
            key = loser.pack() + CONTENT
            raw = txn.get(key, db=self.db["sconflicts"])
            record = {} if raw is None else json.loads(raw)
            if record.get("kept_ino") is not None:
                self._release_kept(txn, key, record)
                record["superseded_by"] = by.pack().hex()
                txn.put(key, json.dumps(record, sort_keys=True).encode(), db=self.db["sconflicts"])

    def _release_kept(self, txn: lmdb.Transaction[bytes], key: bytes, record: dict[str, Any]) -> None:
        """Record `key` keeps its copy in /.conflicts no more. One copy serves both records of a
        version (a content that lost, and an edit against a delete): it goes when neither keeps it."""
        ino, path = int(record.pop("kept_ino")), bytes.fromhex(record.pop("kept_as"))
        other = key[:-1] + (CONTENT if key.endswith(b"e") else b"e")
        raw = txn.get(other, db=self.db["sconflicts"])
        if raw is not None and json.loads(raw).get("kept_ino") == ino:
            return
        self._drop_kept(txn, ino, path)

    def _drop_kept(self, txn: lmdb.Transaction[bytes], ino: int, path: bytes) -> None:
        name = path.rpartition(b"/")[2]
        if self.ns.lookup(txn, CONFLICTS_INO, name) != ino:
            return  # renamed or removed by a user meanwhile: theirs now
        self.ns.remove_entry(txn, CONFLICTS_INO, name)
        self._entries.append((CONFLICTS_INO, name))
        self._inodes.append(CONFLICTS_INO)
        inode = self.ns.require_inode(txn, ino)
        inode.nlink = 0
        self._sm.orphan(txn, inode)

    def conflicts(self, txn: lmdb.Transaction[bytes]) -> list[dict[str, Any]]:
        """Every conflict recorded, oldest loser first, with its `id` (the same on both sites),
        where its object is shown now (`path`) and what each version is now: a content's size
        and hash, an attribute's value, where a losing move would put the object."""
        records = []
        for key, record in self._records(txn):
            record["key"] = key.hex()
            record["id"] = conflict_id(key)
            obj = bytes.fromhex(record["object"])
            record["path"] = self.path_of(txn, obj)
            self._describe_versions(txn, record, obj)
            records.append(record)
        return records

    def conflict_counts(self, txn: lmdb.Transaction[bytes]) -> tuple[int, int]:
        """(open conflicts, all conflicts): for status and metrics, without describing each."""
        records = self._records(txn)
        return sum(1 for _, record in records if record["open"]), len(records)

    def _records(self, txn: lmdb.Transaction[bytes]) -> list[tuple[bytes, dict[str, Any]]]:
        """The stored conflict records and those of the skipped moves the log holds, by key."""
        stored = [(bytes(key), json.loads(raw)) for key, raw in _scan(txn, self.db["sconflicts"], b"")]
        keys = {key for key, _ in stored}
        tree = _TableTree(self, txn, _Dirty())
        for key, _ in _scan(txn, self.meta, SKIPPED):
            entry = tree.entry_at(Stamp.unpack(bytes(key[len(SKIPPED):])))
            assert entry is not None and not entry.done, key.hex()
            record_key, record = self._skipped_record(txn, entry)
            if record_key not in keys:
                stored.append((record_key, record))
        return sorted(stored, key=lambda pair: pair[0])

    def keep_skipped(self, txn: lmdb.Transaction[bytes], entry: LogEntry) -> None:
        """A skipped move the log forgets: its conflict is recorded for good (unless resolved)."""
        key, record = self._skipped_record(txn, entry)
        if txn.get(key, db=self.db["sconflicts"]) is None:
            txn.put(key, json.dumps(record, sort_keys=True).encode(), db=self.db["sconflicts"])
        txn.delete(SKIPPED + entry.move.stamp.pack(), db=self.meta)

    def _skipped_record(self, txn: lmdb.Transaction[bytes], entry: LogEntry) -> tuple[bytes, dict[str, Any]]:
        """A move the tree skipped because it would have made a cycle (concurrent moves of two
        directories, each into the other): the loser, and the placement it met (the winner).
        Built from the log entry alone, so both sites list the same, before and after forgetting."""
        move, before = entry.move, entry.before
        winner = before.stamp if before is not None else move.stamp
        raw = txn.get(move.node, db=self.db["sentries"])
        obj = bytes(raw[:16]) if raw is not None else move.node
        record = {"kind": "skipped-move", "object": obj.hex(), "winner": winner.pack().hex(),
                  "loser": move.stamp.pack().hex(), "open": True, "node": move.node.hex(),
                  "loser_parent": move.parent.hex(), "loser_name": move.name.hex()}
        return move.stamp.pack() + b"s", record

    def _describe_versions(self, txn: lmdb.Transaction[bytes], record: dict[str, Any], obj: bytes) -> None:
        kind = record["kind"]
        if kind in ("content", "edit-delete"):
            if record.get("kept_ino") is not None:
                record["loser_size"], record["loser_hash"] = self._content_of(txn, int(record["kept_ino"]))
            ino = self._ino(txn, obj)
            if kind == "content" and ino is not None:
                record["winner_size"], record["winner_hash"] = self._content_of(txn, ino)
            if kind == "edit-delete":
                record["restore_to"] = self._deleted_from(txn, Stamp.unpack(bytes.fromhex(record["winner"])))
        elif kind in ("move", "skipped-move"):
            parent = bytes.fromhex(record["loser_parent"])
            record["loser_path"] = None if parent == TRASH else \
                self._path_in(txn, parent, bytes.fromhex(record["loser_name"]))
            record["loser_deletes"] = parent == TRASH
        elif kind in ("attributes", "xattr"):
            register = ATTRS if kind == "attributes" else XATTR + bytes.fromhex(record["xattr"])
            for version in self._versions(txn, obj + register):
                for which in ("winner", "loser"):
                    if version.stamp.pack().hex() == record[which]:
                        record[f"{which}_value"] = version.value

    def _content_of(self, txn: lmdb.Transaction[bytes], ino: int) -> tuple[int, str]:
        """A file's size and content hash: BLAKE2b-128 over its size and the CRC32C of each block,
        in file order (the checksums travel with the bytes, so both sites compute the same)."""
        inode = self.ns.get_inode(txn, ino)
        if inode is None:
            return 0, ""
        digest = hashlib.blake2b(u64(inode.size), digest_size=16)
        for ext in filemap.all_extents(txn, self._sm.db["fmap"], ino):
            digest.update(u64(ext.file_block) + u64(ext.count) + ext.checksums)
        return inode.size, digest.hexdigest()

    def _deleted_from(self, txn: lmdb.Transaction[bytes], deletion: Stamp) -> str | None:
        """The path a delete's move took its entry from, as far as this site shows the directory."""
        entry = _TableTree(self, txn, _Dirty()).entry_at(deletion)
        if entry is None or entry.before is None:
            return None
        return self._path_in(txn, entry.before.parent, entry.before.name)

    def _path_in(self, txn: lmdb.Transaction[bytes], parent: bytes, name: bytes) -> str | None:
        """The path of `name` in directory object `parent`, or None if that directory has no path."""
        where = "" if parent == ROOT else self.path_of(txn, parent)
        return None if where is None else f"{where}/{name.decode(errors='replace')}"

    def resolve(self, txn: lmdb.Transaction[bytes], cmd: c.ResolveConflict) -> Applied:
        """An operator's resolution: the record closes here and, through a `Resolved` operation,
        on the peer; the copy kept of the loser goes. Keeping a losing move moves the object
        again, as a new move of this site (the tree's rules apply to it like to any move). A
        losing content, attribute or xattr kept was written back through the mount first, so
        the record may already be settled by that write: only an operator's resolution is final.
        All or none, and refused while another member holds what it moves (`_all_or_none`)."""
        return self._all_or_none(txn, lambda nested: self._resolve(nested, cmd))

    def _resolve(self, txn: lmdb.Transaction[bytes], cmd: c.ResolveConflict) -> Applied:
        self._entries, self._inodes = [], []
        if self.peer(txn) is None:
            raise FsError(errno.ENOTCONN, "not linked to any site")
        if cmd.keep not in o.KEEPS:
            raise FsError(errno.EINVAL, f"keep one of {', '.join(o.KEEPS)}, not {cmd.keep!r}")
        record = self._record(txn, cmd.conflict)
        if record is None:
            raise FsError(errno.ENOENT, "no such conflict")
        if "kept" in record:
            raise FsError(errno.EALREADY, f"conflict resolved already (kept the {record['kept']})")
        if cmd.keep == "both" and record["kind"] not in ("content", "edit-delete"):
            raise FsError(errno.EINVAL, f"a {record['kind']} conflict has one outcome: keep the winner or the loser")
        if record["kind"] in ("move", "skipped-move") and cmd.keep == "loser":
            self._move_back(txn, record, cmd.now_ns)
        stamp = self._tick(txn, cmd.now_ns)
        self._close_resolved(txn, cmd.conflict, cmd.keep, stamp)
        self._ship(txn, o.Resolved(stamp, cmd.conflict, cmd.keep, self._seen(txn)))
        return Applied(0, tuple(self._entries), tuple(self._inodes))

    def _move_back(self, txn: lmdb.Transaction[bytes], record: dict[str, Any], now_ns: int) -> None:
        """Make a losing move again: the node goes where that move put it, with a new stamp."""
        node, parent = bytes.fromhex(record["node"]), bytes.fromhex(record["loser_parent"])
        if parent not in (ROOT, TRASH) and (self._ino(txn, parent) is None or self.path_of(txn, parent) is None):
            raise FsError(errno.ENOENT, "the directory the losing move went to is gone")
        dirty = _Dirty()
        tree = ReplicatedTree(_TableTree(self, txn, dirty), _TableTree(self, txn, dirty))
        if node == parent or tree.is_ancestor(node, parent):
            raise FsError(errno.EINVAL, "that move would still put a directory inside itself: move the other "
                          "directory out first")
        stamp = self._tick(txn, now_ns)
        seen = self._seen(txn)
        move = Move(stamp, node, parent, bytes.fromhex(record["loser_name"]), seen)
        tree.apply(move)
        obj = self._entry_object(txn, node)
        self._ship(txn, o.Moved(stamp, node, parent, move.name, obj, seen))
        self._reshow(txn, dirty, now_ns)
        if parent == TRASH:
            self._edit_against_delete(txn, obj)

    def _record(self, txn: lmdb.Transaction[bytes], key: bytes) -> dict[str, Any] | None:
        """The conflict record with `key`; a skipped move the log still holds is stored first."""
        if txn.get(key, db=self.db["sconflicts"]) is None and key.endswith(b"s") \
                and txn.get(SKIPPED + key[:-1], db=self.meta) is not None:
            entry = _TableTree(self, txn, _Dirty()).entry_at(Stamp.unpack(key[:-1]))
            assert entry is not None, key.hex()
            _key, record = self._skipped_record(txn, entry)
            txn.put(key, json.dumps(record, sort_keys=True).encode(), db=self.db["sconflicts"])
        raw = txn.get(key, db=self.db["sconflicts"])
        return None if raw is None else dict(json.loads(raw))

    def _close_resolved(self, txn: lmdb.Transaction[bytes], key: bytes, keep: str, by: Stamp) -> None:
        record = self._record(txn, key)
        if record is None:
            return  # not a conflict here: nothing to close
        record["open"] = False
        record["kept"] = keep
        record["resolved"] = f"an operator on site {by.site.hex()[:8]} kept the {keep}"
        if record.get("kept_ino") is not None:
            self._release_kept(txn, key, record)
        txn.put(key, json.dumps(record, sort_keys=True).encode(), db=self.db["sconflicts"])

    # -- showing the tree as directory entries --------------------------------------------------
    def _reshow(self, txn: lmdb.Transaction[bytes], dirty: _Dirty, now_ns: int) -> None:
        """Make the directory entries match the placements of what `dirty` names: first every entry
        that is no longer right goes, then every missing one comes (a swap of two names works)."""
        # In sorted order, never a set's: every replica must make the same entries with the same cookies.
        wanted: dict[bytes, tuple[int, bytes] | None] = {}
        for node in sorted(dirty.nodes):
            placed = self.placement(txn, node)
            if placed is None or placed.parent == TRASH:
                wanted[node] = None
            else:
                dirty.groups.add((placed.parent, placed.name))
        for parent, name in sorted(dirty.groups):
            if parent == TRASH:
                continue
            parent_ino = self._ino(txn, parent)
            for node, shown in self._group_names(txn, parent, name).items():
                wanted[node] = None if parent_ino is None else (parent_ino, self._shown_name(txn, parent, node, shown))
        changed = {node: where for node, where in wanted.items() if self._shown(txn, node) != where}
        reachable_before = {node: self._shown_reachably(txn, node) for node in changed}
        for node in changed:
            self._unshow_node(txn, node, entry_too=True, now_ns=now_ns)
        for node, where in changed.items():
            if where is not None:
                self._show_node(txn, node, *where, now_ns)
        # A directory deleted, moved into a deleted one, or back: the files below it lost, or got
        # back, their path. One moved while out of reach (deleted again, by another move) may
        # change which delete took their path: they are judged again too.
        for node in sorted(set(changed) | dirty.nodes):
            reachable = self._shown_reachably(txn, node)
            if reachable and reachable_before.get(node, True):
                continue
            ino = self._ino(txn, self._entry_object(txn, node))
            inode = None if ino is None else self.ns.get_inode(txn, ino)
            if inode is not None and inode.is_dir:
                for obj in self._files_below(txn, inode.ino):
                    self._edit_against_delete(txn, obj)

    def _shown_reachably(self, txn: lmdb.Transaction[bytes], node: bytes) -> bool:
        shown = self._shown(txn, node)
        return shown is not None and self._reachable(txn, shown[0])

    def _group_names(self, txn: lmdb.Transaction[bytes], parent: bytes, name: bytes) -> dict[bytes, bytes]:
        """The names one group of a directory's children shows (tree.visible_names, for one name):
        the newest placement keeps the name, the others get names derived from their stamps."""
        prefix = parent + name + b"\0"
        members = []
        for key, _ in _scan(txn, self.db["skids"], prefix):
            node = bytes(key[len(prefix):])
            placed = self.placement(txn, node)
            assert placed is not None
            members.append((placed.stamp, node))
        members.sort(reverse=True)
        shown: dict[bytes, bytes] = {}
        for rank, (stamp, node) in enumerate(members):
            if rank == 0:
                shown[node] = name
                continue
            extra, candidate = 1, conflict_name(name, stamp)
            while candidate in shown.values() or any(True for _ in _scan(txn, self.db["skids"], parent + candidate + b"\0")):
                extra += 1
                candidate = conflict_name(name, stamp, extra)
            shown[node] = candidate
        return shown

    def _show_node(self, txn: lmdb.Transaction[bytes], node: bytes, parent_ino: int, name: bytes,
                   now_ns: int) -> None:
        obj = self._entry_object(txn, node)
        ino = self._ino(txn, obj)
        assert ino is not None, obj.hex()
        if self.ns.lookup(txn, parent_ino, name) is not None:
            # A local entry outside the tree holds the name (made before the link, in a volume...):
            # the tree's entry waits under its conflict name instead.
            name = conflict_name(name, self.placement(txn, node).stamp)  # type: ignore[union-attr]
        parent = self.ns.require_inode(txn, parent_ino)
        child = self.ns.require_inode(txn, ino)
        self.ns.add_entry(txn, parent_ino, name, ino, self._sm.new_cookie(txn, 0))
        self._entries.append((parent_ino, name))
        self._inodes += (parent_ino, ino)
        self._join_volume(txn, child, parent)
        if child.is_dir:
            child.parent = parent_ino
            if parent.nlink:  # a directory no entry shows stays at 0: recounted when shown
                parent.nlink += 1
            if child.nlink < 2:
                child.nlink = 2 + sum(1 for _, sub in self.ns.names(txn, ino) if self.ns.require_inode(txn, sub).is_dir)
        else:
            child.nlink += 1
        self.ns.put_inode(txn, child)
        parent.mtime_ns = parent.ctime_ns = max(parent.mtime_ns, now_ns)
        self.ns.put_inode(txn, parent)
        txn.delete(ino.to_bytes(8, "big"), db=self.db["orphans"])
        self._put_entry(txn, node, obj, parent_ino, name)
        txn.put(u64(parent_ino) + name, node, db=self.db["snames"])

    def _unshow_node(self, txn: lmdb.Transaction[bytes], node: bytes, *, entry_too: bool = False,
                     now_ns: int = 0) -> None:
        """Forget where `node` is shown; `entry_too`: also remove that directory entry (a remote
        move takes it away; a local command already did)."""
        where = self._shown(txn, node)
        if where is None:
            return
        parent_ino, name = where
        txn.delete(u64(parent_ino) + name, db=self.db["snames"])
        self._put_entry(txn, node, self._entry_object(txn, node), 0, b"")
        if not entry_too or self.ns.lookup(txn, parent_ino, name) is None:
            return
        child_ino = self.ns.remove_entry(txn, parent_ino, name)
        self._entries.append((parent_ino, name))
        self._inodes += (parent_ino, child_ino)
        parent = self.ns.require_inode(txn, parent_ino)
        child = self.ns.require_inode(txn, child_ino)
        if child.is_dir:
            # A directory no entry shows has nlink 0 (recounted when it is shown again, _show_node).
            parent.nlink = max(parent.nlink - 1, 0)
            child.nlink = 0
        else:
            child.nlink -= 1
        self.ns.put_inode(txn, child)
        parent.mtime_ns = parent.ctime_ns = max(parent.mtime_ns, now_ns)
        self.ns.put_inode(txn, parent)

    def _unshow(self, txn: lmdb.Transaction[bytes], parent_ino: int, name: bytes) -> None:
        node = self._node_shown_at(txn, parent_ino, name)
        if node is not None:
            self._unshow_node(txn, node)

    # -- forgetting -----------------------------------------------------------------------------
    def forget(self, txn: lmdb.Transaction[bytes], cmd: c.ForgetSite) -> int:
        """Both sites have applied everything up to `cmd.through` and nothing concurrent with it is
        still to come (repl/link.py's horizon): drop the undo log and the acknowledged outbox up
        to there, and release the objects whose every entry was deleted by then."""
        through = self._forgettable(txn, Stamp.unpack(cmd.through))
        if through is None:
            return 0
        dirty = _Dirty()
        tree = _TableTree(self, txn, dirty)
        self._release_deleted(txn, tree, through)
        dropped = tree.forget_through(through)
        horizon = txn.get(b"horizon", db=self.meta)
        if horizon is None or Stamp.unpack(bytes(horizon)) < through:
            txn.put(b"horizon", through.pack(), db=self.meta)
        for key, _ in list(_scan(txn, self.db["soutbox"], b"")):
            if Stamp.unpack(bytes(key)) > through:
                break
            txn.delete(key, db=self.db["soutbox"])
        return dropped

    def _release_deleted(self, txn: lmdb.Transaction[bytes], tree: _TableTree, through: Stamp) -> None:
        """Drop the entries deleted up to `through` from the tree, and release the objects left
        with none. An object that keeps another entry keeps the moves that deleted the others
        (`DELETED`): an edit concurrent with one of them is kept if its last name goes too, and
        the log that held them is forgotten now."""
        for key, _ in list(_scan(txn, self.db["skids"], TRASH)):
            node = bytes(key[-16:])
            placed = self.placement(txn, node)
            if placed is None or placed.stamp > through:
                continue
            obj = self._entry_object(txn, node)
            entry = tree.entry_at(placed.stamp)  # the log forgets it now
            # A content not on both sites yet (written through a descriptor) keeps the entry for
            # a later forget; an object with no entry left is released.
            if not self._written_after(txn, obj, through) and not self._drop_node(txn, node, obj):
                self._release_object(txn, obj, [] if entry is None else [entry.move])
                continue
            if entry is not None:
                txn.put(DELETED + obj + placed.stamp.pack(), _pack_move(entry.move), db=self.meta)

    def _written_after(self, txn: lmdb.Transaction[bytes], obj: bytes, through: Stamp) -> bool:
        """Has `obj`, or a file below it (a directory is released with what is below it), a
        content version after `through`, that may not be on both sites yet?"""
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        below = self._files_below(txn, inode.ino) if inode is not None and inode.is_dir else []
        return any(v.stamp > through for each in [obj, *below] for v in self._versions(txn, each + CONTENT))

    def _release_object(self, txn: lmdb.Transaction[bytes], obj: bytes, deleted_by: list[Move]) -> None:
        """An object with no entry left in the tree: the orphan purge may have its inode once no
        directory entry shows it either. A directory goes with what is still below it (files
        the other site made there meanwhile, their edits kept in /.conflicts); `deleted_by`: the
        moves the log still holds that took the directory away."""
        for deleted, _ in list(_scan(txn, self.meta, DELETED + obj)):
            txn.delete(deleted, db=self.meta)
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        if inode is None or inode.nlink != 0:  # still shown somewhere
            return
        self._keep_what_the_peer_keeps(txn, obj, inode)
        txn.delete(obj, db=self.db["sids"])
        txn.delete(u64(inode.ino), db=self.db["sinos"])
        if inode.is_dir:
            self._release_below(txn, inode.ino, deleted_by)
        self._sm.orphan(txn, self.ns.require_inode(txn, inode.ino))

    def _release_below(self, txn: lmdb.Transaction[bytes], directory: int, deleted_by: list[Move]) -> None:
        """Empty a released directory: each entry below it leaves the namespace and the tree, and
        its object is released too unless another of its names lives on. Then it keeps the moves
        that took this name's path away (`DELETED`: the entry's own, and `deleted_by`, the
        directory's), as an entry deleted itself keeps its move into TRASH: its content may
        lose its last name later, and whether this path went unknowingly must be judged as the
        other site, which forgets at its own time, judges it (the random test with volumes,
        seed 287, found the file kept on one site only)."""
        tree = _TableTree(self, txn, _Dirty())
        for name, child in list(self.ns.names(txn, directory)):
            node = self._node_shown_at(txn, directory, name)
            if node is None:  # not the tree's (cannot happen in a replicated directory): just unlinked
                self.ns.remove_entry(txn, directory, name)
                inode = self.ns.require_inode(txn, child)
                inode.nlink = 0 if inode.is_dir else max(inode.nlink - 1, 0)
                self.ns.put_inode(txn, inode)
                if inode.nlink == 0:
                    if inode.is_dir:
                        self._release_below(txn, child, deleted_by)
                    self._sm.orphan(txn, self.ns.require_inode(txn, child))
                continue
            obj = self._entry_object(txn, node)
            placed = self.placement(txn, node)
            own = None if placed is None else tree.entry_at(placed.stamp)
            path = ([] if own is None else [own.move]) + deleted_by
            self._unshow_node(txn, node, entry_too=True)
            if not self._drop_node(txn, node, obj):
                self._release_object(txn, obj, path)
            elif path:
                txn.put(DELETED + obj + path[0].stamp.pack() + node, b"".join(_pack_move(m) for m in path),
                        db=self.meta)

    def _drop_node(self, txn: lmdb.Transaction[bytes], node: bytes, obj: bytes) -> bool:
        """Take entry `node` of `obj` out of the tree's tables for good; does `obj` keep another?"""
        placed = self.placement(txn, node)
        if placed is not None:
            txn.delete(placed.parent + placed.name + b"\0" + node, db=self.db["skids"])
        for table, key in (("splace", node), ("sentries", node), ("sobjents", obj + node)):
            txn.delete(key, db=self.db[table])
        return any(True for _ in _scan(txn, self.db["sobjents"], obj))

    def _forgettable(self, txn: lmdb.Transaction[bytes], through: Stamp) -> Stamp | None:
        """How far `forget` may go of `through`: no further than what this site's first
        operation after it had seen of the peer. The horizon (repl/link.py) promises that the
        peer's operations still to come saw everything up to `through`; this site's own, made
        but not yet applied there, may not have. Such an edit is concurrent with a delete the
        peer made before it: that delete, and the object, must stay until the edit is judged
        against it on both sites (edit against delete). None: nothing may be forgotten yet.
        (A site that writes while its peer does not is never held back: its operations saw
        every operation of the peer's there is.)"""
        for _key, raw in _scan_from(txn, self.db["soutbox"], _after(through)):
            seen = o.decode(bytes(raw)).seen.get(self.peer(txn) or b"")
            if seen == self._seen_stamp(txn):
                return through  # it saw all the peer's operations applied here; the rest are after `through`
            return None if seen is None else min(through, seen)
        return through

    def kept_inodes(self, txn: lmdb.Transaction[bytes]) -> list[int]:
        """The inodes of objects with an entry in the tree's TRASH (kept in case it comes back)."""
        inos = set()
        for key, _ in _scan(txn, self.db["skids"], TRASH):
            ino = self._ino(txn, self._entry_object(txn, bytes(key[-16:])))
            if ino is not None:
                inos.add(ino)
        return sorted(inos)

    # -- records --------------------------------------------------------------------------------
    def placement(self, txn: lmdb.Transaction[bytes], node: bytes) -> Placement | None:
        raw = txn.get(node, db=self.db["splace"])
        if raw is None:
            return None
        raw = bytes(raw)
        return Placement(raw[:16], raw[_PLACE_HEAD:], Stamp.unpack(raw[16:_PLACE_HEAD]))

    def object_of(self, txn: lmdb.Transaction[bytes], ino: int) -> bytes | None:
        raw = txn.get(u64(ino), db=self.db["sinos"])
        return None if raw is None else bytes(raw)

    def inode_of(self, txn: lmdb.Transaction[bytes], obj: bytes) -> int | None:
        """The inode holding replicated object `obj` here, if any."""
        return self._ino(txn, obj)

    def _ino(self, txn: lmdb.Transaction[bytes], obj: bytes) -> int | None:
        raw = txn.get(obj, db=self.db["sids"])
        return None if raw is None else read_u64(raw)

    def _set_ids(self, txn: lmdb.Transaction[bytes], ino: int, obj: bytes) -> None:
        txn.put(obj, u64(ino), db=self.db["sids"])
        txn.put(u64(ino), obj, db=self.db["sinos"])

    def _replicated_dir(self, txn: lmdb.Transaction[bytes], ino: int) -> bool:
        return ino not in (VOLUMES_INO, SNAPSHOTS_INO, CONFLICTS_INO) and self.object_of(txn, ino) is not None

    def _new_entry(self, txn: lmdb.Transaction[bytes]) -> bytes:
        raw = txn.get(b"next_entry", db=self.meta)
        number = 1 if raw is None else read_u64(raw)
        txn.put(b"next_entry", u64(number + 1), db=self.meta)
        return o.global_id(self.site(txn), _ENTRY_BIT | number)

    def _put_entry(self, txn: lmdb.Transaction[bytes], node: bytes, obj: bytes, parent_ino: int, name: bytes) -> None:
        txn.put(node, obj + u64(parent_ino) + name, db=self.db["sentries"])
        txn.put(obj + node, b"", db=self.db["sobjents"])

    def _entry_object(self, txn: lmdb.Transaction[bytes], node: bytes) -> bytes:
        raw = txn.get(node, db=self.db["sentries"])
        assert raw is not None, node.hex()
        return bytes(raw[:16])

    def _shown(self, txn: lmdb.Transaction[bytes], node: bytes) -> tuple[int, bytes] | None:
        raw = txn.get(node, db=self.db["sentries"])
        if raw is None:
            return None
        parent_ino = read_u64(raw, 16)
        return None if parent_ino == 0 else (parent_ino, bytes(raw[24:]))

    def _node_shown_at(self, txn: lmdb.Transaction[bytes], parent_ino: int, name: bytes) -> bytes | None:
        raw = txn.get(u64(parent_ino) + name, db=self.db["snames"])
        return None if raw is None else bytes(raw)

    # -- the clock ------------------------------------------------------------------------------
    def _tick(self, txn: lmdb.Transaction[bytes], now_ns: int) -> Stamp:
        """The next stamp: the command's time unless the clock is ahead (a peer's stamps, a step
        back), then one logical tick past it. From the tables and the command only: every replica
        computes the same."""
        raw = txn.get(b"clock", db=self.meta)
        site = self.site(txn)
        if raw is None:
            stamp = Stamp(now_ns, 0, site)
        else:
            last = Stamp.unpack(bytes(raw))
            if now_ns > last.wall_ns:
                stamp = Stamp(now_ns, 0, site)
            elif last.logical < MAX_LOGICAL:
                stamp = Stamp(last.wall_ns, last.logical + 1, site)
            else:
                stamp = Stamp(last.wall_ns + 1, 0, site)
        txn.put(b"clock", stamp.pack(), db=self.meta)
        return stamp

    def _observe(self, txn: lmdb.Transaction[bytes], remote: Stamp) -> None:
        raw = txn.get(b"clock", db=self.meta)
        if raw is None or _wall_logical(remote) > _wall_logical(Stamp.unpack(bytes(raw))):
            txn.put(b"clock", Stamp(remote.wall_ns, remote.logical, self.site(txn)).pack(), db=self.meta)

    def _seen_stamp(self, txn: lmdb.Transaction[bytes]) -> Stamp | None:
        raw = txn.get(b"seen", db=self.meta)
        return None if raw is None else Stamp.unpack(bytes(raw))

    def _seen(self, txn: lmdb.Transaction[bytes]) -> dict[bytes, Stamp]:
        stamp = self._seen_stamp(txn)
        return {} if stamp is None else {stamp.site: stamp}

    def _ship(self, txn: lmdb.Transaction[bytes], op: o.Operation) -> None:
        txn.put(op.stamp.pack(), o.encode(op), db=self.db["soutbox"])
        txn.put(b"head", op.stamp.pack(), db=self.meta)

    def head(self, txn: lmdb.Transaction[bytes]) -> Stamp | None:
        """This site's last operation (an acknowledgement carries it: repl/link.py, Ack.head)."""
        raw = txn.get(b"head", db=self.meta)
        return None if raw is None else Stamp.unpack(bytes(raw))

    def link_info(self, txn: lmdb.Transaction[bytes]) -> dict[str, Any] | None:
        """The peer as LinkSite recorded it: its id, CA certificate and addresses (and, once it
        told them, `revoked`: its removed members' certificate serials; UpdateSiteLink)."""
        raw = txn.get(b"link", db=self.meta)
        return None if raw is None else json.loads(raw)

    # -- reads for the shipper and for `site status` --------------------------------------------
    def outbox(self, txn: lmdb.Transaction[bytes], after: Stamp | None, limit: int) -> list[tuple[Stamp, bytes]]:
        start = b"" if after is None else after.pack()
        found = []
        for key, value in _scan_from(txn, self.db["soutbox"], start):
            stamp = Stamp.unpack(bytes(key))
            if after is not None and stamp <= after:
                continue
            found.append((stamp, bytes(value)))
            if len(found) >= limit:
                break
        return found

    def shipping(self, txn: lmdb.Transaction[bytes], raw: bytes) -> tuple[bytes, int | None]:
        """What to send for an outbox entry: the operation, and for a content version the inode
        whose bytes are that version (the file while it shows it, the sibling a conflict kept it
        in). A version a later one of this site replaced is sent as `Superseded`: only the
        newest bytes travel; so is one of an object this site no longer has (released after its
        every entry was deleted): there are no bytes to send, and the peer deleted it too."""
        op = o.decode(raw)
        if not isinstance(op, o.ContentSet):
            return raw, None
        versions = self._versions(txn, op.object + CONTENT)
        ino = self._ino(txn, op.object)
        if versions and versions[0].stamp == op.stamp and ino is not None:
            return raw, ino
        # A version kept in /.conflicts ships from there even once settled here: the peer keeps it too.
        record = txn.get(op.stamp.pack() + b"c", db=self.db["sconflicts"])
        kept = None if record is None else json.loads(record).get("kept_ino")
        if kept is not None and txn.get(u64(kept), db=self.db["inodes"]) is not None:
            return raw, int(kept)
        return o.encode(o.Superseded(op.stamp, op.object, op.seen)), None

    def content_base(self, txn: lmdb.Transaction[bytes], obj: bytes) -> tuple[int, Stamp] | None:
        """The regular file that shows `obj` here and the stamp of the content version it shows
        (the register's winner), or None: what a content version shipped as a delta from that
        version may reuse (design note 50)."""
        ino = self._ino(txn, obj)
        versions = self._versions(txn, obj + CONTENT)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        if inode is None or not inode.is_reg or not versions:
            return None
        return inode.ino, versions[0].stamp

    def _first_shown(self, txn: lmdb.Transaction[bytes], ino: int) -> tuple[int, bytes] | None:
        """Where the first of an inode's entries is shown: (parent ino, name), or None."""
        obj = self.object_of(txn, ino)
        if obj is None:
            return None
        for key, _ in _scan(txn, self.db["sobjents"], obj):
            shown = self._shown(txn, bytes(key[16:]))
            if shown is not None:
                return shown
        return None

    def pending_after(self, txn: lmdb.Transaction[bytes], after: Stamp | None, limit: int = 1 << 20) -> int:
        """How many outbox entries come after `after` (the peer's acknowledgement), at most `limit`."""
        count = 0
        for key, _ in _scan_from(txn, self.db["soutbox"], b"" if after is None else after.pack()):
            if after is not None and Stamp.unpack(bytes(key)) <= after:
                continue
            count += 1
            if count >= limit:
                break
        return count

    def path_of(self, txn: lmdb.Transaction[bytes], obj: bytes) -> str | None:
        """Where this site shows an object now (its first name), or None (deleted, unknown)."""
        ino = self._ino(txn, obj)
        where = None if ino is None else self._first_shown(txn, ino)
        parts: list[bytes] = []
        for _ in range(MAX_DEPTH):
            if where is None:
                return None
            parent_ino, name = where
            parts.append(name)
            if parent_ino in (ROOT_INO, VOLUMES_INO):
                top = "/" if parent_ino == ROOT_INO else "/.volumes/"
                return top + "/".join(p.decode(errors="replace") for p in reversed(parts))
            parent = self.object_of(txn, parent_ino)
            where = None if parent is None else self._shown(txn, parent)
        return None

    def applied_from_peer(self, txn: lmdb.Transaction[bytes]) -> Stamp | None:
        return self._seen_stamp(txn)


_UNCHANGED = object()


@dataclass(frozen=True)
class _ContentBlocks:
    """The blocks of one content version of the peer's: `fresh` ones staged here for it, `shared`
    ones this site's file already holds (delta transfer)."""

    fresh: tuple[Extent, ...]
    shared: tuple[Extent, ...] = ()

    def mapped(self) -> tuple[Extent, ...]:
        """Both, in file order: the version's map."""
        if not self.shared:
            return self.fresh
        return tuple(sorted(self.fresh + self.shared, key=lambda ext: ext.file_block))
"""A register's apply that did not change what shows."""


def _wall_logical(stamp: Stamp) -> tuple[int, int]:
    return stamp.wall_ns, stamp.logical


def _scan(txn: lmdb.Transaction[bytes], db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of `db` whose keys start with `prefix`, in key order."""
    cursor = txn.cursor(db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if bytes(key[:len(prefix)]) != prefix:
            return
        yield key, value


def _after(stamp: Stamp) -> bytes:
    """The smallest key after `stamp`'s in a table keyed by packed stamps."""
    return stamp.pack() + b"\0"


def _scan_from(txn: lmdb.Transaction[bytes], db: Any, start: bytes) -> Iterator[tuple[bytes, bytes]]:
    cursor = txn.cursor(db)
    if not cursor.set_range(start):
        return
    yield from cursor


_MOVE_HEAD = struct.Struct(f">{PACKED_BYTES}s16s16sBH")
_SEEN = struct.Struct(f">16s{PACKED_BYTES}s")
_BEFORE = struct.Struct(f">16s{PACKED_BYTES}sH")


def _pack_move(move: Move) -> bytes:
    """stamp, node, parent, how many seen, name length; then each seen (site, stamp); the name."""
    seen = sorted(move.seen.items())
    return (_MOVE_HEAD.pack(move.stamp.pack(), move.node, move.parent, len(seen), len(move.name))
            + b"".join(_SEEN.pack(site, stamp.pack()) for site, stamp in seen) + move.name)


def _unpack_move(raw: bytes, at: int = 0) -> tuple[Move, int]:
    stamp, node, parent, count, name_len = _MOVE_HEAD.unpack_from(raw, at)
    at += _MOVE_HEAD.size
    seen = {}
    for _ in range(count):
        site, seen_stamp = _SEEN.unpack_from(raw, at)
        seen[site] = Stamp.unpack(seen_stamp)
        at += _SEEN.size
    return Move(Stamp.unpack(stamp), node, parent, raw[at:at + name_len], seen), at + name_len


def _pack_log_entry(entry: LogEntry) -> bytes:
    """done, whether a placement was before; that placement (parent, stamp, name); the move."""
    before = entry.before
    head = bytes((entry.done, before is not None))
    if before is not None:
        head += _BEFORE.pack(before.parent, before.stamp.pack(), len(before.name)) + before.name
    return head + _pack_move(entry.move)


def _log_entry(raw: bytes) -> LogEntry:
    raw = bytes(raw)
    done, has_before = raw[0], raw[1]
    at, before = 2, None
    if has_before:
        parent, stamp, name_len = _BEFORE.unpack_from(raw, at)
        at += _BEFORE.size
        before = Placement(parent, raw[at:at + name_len], Stamp.unpack(stamp))
        at += name_len
    move, _ = _unpack_move(raw, at)
    return LogEntry(move, before, bool(done))
