"""Conflicts as an operator sees them: listed (`site conflicts`, `site status`) and resolved.

A conflict is listed with an id that is the same on both sites, where its object is shown now
and what each version is now. A resolution closes the record here and, through a `Resolved`
operation, on the peer; keeping a losing move makes that move again, as a new move of this site
(the contents, attributes and xattrs an operator keeps are written back through the mount first,
by repl/resolve.py).

Apart because these are the only reads and the only command that answer an operator rather than
the other site.
"""

from __future__ import annotations

import errno
import hashlib
import json
from typing import Any

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.crdt.tree import ROOT, TRASH, Move, ReplicatedTree
from awsomefsd.meta import commands as c
from awsomefsd.meta import filemap
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Applied, u64
from awsomefsd.meta.sites.tables import ATTRS, SKIPPED, XATTR, scan
from awsomefsd.meta.sites.tree import Dirty, TableTree
from awsomefsd.meta.sites.view import SiteView


def conflict_id(key: bytes) -> str:
    """A conflict's short name for operators: the same on both sites (its key is)."""
    return hashlib.blake2b(key, digest_size=6).hexdigest()


class SiteResolve(SiteView):
    """Conflicts listed and resolved."""

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
        stored = [(bytes(key), json.loads(raw)) for key, raw in scan(txn, self.db["sconflicts"], b"")]
        keys = {key for key, _ in stored}
        tree = TableTree(self, txn, Dirty())
        for key, _ in scan(txn, self.meta, SKIPPED):
            entry = tree.entry_at(Stamp.unpack(bytes(key[len(SKIPPED):])))
            assert entry is not None and not entry.done, key.hex()
            record_key, record = self._skipped_record(txn, entry)
            if record_key not in keys:
                stored.append((record_key, record))
        return sorted(stored, key=lambda pair: pair[0])

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
        entry = TableTree(self, txn, Dirty()).entry_at(deletion)
        if entry is None or entry.before is None:
            return None
        return self._path_in(txn, entry.before.parent, entry.before.name)

    def _path_in(self, txn: lmdb.Transaction[bytes], parent: bytes, name: bytes) -> str | None:
        """The path of `name` in directory object `parent`, or None if that directory has no path."""
        where = "" if parent == ROOT else self.path_of(txn, parent)
        return None if where is None else f"{where}/{name.decode(errors='replace')}"

    # -- an operator's resolution ---------------------------------------------------------------
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
        dirty = Dirty()
        tree = ReplicatedTree(TableTree(self, txn, dirty), TableTree(self, txn, dirty))
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
