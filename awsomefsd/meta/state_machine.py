"""The replicated state machine: applies metadata commands to the LMDB tables.

Rules every handler follows:
- Validate everything first, write second: a command that fails leaves no trace, so one failed
  command never poisons the batch it shares a transaction with.
- Depend only on the state and the command (no clock, no randomness, no node-local facts): every
  replica computes the same result from the same log.
- Keep the in-memory mirrors (free space, counters) in step with the tables; `load()` rebuilds them.
"""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Callable
from typing import Any, TypeAlias

import lmdb

from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta import filemap
from awsomefsd.meta.cluster_sm import LINK_MAX, ClusterTables
from awsomefsd.meta.commands import R
from awsomefsd.meta.errors import Delegated, FsError, SpaceCorruption
from awsomefsd.meta.files import apply_removexattr, apply_setattr, apply_setxattr, apply_write_data
from awsomefsd.meta.isolation import apply_isolated
from awsomefsd.meta.namespace import Namespace, has_records
from awsomefsd.meta.ranges import apply_clone_range, apply_preallocate, apply_punch_hole
from awsomefsd.meta.records import (
    MAX_SYMLINK_BYTES,
    ROOT_INO,
    Inode,
    check_new_inode,
    check_times,
    cookie_key,
    pack_holders,
    u64,
    unpack_holders,
    xattr_key,
)
from awsomefsd.meta.replays import Replays, predict_again, write_as_predicted
from awsomefsd.meta.sites.capture import REPLICATED, UNFOLDED
from awsomefsd.meta.sites.link import SiteTables
from awsomefsd.meta.space import SpaceMap
from awsomefsd.meta.store import FORMAT_VERSION, MetaStore
from awsomefsd.meta.tmpfile import forget_mark, link_tmpfile, make_tmpfile
from awsomefsd.meta.volumes_sm import SNAPSHOTS_INO, VOLUMES_INO, VolumeTables

log = logging.getLogger(__name__)

FIRST_USER_INO = 16  # below: reserved (1 = root, 2 = volumes container, 3 = snapshots container)
MAX_RESERVE_INODES = 1 << 20

LATER_COUNTERS = {b"tier_next": 1}
"""Counters added after stores were bootstrapped without them, with their first value."""

UNSEEN_BY_PREDICTIONS = frozenset({c.Batch, c.Fenced, cc.RenewLease, c.ReserveInodes})
"""Commands whose apply leaves every waiting prediction exact (meta/replays.py): a Batch or a Fenced
is its commands, each applied (or written as predicted) in turn; a RenewLease changes at most a
member's `expired` flag, and a prediction reads members only for their state (`active_members`);
a ReserveInodes moves the inode counter, which no prediction reads (`Unpredictable`). Every other
command applied in full while predictions wait makes them inexact (predicted again at their
apply). Members renew their leases and a creating node reserves numbers all the time: without these
two, almost no prediction of a busy member was exact when the log applied it."""

FreedListener = Callable[[list[tuple[int, int]]], None]
Handler: TypeAlias = "Callable[[lmdb.Transaction[bytes], Any], Any]"


class StateMachine:
    """Owns the tables' semantics; the replicated log owns ordering and durability."""

    def __init__(self, store: MetaStore, *, delayed_free_ns: int = 5_000_000_000) -> None:
        self.store = store
        self.db = store.db
        self.space = SpaceMap(store)
        self.ns = Namespace(store)
        self.volumes = VolumeTables(store, self.ns, self.space)
        self.cluster = ClusterTables(store)
        self.sites = SiteTables(store, self)
        self.delayed_free_ns = delayed_free_ns
        self.freed_listeners: list[FreedListener] = []
        self.quiet = False  # replaying a batch: listeners already heard these events
        self._proposer = 0  # the member whose Fenced command is being applied (check_delegated)
        self.replays = Replays()
        """This node's predictions waiting for their apply here (meta/replays.py): a Batch writes
        them as predicted instead of running their handlers again."""
        self._counters: dict[bytes, int] = {}
        self._handlers: dict[type, Handler] = {}  # filled by `_on`
        on = self._on
        on(c.Mknod, self._mknod)
        on(c.MknodFor, self._mknod)
        on(c.Link, self._link)
        on(c.Unlink, self._unlink)
        on(c.UnlinkClosed, self._unlink)
        on(c.UnlinkAlone, self._unlink)
        on(c.Rename, self._rename)
        on(c.SetAttr, lambda txn, cmd: apply_setattr(self, txn, cmd))
        on(c.WriteData, lambda txn, cmd: apply_write_data(self, txn, cmd))
        on(c.Preallocate, self._preallocate)
        on(c.SetXattr, lambda txn, cmd: apply_setxattr(self, txn, cmd))
        on(c.RemoveXattr, lambda txn, cmd: apply_removexattr(self, txn, cmd))
        on(c.ReserveInodes, self._reserve_inodes)
        on(c.Purge, self._purge)
        on(c.ReclaimFrees, self._reclaim)
        on(c.GrantGroups, self._grant_groups)
        on(c.ReleaseLeaked, self._release_leaked)
        on(c.CreateVolume, self._create_volume)
        on(c.DeleteVolume, self._delete_volume)
        on(c.ResizeVolume, self._resize_volume)
        on(c.CreateSnapshot, self._create_snapshot)
        on(c.DeleteSnapshot, self._delete_snapshot)
        on(c.Batch, self._batch)
        on(cc.InitCluster, self.cluster.init_cluster)
        on(cc.AddMember, self.cluster.add_member)
        on(cc.SetMemberCert, self.cluster.set_member_cert)
        on(cc.UpdateMemberAddress, self.cluster.update_address)
        on(cc.RemoveMember, self.cluster.remove_member)
        on(cc.SetJoinVerifier, self.cluster.set_verifier)
        on(c.SetLogLevel, self.cluster.set_log_level)
        on(cc.RenewLease, self.cluster.renew_lease)
        on(cc.ExpireNode, self._expire_node)
        on(cc.ClaimGroups, self._claim_groups)
        on(cc.AcquireWriteLease, self.cluster.acquire_lease)
        on(cc.ReleaseWriteLease, self.cluster.release_lease)
        on(c.Fenced, self._fenced)
        on(cc.ReleaseOrphans, self._release_orphans)
        on(c.PunchHole, self._punch_hole)
        on(c.CloneRange, self._clone_range)
        on(c.PlanTierObject, lambda txn, cmd: self.space.tiered.plan(txn, cmd, self._next))
        on(c.CommitTierObject, lambda txn, cmd: self.space.tiered.commit(self, txn, cmd))
        on(c.AbandonTierObjects, self.space.tiered.abandon)
        on(c.ForgetTierObjects, self.space.tiered.forget)
        on(c.LinkSite, lambda txn, cmd: self.sites.link(txn, cmd))
        on(c.UnlinkSite, self._unlink_site)
        on(c.ApplyRemote, lambda txn, cmd: self.sites.apply_remote(txn, cmd))
        on(c.ApplyRemoteSharing, lambda txn, cmd: self.sites.apply_remote(txn, cmd))
        on(c.ForgetSite, lambda txn, cmd: self.sites.forget(txn, cmd))
        on(c.FoldCapture, lambda txn, cmd: self.sites.fold(txn, max(cmd.limit, 1)))
        on(c.SeedSite, lambda txn, cmd: self.sites.seed(txn, max(cmd.limit, 1), cmd.now_ns))
        on(c.UpdateSiteLink, lambda txn, cmd: self.sites.update_link(txn, cmd))
        on(c.PauseCapture, lambda txn, cmd: self.sites.pause_capture(txn))
        on(c.ResumeCapture, lambda txn, cmd: self.sites.resume_capture(txn, cmd.now_ns))
        on(c.ResolveConflict, lambda txn, cmd: self.sites.resolve(txn, cmd))
        on(c.MakeTmpfile, lambda txn, cmd: make_tmpfile(self, txn, cmd))
        on(c.LinkTmpfile, lambda txn, cmd: link_tmpfile(self, txn, cmd))

    def _on(self, kind: type[c.Command[R]], handler: Callable[[lmdb.Transaction[bytes], Any], R]) -> None:
        """Apply commands of `kind` with `handler`: mypy checks that it returns what the command
        declares (`Command[R]`), which is what `apply` and every proposer promise their callers."""
        self._handlers[kind] = handler

    # -- lifecycle ------------------------------------------------------------------------------
    def bootstrap(
        self, txn: lmdb.Transaction[bytes], *, cluster_id: str, device_id: str, data_extent: tuple[int, int], now_ns: int
    ) -> None:
        """Initial state of a new filesystem: the root directory and all data blocks free."""
        meta = self.db["meta"]
        assert txn.get(b"format", db=meta) is None, "bootstrap of an initialised store"
        txn.put(b"format", str(FORMAT_VERSION).encode(), db=meta)
        txn.put(b"cluster_id", cluster_id.encode(), db=meta)
        txn.put(b"device_id", device_id.encode(), db=meta)
        for name, value in ((b"ino_next", FIRST_USER_INO), (b"cookie_next", 3), (b"dfree_seq", 1)):
            txn.put(name, u64(value), db=meta)
        root = Inode(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 2, 0, now_ns, now_ns, now_ns, parent=ROOT_INO)
        self.ns.put_inode(txn, root)
        for ino, name in ((VOLUMES_INO, b".volumes"), (SNAPSHOTS_INO, b".snapshots")):
            node = Inode(ino, stat.S_IFDIR | 0o711, 0, 0, 2, 0, now_ns, now_ns, now_ns, parent=ROOT_INO)
            self.ns.put_inode(txn, node)
            root.nlink += 1
            self.ns.add_entry(txn, ROOT_INO, name, ino, self._next(txn, b"cookie_next"))
        self.ns.put_inode(txn, root)
        self.space.load(txn)
        self.space.give(txn, *data_extent)

    def load(self, txn: lmdb.Transaction[bytes]) -> None:
        version = txn.get(b"format", db=self.db["meta"])
        if version is None:
            raise RuntimeError("metadata store is not initialised")
        if int(version) != FORMAT_VERSION:
            raise RuntimeError(f"metadata format {int(version)} is not supported (want {FORMAT_VERSION})")
        self._counters.clear()
        self.sites.forget_deferring()
        self.space.load(txn)
        self.replays.applied_in_full()  # a transaction was undone, or the state replaced

    def meta_value(self, txn: lmdb.Transaction[bytes], key: bytes) -> bytes | None:
        return txn.get(key, db=self.db["meta"])

    # -- dispatch -------------------------------------------------------------------------------
    def apply(self, txn: lmdb.Transaction[bytes], command: c.Command[R]) -> R:
        handler = self._handlers.get(type(command))
        if handler is None:
            raise FsError(errno.EINVAL, f"unknown command {type(command).__name__}")
        if type(command) not in UNSEEN_BY_PREDICTIONS:
            self.replays.applied_in_full()
        if not isinstance(command, UNFOLDED):
            self.sites.before_command(txn)  # every capture pending is made before anything reads the site tables
            self.sites.seed_before(txn, command)  # what a rename moves across the initial sync's walk
        result = handler(txn, command)
        if isinstance(command, REPLICATED):
            self.sites.record(txn, command, result)
        return result

    def next_ino(self, txn: lmdb.Transaction[bytes]) -> int:
        """A fresh inode number from the log's counter (what ReserveInodes hands out)."""
        return self._next(txn, b"ino_next")

    def _next(self, txn: lmdb.Transaction[bytes], name: bytes, count: int = 1) -> int:
        value = self._counters.get(name)
        if value is None:
            raw = txn.get(name, db=self.db["meta"])
            assert raw is not None or name in LATER_COUNTERS, name  # bootstrap() writes the others
            value = LATER_COUNTERS[name] if raw is None else int.from_bytes(raw, "big")
        self._counters[name] = value + count
        txn.put(name, u64(value + count), db=self.db["meta"])
        return value

    def check_cookie(self, txn: lmdb.Transaction[bytes], parent: int, chosen: int) -> None:
        """A cookie the proposer chose must be in the delegated range and unused in the directory
        (checked with the command's other checks, before anything is written)."""
        if chosen and (not chosen & c.DELEGATED_COOKIE_BIT
                       or txn.get(cookie_key(parent, chosen), db=self.db["cookies"]) is not None):
            raise FsError(errno.EIO, f"readdir cookie {chosen:#x} proposed twice in directory {parent}")

    def check_delegated(self, txn: lmdb.Transaction[bytes], *dirs: int) -> None:
        """A member may change a directory's entries only if no other member holds its delegation
        (docs/delegations.md): the holder may have acknowledged changes to it that the log has not
        seen, and its predictions of them must stay the log's results. Checked first, before the
        command's other checks: the proposer's view of the directory may be incomplete. Commands
        no member proposed (one node; a prediction, which runs bare) are not checked."""
        if not self._proposer:
            return
        for directory in dirs:
            holder = self.cluster.lease_holder(txn, directory) if directory else 0
            if holder and holder != self._proposer:
                raise Delegated(directory, holder)

    def new_cookie(self, txn: lmdb.Transaction[bytes], chosen: int) -> int:
        """The readdir cookie of a new entry: the proposer's (`check_cookie`), else the log's next."""
        return chosen or self._next(txn, b"cookie_next")

    def _emit_freed(self, freed: list[tuple[int, int]]) -> None:
        if freed and not self.quiet:
            for listener in self.freed_listeners:
                listener(freed)

    def defer_free(self, txn: lmdb.Transaction[bytes], extents: list[tuple[int, int]], now_ns: int) -> None:
        if extents:
            self.space.defer(txn, self._next(txn, b"dfree_seq"), extents, now_ns + self.delayed_free_ns)

    # -- namespace ------------------------------------------------------------------------------
    def _mknod(self, txn: lmdb.Transaction[bytes], cmd: c.Mknod) -> Inode:
        ns = self.ns
        self.check_delegated(txn, cmd.parent)
        parent = ns.dir_for_entry(txn, cmd.parent, cmd.name)
        check_new_inode(cmd.mode, cmd.uid, cmd.gid, cmd.rdev)
        check_times(cmd.now_ns)
        if len(cmd.target) > MAX_SYMLINK_BYTES:
            raise FsError(errno.ENAMETOOLONG)
        if ns.lookup(txn, cmd.parent, cmd.name) is not None:
            raise FsError(errno.EEXIST)
        if ns.get_inode(txn, cmd.ino) is not None:
            raise FsError(errno.EIO, f"inode {cmd.ino} proposed twice")
        is_dir = stat.S_ISDIR(cmd.mode)
        if is_dir and parent.nlink >= self.cluster.dir_link_limit(txn):
            raise FsError(errno.EMLINK)
        self.check_cookie(txn, cmd.parent, cmd.cookie)
        self.volumes.charge(txn, parent.volume, blocks=0, inodes=1)
        mode, gid = cmd.mode, cmd.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if is_dir:
                mode |= stat.S_ISGID
        inode = Inode(
            cmd.ino, mode, cmd.uid, gid, 2 if is_dir else 1, len(cmd.target), cmd.now_ns, cmd.now_ns, cmd.now_ns,
            rdev=cmd.rdev, volume=parent.volume, parent=cmd.parent if is_dir else 0,
        )
        ns.put_inode(txn, inode)
        if stat.S_ISLNK(mode):
            txn.put(u64(cmd.ino), cmd.target, db=self.db["symlinks"])
        if cmd.lease_to and (stat.S_ISREG(mode) or is_dir) and (
                not isinstance(cmd, c.MknodFor) or self.cluster.epoch_is_current(txn, cmd.lease_to, cmd.lease_epoch)):
            self.cluster.grant_new_lease(txn, cmd.ino, cmd.lease_to)
        ns.add_entry(txn, cmd.parent, cmd.name, cmd.ino, self.new_cookie(txn, cmd.cookie))
        if is_dir:
            parent.nlink += 1
        parent.mtime_ns = parent.ctime_ns = cmd.now_ns
        ns.put_inode(txn, parent)
        return inode

    def _link(self, txn: lmdb.Transaction[bytes], cmd: c.Link) -> Inode:
        ns = self.ns
        self.check_delegated(txn, cmd.new_parent)
        inode = ns.require_inode(txn, cmd.ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        self.volumes.check_writable(txn, inode.volume)
        parent = ns.dir_for_entry(txn, cmd.new_parent, cmd.new_name)
        if ns.lookup(txn, cmd.new_parent, cmd.new_name) is not None:
            raise FsError(errno.EEXIST)
        if parent.volume != inode.volume:
            raise FsError(errno.EXDEV)
        if inode.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK)
        self.check_cookie(txn, cmd.new_parent, cmd.cookie)
        ns.add_entry(txn, cmd.new_parent, cmd.new_name, cmd.ino, self.new_cookie(txn, cmd.cookie))
        inode.nlink += 1
        inode.ctime_ns = cmd.now_ns
        ns.put_inode(txn, inode)
        parent.mtime_ns = parent.ctime_ns = cmd.now_ns
        ns.put_inode(txn, parent)
        return inode

    def _unlink(self, txn: lmdb.Transaction[bytes], cmd: c.Unlink) -> int:
        """Returns the inode whose link went away (the caller may purge it once nothing holds it).
        An UnlinkClosed deletes it at once when it would be an orphan no one holds, an UnlinkAlone
        when only its proposer could hold it (`_drop_link`)."""
        ns = self.ns
        self.check_delegated(txn, cmd.parent)
        parent = ns.dir_for_entry(txn, cmd.parent, cmd.name)
        child_ino = ns.lookup(txn, cmd.parent, cmd.name)
        if child_ino is None:
            raise FsError(errno.ENOENT)
        child = ns.require_inode(txn, child_ino)
        if child.is_dir:
            self.check_delegated(txn, child_ino)  # its emptiness is its holder's to know
        self.volumes.check_writable(txn, parent.volume)
        if cmd.is_dir:
            if not child.is_dir:
                raise FsError(errno.ENOTDIR)
            if child_ino in (ROOT_INO, VOLUMES_INO, SNAPSHOTS_INO) or self.volumes.is_volume_root(txn, child):
                raise FsError(errno.EBUSY)
            if ns.has_entries(txn, child_ino):
                raise FsError(errno.ENOTEMPTY)
        elif child.is_dir:
            raise FsError(errno.EISDIR)
        ns.remove_entry(txn, cmd.parent, cmd.name)
        if child.is_dir:
            parent.nlink -= 1
        parent.mtime_ns = parent.ctime_ns = cmd.now_ns
        ns.put_inode(txn, parent)
        closed = cmd.ino if isinstance(cmd, c.UnlinkClosed) else 0
        alone = isinstance(cmd, c.UnlinkAlone) and self._alone(txn, closed)
        self._drop_link(txn, child, cmd.now_ns, closed, alone=alone)
        return child_ino

    def _alone(self, txn: lmdb.Transaction[bytes], ino: int) -> bool:
        """May an UnlinkAlone's proposer speak for every member: does it hold the file's write lease
        (granted by its create ahead; any other writer took it since)? A prediction runs bare: its
        proposer is the node predicting, which checked that itself."""
        return not self._proposer or self.cluster.lease_holder(txn, ino) == self._proposer

    def _drop_link(self, txn: lmdb.Transaction[bytes], child: Inode, now_ns: int, closed: int = 0, *,
                   alone: bool = False) -> None:
        """The inode is written once: by `orphan` when it is left with no name, else here.
        `closed`: the inode an UnlinkClosed names; left with no name and held by no member (the
        orphan mark would name none), it is deleted now, as the Purge after an Unlink did. `alone`:
        the proposer of an UnlinkAlone answers for every member (none other can reach it)."""
        child.nlink = 0 if child.is_dir else child.nlink - 1
        child.ctime_ns = now_ns
        if child.nlink == 0 and not self.sites.keeps(txn, child.ino):
            if child.ino == closed and (alone or not self.cluster.active_members(txn)):
                self.delete_inode(txn, child, now_ns)
            else:
                self.orphan(txn, child)
        else:
            self.ns.put_inode(txn, child)

    def orphan(self, txn: lmdb.Transaction[bytes], inode: Inode) -> None:
        """Mark an inode with no name left for deletion once nothing holds it open. In a cluster
        every active member may hold it open: each must release it (ReleaseOrphans)."""
        self.ns.put_inode(txn, inode)
        txn.put(u64(inode.ino), pack_holders(tuple(self.cluster.active_members(txn))), db=self.db["orphans"])

    def _rename(self, txn: lmdb.Transaction[bytes], cmd: c.Rename) -> int:
        """Returns the inode that lost its name to the rename (0 when none)."""
        from awsomefsd.meta.rename import apply_rename

        return apply_rename(self, txn, cmd)

    # -- attributes and data (their handlers: meta/files.py, meta/ranges.py) --------------------
    def space_check_new(self, txn: lmdb.Transaction[bytes], ranges: list[tuple[int, int]]) -> None:
        """The device ranges (start, count) a command maps as new are free, and (a member's
        command) in the proposer's allocation groups: space another node may be writing is not
        its to map."""
        for start, count in ranges:
            if not self.space.mirror.contains_free(start, count):
                log.error("refusing a write: blocks %d+%d are not free", start, count)
                raise FsError(errno.EIO, "allocation conflict")
        if self._proposer:
            self.cluster.check_owned(txn, self._proposer, ranges)

    def _punch_hole(self, txn: lmdb.Transaction[bytes], cmd: c.PunchHole) -> Inode:
        return apply_punch_hole(self, txn, cmd)

    def _preallocate(self, txn: lmdb.Transaction[bytes], cmd: c.Preallocate) -> Inode:
        return apply_preallocate(self, txn, cmd)

    def _clone_range(self, txn: lmdb.Transaction[bytes], cmd: c.CloneRange) -> Inode:
        return apply_clone_range(self, txn, cmd)

    def put_xattr_raw(self, txn: lmdb.Transaction[bytes], ino: int, name: bytes, value: bytes | None) -> None:
        """Set or (None) remove an extended attribute as another site's winning version says."""
        now_ns = self.ns.require_inode(txn, ino).ctime_ns
        if value is not None:
            apply_setxattr(self, txn, c.SetXattr(ino, name, value, 0, now_ns))
        elif txn.get(xattr_key(ino, name), db=self.db["xattrs"]) is not None:
            apply_removexattr(self, txn, c.RemoveXattr(ino, name, now_ns))

    def _unlink_site(self, txn: lmdb.Transaction[bytes], cmd: c.UnlinkSite) -> None:
        """Stop replicating, keeping the tables for a relink; again: drop them, and the inodes the
        tree kept after their last name went become orphans (meta/sites/link.py)."""
        self.sites.unlink(txn, cmd)

    # -- inode lifecycle and space --------------------------------------------------------------
    def _reserve_inodes(self, txn: lmdb.Transaction[bytes], cmd: c.ReserveInodes) -> tuple[int, int]:
        if not 0 < cmd.count <= MAX_RESERVE_INODES:
            raise FsError(errno.EINVAL)
        start = self._next(txn, b"ino_next", cmd.count)
        return start, start + cmd.count

    def _purge(self, txn: lmdb.Transaction[bytes], cmd: c.Purge) -> bool:
        inode = self.ns.get_inode(txn, cmd.ino)
        if inode is None or inode.nlink > 0 or self.sites.keeps(txn, cmd.ino):
            txn.delete(u64(cmd.ino), db=self.db["orphans"])
            return False
        self.delete_inode(txn, inode, cmd.now_ns)
        return True

    def delete_inode(self, txn: lmdb.Transaction[bytes], inode: Inode, now_ns: int) -> None:
        """Remove an inode with its data (freed after the grace period), xattrs and orphan mark.
        Most deleted files are small or empty: a block map or xattrs are scanned only when one
        seek finds a record of the inode, and only a symlink has a target to drop."""
        ino = inode.ino
        fmap = self.db["fmap"]
        if has_records(txn, fmap, ino):
            self.defer_free(txn, filemap.unmap_range(txn, fmap, ino, 0, 1 << 62), now_ns)
        self.volumes.charge(txn, inode.volume, blocks=-inode.blocks, inodes=-1, enforce=False)
        if has_records(txn, self.ns.xattr_db, ino):
            self.ns.delete_xattrs(txn, ino)
        if stat.S_ISLNK(inode.mode):
            txn.delete(u64(ino), db=self.db["symlinks"])
        txn.delete(u64(ino), db=self.db["orphans"])
        forget_mark(txn, self.db, inode.ino)
        self.cluster.drop_leases_of_inode(txn, inode.ino)
        self.sites.inode_deleted(txn, inode.ino)  # no site id outlives its inode (numbers may come again)
        self.ns.delete_inode(txn, inode.ino)

    def _reclaim(self, txn: lmdb.Transaction[bytes], cmd: c.ReclaimFrees) -> list[tuple[int, int]]:
        try:
            freed = self.space.reclaim(txn, cmd.now_ns)
        except SpaceCorruption as exc:
            log.error("delayed free refused: %s", exc)
            raise FsError(errno.EIO, str(exc)) from exc
        self._emit_freed(freed)
        return freed

    def _release_leaked(self, txn: lmdb.Transaction[bytes], cmd: c.ReleaseLeaked) -> int:
        for start, count in cmd.extents:
            if self.space.mirror.overlaps_free(start, count):
                raise FsError(errno.EINVAL, f"blocks {start}+{count} are already free")
        for start, count in cmd.extents:
            self.space.give(txn, start, count)
        self._emit_freed(list(cmd.extents))
        return sum(n for _, n in cmd.extents)

    def _grant_groups(self, txn: lmdb.Transaction[bytes], cmd: c.GrantGroups) -> None:
        for group in cmd.groups:
            txn.put(group.to_bytes(4, "big"), u64(cmd.node), db=self.db["groups"])

    def _claim_groups(self, txn: lmdb.Transaction[bytes], cmd: cc.ClaimGroups) -> tuple[int, ...]:
        count = self.cluster.value(txn, b"ag_count")
        if count is None:
            raise FsError(errno.EINVAL, "not a cluster")
        return self.cluster.claim_groups(txn, cmd, int.from_bytes(count, "big"))

    def _release_orphans(self, txn: lmdb.Transaction[bytes], cmd: cc.ReleaseOrphans) -> int:
        """Returns how many of the inodes were deleted (nobody holds them any more)."""
        if len(cmd.inos) > MAX_RESERVE_INODES:
            raise FsError(errno.EINVAL, "too many inodes in one release")
        return sum(self.release_orphan(txn, ino, cmd.node, cmd.now_ns) for ino in cmd.inos)

    def release_orphan(self, txn: lmdb.Transaction[bytes], ino: int, node: int, now_ns: int) -> bool:
        raw = txn.get(u64(ino), db=self.db["orphans"])
        if raw is None:
            return False
        holders = tuple(n for n in unpack_holders(bytes(raw)) if n != node)
        if holders:
            txn.put(u64(ino), pack_holders(holders), db=self.db["orphans"])
            return False
        return self._purge(txn, c.Purge(ino, now_ns))

    def _expire_node(self, txn: lmdb.Transaction[bytes], cmd: cc.ExpireNode) -> list[int]:
        """A node that is gone holds nothing open any more: its orphan holds go with its groups."""
        groups = self.cluster.expire_node(txn, cmd)
        held = [int.from_bytes(k, "big") for k, v in txn.cursor(self.db["orphans"])
                if cmd.node in unpack_holders(bytes(v))]
        for ino in held:
            self.release_orphan(txn, ino, cmd.node, cmd.now_ns)
        return groups

    def _fenced(self, txn: lmdb.Transaction[bytes], cmd: c.Fenced) -> object:
        self.cluster.check_fenced(txn, cmd)
        self._proposer = cmd.node
        try:
            if len(cmd.commands) == 1:
                return self.apply(txn, cmd.commands[0])
            return self._batch(txn, c.Batch(cmd.commands))
        finally:
            self._proposer = 0

    def group_owners(self, txn: lmdb.Transaction[bytes]) -> dict[int, int]:
        return {int.from_bytes(k, "big"): int.from_bytes(v, "big") for k, v in txn.cursor(self.db["groups"])}

    # -- volumes and snapshots (semantics in volumes_sm) ----------------------------------------
    def _create_volume(self, txn: lmdb.Transaction[bytes], cmd: c.CreateVolume) -> dict[str, Any]:
        return self.volumes.create_volume(txn, cmd, self._next)

    def _delete_volume(self, txn: lmdb.Transaction[bytes], cmd: c.DeleteVolume) -> bool:
        if self.sites.delete_volume(txn, cmd):  # it ships: its tree stays while the other site may write
            return True
        return self.volumes.delete_volume(txn, cmd, self.delete_inode)

    def _resize_volume(self, txn: lmdb.Transaction[bytes], cmd: c.ResizeVolume) -> dict[str, Any]:
        return self.volumes.resize_volume(txn, cmd)

    def _create_snapshot(self, txn: lmdb.Transaction[bytes], cmd: c.CreateSnapshot) -> dict[str, Any]:
        return self.volumes.create_snapshot(txn, cmd, self._next)

    def _delete_snapshot(self, txn: lmdb.Transaction[bytes], cmd: c.DeleteSnapshot) -> bool:
        return self.volumes.delete_snapshot(txn, cmd, self.delete_inode)

    def _batch(self, txn: lmdb.Transaction[bytes], cmd: c.Batch) -> list[object]:
        """Each command's outcome: its result or its refusal (a bug in one is its own: isolation.py)."""
        results: list[object] = []
        replays = self.replays
        for sub in cmd.commands:
            replay, exact = replays.take(sub)
            if replay is not None and not exact:
                replay = predict_again(self, txn, replay, self._proposer)
            if replay is not None and write_as_predicted(self, txn, replay):
                results.append(replay.result)
                continue
            try:
                results.append(apply_isolated(self, txn, sub))
            except FsError as exc:
                results.append(exc)
        return results
