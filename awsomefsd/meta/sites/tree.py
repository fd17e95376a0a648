"""The replicated tree (crdt/tree.py) on the site tables, and where it shows a node.

`TableTree` is the tree's TreeState and TreeLog within one transaction: placements in `splace`
and `skids`, the undo log in `slog`, each node's moves in `smoves`, with the encodings of moves
and log entries. `SiteTree` adds what a placement means for this site: the path an object is
shown at, whether a directory can be reached from the root, the moves that took a node into
TRASH; and the skipped moves (those that would have made a cycle), conflicts the log holds,
recorded for good when the log forgets them.

Apart because the algorithm is crdt's and knows no table: this is the one adapter between the
two, and what every job that moves or looks up an entry goes through.
"""

from __future__ import annotations

import bisect
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import lmdb

from awsomefsd.crdt.hlc import PACKED_BYTES, Stamp
from awsomefsd.crdt.tree import MAX_DEPTH, ROOT, TRASH, VOLUMES, LogEntry, Move, Placement, parents_named
from awsomefsd.meta import levels
from awsomefsd.meta.records import ROOT_INO, VOLUMES_INO
from awsomefsd.meta.sites.tables import PATH_MOVE, SKIPPED, SiteRecords, scan, scan_from


@dataclass(slots=True)
class Dirty:
    """What one operation's tree moves touched: the name groups whose shown names may change,
    and the nodes that moved (whose old directory entries may have to go)."""

    groups: set[tuple[bytes, bytes]] = field(default_factory=set)
    nodes: set[bytes] = field(default_factory=set)


@dataclass(slots=True)
class ReorderingIndex:
    """While one batch of the peer's moves applies, what the log holds from `start` on: the nodes
    its entries name a parent (`TreeLog.parent_since`), so that a file's move learns it had no
    child without reading every entry made since (most of a catch-up's log); and, once a
    directory's move needs them, the entries that `reorders` (LogEntry.reorders), what such a
    move undoes. One read of the log per batch, kept current as entries go in and out."""

    start: Stamp | None = None
    """From where `parents` and `stamps` are complete; None until a move of the batch reads the log."""
    parents: set[bytes] = field(default_factory=set)
    """May keep a node whose entry went out: `parent_since` may answer True when unsure."""
    stamps: list[bytes] | None = None
    """The packed stamps of the entries that `reorders`, in order; None until asked for."""

    def count(self, entry: LogEntry, went_in: bool) -> None:
        """`entry` went into the log, or out of it."""
        if self.start is None or entry.move.stamp < self.start:
            return
        if went_in:
            self.parents.update(parents_named(entry))
        if self.stamps is not None and entry.reorders:
            key = entry.move.stamp.pack()
            at = bisect.bisect_left(self.stamps, key)
            if went_in:
                self.stamps.insert(at, key)
            elif at < len(self.stamps) and self.stamps[at] == key:
                del self.stamps[at]


@dataclass(slots=True)
class _IndexKept:
    """A batch's `ReorderingIndex` kept for the next batch (`SiteTree.resume_index`), with what
    tells whether the log is still the one it describes."""

    seen: bytes
    """The `seen` row the batch left: only a state that holds that batch's writes continues it
    (one whose transaction aborted, or replayed before it, shows an older one)."""
    high: bytes
    """The greatest key the log held then: later keys are the entries appended since."""
    entries: int
    """How many entries the log held then."""
    index: ReorderingIndex


class TableTree:
    """The replicated tree's TreeState and TreeLog on the site tables, within one transaction."""

    def __init__(self, tables: SiteTree, txn: lmdb.Transaction[bytes], dirty: Dirty) -> None:
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

    def place_new(self, move: Move) -> None:
        """`ReplicatedTree.apply_local(move)` for a node never placed and with nothing placed
        under it (a create's): what its `_do` reads is known (no placement before, not above the
        parent: done), so this reads nothing and writes the rows it writes (a fold's creates)."""
        txn, db, stamp, packed = self.txn, self.t.db, move.stamp.pack(), pack_move(move)
        txn.put(move.node, move.parent + stamp + move.name, db=db["splace"])
        txn.put(move.parent + move.name + b"\0" + move.node, b"", db=db["skids"])
        txn.put(stamp, _DONE_FIRST + packed, db=db["slog"])  # _pack_log_entry(LogEntry(move, None, True))
        txn.put(move.node + stamp, packed, db=db["smoves"])

    # TreeLog
    def entry_at(self, stamp: Stamp) -> LogEntry | None:
        raw = self.txn.get(stamp.pack(), db=self.t.db["slog"])
        return None if raw is None else _log_entry(raw)

    def has_children(self, node: bytes) -> bool:
        cursor = self.txn.cursor(self.t.db["skids"])
        return cursor.set_range(node) and bytes(cursor.key()[:len(node)]) == node

    def entries_from(self, stamp: Stamp) -> list[LogEntry]:
        return [_log_entry(v) for _, v in scan_from(self.txn, self.t.db["slog"], stamp.pack())]

    def _index_from(self, stamp: Stamp) -> ReorderingIndex:
        """The batch's index, complete from `stamp` on: read from the log unless it is already;
        outside a batch, one of this call only."""
        index = self.t.reordering
        if index is not None and index.start is not None and stamp >= index.start:
            return index
        fresh = ReorderingIndex(stamp)
        _parents_from(self.txn, self.t.db["slog"], stamp.pack(), fresh.parents)
        if index is not None:  # a batch applies: keep it, and keep it current
            index.start, index.parents, index.stamps = fresh.start, fresh.parents, None
            return index
        return fresh

    def parent_since(self, node: bytes, stamp: Stamp) -> bool:
        """From the batch's index, which counts from the batch's first stamp: entries before
        `stamp` may answer True too, which `TreeLog.parent_since` allows."""
        return node in self._index_from(stamp).parents

    def reordering_from(self, stamp: Stamp) -> list[LogEntry]:
        index = self._index_from(stamp)
        if index.stamps is None:
            assert index.start is not None
            index.stamps = [bytes(key) for key, raw in scan_from(self.txn, self.t.db["slog"], index.start.pack())
                            if _reorders(raw)]
        found = []
        for key in index.stamps[bisect.bisect_left(index.stamps, stamp.pack()):]:
            raw = self.txn.get(key, db=self.t.db["slog"])
            assert raw is not None, "the index of reordering entries is behind the log"
            found.append(_log_entry(raw))
        return found

    def remove(self, entries: list[LogEntry]) -> None:
        index = self.t.reordering
        for entry in entries:
            key = entry.move.stamp.pack()
            self.txn.delete(key, db=self.t.db["slog"])
            if not entry.done:
                self.txn.delete(SKIPPED + key, db=self.t.meta)
            if index is not None:
                index.count(entry, went_in=False)

    def append(self, entry: LogEntry) -> None:
        self.insert(entry)

    def insert(self, entry: LogEntry) -> None:
        """Entries are keyed by stamp: one goes to its place in stamp order wherever it is put."""
        self.txn.put(entry.move.stamp.pack(), _pack_log_entry(entry), db=self.t.db["slog"])
        if not entry.done:  # a move that would have made a cycle: listed while the log holds it
            self.txn.put(SKIPPED + entry.move.stamp.pack(), b"", db=self.t.meta)
        if self.t.reordering is not None:
            self.t.reordering.count(entry, went_in=True)

    def moves_of(self, node: bytes) -> list[Move]:
        return [unpack_move(bytes(v))[0] for _, v in scan(self.txn, self.t.db["smoves"], node)]

    def add_move_of(self, move: Move) -> None:
        self.txn.put(move.node + move.stamp.pack(), pack_move(move), db=self.t.db["smoves"])

    def forget_through(self, stamp: Stamp) -> int:
        """Drop the log up to `stamp`; a skipped move in it becomes a conflict record for good,
        and one that places a node on a path into TRASH is kept (`SiteTree.keep_path_move`)."""
        txn, db = self.txn, self.t.db
        if self.t.reordering is not None:
            self.t.reordering.start = None  # read the log again
        dropped = 0
        keep_paths = self.t.at_site_paths_level(txn)
        for key, value in list(scan(txn, db["slog"], b"")):
            if Stamp.unpack(bytes(key)) > stamp:
                break
            entry = _log_entry(value)
            if not entry.done:
                self.t.keep_skipped(txn, entry)
            if keep_paths:
                self.t.keep_path_move(txn, entry.move)
            txn.delete(key, db=db["slog"])
            txn.delete(entry.move.node + bytes(key), db=db["smoves"])
            dropped += 1
        return dropped


class SiteTree(SiteRecords):
    """The tree's skipped moves and where the tree shows a node."""

    reordering: ReorderingIndex | None = None
    """Set while a batch of the peer's operations applies (`SiteApply.apply_remote`)."""
    _index_kept: _IndexKept | None = None
    """The last batch's index (`keep_index`), for the next batch (`resume_index`)."""

    def resume_index(self, txn: lmdb.Transaction[bytes]) -> ReorderingIndex:
        """The index a batch of the peer's operations starts with: the last batch's, brought up to
        date, when the log changed since only by entries appended after it (local moves; a
        batch that had to read the log since its first stamp otherwise read it again at every
        slice of a catch-up: the whole backlog each time, issue 47); else an empty one. Kept
        only while this state holds that batch's writes (its `seen`) and the log's count is that
        batch's plus the entries appended: anything else (a forget, an abort, a relink) reads
        the log afresh. The nodes named a parent may include some no longer named (that costs
        undo, never a different result: `TreeLog.parent_since`); the reordering stamps, which
        must be exact, gain the appended entries that reorder (all later than every stamp they
        hold: the list stays in order)."""
        kept, self._index_kept = self._index_kept, None
        if kept is None or kept.index.start is None or txn.get(b"seen", db=self.meta) != kept.seen:
            return ReorderingIndex()
        db = self.db["slog"]
        appended = _parents_from(txn, db, kept.high, kept.index.parents, after=True, reorders=kept.index.stamps)
        if txn.stat(db)["entries"] != kept.entries + appended:
            return ReorderingIndex()
        return kept.index

    def keep_index(self, txn: lmdb.Transaction[bytes], index: ReorderingIndex) -> None:
        """After a batch applied in `txn` (none of it refused): keep its index for the next."""
        seen = txn.get(b"seen", db=self.meta)
        cursor = txn.cursor(self.db["slog"])
        if index.start is None or seen is None or not cursor.last():
            return
        self._index_kept = _IndexKept(bytes(seen), bytes(cursor.key()), txn.stat(self.db["slog"])["entries"], index)

    def at_site_paths_level(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Does this site follow the rules of `levels.SITE_PATHS_LEVEL` (the moves on a path into TRASH
        kept past `forget`, a local directory delete's files judged, a deleted directory released
        only once nothing below it moved in later)? On a cluster only once every member's build
        does: replicas that kept different rows would judge, and release, differently."""
        return self.at_level(txn, levels.SITE_PATHS_LEVEL)

    def keep_path_move(self, txn: lmdb.Transaction[bytes], move: Move) -> None:
        """The log forgets `move`. If it is where its node is placed now and the node's path leads
        into TRASH (the node deleted, or a directory above it), keep it (`PATH_MOVE`): a file
        there may lose its last name later and is judged against every move on its path
        (edit_delete.py), and the other site, which forgets at its own time, may still hold it
        in its log. A path not into TRASH now needs none of it: a delete that takes it later
        saw this move (the horizon's promise), and then judges alike with or without it. Rows
        of the node's earlier placements go (it moved on for good)."""
        placed = self.placement(txn, move.node)
        if placed is None or placed.stamp != move.stamp:
            return
        for key, _ in list(scan(txn, self.meta, PATH_MOVE + move.node)):
            txn.delete(key, db=self.meta)
        if self._path_to_trash(txn, move.node):
            txn.put(PATH_MOVE + move.node + move.stamp.pack(), pack_move(move), db=self.meta)

    def _path_move(self, txn: lmdb.Transaction[bytes], tree: TableTree, node: bytes, stamp: Stamp) -> Move | None:
        """The move with `stamp` that placed `node`: from the log, or kept past it (`PATH_MOVE`)."""
        entry = tree.entry_at(stamp)
        if entry is not None:
            return entry.move
        raw = txn.get(PATH_MOVE + node + stamp.pack(), db=self.meta)
        return None if raw is None else unpack_move(bytes(raw))[0]

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

    # -- where the tree shows a node -------------------------------------------------------------
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

    def _first_shown(self, txn: lmdb.Transaction[bytes], ino: int) -> tuple[int, bytes] | None:
        """Where the first of an inode's entries is shown: (parent ino, name), or None."""
        obj = self.object_of(txn, ino)
        if obj is None:
            return None
        for key, _ in scan(txn, self.db["sobjents"], obj):
            shown = self._shown(txn, bytes(key[16:]))
            if shown is not None:
                return shown
        return None

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
        for key, _ in scan(txn, self.db["sobjents"], obj or b"\xff" * 17):
            shown = self._shown(txn, bytes(key[16:]))
            if shown is not None and self._reachable(txn, shown[0]):
                return shown
        return None

    def _path_to_trash(self, txn: lmdb.Transaction[bytes], node: bytes) -> list[tuple[bytes, Stamp] | None]:
        """When `node` or one of its ancestors is under TRASH: the placements on the way up, as
        (node, stamp), its own first, to the move into TRASH last (None for a placement
        forgotten: an ancestor released by `forget` has none left). Every one of them took part
        in taking the path away: a directory moved into one the other site removed loses its
        files as surely as the removal does. [] when not under TRASH."""
        stamps: list[tuple[bytes, Stamp] | None] = []
        for _ in range(MAX_DEPTH):
            if node in (ROOT, VOLUMES):
                return []
            placed = self.placement(txn, node)
            if placed is None:
                return [*stamps, None]
            stamps.append((node, placed.stamp))
            if placed.parent == TRASH:
                return stamps
            node = placed.parent
        return []


_MOVE_HEAD = struct.Struct(f">{PACKED_BYTES}s16s16sBH")
_SEEN = struct.Struct(f">16s{PACKED_BYTES}s")
_BEFORE = struct.Struct(f">16s{PACKED_BYTES}sH")


def pack_move(move: Move) -> bytes:
    """stamp, node, parent, how many seen, name length; then each seen (site, stamp); the name."""
    seen = sorted(move.seen.items())
    return (_MOVE_HEAD.pack(move.stamp.pack(), move.node, move.parent, len(seen), len(move.name))
            + b"".join(_SEEN.pack(site, stamp.pack()) for site, stamp in seen) + move.name)


def unpack_move(raw: bytes, at: int = 0) -> tuple[Move, int]:
    stamp, node, parent, count, name_len = _MOVE_HEAD.unpack_from(raw, at)
    at += _MOVE_HEAD.size
    seen = {}
    for _ in range(count):
        site, seen_stamp = _SEEN.unpack_from(raw, at)
        seen[site] = Stamp.unpack(seen_stamp)
        at += _SEEN.size
    return Move(Stamp.unpack(stamp), node, parent, raw[at:at + name_len], seen), at + name_len


_DONE_FIRST = bytes((True, False))
"""The head `_pack_log_entry` gives a move done that placed its node first (no placement before)."""


def _pack_log_entry(entry: LogEntry) -> bytes:
    """done, whether a placement was before; that placement (parent, stamp, name); the move."""
    before = entry.before
    head = bytes((entry.done, before is not None))
    if before is not None:
        head += _BEFORE.pack(before.parent, before.stamp.pack(), len(before.name)) + before.name
    return head + pack_move(entry.move)


def _reorders(raw: bytes) -> bool:
    """`LogEntry.reorders` of a packed entry, from its first two bytes (done, a placement before)."""
    return raw[0] == 0 or raw[1] == 1


_PARENT_AT = 2 + PACKED_BYTES + 16  # a packed entry without a placement before: its move's parent
_NAME_LENGTH_AT = 2 + 16 + PACKED_BYTES  # with one: the length of that placement's name


def _parents_from(txn: lmdb.Transaction[bytes], db: Any, start: bytes, parents: set[bytes], *,
                  after: bool = False, reorders: list[bytes] | None = None) -> int:
    """Add to `parents` `crdt.tree.parents_named` of every log entry from `start` on (`after`:
    past it), read from the packed entries without decoding the rest, and to `reorders` the
    keys of those that `reorders`; returns how many entries it read."""
    cursor = txn.cursor(db)
    if not cursor.set_range(start) or (after and cursor.key() == start and not cursor.next()):
        return 0
    read = 0
    for key, raw in cursor.iternext(keys=True, values=True):
        read += 1
        if reorders is not None and _reorders(raw):
            reorders.append(bytes(key))
        if raw[1]:  # a placement before: its parent, then the move's after that placement's name
            parents.add(raw[2:18])
            at = _PARENT_AT + _BEFORE.size + int.from_bytes(raw[_NAME_LENGTH_AT:_NAME_LENGTH_AT + 2], "big")
            parents.add(raw[at:at + 16])
        else:
            parents.add(raw[_PARENT_AT:_PARENT_AT + 16])
    return read


def _log_entry(raw: bytes) -> LogEntry:
    raw = bytes(raw)
    done, has_before = raw[0], raw[1]
    at, before = 2, None
    if has_before:
        parent, stamp, name_len = _BEFORE.unpack_from(raw, at)
        at += _BEFORE.size
        before = Placement(parent, raw[at:at + name_len], Stamp.unpack(stamp))
        at += name_len
    move, _ = unpack_move(raw, at)
    return LogEntry(move, before, bool(done))
