"""Edit against delete (design note 48's rule, made concrete in note 49): when every name of a file
was deleted by moves that did not mean to discard its content, the edit wins, whatever the
stamps: the content is kept in /.conflicts and listed, and the delete stands.

The verdict is a function of the tree and the register, not of the order things arrived in, so
both sites keep the same copies: it is judged again after anything that changes either (a local
or remote move, a content version, a directory shown again or taken away), and a copy goes when
the file has a name again or a newer content that saw every delete wins.

Apart because it reads both the tree's history (the moves on a lost path, those kept past
`forget`) and the registers, and every job that moves entries or takes in content asks it.
"""

from __future__ import annotations

import json
from typing import Any

import lmdb

from awsomefsd.crdt.hlc import PACKED_BYTES, Stamp, happened_before
from awsomefsd.crdt.register import Version
from awsomefsd.crdt.tree import Move
from awsomefsd.meta import filemap
from awsomefsd.meta.sites.conflicts import SiteConflicts
from awsomefsd.meta.sites.tables import CONTENT, DELETED, EDIT_DELETE, scan
from awsomefsd.meta.sites.tree import Dirty, TableTree, unpack_move


class EditAgainstDelete(SiteConflicts):
    """The edit-against-delete rule, judged per object."""

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
        versions = self._versions(txn, obj + CONTENT)
        index = EDIT_DELETE + obj  # the open record of this object, if any (no scan per command)
        raw_key = txn.get(index, db=self.meta)
        if not versions and raw_key is None:
            return 0  # no content to keep, no record to close: the paths cannot change the verdict
        found = self._lost_paths(txn, inode.ino)
        paths, forgotten = ([], False) if found is None else found
        wanted = None
        # The moves the writer had not seen that took a path away: the newest stands for them.
        unaware = sorted(move.stamp for path in paths if versions and self._taken_unknowingly(versions[0], path)
                         for move in path if not happened_before(move.stamp, versions[0].stamp, versions[0].seen))
        if unaware:
            wanted = versions[0]
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
        return TableTree(self, txn, Dirty()).entry_at(winner) is not None \
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

    def _lost_paths(self, txn: lmdb.Transaction[bytes], ino: int) -> tuple[list[list[Move]], bool] | None:
        """How an inode none of whose names is reachable from the root lost each of them: per
        entry, the moves on its path up to the move into TRASH (its own placement, its
        directories', and that move; `_path_to_trash`), those the log still holds or `forget`
        kept (`PATH_MOVE`), and whether it has forgotten some (they are left out: every
        operation since saw them). None while a
        name is reachable (or it never had one). A deleted entry whose move the log forgot but
        the object kept (`deleted:` rows) counts as a path of that move alone."""
        if self._first_reachable(txn, ino) is not None:
            return None
        obj = self.object_of(txn, ino) or b"\xff" * 17
        tree = TableTree(self, txn, Dirty())
        kept = self._kept_deletes(txn, obj)
        paths: list[list[Move]] = []
        forgotten = False
        for key, _ in scan(txn, self.db["sobjents"], obj):
            path = []
            for step in self._path_to_trash(txn, bytes(key[16:])):
                moves = None
                if step is not None:
                    node, stamp = step
                    entry = tree.entry_at(stamp)
                    moves = [entry.move] if entry is not None else kept.pop(stamp, None)
                    if moves is None and (move := self._path_move(txn, tree, node, stamp)) is not None:
                        moves = [move]
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
        for key, raw in scan(txn, self.meta, DELETED + obj):
            moves, at, raw = [], 0, bytes(raw)
            while at < len(raw):
                move, at = unpack_move(raw, at)
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
