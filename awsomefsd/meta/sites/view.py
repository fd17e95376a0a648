"""The tree's placements shown as directory entries.

What a site shows is a function of the moves it applied: after a batch of moves, the entries of
the name groups and nodes they touched are made to match the placements (`_reshow`), every
replica in the same order, so that they make the same entries with the same cookies. Two
placements with one name in one directory show the newest under the name and the others under
names derived from their stamps (crdt/tree.py's `visible_names`, for one group). A directory
that lost or regained its path makes the files below it judged again (edit_delete.py).

Apart because both sides of replication end here: a local command's moves (capture.py), the
peer's (apply.py), an operator's (resolve.py) and forgetting (forget.py).
"""

from __future__ import annotations

from collections.abc import Callable

import lmdb

from awsomefsd.crdt.hlc import Stamp
from awsomefsd.crdt.tree import MAX_NAME_BYTES, TRASH, conflict_name
from awsomefsd.meta import levels
from awsomefsd.meta.records import u64
from awsomefsd.meta.sites.edit_delete import EditAgainstDelete
from awsomefsd.meta.sites.tables import scan
from awsomefsd.meta.sites.tree import Dirty
from awsomefsd.meta.sites.volumes import SiteVolumes


class SiteView(EditAgainstDelete, SiteVolumes):
    """Directory entries made to match the tree."""

    def _reshow(self, txn: lmdb.Transaction[bytes], dirty: Dirty, now_ns: int) -> None:
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
        if self.at_site_paths_level(txn):
            self._groups_deriving(txn, dirty)
        for parent, name in sorted(dirty.groups):
            if parent == TRASH:
                continue
            parent_ino = self._ino(txn, parent)
            for node, shown in self._group_names(txn, parent, name).items():
                wanted[node] = None if parent_ino is None else (parent_ino, self._shown_name(txn, parent, node, shown))
        changed = {node: where for node, where in wanted.items() if self._shown(txn, node) != where}
        # Only a directory's reach matters below (what reaches its files): the type of what a
        # node names is known before it is shown, and a file's entries need no walk to the root.
        directories = {node: ino for node in sorted(set(changed) | dirty.nodes)
                       if (ino := self._directory_of(txn, node)) is not None}
        reachable_before = {node: self._shown_reachably(txn, node) for node in changed if node in directories}
        for node in changed:
            self._unshow_node(txn, node, entry_too=True, now_ns=now_ns)
        for node, where in changed.items():
            if where is not None:
                self._show_node(txn, node, *where, now_ns)
        # A directory deleted, moved into a deleted one, or back: the files below it lost, or got
        # back, their path. One moved while out of reach (deleted again, by another move) may
        # change which delete took their path: they are judged again too.
        reached_again = False
        for node, ino in directories.items():
            reachable = self._shown_reachably(txn, node)
            if reachable and reachable_before.get(node, True):
                continue
            reached_again = reached_again or reachable
            for obj in self._files_below(txn, ino):
                self._edit_against_delete(txn, obj)
        if reached_again:
            self._walk_again(txn)

    def _walk_again(self, txn: lmdb.Transaction[bytes]) -> None:
        """A directory has a path from the root again: what the initial sync's walk skipped while
        it had none is walked now (seeding.py; nothing to do here)."""

    def _directory_of(self, txn: lmdb.Transaction[bytes], node: bytes) -> int | None:
        """The inode of the directory entry `node` names, or None (a file's entry, or nothing here)."""
        raw = txn.get(node, db=self.db["sentries"])
        ino = None if raw is None else self._ino(txn, bytes(raw[:16]))
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        return inode.ino if inode is not None and inode.is_dir else None

    def _groups_deriving(self, txn: lmdb.Transaction[bytes], dirty: Dirty) -> None:
        """A group named like a derived name (`x.conflict-<site>-<ns>`: a user renamed an entry
        shown under one, and kept that name) takes it from group `x`'s loser, which must show
        the next derived name (`_group_names` skips names a group holds): group `x` is shown
        again too. Else the loser kept the name where it was shown first, the newcomer got a
        name derived from it, and the two sites, showing them in different orders, named them
        differently (random test seed 700001764). A base cut to fit 255 bytes: every group it
        begins."""
        for parent, name in list(dirty.groups):
            at = name.find(b".conflict-")
            while at > 0:
                base = name[:at]
                dirty.groups.add((parent, base))
                if len(name) == MAX_NAME_BYTES:
                    for key, _ in scan(txn, self.db["skids"], parent + base):
                        dirty.groups.add((parent, bytes(key[16:]).split(b"\0", 1)[0]))
                at = name.find(b".conflict-", at + 1)

    def _shown_reachably(self, txn: lmdb.Transaction[bytes], node: bytes) -> bool:
        shown = self._shown(txn, node)
        return shown is not None and self._reachable(txn, shown[0])

    def _group_names(self, txn: lmdb.Transaction[bytes], parent: bytes, name: bytes) -> dict[bytes, bytes]:
        """The names one group of a directory's children shows (tree.visible_names, for one name):
        the newest placement keeps the name, the others get names derived from their stamps."""
        prefix = parent + name + b"\0"
        members = []
        for key, _ in scan(txn, self.db["skids"], prefix):
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
            shown[node] = self._free_conflict_name(txn, parent, name, stamp,
                                                   lambda candidate: candidate in shown.values())
        return shown

    def _show_node(self, txn: lmdb.Transaction[bytes], node: bytes, parent_ino: int, name: bytes,
                   now_ns: int) -> None:
        obj = self._entry_object(txn, node)
        ino = self._ino(txn, obj)
        assert ino is not None, obj.hex()
        if self.ns.lookup(txn, parent_ino, name) is not None:
            # A local entry outside the tree holds the name (made before the link, in a volume...):
            # the tree's entry waits under its conflict name instead.
            name = self._waiting_name(txn, node, parent_ino, name)
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

    def _waiting_name(self, txn: lmdb.Transaction[bytes], node: bytes, parent_ino: int, name: bytes) -> bytes:
        """The name `node` waits under while a local entry outside the tree holds `name`: its
        conflict name, and from `UNSEEDED_NAMES_LEVEL` on the next one (as `_group_names` derives)
        while an entry or a group of the tree holds that (seed 4000321: the walk's seed of a file
        exchanged into such a name made it a group, and the entry waiting there next overwrote it)."""
        stamp = self.placement(txn, node).stamp  # type: ignore[union-attr]
        if not self.at_level(txn, levels.UNSEEDED_NAMES_LEVEL):
            return conflict_name(name, stamp)
        return self._free_conflict_name(txn, self.object_of(txn, parent_ino), name, stamp,
                                        lambda candidate: self.ns.lookup(txn, parent_ino, candidate) is not None)

    def _free_conflict_name(self, txn: lmdb.Transaction[bytes], parent: bytes | None, name: bytes, stamp: Stamp,
                            taken: Callable[[bytes], bool]) -> bytes:
        """The first of `name`'s conflict names for `stamp` (then `-2`, `-3`...) that no name group
        of the tree's directory `parent` holds and `taken` does not say is taken."""
        extra, candidate = 1, conflict_name(name, stamp)
        while taken(candidate) or (parent is not None and any(
                True for _ in scan(txn, self.db["skids"], parent + candidate + b"\0"))):
            extra += 1
            candidate = conflict_name(name, stamp, extra)
        return candidate

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
