"""Forgetting: what both sites have moved past is dropped, and what it kept is released.

Deleting is a move into TRASH, and an object whose last entry went there keeps its inode (nlink
0, not an orphan) until both sites have moved past the deletion, because a concurrent rename with
a later stamp must be able to bring it back. Once the horizon (repl/link.py) says so, `forget`
drops the undo log and the acknowledged outbox and releases those objects to the orphan purge;
the deletes an object that lives on must still be judged against are kept with it (`DELETED`).

Apart because it is the one job that removes history: it runs on its own command (`ForgetSite`)
and decides alone what may go.
"""

from __future__ import annotations

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.crdt.tree import MAX_DEPTH, ROOT, TRASH, VOLUMES, Move
from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.records import u64
from awsomefsd.meta.sites.tables import CONTENT, DELETED, PATH_MOVE, REVIVED, scan, scan_from
from awsomefsd.meta.sites.tree import Dirty, TableTree, pack_move
from awsomefsd.meta.sites.view import SiteView


class SiteForget(SiteView):
    """The log and the outbox forgotten; deleted objects released."""

    def forget(self, txn: lmdb.Transaction[bytes], cmd: c.ForgetSite) -> int:
        """Both sites have applied everything up to `cmd.through` and nothing concurrent with it is
        still to come (repl/link.py's horizon): drop the undo log and the acknowledged outbox up
        to there, and release the objects whose every entry was deleted by then."""
        through = self._forgettable(txn, Stamp.unpack(cmd.through))
        if through is None:
            return 0
        dirty = Dirty()
        tree = TableTree(self, txn, dirty)
        self._release_deleted(txn, tree, through)
        dropped = tree.forget_through(through)
        horizon = txn.get(b"horizon", db=self.meta)
        if horizon is None or Stamp.unpack(bytes(horizon)) < through:
            txn.put(b"horizon", through.pack(), db=self.meta)
        for key, _ in list(scan(txn, self.db["soutbox"], b"")):
            if Stamp.unpack(bytes(key)) > through:
                break
            txn.delete(key, db=self.db["soutbox"])
        return dropped

    def _forgettable(self, txn: lmdb.Transaction[bytes], through: Stamp) -> Stamp | None:
        """How far `forget` may go of `through`: no further than what this site's first
        operation after it had seen of the peer. The horizon (repl/link.py) promises that the
        peer's operations still to come saw everything up to `through`; this site's own, made
        but not yet applied there, may not have. Such an edit is concurrent with a delete the
        peer made before it: that delete, and the object, must stay until the edit is judged
        against it on both sites (edit against delete). None: nothing may be forgotten yet.
        (A site that writes while its peer does not is never held back: its operations saw
        every operation of the peer's there is.)"""
        for _key, raw in scan_from(txn, self.db["soutbox"], _after(through)):
            seen = o.decode(bytes(raw)).seen.get(self.peer(txn) or b"")
            if seen == self._seen_stamp(txn):
                return through  # it saw all the peer's operations applied here; the rest are after `through`
            return None if seen is None else min(through, seen)
        return through

    def _release_deleted(self, txn: lmdb.Transaction[bytes], tree: TableTree, through: Stamp) -> None:
        """Drop the entries deleted up to `through` from the tree, and release the objects left
        with none. An object that keeps another entry keeps the moves that deleted the others
        (`DELETED`): an edit concurrent with one of them is kept if its last name goes too, and
        the log that held them is forgotten now."""
        unstable = self._above_unstable(txn, tree, through)
        for key, _ in list(scan(txn, self.db["skids"], TRASH)):
            node = bytes(key[-16:])
            placed = self.placement(txn, node)
            if placed is None or placed.stamp > through:
                continue
            obj = self._entry_object(txn, node)
            move = self._path_move(txn, tree, node, placed.stamp)  # the log forgets it now (or did)
            # A content not on both sites yet (written through a descriptor), or an entry moved
            # in below after `through`, keeps the entry for a later forget; an object with no
            # entry left is released.
            if not self._written_after(txn, obj, through) and node not in unstable \
                    and not self._drop_node(txn, node, obj):
                self._release_object(txn, obj, [] if move is None else [move])
                continue
            if move is not None:
                txn.put(DELETED + obj + placed.stamp.pack(), pack_move(move), db=self.meta)

    def _written_after(self, txn: lmdb.Transaction[bytes], obj: bytes, through: Stamp) -> bool:
        """Has `obj`, or a file below it (a directory is released with what is below it), a
        content version after `through`, that may not be on both sites yet?"""
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        below = self._files_below(txn, inode.ino) if inode is not None and inode.is_dir else []
        return any(v.stamp > through for each in [obj, *below] for v in self._versions(txn, each + CONTENT))

    def _above_unstable(self, txn: lmdb.Transaction[bytes], tree: TableTree, through: Stamp) -> set[bytes]:
        """The directory entries above an entry placed after `through` (its move is still in the
        log, as every move after it is). Such a move is not stable: a concurrent move in flight
        may take the entry out again (the other site had not seen the delete above it), and this
        site's own may not have reached the peer. A deleted directory released now would take
        the entry and its object with it, and the move that follows would name an unknown
        object, or the log's undo a node gone (the random tests, seeds 258014451 and 507061005):
        one of these waits for a later forget (`levels.SITE_PATHS_LEVEL`). Read from the log after
        `through`, which holds only what is not stable yet: no walk of a large deleted tree."""
        above: set[bytes] = set()
        if not self.at_site_paths_level(txn):
            return above
        for entry in tree.entries_from(through):
            placed = self.placement(txn, entry.move.node)
            if entry.move.stamp <= through or placed is None or placed.stamp != entry.move.stamp:
                continue  # not where its node is now (moved again, or skipped as a cycle)
            parent = placed.parent
            for _ in range(MAX_DEPTH):
                if parent in (ROOT, VOLUMES, TRASH) or parent in above:
                    break
                above.add(parent)
                up = self.placement(txn, parent)
                if up is None:
                    break
                parent = up.parent
        return above

    def _release_object(self, txn: lmdb.Transaction[bytes], obj: bytes, deleted_by: list[Move]) -> None:
        """An object with no entry left in the tree: the orphan purge may have its inode once no
        directory entry shows it either. A directory goes with what is still below it (files
        the other site made there meanwhile, their edits kept in /.conflicts); `deleted_by`: the
        moves the log still holds that took the directory away."""
        for deleted, _ in list(scan(txn, self.meta, DELETED + obj)):
            txn.delete(deleted, db=self.meta)
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        if inode is None or inode.nlink != 0 or txn.get(REVIVED + obj, db=self.meta) is not None:
            return  # still shown somewhere, or a name of it is on its way from the peer
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
        tree = TableTree(self, txn, Dirty())
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
            own = None if placed is None else self._path_move(txn, tree, node, placed.stamp)
            path = ([] if own is None else [own]) + deleted_by
            self._unshow_node(txn, node, entry_too=True)
            if not self._drop_node(txn, node, obj):
                self._release_object(txn, obj, path)
            elif path:
                txn.put(DELETED + obj + path[0].stamp.pack() + node, b"".join(pack_move(m) for m in path),
                        db=self.meta)

    def _drop_node(self, txn: lmdb.Transaction[bytes], node: bytes, obj: bytes) -> bool:
        """Take entry `node` of `obj` out of the tree's tables for good; does `obj` keep another?"""
        placed = self.placement(txn, node)
        if placed is not None:
            txn.delete(placed.parent + placed.name + b"\0" + node, db=self.db["skids"])
        for key, _ in list(scan(txn, self.meta, PATH_MOVE + node)):
            txn.delete(key, db=self.meta)
        for table, key in (("splace", node), ("sentries", node), ("sobjents", obj + node)):
            txn.delete(key, db=self.db[table])
        return any(True for _ in scan(txn, self.db["sobjents"], obj))

    # -- what the tree keeps ---------------------------------------------------------------------
    def keeps(self, txn: lmdb.Transaction[bytes], ino: int) -> bool:
        """Does the replicated tree keep this inode after its last name went (it may come back)?
        Also while unlinked with the tables kept for a relink (relink.py): the peer may still
        bring it back, and its content must be there to show. Not when the tree holds no entry
        of it at all (from `UNSEEDED_NAMES_LEVEL`): its last name was one the initial sync's walk
        had not reached, and the names the peer knew were deleted and forgotten on both sites
        (`_release_object` found it still named): nothing can bring it back, and nothing else would
        ever release it; unless the peer sent it again and the move naming it is on its way
        (`REVIVED`: fsck must not take it meanwhile)."""
        if self.peer(txn) is None and self.kept_peer(txn) is None:
            return False
        obj = txn.get(u64(ino), db=self.db["sinos"])
        if obj is None:
            return False
        return not self.at_level(txn, levels.UNSEEDED_NAMES_LEVEL) \
            or any(True for _ in scan(txn, self.db["sobjents"], bytes(obj))) \
            or txn.get(REVIVED + bytes(obj), db=self.meta) is not None

    def kept_inodes(self, txn: lmdb.Transaction[bytes]) -> list[int]:
        """The inodes of objects with an entry in the tree's TRASH (kept in case it comes back)."""
        inos = set()
        for key, _ in scan(txn, self.db["skids"], TRASH):
            ino = self._ino(txn, self._entry_object(txn, bytes(key[-16:])))
            if ino is not None:
                inos.add(ino)
        return sorted(inos)


def _after(stamp: Stamp) -> bytes:
    """The smallest key after `stamp`'s in a table keyed by packed stamps."""
    return stamp.pack() + b"\0"
