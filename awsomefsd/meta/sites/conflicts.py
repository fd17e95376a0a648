"""Registers and their conflicts (design note 48), and the losing contents kept in /.conflicts.

Attributes, each extended attribute and file content are multi-value registers
(crdt/register.py) stored in `sregs`: a version taken in, local or the peer's, settles the
conflicts of the versions it saw and records one for each concurrent version that loses
(`sconflicts`). A losing content is kept as a file in /.conflicts, named after the object and the
loser's stamp, so both sites keep the same name and bytes; the copy goes when its conflict is
settled by the loser's own site or resolved. The peer shows only its newest content, so a version
of ours that it kept is learnt from the version after it (`_lost_on_the_peer`).

Apart because this is the one place a conflict record and a kept copy are opened, settled and
released: applying, capturing, forgetting and resolving all end up here.
"""

from __future__ import annotations

import json
import stat
from typing import Any

import lmdb

from awsomefsd.crdt.hlc import Stamp, happened_before
from awsomefsd.crdt.register import MultiValueRegister, Version
from awsomefsd.crdt.tree import conflict_name
from awsomefsd.meta import filemap
from awsomefsd.meta.records import CONFLICTS_INO, ROOT_INO, Extent, Inode, fmap_key
from awsomefsd.meta.sites.tables import (
    ATTRS,
    CONFLICTS_NAME,
    CONTENT,
    KEPT_COPY,
    PEER_LAST,
    SKIPPED,
    XATTR,
    scan,
)
from awsomefsd.meta.sites.tree import Dirty, SiteTree, TableTree

UNCHANGED = object()
"""A register's apply that did not change what shows."""


class SiteConflicts(SiteTree):
    """Register versions taken in, conflict records, and the copies kept of losers."""

    # -- registers ------------------------------------------------------------------------------
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
        """Take in a peer's version; returns (the value now shown, or UNCHANGED; conflicts made)."""
        shown, lost, _ = self._remote_versions(txn, obj, kind, version, self._versions(txn, obj + kind))
        return shown, lost

    def _remote_versions(self, txn: lmdb.Transaction[bytes], obj: bytes, kind: bytes, version: Version[Any],
                         before: list[Version[Any]]) -> tuple[Any, int, tuple[Version[Any], ...]]:
        """`_remote_version`, given the register's versions as they are (`before`: the caller read
        them already), returning its versions after too: a content's apply needs both, and each
        read of a register decodes its JSON."""
        key = obj + kind
        register = MultiValueRegister(tuple(before))
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
        return (winner.value if outcome.shown else UNCHANGED), len(outcome.lost), register.versions

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

    # -- conflict records -----------------------------------------------------------------------
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
        for index, _ in list(scan(txn, self.meta, prefix)):
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

    def _record(self, txn: lmdb.Transaction[bytes], key: bytes) -> dict[str, Any] | None:
        """The conflict record with `key`; a skipped move the log still holds is stored first."""
        if txn.get(key, db=self.db["sconflicts"]) is None and key.endswith(b"s") \
                and txn.get(SKIPPED + key[:-1], db=self.meta) is not None:
            entry = TableTree(self, txn, Dirty()).entry_at(Stamp.unpack(key[:-1]))
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

    # -- copies kept in /.conflicts -------------------------------------------------------------
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

    # -- what the peer kept ---------------------------------------------------------------------
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
