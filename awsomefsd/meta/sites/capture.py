"""Capture: a local command, applied, turned into operations for the peer.

After a namespace or attribute command applied, while the site is linked, what it did is
written to the outbox in site-independent terms (crdt/ops.py): objects named by global ids,
directory entries as nodes of the replicated tree, each operation stamped by the site's hybrid
logical clock; the same changes go into the site's own tree and registers, so that the peer's
concurrent operations meet them. Deleting is a move to the tree's TRASH. Linking captures what
exists already, from the root down, as creates (the initial sync), volumes included.

A create, an attribute change, an extended attribute or a content write (`DEFERRED`) is not
captured in its command: its facts are recorded (pending.py) and folded in later, in a batch
(`fold`): by `FoldCapture`, which the node running the link proposes, and first thing in every
other command but those that read no site table (`UNFOLDED`). So every stamp, every `seen` and
every register is what capture at once would have made: nothing that reads or changes the site
tables runs between a command and its fold. A deferred command whose capture would change a
directory entry or settle a conflict (a register with a loser, a copy kept, an edit against a
delete) is captured at once, after a fold.

Apart because it runs inside every local command that changes the replicated namespace
(`REPLICATED`), and only there.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.crdt.tree import TRASH, VOLUMES, Move, ReplicatedTree
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.records import (
    CONFLICTS_INO,
    SNAPSHOTS_INO,
    VOLUMES_INO,
    Applied,
    Inode,
    read_u64,
    u64,
    volume_dir_name,
)
from awsomefsd.meta.sites import pending as p
from awsomefsd.meta.sites.tables import (
    ATTRS,
    CAPTURE_PAUSED,
    CONTENT,
    EDIT_DELETE,
    KEPT_COPY,
    XATTR,
    Held,
    scan,
)
from awsomefsd.meta.sites.tree import Dirty, TableTree
from awsomefsd.meta.sites.view import SiteView

REPLICATED = (c.Mknod, c.Link, c.Unlink, c.Rename, c.SetAttr, c.SetXattr, c.RemoveXattr,
              c.WriteData, c.PunchHole, c.CloneRange, c.CreateVolume, c.ResizeVolume, c.LinkTmpfile)
"""The commands whose effect ships (Preallocate does not: it changes no byte a reader sees;
DeleteVolume is captured in place of its teardown: `delete_volume`)."""
DEFERRED = (c.Mknod, c.SetAttr, c.SetXattr, c.RemoveXattr, c.WriteData, c.PunchHole, c.CloneRange)
"""The commands whose capture waits for a fold (pending.py): none changes a directory entry of
the tree but a create, whose capture shows nothing (the command made the entry)."""
UNFOLDED = (*DEFERRED, c.FoldCapture, c.ReserveInodes, c.Preallocate, c.ReclaimFrees, c.Fenced, c.Batch,
            cc.RenewLease, cc.AcquireWriteLease, cc.ReleaseWriteLease)
"""The commands the state machine applies without folding first: the deferred ones, FoldCapture
(which folds as many as it says), those that read no site table, and the containers (each command
they carry decides for itself). Every other command folds first, whatever it is: a new command
is safe without a thought."""

CONTENT_TIME_WINDOW_NS = 60 * 10**9
"""How long before its commit a write's time may be (`SiteCapture.content_time`): the longest a
write waits in the buffer ([data] flush_interval_ms at most 60 s), or a closed file for its batch."""


@dataclass(slots=True)
class Deferring:
    """What `record` reads of the site tables for a deferred command, kept while the deferred
    commands of one transaction apply (a group commit's batch holds thousands): whether capture
    runs (linked, not paused), whether it waits for a fold (`FOLD_LEVEL`), and the next pending
    row's number. Only a command that is not `UNFOLDED` can change the first two (a link, an
    unlink, a pause, the peer's batch, a new log level), and each drops this first
    (`before_command`); a fold changes the third. A transaction aborted is not this one any more, and
    `StateMachine.load` drops it too."""

    txn: object
    capturing: bool
    later: bool
    next_pending: int | None = None


class SiteCapture(SiteView):
    """Local commands recorded in the tree, the registers and the outbox."""

    _deferring: Deferring | None = None

    def record(self, txn: lmdb.Transaction[bytes], cmd: object, result: Any) -> None:
        """Capture what `cmd` (applied, with `result`) did, if the site is linked and capture is
        not paused (bound.py): its facts kept for a fold later when it is `DEFERRED` and may wait,
        else now."""
        if isinstance(cmd, DEFERRED):
            deferring = self._deferring
            if deferring is None or deferring.txn is not txn:
                capturing = self._capturing(txn)  # (the level is read only where it matters)
                deferring = self._deferring = Deferring(txn, capturing, capturing and self.folds_later(txn))
            if not deferring.capturing:
                return
            if deferring.later:
                if type(cmd) is c.Mknod or type(cmd) is c.MknodFor:  # the commonest, and one row whatever it made
                    target = cmd.target  # a symlink's (any other type's is its size only)
                    if target and not stat.S_ISLNK(result.mode):
                        target = b""
                    self._keep_pending(txn, deferring, p.pack_new(cmd.parent, result, cmd.name, target, cmd.now_ns))
                    return
                facts = self._facts(txn, cmd, result)
                if facts is not None:
                    for fact in facts:
                        self._keep_pending(txn, deferring, fact)
                    return
                self.fold(txn)  # what the command changed the state machine did not fold before it
        elif not self._capturing(txn):
            return
        self._entries, self._inodes = [], []
        self._capture(txn, cmd, result)
        self._tell_side_effects()

    def _capturing(self, txn: lmdb.Transaction[bytes]) -> bool:
        return self.peer(txn) is not None and txn.get(CAPTURE_PAUSED, db=self.meta) is None

    def before_command(self, txn: lmdb.Transaction[bytes]) -> None:
        """Before a command that is not `UNFOLDED` (it may read the site tables, or change the
        link, the pause or the log level): what waits is folded, and what `record` kept of the
        tables (`Deferring`) is read again by the next deferred command."""
        self._deferring = None
        self.fold(txn)

    def forget_deferring(self) -> None:
        """The state machine's mirrors are rebuilt (a transaction aborted): read the tables again."""
        self._deferring = None

    def _tell_side_effects(self) -> None:
        if self._entries and self.local_side_effects is not None:
            self.local_side_effects(Applied(0, tuple(self._entries), tuple(self._inodes)))

    # -- captured later (pending.py) ----------------------------------------------------------
    def folds_later(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Does this site record deferred captures for a fold (`levels.FOLD_LEVEL`)? On a cluster only
        once every member's build does: a member on an older build captures at once and cannot
        decode FoldCapture."""
        return self.at_level(txn, levels.FOLD_LEVEL)

    def fold(self, txn: lmdb.Transaction[bytes], limit: int | None = None) -> int:
        """Capture what the pending records say, oldest first (at most `limit`); returns how many."""
        rows = []
        for key, value in scan(txn, self.meta, p.PENDING):
            rows.append((bytes(key), bytes(value)))
            if limit is not None and len(rows) >= limit:
                break
        if not rows:
            return 0
        if self._deferring is not None:
            self._deferring.next_pending = None  # numbering starts again at 0 once none waits
        with self._holding(txn):
            for key, value in rows:
                txn.delete(key, db=self.meta)
                self._entries, self._inodes = [], []
                self._fold_one(txn, p.unpack(value))
                self._tell_side_effects()
        return len(rows)

    @contextmanager
    def _holding(self, txn: lmdb.Transaction[bytes]) -> Iterator[None]:
        """While many captures run in one command (a fold, a slice of the initial sync's walk): the
        clock, `seen`, the head and the next entry number kept in memory (`Held`), written once at
        the end."""
        raw = txn.get(b"clock", db=self.meta)
        clock = None if raw is None else Stamp.unpack(bytes(raw))
        held = self._held = Held(clock, self._seen_stamp(txn))
        try:
            yield
        finally:
            self._held = None
            if held.clock != clock and held.clock is not None:
                txn.put(b"clock", held.clock.pack(), db=self.meta)
            if held.head is not None:
                txn.put(b"head", held.head.pack(), db=self.meta)
            if held.next_entry is not None:
                txn.put(b"next_entry", u64(held.next_entry), db=self.meta)

    def _keep_pending(self, txn: lmdb.Transaction[bytes], deferring: Deferring, fact: bytes) -> None:
        """The row goes after the last one waiting (numbered from 0 when none waits: every replica
        numbers alike, whatever it kept in memory)."""
        number = deferring.next_pending
        if number is None:
            number = 0
            cursor = txn.cursor(db=self.meta)
            if cursor.last():
                last = bytes(cursor.key())
                if last.startswith(p.PENDING):
                    number = read_u64(last, len(p.PENDING)) + 1
        txn.put(p.PENDING + u64(number), fact, db=self.meta)
        deferring.next_pending = number + 1

    def _facts(self, txn: lmdb.Transaction[bytes], cmd: object, result: Any) -> list[bytes] | None:
        """What a deferred command's capture will need (packed `Facts`), or None when it must be
        captured now: its capture would settle a conflict (a register holding a loser, a copy
        kept) or judge an edit against a delete, which change what /.conflicts shows. The rows
        that decide that change only in commands that fold first: what is true now is true at
        the fold."""
        if isinstance(cmd, (c.SetXattr, c.RemoveXattr)):
            if not self._waits(txn, cmd.ino, XATTR + cmd.name):
                return None
            return [p.pack_xattr(cmd.ino, cmd.name, cmd.value if isinstance(cmd, c.SetXattr) else None, cmd.now_ns)]
        facts = []
        inode: Inode
        written_ns = 0  # a WriteData's: when its writes were made
        if isinstance(cmd, c.SetAttr):
            inode = result
            if any(v is not None for v in (cmd.mode, cmd.uid, cmd.gid, cmd.atime_ns, cmd.mtime_ns)):
                if not self._waits(txn, inode.ino, ATTRS):
                    return None
                facts.append(p.pack_attrs(inode, cmd.now_ns))
            if cmd.size is None:
                return facts
        elif isinstance(cmd, c.WriteData):
            if not self._changes_content(txn, cmd):
                return facts
            inode, written_ns = result, self.content_time(txn, cmd)
        elif isinstance(cmd, c.PunchHole):
            inode = result
        else:
            assert isinstance(cmd, c.CloneRange), cmd
            inode = self.ns.require_inode(txn, cmd.dst_ino)
        if not self._waits(txn, inode.ino, CONTENT):
            return None
        facts.append(p.pack_content(inode, written_ns or cmd.now_ns))
        return facts

    def _changes_content(self, txn: lmdb.Transaction[bytes], cmd: c.WriteData) -> bool:
        """Is `cmd` a change of content to capture? Every replica must answer alike: below
        WRITEBACK_CONTENT_LEVEL only a write that touches the times was one."""
        return cmd.touch or (cmd.changes_content and self.at_level(txn, levels.WRITEBACK_CONTENT_LEVEL))

    def content_time(self, txn: lmdb.Transaction[bytes], cmd: c.WriteData) -> int:
        """The time that stamps the content `cmd` changed (what last-writer-wins between sites
        judges): from CONTENT_TIME_LEVEL on, when its writes were made (`mtime_ns`), not when it
        commits; a close may be answered before its data is written (fs/batch.py). A time after
        the commit's, or more than CONTENT_TIME_WINDOW_NS before it, is no write's: one the
        application set (tar's, cp -p's, carried by a flush as the file's mtime); the commit's
        stands for it, as before the level."""
        written = cmd.mtime_ns
        if (written and cmd.now_ns - CONTENT_TIME_WINDOW_NS <= written <= cmd.now_ns
                and self.at_level(txn, levels.CONTENT_TIME_LEVEL)):
            return written
        return cmd.now_ns

    def _waits(self, txn: lmdb.Transaction[bytes], ino: int, kind: bytes) -> bool:
        """May a local version of register `kind` of `ino` wait for a fold? Yes unless applying it
        would do more than replace the register's one version (`_local_version`)."""
        obj = self.object_of(txn, ino)
        if obj is None:  # not replicated, or created by a record not folded yet: no register
            return True
        raw = txn.get(obj + kind, db=self.db["sregs"])
        if raw is not None and len(self._decode_versions(bytes(raw))) > 1:
            return False
        if kind == CONTENT:
            if txn.get(EDIT_DELETE + obj, db=self.meta) is not None:
                return False
            if any(True for _ in scan(txn, self.meta, KEPT_COPY + obj)):
                return False
        return True

    def _fold_one(self, txn: lmdb.Transaction[bytes], f: p.Facts) -> None:
        if f.kind == p.NEW:
            if self._replicated_dir(txn, f.parent):
                inode = Inode(f.ino, f.mode, f.uid, f.gid, 1, 0, f.mtime_ns, f.mtime_ns, f.mtime_ns, rdev=f.rdev)
                self._capture_new(txn, f.parent, f.name, inode, f.now_ns, target=f.value or b"")
        elif f.kind == p.ATTRS:
            self._capture_attrs(txn, Inode(f.ino, f.mode, f.uid, f.gid, 1, 0, f.atime_ns, f.mtime_ns, 0), f.now_ns)
        elif f.kind == p.CONTENT:
            self._capture_content(txn, Inode(f.ino, f.mode, f.uid, f.gid, 1, f.size, 0, f.mtime_ns, 0), f.now_ns)
        else:
            self._capture_xattr(txn, f.ino, f.name, f.value, f.now_ns)

    def _capture(self, txn: lmdb.Transaction[bytes], cmd: object, result: Any) -> None:
        if isinstance(cmd, c.Mknod):
            if self._replicated_dir(txn, cmd.parent):
                self._capture_new(txn, cmd.parent, cmd.name, result, cmd.now_ns)
        elif isinstance(cmd, c.Link):
            if self._replicated_dir(txn, cmd.new_parent):
                linked = self.ns.require_inode(txn, cmd.ino)
                obj = self.object_of(txn, cmd.ino)
                if obj is not None and not self._gone_for_peer(txn, linked, obj):
                    self._local_move(txn, self._new_entry(txn), cmd.new_parent, cmd.new_name, obj, cmd.now_ns)
                elif self.at_level(txn, levels.SEED_LEVEL):  # its other names not reached by the walk yet
                    self._seed_entry(txn, cmd.new_parent, cmd.new_name, linked, cmd.now_ns)
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
            self._capture_xattr(txn, cmd.ino, cmd.name, cmd.value if isinstance(cmd, c.SetXattr) else None, cmd.now_ns)
        elif isinstance(cmd, c.WriteData):
            if self._changes_content(txn, cmd):  # a compaction moves bytes, it changes none
                self._capture_content(txn, result, self.content_time(txn, cmd))
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

    def _capture_new(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes,
                     inode: Inode, now_ns: int, target: bytes | None = None) -> None:
        """`target`: a symlink's (read from the namespace when None)."""
        obj = self._fresh_object_id(txn, inode.ino)
        self._set_ids(txn, inode.ino, obj)
        stamp = self._tick(txn, now_ns)
        if target is None:
            target = self.ns.symlink_target(txn, inode.ino) if stat.S_ISLNK(inode.mode) else b""
        self._ship(txn, o.Created(stamp, obj, inode.mode, inode.uid, inode.gid, inode.rdev, target,
                                  inode.mtime_ns, self._seen(txn)))
        if inode.is_dir:
            node = obj
            fresh = (txn.get(node, db=self.db["sentries"]) is None and self.placement(txn, node) is None
                     and not any(True for _ in scan(txn, self.db["skids"], node)))
        else:
            node, fresh = self._new_entry(txn), True  # an entry node is minted once: no row names it yet
        if fresh and parent != VOLUMES_INO:
            self._place_new(txn, node, parent, name, obj, now_ns)
        else:
            self._local_move(txn, node, parent, name, obj, now_ns)

    def _place_new(self, txn: lmdb.Transaction[bytes], node: bytes, parent_ino: int, name: bytes, obj: bytes,
                   now_ns: int) -> None:
        """`_local_move` of a node that no row names and under which nothing is placed (a create's):
        its rows, each written once, none read. For such a node `_local_move` finds it shown
        nowhere, the tree places it (`TableTree.place_new`), and, the newest of its group, it shows
        under the name the command gave it: no group is shown again. tests/repl/test_sites_fold.py
        compares the tables both ways."""
        parent = self.object_of(txn, parent_ino)
        assert parent is not None, parent_ino
        stamp = self._tick(txn, now_ns)
        seen = self._seen(txn)
        TableTree(self, txn, Dirty()).place_new(Move(stamp, node, parent, name, seen))
        self._ship(txn, o.Moved(stamp, node, parent, name, obj, seen))
        self._put_entry(txn, node, obj, parent_ino, name)
        txn.put(u64(parent_ino) + name, node, db=self.db["snames"])

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

    def _capture_xattr(self, txn: lmdb.Transaction[bytes], ino: int, name: bytes, value: bytes | None,
                       now_ns: int) -> None:
        obj = self.object_of(txn, ino)
        if obj is not None:
            stamp = self._tick(txn, now_ns)
            self._local_version(txn, obj, XATTR + name, stamp, None if value is None else value.hex())
            self._ship(txn, o.XattrSet(stamp, obj, name, value, self._seen(txn)))

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

    # -- volumes (design note 52) ----------------------------------------------------------------
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
        self._seed_below(txn, root, obj, now_ns)

    def delete_volume(self, txn: lmdb.Transaction[bytes], cmd: c.DeleteVolume) -> bool:
        """DeleteVolume of a volume that ships: its root leaves /.volumes as an rmdir would, and
        its entry moves into TRASH; its tree stays, kept as any deleted directory is until both
        sites forget the delete, so that what the other site wrote there meanwhile, not knowing,
        is judged by the edit-against-delete rule and kept in /.conflicts. False: the volume does
        not ship, and the caller tears it down at once."""
        record = self._sm.volumes.get(txn, cmd.volume)
        if (self.peer(txn) is None and self.kept_peer(txn) is None) or record is None or record["kind"] != "volume":
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

    # -- what exists already (the initial sync) -----------------------------------------------
    def _seed_below(self, txn: lmdb.Transaction[bytes], ino: int, node: bytes, now_ns: int) -> None:
        """What is below a directory new to the peer: captured here (seeding.py queues it instead
        from `levels.SEED_LEVEL` on)."""
        self._seed(txn, ino, node, now_ns)

    def _gone_for_peer(self, txn: lmdb.Transaction[bytes], inode: Inode, obj: bytes) -> bool:
        """May the peer have released file `obj`, which lives here by a name it was never told of?
        (Never below `levels.SEED_LEVEL`: every name was told at the link.)"""
        return False

    def seed_before(self, txn: lmdb.Transaction[bytes], cmd: object) -> None:
        """Before a command that folds first: what it would move across the initial sync's walk
        front is seeded first (seeding.py)."""

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
                    now_ns: int, *, below: bool = True) -> None:
        """Capture one entry as the initial sync does; a directory new to the peer with what is
        below it, unless `below` is False (a relink walks it itself: relink.py)."""
        known = self.object_of(txn, inode.ino)
        if known is None:
            self._capture_new(txn, parent, name, inode, now_ns)
            obj = self.object_of(txn, inode.ino)
            assert obj is not None
            self._seed_registers(txn, inode, obj, now_ns)
            if inode.is_dir and below:
                self._seed_below(txn, inode.ino, obj, now_ns)
            return
        if self._gone_for_peer(txn, inode, known):  # sent again whole, in case the peer released it
            target = self.ns.symlink_target(txn, inode.ino) if stat.S_ISLNK(inode.mode) else b""
            self._ship(txn, o.Created(self._tick(txn, now_ns), known, inode.mode, inode.uid, inode.gid, inode.rdev,
                                      target, inode.mtime_ns, self._seen(txn)))
            self._seed_registers(txn, inode, known, now_ns)
        self._local_move(txn, self._new_entry(txn), parent, name, known, now_ns)  # a second name of a file

    def _seed_registers(self, txn: lmdb.Transaction[bytes], inode: Inode, obj: bytes, now_ns: int) -> None:
        """A seeded object's attributes, extended attributes and content, as they are now."""
        self._capture_attrs(txn, inode, now_ns)
        for key, value in list(self.ns.xattrs(txn, inode.ino)):
            stamp = self._tick(txn, now_ns)
            self._local_version(txn, obj, XATTR + key[8:], stamp, value.hex())
            self._ship(txn, o.XattrSet(stamp, obj, key[8:], value, self._seen(txn)))
        if inode.is_reg and inode.size:
            self._capture_content(txn, inode, now_ns)

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
        objs = {node: self._entry_object(txn, node) for node, _parent_ino, _name in moves}
        for node, _parent_ino, _name in moves:
            self._unshow_node(txn, node)
        dirty = Dirty()
        tree = ReplicatedTree(TableTree(self, txn, dirty), TableTree(self, txn, dirty))
        for node, parent_ino, name in moves:
            parent = TRASH if parent_ino == 0 else self.object_of(txn, parent_ino)
            assert parent is not None, parent_ino
            stamp = self._tick(txn, now_ns)
            seen = self._seen(txn)
            tree_name = self._tree_name(txn, node, parent_ino, name)
            tree.apply_local(Move(stamp, node, parent, tree_name, seen))
            self._ship(txn, o.Moved(stamp, node, parent, tree_name, objs[node], seen))
        for node, parent_ino, name in moves:
            if parent_ino:
                self._put_entry(txn, node, objs[node], parent_ino, name)
                txn.put(u64(parent_ino) + name, node, db=self.db["snames"])
                placed = self.placement(txn, node)
                if placed is not None:  # newest of its group: the name the command gave it is right
                    dirty.groups.discard((placed.parent, placed.name))
            dirty.nodes.discard(node)
        self._reshow(txn, dirty, now_ns)
        for node, parent_ino, _name in moves:
            obj = self._entry_object(txn, node)
            if parent_ino:  # a name given (one the walk had not told the peer of) to a file kept
                if txn.get(EDIT_DELETE + obj, db=self.meta) is not None \
                        and self.at_level(txn, levels.UNSEEDED_NAMES_LEVEL):  # against deletes: the copy
                    self._edit_against_delete(txn, obj)  # goes, as at the peer applying this move
            else:  # only a delete can leave a file with no name
                self._edit_against_delete(txn, obj)
                ino = self._ino(txn, obj)
                inode = None if ino is None else self.ns.get_inode(txn, ino)
                if inode is not None and inode.is_dir and self.at_site_paths_level(txn):
                    # A directory deleted with files below (a volume's root: rmdir takes only an
                    # empty one): they lost their path, as the peer's _reshow finds applying it.
                    for below in self._files_below(txn, inode.ino):
                        self._edit_against_delete(txn, below)
