"""The metadata client: how the rest of the daemon reads and changes metadata.

Everything outside `meta/` goes through one `MetaClient`: typed reads (inodes, directory entries,
extents, volumes, members, orphans, space) and `propose`/`barrier` on the replicated log, whatever
log that is (the local group-commit log or Raft: both implement `meta.log.ReplicatedLog`). Only
`meta/` knows that the state lives in LMDB tables and how each record is encoded.

What a caller may rely on:
- A read sees every mutation acknowledged before it: the log's `read_txn()` contract, with the
  changes this node acknowledged ahead of the log (`run_ahead`, meta/ahead.py) on top.
- A read takes no await and returns values, not handles: nothing it returns is invalidated by a
  later commit, and no transaction outlives the call. The one lazy result, `entries()`, must be
  consumed without awaiting (readdir fills its reply in one step); it reads one directory slice.
- `propose` returns the command's result (typed: a `Command[R]` gives an `R`, meta/commands.py) or
  raises the FsError the state machine refused it with; `barrier` returns once everything
  proposed before it is durable (fsync).

Listeners of state-machine events (`on_freed`) are registered when the listening object is built
(awsomefsd/daemon/node.py): the state machine calls them inside its apply, so they must only update
memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import trio

from awsomefsd.crdt.hlc import Stamp
from awsomefsd.meta.ahead import AheadLog
from awsomefsd.meta.cluster_sm import member_from_record
from awsomefsd.meta.commands import Command, R, level_of
from awsomefsd.meta.filemap import all_extents, extents_in, written_run
from awsomefsd.meta.freespace import FreeSpaceMap
from awsomefsd.meta.levels import BASE_LOG_LEVEL, LOG_LEVEL
from awsomefsd.meta.log import ReplicatedLog
from awsomefsd.meta.namespace import Namespace
from awsomefsd.meta.records import (
    TIER_BASE_BLOCK,
    U64_PAIR,
    Applied,
    ClusterInfo,
    DeferredFree,
    Extent,
    Inode,
    Member,
    Orphan,
    TierObject,
    Volume,
    object_of,
    read_u64,
    u64,
    unpack_holders,
)
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore
from awsomefsd.meta.tmpfile import is_linkable
from awsomefsd.meta.volumes_sm import volume_from_record

FreedListener = Callable[[list[tuple[int, int]]], None]


class MetaClient:
    def __init__(self, log: ReplicatedLog, sm: StateMachine) -> None:
        self._log = log
        self._sm = sm
        self._ns = sm.ns
        self._fmap = sm.db["fmap"]
        self.ahead = AheadLog(log, sm)
        self._view = self.ahead.view
        self._proposed: list[Callable[[Command[Any]], None]] = []
        self._applied_moved: trio.Event | None = None
        log.applied_listeners.append(self._wake_applied_waiters)

    def on_proposed(self, listener: Callable[[Command[Any]], None]) -> None:
        """`listener(command)` once each `propose` has applied its command or failed, before its
        caller goes on (the read workers' hot map, fs/hotmap.py: the command's inodes must be marked
        before its change is acknowledged)."""
        self._proposed.append(listener)

    def hear_site_side_effects(self, hear: Callable[[Applied], None]) -> None:
        """`hear(changed)` after each local command on a linked site whose capture changed other
        entries than the command's own (meta/sites/tables.py: `local_side_effects`)."""
        self._sm.sites.local_side_effects = hear

    # -- the replicated log -----------------------------------------------------------------------
    async def propose(self, command: Command[R], *, epoch: int | None = None, hurry: bool = True) -> R:
        """Order, commit and apply `command` (meta/commands.py); its result, or its FsError.
        `epoch`: the lease epoch the work it commits was done under (`lease_epoch`). Ordered after
        every change this node acknowledged ahead of the log (`run_ahead`); `hurry=False` lets it
        wait for the pipeline's next batch (`AheadLog.propose`)."""
        try:
            return await self.ahead.propose(command, epoch=epoch, hurry=hurry)
        finally:
            for listener in self._proposed:
                listener(command)

    async def run_ahead(self, command: Command[R], *, epoch: int | None = None,
                        still: Callable[[], bool] | None = None) -> R:
        """Apply `command` to this node's view and acknowledge it now; the log commits it later, in
        order (meta/ahead.py). Only for a caller that holds the delegations the command needs
        (docs/delegations.md), and only for commands `can_run_ahead` accepts. `epoch` as for
        `propose` (default: the current one); `still()`: is running ahead still allowed (asked again
        when the call had to wait for room in the pipeline; if not, the command is proposed)."""
        epoch = self._log.lease_epoch() if epoch is None else epoch
        return await self.ahead.run_ahead(command, epoch=epoch, still=still)

    async def run_ahead_committed(self, command: Command[R]) -> tuple[R, Callable[[], Awaitable[int]]]:
        """`run_ahead`, for a change this node makes for another member (design note 145): the
        result now, and `committed()`, which returns once the log committed the change and this
        node applied it, with the log index the other member waits to apply (or raises the
        FsError the log refused it with)."""
        result, decided = await self.ahead.run_ahead_told(command, epoch=self._log.lease_epoch())

        async def committed() -> int:
            await decided()
            return self._log.applied_index

        return result, committed

    async def acknowledged_applied(self) -> int:
        """Return once every change this node acknowledged ahead before the call is decided (applied
        here, or refused), with the log index applied then: another member that applies up to it
        sees all of them (a look answered for it, design note 148)."""
        await self.ahead.drain()
        return self._log.applied_index

    async def applied_up_to(self, index: int) -> None:
        """Return once this node applied the log up to `index` (a change another member made for it)."""
        if self._log.applied_index < index:
            await self.applied_past(index - 1)

    def runs_ahead_at_once(self) -> bool:
        """Would `run_ahead` of a command it can predict return without waiting (room in the pipeline)?"""
        return self.ahead.has_room()

    async def run_pipeline(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The task that commits what was acknowledged ahead (a cluster member runs it)."""
        await self.ahead.run(task_status=task_status)

    def lease_epoch(self) -> int | None:
        """This node's liveness-lease epoch now (None on a single node): taken before writing data
        to the shared device and passed to the `propose` that maps it, so that a lease lost and
        renewed in between refuses the mapping (others may have written the file meanwhile)."""
        return self._log.lease_epoch()

    async def barrier(self, inode: int | None = None, *, report: bool = True) -> None:
        """Return once everything proposed or acknowledged ahead before the call is durable; EIO
        if changes acknowledged ahead were lost since the last barrier (a durability point reports
        them, as fsync reports lost writes), or, the fsync of `inode`, lost changes to that file
        since its last fsync (AheadLog.drain). `report=False`: the daemon's own barriers (the
        link's, tiering's), which must neither fail on an application's lost change nor take
        the one report of it that the application's next fsync is owed."""
        await self.ahead.drain(report=report, inode=inode)
        await self._log.barrier()

    @property
    def applied_index(self) -> int:
        return self._log.applied_index

    async def applied_past(self, index: int) -> None:
        """Return once a command after `index` was applied on this node: how the daemon's own
        loops (the site link's) sleep while nothing changes, instead of looking every few
        milliseconds (each look woke the loop and read LMDB: ~4 % of a core on an idle link)."""
        while self._log.applied_index <= index:
            if self._applied_moved is None:
                self._applied_moved = trio.Event()
            await self._applied_moved.wait()

    def _wake_applied_waiters(self, _index: int) -> None:
        moved, self._applied_moved = self._applied_moved, None
        if moved is not None:
            moved.set()

    @property
    def committed_index(self) -> int:
        """The last command committed: with the local log, in LMDB, where other processes see it."""
        return self._log.committed_index

    # -- namespace --------------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode | None:
        return self._ns.get_inode(self._view(), ino)

    def require_inode(self, ino: int) -> Inode:
        """The inode, or FsError(ENOENT)."""
        return self._ns.require_inode(self._view(), ino)

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The inode `name` in directory `parent` names, if any."""
        return self._ns.lookup(self._view(), parent, name)

    def entries(self, parent: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, Inode]]:
        """(cookie, name, inode) of the directory's entries in cookie (readdir) order, strictly
        after `after_cookie`; the cookie is the entry's stable readdir offset. Lazy: consume it
        without awaiting (it reads one open transaction)."""
        return self._ns.entries_with_inodes(self._view(), parent, after_cookie)

    def listing(self, parent: int, after_cookie: int = 0) -> Iterator[tuple[int, bytes, int, int]]:
        """(cookie, name, child, mode) of the directory's entries strictly after `after_cookie`,
        without their attributes (a plain readdir). Lazy, like `entries`."""
        return self._ns.listing(self._view(), parent, after_cookie)

    def symlink_target(self, ino: int) -> bytes:
        return self._ns.symlink_target(self._view(), ino)

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        value = self._ns.get_xattr(self._view(), ino, name)
        return None if value is None else bytes(value)

    def xattr_names(self, ino: int) -> list[bytes]:
        return [key[8:] for key, _ in self._ns.xattrs(self._view(), ino)]

    def inode_count(self) -> int:
        return int(self._view().stat(self._sm.db["inodes"])["entries"])

    def inode_numbers(self) -> list[int]:
        """Every inode, in number order (fsck)."""
        return [int.from_bytes(key, "big") for key, _ in self._view().cursor(self._sm.db["inodes"])]

    def orphans(self) -> list[Orphan]:
        """Unlinked inodes not deleted yet, in inode order."""
        return [_orphan(key, value) for key, value in self._view().cursor(self._sm.db["orphans"])]

    def orphan(self, ino: int) -> Orphan | None:
        raw = self._view().get(u64(ino), db=self._sm.db["orphans"])
        return None if raw is None else _orphan(u64(ino), raw)

    def linkable_tmpfile(self, ino: int) -> bool:
        """Is `ino` an O_TMPFILE file that linkat may still name (meta/tmpfile.py)?"""
        return is_linkable(self._view(), self._sm.db, ino)

    # -- file data --------------------------------------------------------------------------------
    def extents(self, ino: int, first_block: int, end_block: int) -> list[Extent]:
        """The extents of `ino` overlapping file blocks [first_block, end_block), in order, unclipped."""
        return list(extents_in(self._view(), self._fmap, ino, first_block, end_block))

    def written_run(self, ino: int, first_block: int, end_block: int) -> tuple[int, bytes] | None:
        """(device block of `first_block`, checksums of [first_block, end_block)) when one written
        extent on the device holds those blocks of `ino`; None otherwise (meta/filemap.py)."""
        return written_run(self._view(), self._fmap, ino, first_block, end_block)

    def extent_at(self, ino: int, file_block: int) -> Extent | None:
        """The extent holding `file_block`, or None for a hole."""
        for ext in extents_in(self._view(), self._fmap, ino, file_block, file_block + 1):
            return ext
        return None

    def all_extents(self, ino: int) -> list[Extent]:
        return list(all_extents(self._view(), self._fmap, ino))

    def shares_blocks(self, ext: Extent) -> bool:
        """Does a snapshot or another file (a clone) also reference a block of this extent?"""
        return self._sm.space.shared(self._view(), ext.dev_block, ext.count)

    # -- tiered data (meta/tiered.py) -------------------------------------------------------------
    def tier_object(self, object_id: int) -> TierObject | None:
        return self._sm.space.tiered.get(self._view(), object_id)

    def tier_objects(self) -> list[TierObject]:
        """Every object the log knows, by id."""
        return list(self._sm.space.tiered.all(self._view()))

    def extents_in_objects(self, object_ids: set[int]) -> list[tuple[int, Extent]]:
        """(inode, extent) of every file-map record pointing into these objects: a walk of the
        whole file map, which repacking does only for objects that are mostly dead."""
        found: list[tuple[int, Extent]] = []
        for key, value in self._view().cursor(self._fmap):
            block = read_u64(value)
            if block >= TIER_BASE_BLOCK and object_of(block)[0] in object_ids:
                ino, file_block = U64_PAIR.unpack(key)
                found.append((ino, Extent.unpack(file_block, value)))
        return found

    def cold_files(self, after_ino: int, cold_before_ns: int, min_bytes: int, limit: int) -> tuple[list[Inode], int]:
        """Regular files numbered above `after_ino`, of at least `min_bytes`, not written or
        changed (nor given an atime) since `cold_before_ns`, looking at no more than `limit`
        inodes; and the last inode looked at (0 once the table's end is reached), where the next
        slice starts."""
        cursor = self._view().cursor(self._sm.db["inodes"])
        found: list[Inode] = []
        if not cursor.set_range(u64(after_ino + 1)):
            return found, 0
        for looked, (key, value) in enumerate(cursor.iternext(), 1):
            inode = Inode.unpack(int.from_bytes(key, "big"), value)
            if (inode.is_reg and inode.nlink > 0 and inode.size >= min_bytes
                    and max(inode.atime_ns, inode.mtime_ns, inode.ctime_ns) < cold_before_ns):
                found.append(inode)
            if looked >= limit:
                return found, inode.ino
        return found, 0

    # -- space ------------------------------------------------------------------------------------
    def free_blocks(self) -> int:
        """Free data blocks in the replicated free map (delayed frees not counted)."""
        return self._sm.space.mirror.free_blocks

    def free_space(self) -> FreeSpaceMap:
        """A copy of the replicated free map (to seed a node's allocator)."""
        return self._sm.space.mirror.copy()

    def pending_free_blocks(self) -> int:
        """Blocks the delayed-free list will return to free space."""
        return self._sm.space.pending_free_blocks(self._view())

    def deferred_frees(self) -> list[DeferredFree]:
        """The delayed-free list in order (the earliest due first)."""
        return [DeferredFree(seq, not_before, tuple(pairs))
                for seq, not_before, pairs in self._sm.space.deferred(self._view())]

    def next_deferred_free(self) -> DeferredFree | None:
        """The delayed free due first, if any."""
        for seq, not_before, pairs in self._sm.space.deferred(self._view()):
            return DeferredFree(seq, not_before, tuple(pairs))
        return None

    def group_owners(self) -> dict[int, int]:
        """Allocation group -> the node it is granted to."""
        return self._sm.group_owners(self._view())

    def groups_of(self, node: int) -> list[int]:
        return [group for group, owner in self.group_owners().items() if owner == node]

    def on_freed(self, listener: FreedListener) -> None:
        """Call `listener(extents)` whenever applying a command returns extents to free space
        (inside the apply: it must only update memory)."""
        self._sm.freed_listeners.append(listener)

    # -- volumes ----------------------------------------------------------------------------------
    def volume(self, volume: int) -> Volume | None:
        record = self._sm.volumes.get(self._view(), volume)
        return None if record is None else volume_from_record(volume, record)

    def volume_by_name(self, kind: str, name: str) -> Volume | None:
        """The volume ("volume") or snapshot ("snapshot") called `name`."""
        txn = self._view()
        number = self._sm.volumes.by_name(txn, "v" if kind == "volume" else "s", name)
        record = None if number is None else self._sm.volumes.get(txn, number)
        return None if number is None or record is None else volume_from_record(number, record)

    def volumes(self) -> list[Volume]:
        """Every volume and snapshot, by id."""
        return [volume_from_record(number, record) for number, record in self._sm.volumes.all(self._view())]

    def check_writable(self, volume: int) -> None:
        """FsError(EROFS) for a snapshot's inodes."""
        self._sm.volumes.check_writable(self._view(), volume)

    async def propose_volume(self, command: Command[dict[str, Any]]) -> Volume:
        """Propose a volume or snapshot command (create, resize, snapshot); the record it left."""
        result = await self.propose(command)
        return volume_from_record(result["id"], result)

    # -- cross-site replication (meta/sites/) -----------------------------------------------------
    def site_link(self) -> dict[str, Any] | None:
        """The linked site as LinkSite recorded it (id, CA, addresses), or None when not linked."""
        return self._sm.sites.link_info(self._view())

    def site_kept_peer(self) -> bytes | None:
        """While unlinked: the site the link's tables are kept for (a relink to it re-pairs), or None."""
        return self._sm.sites.kept_peer(self._view())

    def site_capture_paused(self) -> bool:
        """Is capture paused, the outbox over its bound (meta/sites/bound.py)?"""
        return self._sm.sites.capture_paused(self._view())

    def site_outbox_operations(self) -> int:
        """The outbox's entries, acknowledged or not yet forgotten."""
        return self._sm.sites.outbox_operations(self._view())

    def site_outbox(self, after: Stamp | None, limit: int) -> list[tuple[Stamp, bytes]]:
        """This site's operations after `after` (the peer's cursor), in stamp order."""
        return self._sm.sites.outbox(self._view(), after, limit)

    def site_shipping(self, raw: bytes) -> tuple[bytes, int | None]:
        """What to send for an outbox entry, and the inode whose bytes go with it (SiteTables.shipping)."""
        return self._sm.sites.shipping(self._view(), raw)

    def site_content_base(self, obj: bytes) -> tuple[int, Stamp] | None:
        """The file showing `obj` and the content version it shows (SiteTables.content_base)."""
        return self._sm.sites.content_base(self._view(), obj)

    def site_object_of(self, ino: int) -> bytes | None:
        """The replicated object an inode holds, if the link tracks it."""
        return self._sm.sites.object_of(self._view(), ino)

    def site_inode_of(self, obj: bytes) -> int | None:
        """The inode holding a replicated object here, if any."""
        return self._sm.sites.inode_of(self._view(), obj)

    def site_applied_from_peer(self) -> Stamp | None:
        return self._sm.sites.applied_from_peer(self._view())

    def site_volumes(self) -> dict[str, str]:
        """The volumes that ship: their root's global id (hex) -> their directory in /.volumes here."""
        return self._sm.sites.shipped_volumes(self._view())

    def site_head(self) -> Stamp | None:
        return self._sm.sites.head(self._view())

    def site_conflicts(self) -> list[dict[str, Any]]:
        return self._sm.sites.conflicts(self._view())

    def site_conflict_counts(self) -> tuple[int, int]:
        """(open conflicts, all conflicts)."""
        return self._sm.sites.conflict_counts(self._view())

    def site_newest_unfolded(self) -> int | None:
        """The number of the newest capture waiting for its fold (FoldCapture), None if none waits."""
        return self._sm.sites.newest_unfolded(self._view())

    def site_seeding(self) -> dict[str, int] | None:
        """The initial sync's walk (meta/sites/seeding.py): entries seeded and directories left, or
        None once no directory is left."""
        return self._sm.sites.seeding(self._view())

    def site_pending(self, after: Stamp | None) -> int:
        """Operations after the peer's acknowledgement `after`: what it has not applied yet."""
        return self._sm.sites.pending_after(self._view(), after)

    # -- the cluster ------------------------------------------------------------------------------
    def cluster_info(self) -> ClusterInfo | None:
        """What InitCluster recorded; None before (a single node, or a joiner without state)."""
        txn = self._view()
        cluster = self._sm.cluster
        if not cluster.initialised(txn):
            return None
        cert, key, verifier = (cluster.value(txn, k) for k in (b"ca_cert", b"ca_key", b"join_verifier"))
        target = cluster.value(txn, b"voters_target")
        assert cert is not None and key is not None and verifier is not None, "InitCluster writes them together"
        return ClusterInfo(cert, key, verifier, 3 if target is None else int.from_bytes(target, "big"))

    def log_level(self) -> int:
        """The newest commands every member decodes (meta/levels.py, LOG_LEVEL); a single node's
        is its own build's."""
        txn = self._view()
        cluster = self._sm.cluster
        if not cluster.initialised(txn):
            return LOG_LEVEL
        level = cluster.log_level(txn)
        return BASE_LOG_LEVEL if level is None else level

    def may_propose(self, command: type) -> bool:
        """May this node propose commands of this kind now? Not while a member's build could not
        decode them (a rolling upgrade under way)."""
        return level_of(command) <= self.log_level()

    def join_verifier(self) -> bytes | None:
        return self._sm.cluster.value(self._view(), b"join_verifier")

    def member(self, node: int) -> Member | None:
        record = self._sm.cluster.member(self._view(), node)
        return None if record is None else member_from_record(node, record)

    def members(self) -> dict[int, Member]:
        return {node: member_from_record(node, record) for node, record in self._sm.cluster.members(self._view()).items()}

    def revoked_serials(self) -> set[int]:
        return self._sm.cluster.revoked_serials(self._view())

    def lease_holder(self, ino: int) -> int:
        """The node holding the file's write lease or directory's delegation (0: none). Leases are
        read as committed: a grant acknowledged ahead counts once the log has it (the coherence
        layer keeps what it was granted ahead itself), and one that the log refuses never counts."""
        return self._sm.cluster.lease_holder(self._log.read_txn(), ino)

    def leases_of(self, node: int) -> list[int]:
        """The files whose write lease `node` holds."""
        return self._sm.cluster.leases_of(self._log.read_txn(), node)


class CommittedReader:
    """The metadata as last committed to LMDB, read from another process (a read worker,
    fuse/kernel/workers.py): read-only, without the log, the state machine or anything applied and
    not committed yet. Each call is one short read transaction."""

    def __init__(self, path: Path) -> None:
        self._store = MetaStore(path, readonly=True)
        self._ns = Namespace(self._store)
        self._fmap = self._store.db["fmap"]

    def file_map(self, ino: int, first_block: int, end_block: int) -> tuple[Inode | None, list[Extent]]:
        """The inode and its extents overlapping [first_block, end_block), from one transaction."""
        for attempt in (1, 2):
            try:
                with self._store.env.begin() as txn:
                    inode = self._ns.get_inode(txn, ino)
                    if inode is None:
                        return None, []
                    return inode, list(extents_in(txn, self._fmap, ino, first_block, end_block))
            except lmdb.MapResizedError:  # the writer grew the map: adopt its size, once
                if attempt == 2:
                    raise
                self._store.env.set_mapsize(0)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._store.close()


def _orphan(key: bytes, value: bytes) -> Orphan:
    return Orphan(int.from_bytes(key, "big"), unpack_holders(bytes(value)))

