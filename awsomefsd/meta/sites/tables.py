"""The site tables and the rows every job of the package keeps in them (`SiteRecords`): which
table holds what (SITE_TABLES, the key prefixes of the `sites` table), the global ids of objects
and the replicated tree's entries, where each entry is shown, the site's hybrid logical clock and
the stored versions of the registers.

Apart because every other module here reads and writes these same rows: one place says how a row
is keyed and encoded, and the jobs above (capture, apply, conflicts, forgetting...) only combine
them. The clock is kept in the tables and advanced from the command's own `now_ns`, so every
replica of the site's Raft group computes the same stamps.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import MAX_LOGICAL, PACKED_BYTES, Stamp
from awsomefsd.crdt.register import Version
from awsomefsd.crdt.tree import Placement
from awsomefsd.meta import levels
from awsomefsd.meta.records import CONFLICTS_INO, SNAPSHOTS_INO, VOLUMES_INO, Applied, read_u64, u64

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
PATH_MOVE = b"path-move:"
"""Key prefix in the `sites` table: entry node + stamp -> the move that placed the node, kept
past `forget` while the node's path leads into TRASH (its own placement, or a directory's above
it): a file below may lose its last name later and be judged against that path, as the other
site, which forgets at its own time, judges it (`TableTree.forget_through`)."""
KEPT_PEER = b"kept_peer"
"""Key in the `sites` table, while unlinked: the site the tables are kept for (`site unlink`
keeps the ids, the tree, the registers, the clock and the cursors, so that linking that site
again re-pairs the same objects: meta/sites/relink.py)."""
KEPT_MAP = b"kept-map:"
"""Key prefix in the `sites` table, while unlinked or capture is paused: object -> a hash of the file's content when
it was unlinked (its size and each block's checksum), which the relink compares to tell a
content changed meanwhile from one only renamed or chmodded (mtime alone can be set back)."""
CAPTURE_PAUSED = b"capture_paused"
"""Key in the `sites` table, while the outbox is over its bound: capture is paused, each object's
state as the peer was last told noted under `KEPT_MAP` (meta/sites/bound.py)."""
REVIVED = b"revived:"
"""Key prefix in the `sites` table: object -> b"": the peer sent again whole an object held here
with no name left (seeding.py `_gone_for_peer`: it lives on there by a name the initial sync's walk
had just reached), and the move naming it follows; until that move arrives a forget does not
release it (forget.py `_release_object`), or the move would name an unknown object."""
KEPT_COPY = b"kept-copy:"
"""Key prefix in the `sites` table: object + loser stamp of a settled content conflict whose copy
stays until a later version from the loser's own site supersedes it (`_settle`)."""


@dataclass(slots=True)
class Held:
    """While a batch of captures folds (capture.py, `fold`): the clock, what was applied from the
    peer (`seen`), the head and the next entry number, kept here and written once at the batch's end. Nothing else
    reads or writes them meanwhile, and each was a read and a write per operation."""

    clock: Stamp | None
    seen: Stamp | None
    head: Stamp | None = None
    next_entry: int | None = None
    """The next entry node's number, once a fold made one."""
    levels: dict[int, bool] = field(default_factory=dict)
    """`at_level`'s answers: no folded command changes the cluster's log level."""


def site_of_cluster(cluster_id: str) -> bytes:
    """A site's id: its cluster id's 16 bytes."""
    return uuid.UUID(cluster_id).bytes


class SiteRecords:
    """The site's identity, link and rows; the base every job of `SiteTables` builds on."""

    def __init__(self, store: Any, sm: StateMachine) -> None:
        self.db = store.db
        self.meta = store.db["sites"]
        self._sm = sm  # its counters, space map and orphan records; the namespace as `ns`
        self.ns = sm.ns
        self._site: bytes | None = None
        self._entries: list[tuple[int, bytes]] = []  # touched by the command being applied
        self._inodes: list[int] = []
        self._held: Held | None = None
        self.local_side_effects: Callable[[Applied], None] | None = None
        """Hears what capturing a local command changed besides the command's own entries: a
        name group shown again (an entry shown under a conflict name gets its name back when the
        newer one is renamed or removed), a copy kept in /.conflicts. The mount's kernel caches
        those names (60 s on a single node) and was told of nothing: a renamed-away conflict name
        stayed visible to stat."""

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

    # -- objects and entries -------------------------------------------------------------------
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

    def at_level(self, txn: lmdb.Transaction[bytes], level: int) -> bool:
        """Does this site follow the rules of log level `level` (meta/levels.py)? A single node
        always does; a cluster only once every member's build does: replicas that kept different
        rows would judge, ship and release differently."""
        held = self._held
        if held is not None and level in held.levels:
            return held.levels[level]
        cluster = self._sm.cluster
        answer = not cluster.initialised(txn) or (cluster.log_level(txn) or levels.BASE_LOG_LEVEL) >= level
        if held is not None:
            held.levels[level] = answer
        return answer

    def _fresh_object_id(self, txn: lmdb.Transaction[bytes], ino: int) -> bytes:
        """The global id of an object made here: this site's and its inode number's; unless an
        older object still holds that id in the tree (the number came again after the inode
        went: `inode_deleted`), then one of the entries' numbering, which no inode has."""
        obj = o.global_id(self.site(txn), ino)
        if not self.at_level(txn, levels.RELINK_LEVEL):
            return obj
        if self._ino(txn, obj) is not None or any(True for _ in scan(txn, self.db["sobjents"], obj)):
            return self._new_entry(txn)
        return obj

    def inode_deleted(self, txn: lmdb.Transaction[bytes], ino: int) -> None:
        """Inode `ino` is gone for good (purged, or torn down with a volume): an id kept for it
        goes with it, so that no object id outlives its inode and a number used again later
        (by a store restored, a repair, a proposer's reservation) never takes an old object's
        id: on a relink the new inode is a new object, and the old one's entries deletes."""
        obj = self.object_of(txn, ino)  # first: None for every inode of a site never linked
        if obj is None or not self.at_level(txn, levels.RELINK_LEVEL):
            return
        if self._ino(txn, obj) == ino:
            txn.delete(obj, db=self.db["sids"])
        txn.delete(u64(ino), db=self.db["sinos"])

    def kept_peer(self, txn: lmdb.Transaction[bytes]) -> bytes | None:
        """While unlinked: the site whose link the tables are kept for (None: linked, or nothing kept)."""
        raw = txn.get(KEPT_PEER, db=self.meta)
        return None if raw is None else bytes(raw)

    def _replicated_dir(self, txn: lmdb.Transaction[bytes], ino: int) -> bool:
        return ino not in (VOLUMES_INO, SNAPSHOTS_INO, CONFLICTS_INO) and self.object_of(txn, ino) is not None

    def _new_entry(self, txn: lmdb.Transaction[bytes]) -> bytes:
        held = self._held
        if held is not None and held.next_entry is not None:
            number = held.next_entry
        else:
            raw = txn.get(b"next_entry", db=self.meta)
            number = 1 if raw is None else read_u64(raw)
        if held is not None:
            held.next_entry = number + 1
        else:
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
        held = self._held
        if held is not None:
            last = held.clock
        else:
            raw = txn.get(b"clock", db=self.meta)
            last = None if raw is None else Stamp.unpack(bytes(raw))
        site = self.site(txn)
        if last is None or now_ns > last.wall_ns:
            stamp = Stamp(now_ns, 0, site)
        elif last.logical < MAX_LOGICAL:
            stamp = Stamp(last.wall_ns, last.logical + 1, site)
        else:
            stamp = Stamp(last.wall_ns + 1, 0, site)
        if held is not None:
            held.clock = stamp
        else:
            txn.put(b"clock", stamp.pack(), db=self.meta)
        return stamp

    def _observe(self, txn: lmdb.Transaction[bytes], remote: Stamp) -> None:
        assert self._held is None, "a peer's stamp observed while captures fold"
        raw = txn.get(b"clock", db=self.meta)
        if raw is None or _wall_logical(remote) > _wall_logical(Stamp.unpack(bytes(raw))):
            txn.put(b"clock", Stamp(remote.wall_ns, remote.logical, self.site(txn)).pack(), db=self.meta)

    def _seen_stamp(self, txn: lmdb.Transaction[bytes]) -> Stamp | None:
        if self._held is not None:
            return self._held.seen
        raw = txn.get(b"seen", db=self.meta)
        return None if raw is None else Stamp.unpack(bytes(raw))

    def _seen(self, txn: lmdb.Transaction[bytes]) -> dict[bytes, Stamp]:
        stamp = self._seen_stamp(txn)
        return {} if stamp is None else {stamp.site: stamp}

    def _ship(self, txn: lmdb.Transaction[bytes], op: o.Operation) -> None:
        txn.put(op.stamp.pack(), o.encode(op), db=self.db["soutbox"])
        if self._held is not None:
            self._held.head = op.stamp
        else:
            txn.put(b"head", op.stamp.pack(), db=self.meta)

    # -- register versions ----------------------------------------------------------------------
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


def _wall_logical(stamp: Stamp) -> tuple[int, int]:
    return stamp.wall_ns, stamp.logical


def scan(txn: lmdb.Transaction[bytes], db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of `db` whose keys start with `prefix`, in key order."""
    cursor = txn.cursor(db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if bytes(key[:len(prefix)]) != prefix:
            return
        yield key, value


def scan_from(txn: lmdb.Transaction[bytes], db: Any, start: bytes) -> Iterator[tuple[bytes, bytes]]:
    cursor = txn.cursor(db)
    if not cursor.set_range(start):
        return
    yield from cursor
