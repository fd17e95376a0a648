"""Relinking: linking the same site again after `site unlink` re-pairs the objects both sites
already share, instead of giving each a new id and showing it twice.

`site unlink` pauses the link rather than ending it (`keep_for_relink`): the object ids, the
replicated tree with its undo log, the registers, the clock, the cursors and the outbox stay;
nothing is captured any more, and the inodes the tree keeps after their last name went (and
those whose last name goes while unlinked) stay kept, as during a partition. Linking that same
site again, when it kept its side too (the pairing asks: repl/pairing.py), resumes: the cursors
continue, what was not shipped before the unlink ships first, and what changed here meanwhile is
captured (`relink`) as the local commands would have captured it, against what the tables say
the peer was last told. So a change made on either side while unlinked meets the other side's
as any concurrent change does: later stamp wins, the loser kept and listed; nothing unchanged
travels again, and nothing shows twice.

Apart because it is the one job that compares the namespace with the tables as a whole (every
other capture sees one command); it runs only inside `LinkSite` of a site kept for relinking.
"""

from __future__ import annotations

import hashlib
import stat
import struct

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.meta import filemap
from awsomefsd.meta.records import CONFLICTS_INO, ROOT_INO, SNAPSHOTS_INO, VOLUMES_INO, Inode, read_u64, u64
from awsomefsd.meta.sites.seeding import SiteSeeding
from awsomefsd.meta.sites.tables import KEPT_MAP, KEPT_PEER, XATTR, scan

Moves = list[tuple[bytes, int, bytes]]


class SiteRelink(SiteSeeding):
    """The link paused by `site unlink`, and resumed by linking the same site again."""

    def keep_paused_notes(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Was capture paused (bound.py, which keeps its notes for the relink)? Not here."""
        return False

    def keep_for_relink(self, txn: lmdb.Transaction[bytes], peer: bytes) -> None:
        """Unlink, keeping everything a relink to `peer` needs: only the link itself (the peer's
        address and CA) goes. Each object's attributes and content are noted (`_as_kept`), to
        tell on relinking what changed meanwhile."""
        txn.delete(b"peer", db=self.meta)
        txn.delete(b"link", db=self.meta)
        txn.put(KEPT_PEER, peer, db=self.meta)
        if self.keep_paused_notes(txn):  # capture was paused: the notes say what the peer was told
            return
        for key, value in scan(txn, self.db["sinos"], b""):
            inode = self.ns.get_inode(txn, read_u64(bytes(key)))
            if inode is not None:
                txn.put(KEPT_MAP + bytes(value), self._as_kept(txn, inode), db=self.meta)

    def relink(self, txn: lmdb.Transaction[bytes], now_ns: int) -> None:
        """Capture what changed here since the unlink (`LinkSite` to the kept peer, the link
        record written). First the registers of the objects kept (attributes, extended
        attributes, contents that changed), each stamped at its inode's ctime when the clock
        allows, in that order: the later change wins a conflict, as it would have linked, not
        the site that happened to link second. Then the names, stamped now: what the tables
        show where the namespace has something else moves, or goes. The names it shows again are
        told as a capture's are (`local_side_effects`): the kernel may cache the ones they replace."""
        txn.delete(KEPT_PEER, db=self.meta)
        self._entries, self._inodes = [], []
        changed = []
        for _, obj in list(scan(txn, self.db["sinos"], b"")):
            obj = bytes(obj)
            ino = self._ino(txn, obj)
            inode = None if ino is None else self.ns.get_inode(txn, ino)
            noted = txn.get(KEPT_MAP + obj, db=self.meta)
            if inode is not None and noted is not None:
                changed.append((inode.ctime_ns, obj, inode, bytes(noted)))
        for ctime_ns, obj, inode, noted in sorted(changed, key=lambda each: each[:2]):
            self._relink_registers(txn, obj, inode, noted, ctime_ns)
        for key, _ in list(scan(txn, self.meta, KEPT_MAP)):
            txn.delete(key, db=self.meta)
        left = self._left_entries(txn)
        moves: Moves = []
        self._relink_below(txn, ROOT_INO, left, moves, now_ns)
        for number, record in self._sm.volumes.all(txn):
            if record["kind"] != "volume":
                continue
            if self.object_of(txn, record["root"]) is None:  # made while unlinked: new to the peer
                self._capture_volume(txn, number, record, now_ns)
            else:
                self._relink_below(txn, record["root"], left, moves, now_ns)
        for nodes in left.values():  # what is shown nowhere now: deleted meanwhile
            for node in nodes:
                placed = self.placement(txn, node)
                moves.append((node, 0, b"" if placed is None else placed.name))
        if moves:  # one batch: no name group is shown again half way (`_local_moves`)
            self._local_moves(txn, moves, now_ns)
        self._tell_side_effects()

    def _left_entries(self, txn: lmdb.Transaction[bytes]) -> dict[bytes, list[bytes]]:
        """The entries the tables show where the namespace no longer has their object (renamed,
        deleted, or the object gone), by object: no longer shown, in the tables only (the
        namespace changed already). The others are where they were."""
        left: dict[bytes, list[bytes]] = {}
        for key, raw in list(scan(txn, self.db["sentries"], b"")):
            raw = bytes(raw)
            parent_ino = read_u64(raw, 16)
            if parent_ino == 0:
                continue
            obj = raw[:16]
            ino = self._ino(txn, obj)
            if ino is not None and self.ns.lookup(txn, parent_ino, raw[24:]) == ino:
                continue
            node = bytes(key)
            left.setdefault(obj, []).append(node)
            self._unshow_node(txn, node)
        return left

    def _relink_below(self, txn: lmdb.Transaction[bytes], directory: int, left: dict[bytes, list[bytes]],
                      moves: Moves, now_ns: int) -> None:
        """Walk a directory of the replicated tree: an entry shown where it was stays; an object
        new since the unlink is captured as the initial sync captures one (at once, so that what
        moves into it finds it); a kept object under a new name takes one of its entries that
        left (a rename), or a new one (a hard link), in `moves`."""
        volume = self.ns.require_inode(txn, directory).volume
        for name, child in list(self.ns.names(txn, directory)):
            if child in (VOLUMES_INO, SNAPSHOTS_INO, CONFLICTS_INO):
                continue
            inode = self.ns.require_inode(txn, child)
            if inode.volume != volume:
                continue
            if self._node_shown_at(txn, directory, name) is None:
                obj = self.object_of(txn, child)
                if obj is None:
                    self._seed_entry(txn, directory, name, inode, now_ns, below=False)
                else:
                    moves.append((self._entry_to_move(txn, obj, inode, left), directory, name))
            if inode.is_dir:
                self._relink_below(txn, child, left, moves, now_ns)

    def _entry_to_move(self, txn: lmdb.Transaction[bytes], obj: bytes, inode: Inode,
                       left: dict[bytes, list[bytes]]) -> bytes:
        spare = left.get(obj, [])
        if inode.is_dir:  # a directory's one entry is its object
            if obj in spare:
                spare.remove(obj)
            return obj
        if spare:
            return spare.pop()
        node = self._new_entry(txn)
        self._put_entry(txn, node, obj, 0, b"")
        return node

    def _relink_registers(self, txn: lmdb.Transaction[bytes], obj: bytes, inode: Inode, noted: bytes,
                          now_ns: int) -> None:
        """A new version of each register of `obj` that changed since the unlink (`noted` then,
        `_as_kept`): the content if its sum changed, the attributes if the mode, the owner, atime
        or (content unchanged) mtime did; and each extended attribute whose register's winner is
        not what the inode holds (set, changed or removed)."""
        now = self._as_kept(txn, inode)
        content_changed = now[_ATTRS.size:] != noted[_ATTRS.size:]
        if content_changed:
            self._capture_content(txn, inode, now_ns)
        mode, uid, gid, atime, mtime = _ATTRS.unpack_from(noted)
        if (mode, uid, gid, atime) != (stat.S_IMODE(inode.mode), inode.uid, inode.gid, inode.atime_ns) \
                or (not inode.is_dir and not content_changed and mtime != inode.mtime_ns):
            self._capture_attrs(txn, inode, now_ns)
        prefix = obj + XATTR
        registered = {bytes(key)[len(prefix):]: self._decode_versions(bytes(raw))
                      for key, raw in scan(txn, self.db["sregs"], prefix)}
        held = {bytes(key)[8:]: bytes(value) for key, value in self.ns.xattrs(txn, inode.ino)}
        for name in sorted(set(registered) | set(held)):
            versions = registered.get(name)
            was = None if not versions or versions[0].value is None else bytes.fromhex(versions[0].value)
            value = held.get(name)
            if value != was:
                stamp = self._tick(txn, now_ns)
                self._local_version(txn, obj, XATTR + name, stamp, None if value is None else value.hex())
                self._ship(txn, o.XattrSet(stamp, obj, name, value, self._seen(txn)))

    def _as_kept(self, txn: lmdb.Transaction[bytes], inode: Inode) -> bytes:
        """What a relink compares: the mode bits, owner, atime and mtime; for a file, a sum of its
        content: its size and each written block's checksum (how its extents are cut up, or
        where its blocks lie, does not matter: compaction moves them; mtime alone can be set
        back, by `cp -p` over the file say)."""
        head = _ATTRS.pack(stat.S_IMODE(inode.mode), inode.uid, inode.gid, inode.atime_ns, inode.mtime_ns)
        if not inode.is_reg:
            return head
        digest = hashlib.blake2b(u64(inode.size), digest_size=16)
        for ext in filemap.all_extents(txn, self._sm.db["fmap"], inode.ino):
            if not ext.unwritten:
                for i in range(ext.count):
                    digest.update(u64(ext.file_block + i) + ext.checksums[4 * i:4 * i + 4])
        return head + digest.digest()


_ATTRS = struct.Struct(">IIIqq")
KEPT_HEAD = _ATTRS.size
"""A note's attributes; what follows is a regular file's content sum (`_as_kept`)."""
