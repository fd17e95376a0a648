"""Apply: the peer's operations, in its stamp order, all or none per batch.

Moves go through the replicated tree (undone and redone when one arrives older than moves applied
here) and the entries are then made to match (view.py); attributes, extended attributes and
content are register versions (conflicts.py). A content version's bytes travel beside the
operation and are on this site's device before the `ApplyRemote` that maps them: fresh blocks, or
blocks the file shares with the version it has (delta transfer, design note 50). A batch is
checked before anything is written; what only applying can tell refuses it whole.

Apart because this is the one entry point for what another site did (`ApplyRemote`,
`ApplyRemoteSharing`), and every check of what crosses from there is here.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import stat
import time
from dataclasses import dataclass

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.crdt.register import Version
from awsomefsd.crdt.tree import ROOT, TRASH, VOLUMES, LogEntry, Move, Placement, ReplicatedTree
from awsomefsd.meta import commands as c
from awsomefsd.meta import filemap, levels
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import MAX_FILE_SIZE_BYTES, Applied, Extent, Inode, blocks_for, u64
from awsomefsd.meta.sites.conflicts import UNCHANGED
from awsomefsd.meta.sites.tables import ATTRS, CAPTURE_PAUSED, CONTENT, REVIVED, XATTR, scan, scan_from
from awsomefsd.meta.sites.tree import Dirty, TableTree
from awsomefsd.meta.sites.view import SiteView


class SiteApply(SiteView):
    """The peer's batches applied."""

    clock_later: bool = False
    """While a batch applies with capture not paused: the clock and `seen` are moved once, to
    its last operation, at its end (`_apply_remote`), not at each operation."""

    def apply_remote(self, txn: lmdb.Transaction[bytes], cmd: c.ApplyRemote | c.ApplyRemoteSharing) -> Applied:
        """Apply a batch of the peer's operations, all or none (`_all_or_none`): an operation can
        be refused after others wrote (the batch is checked first, but state that breaks an
        invariant shows only when it is met)."""
        began = time.perf_counter()
        self.reordering = index = self.resume_index(txn)
        try:
            applied = self._all_or_none(txn, lambda nested: self._apply_remote(nested, cmd))
            self.keep_index(txn, index)
            return dataclasses.replace(applied, apply_s=time.perf_counter() - began)
        finally:
            self.reordering = None  # of this transaction only
            self.clock_later = False

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
            batch = [o.decode_remembered(raw) for raw in cmd.operations]
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
        # Observing each stamp in turn leaves the clock at the last one's (the batch's stamps
        # rise); only capture reads the clock and `seen`, and within a batch capture runs only
        # while it is paused (meta/sites/bound.py: a local change met, or the pause ended). Not
        # paused now, not paused before the end: both are written once, after the batch.
        self.clock_later = self.observes_once(txn)
        conflicts = 0
        for op in batch:
            try:
                conflicts += self._apply_one(txn, op, extents_of, cmd.now_ns)
            except FsError as exc:
                raise FsError(exc.errno, f"{exc} (applying {op})") from exc
        if self.clock_later and batch:
            self._observe(txn, batch[-1].stamp)
            txn.put(b"seen", batch[-1].stamp.pack(), db=self.meta)
        return Applied(conflicts, tuple(self._entries), tuple(self._inodes))

    def observes_once(self, txn: lmdb.Transaction[bytes]) -> bool:
        """May a batch move the clock and `seen` once, at its end (capture is not paused)?"""
        return txn.get(CAPTURE_PAUSED, db=self.meta) is None

    def _apply_one(self, txn: lmdb.Transaction[bytes], op: o.Operation, extents_of: dict[Stamp, _ContentBlocks],
                   now_ns: int) -> int:
        conflicts = 0
        if not self.clock_later:
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
        if not self.clock_later:
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
        if txn.get(op.object, db=self.db["sids"]) is not None:  # held here: the peer sent it again, a
            if self.at_level(txn, levels.UNSEEDED_NAMES_LEVEL):  # name of it follows (`REVIVED`)
                txn.put(REVIVED + op.object, b"", db=self.meta)
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
        txn.delete(REVIVED + op.object, db=self.meta)  # the name it was sent again for (if it was)
        if op.parent not in (ROOT, TRASH) and self.placement(txn, op.parent) is None \
                and txn.get(op.parent, db=self.db["sids"]) is None:
            raise FsError(errno.EINVAL, f"a move into unknown directory {op.parent.hex()}")
        volume_root = self._volume_root(txn, op.object)
        if (op.parent == VOLUMES) != (volume_root is not None and op.parent != TRASH):
            raise FsError(errno.EINVAL, f"entry {op.node.hex()}: only a volume's root goes into the volumes' "
                                        "container, and it goes nowhere else but the trash")
        unseen = txn.get(op.node, db=self.db["sentries"]) is None
        if unseen:
            self._put_entry(txn, op.node, op.object, 0, b"")
        dirty = Dirty()
        tables = TableTree(self, txn, dirty)
        move = Move(op.stamp, op.node, op.parent, op.name, op.seen)
        if unseen and self.first_placement(txn, tables, move):
            found = []
        else:
            # causal: the peer's moves come in its order, over the one link (crdt/tree.py, `causal`)
            tree = ReplicatedTree(tables, tables, causal=True)
            # Two deletes of one entry wanted the same: no conflict to list.
            found = [conflict for conflict in tree.apply(move)
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

    def first_placement(self, txn: lmdb.Transaction[bytes], tables: TableTree, move: Move) -> bool:
        """The short path of most of a catch-up's moves: the first placement of an entry this site
        never saw, applied as `ReplicatedTree.apply` would apply it, when that is only placing it;
        False (nothing done) otherwise. That is so when the node has no placement, no move, and
        nothing placed under it (it is no one's ancestor, so the move makes no cycle and no
        conflict: a conflict is a concurrent move of the same node), and the log holds nothing
        at or after the move's stamp (nothing to undo and redo, no resend): the tree would then
        log it as done, with nothing before it, and add it to the node's moves. Here that costs
        three reads instead of the walks up from the parent that `apply` makes twice (its
        premise check and its cycle check) and its reads of the log. The differential test
        (tests/repl/test_apply_short_path.py) holds both paths to the same tables."""
        db = self.db
        if move.node == move.parent or tables.placement(move.node) is not None \
                or any(True for _ in scan(txn, db["skids"], move.node)) \
                or any(True for _ in scan(txn, db["smoves"], move.node)) \
                or any(True for _ in scan_from(txn, db["slog"], move.stamp.pack())):
            return False
        tables.place(move.node, Placement(move.parent, move.name, move.stamp))
        tables.insert(LogEntry(move, None, done=True))
        tables.add_move_of(move)
        return True

    def _apply_attrs(self, txn: lmdb.Transaction[bytes], op: o.AttrsSet) -> int:
        value = [op.mode, op.uid, op.gid, op.atime_ns, op.mtime_ns]
        shown, lost = self._remote_version(txn, op.object, ATTRS, Version(op.stamp, value, op.seen))
        if shown is not UNCHANGED:
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
        if shown is not UNCHANGED and ino is not None:
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
        shown, lost, now = self._remote_versions(txn, op.object, CONTENT, Version(op.stamp, value, op.seen), previous)
        lost_stamps = {v.stamp for v in now[1:]} - {v.stamp for v in previous[1:]}
        fmap = self._sm.db["fmap"]
        if shown is not UNCHANGED:
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
