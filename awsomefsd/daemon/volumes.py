"""The CSI `VolumeService` on the filesystem core: volumes and snapshots as replicated metadata.

The state machine owns the semantics (awsomefsd/meta/volumes_sm.py): a volume is the directory
`/.volumes/vol-%016x` whose number is its root inode number, with a quota the state machine
enforces (EDQUOT); a snapshot is a read-only tree `/.snapshots/snap-%016x` sharing extents by
reference count; a clone copies a volume or snapshot tree the same way. This module translates
between that and the CSI layer's contract (awsomefsd/csi/backend.py): ids, idempotency rules,
error classes, and the node-side paths.

CSI ids. A CSI id is `vol-`/`snap-` plus 32 hex digits (awsomefsd/csi/ids.py). Here the first 16
digits are the internal number and the last 16 a check tag, SHA-256 over the cluster id, the kind
and the number. So an id resolves with one keyed read (no table scan, no extra state, nothing to
keep consistent), a source id can always be rendered even after its snapshot is gone, and an id
from another cluster (or one typed by hand) fails the tag check and names nothing. Retries are
stable because the state machine answers a repeated name with the existing record, and numbers
come from the inode counter, so a deleted volume's id is never reused.

Everything here runs on the daemon's trio thread (the gRPC bridge calls the servicers there), so a
read transaction is taken, used and dropped without an await in between, as the log requires.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import trio

from awsomefsd.csi.backend import (
    CapacityOutOfRange,
    InsufficientCapacity,
    SnapshotInfo,
    VolumeAlreadyExists,
    VolumeError,
    VolumeInfo,
    VolumeNotFound,
)
from awsomefsd.csi.ids import ID_HEX_CHARS, SNAPSHOT_PREFIX, VOLUME_PREFIX, is_snapshot_id, is_volume_id
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import (
    ROOT_INO,
    SNAPSHOTS_INO,
    VOLUMES_INO,
    Volume,
    snapshot_dir_name,
    volume_dir_name,
)

if TYPE_CHECKING:
    from awsomefsd.config import Settings
    from awsomefsd.daemon.node import Core

log = logging.getLogger(__name__)

VOLUMES_DIR = ".volumes"
SNAPSHOTS_DIR = ".snapshots"
HEALTH_TIMEOUT_S = 5.0
# A stat of a hung FUSE mount never returns; its abandoned thread keeps its token, so at most this
# many threads pile up however often the liveness probe asks.
HEALTH_THREADS = 2
_NUMBER_HEX = ID_HEX_CHARS // 2
Kind = Literal["volume", "snapshot"]
SourceKind = Literal["", "snapshot", "volume"]


def _tag(cluster_id: str, kind: Kind, number: int) -> str:
    data = f"awsomefs/{kind}-id\x00{cluster_id}\x00{number}".encode()
    return hashlib.sha256(data).hexdigest()[:_NUMBER_HEX]


def csi_id(cluster_id: str, kind: Kind, number: int) -> str:
    """The CSI id of volume or snapshot `number` in cluster `cluster_id`."""
    assert 0 < number < 1 << 64, number
    prefix = VOLUME_PREFIX if kind == "volume" else SNAPSHOT_PREFIX
    return f"{prefix}{number:0{_NUMBER_HEX}x}{_tag(cluster_id, kind, number)}"


def parse_csi_id(cluster_id: str, kind: Kind, value: str) -> int | None:
    """The internal number a CSI id names, or None when it has the wrong shape or tag."""
    if not (is_volume_id(value) if kind == "volume" else is_snapshot_id(value)):
        return None
    digits = value.split("-", 1)[1]
    number = int(digits[:_NUMBER_HEX], 16)
    if number == 0 or digits[_NUMBER_HEX:] != _tag(cluster_id, kind, number):
        return None
    return number


def _invalidate_kernel_entry(parent_ino: int, name: bytes) -> None:
    """Drop the kernel's cached dentry (positive or negative) for a directory the state machine
    created or removed behind the kernel's back; otherwise it lingers for the entry timeout.
    On a thread of its own: the kernel may hold the notification until a request about the same
    directory is answered, and requests are answered on the caller's thread."""
    from awsomefsd.fuse.invalidate import MOUNTED

    def notify() -> None:
        try:
            MOUNTED.invalidate_entry(parent_ino, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot drop the kernel's entry %r in inode %d: %s", name, parent_ino, exc)

    threading.Thread(target=notify, name="invalidate-entry", daemon=True).start()


class CoreVolumes:
    """`VolumeService` on a `Core`: every mutation is one state-machine command through the log.

    `mount` is where this node mounts the filesystem (volume paths are below it).
    `invalidate_entry(parent_ino, name)` is called after a volume directory appears or disappears
    so the kernel forgets cached entries; the daemon passes pyfuse3's, tests without FUSE none.
    """

    def __init__(
        self,
        core: Core,
        mount: str | os.PathLike[str],
        *,
        invalidate_entry: Callable[[int, bytes], None] | None = None,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
    ) -> None:
        self.core = core
        self.mount = Path(mount)
        self.cluster_id = str(core.superblock.cluster_id)
        self.total_bytes = core.superblock.layout.data_blocks * BLOCK_SIZE
        self._invalidate = invalidate_entry
        self._health_timeout_s = health_timeout_s
        self._health_limiter = trio.CapacityLimiter(HEALTH_THREADS)

    # -- ids and records ------------------------------------------------------------------------
    def _number(self, kind: Kind, value: str) -> int | None:
        return parse_csi_id(self.cluster_id, kind, value)

    async def _caught_up(self) -> None:
        """On a cluster member, first apply everything committed before the call: a volume made
        or deleted through another node's endpoint a moment ago is then seen here (ListVolumes on
        the next node missed one just made; a DeleteVolume there would have answered "deleted"
        for a volume it had not seen yet)."""
        coherence = self.core.ops.coherence
        if coherence is not None:
            await coherence.catch_up(drain=False)  # no kernel cache is read here

    def _record(self, kind: Kind, value: str) -> Volume | None:
        """The volume or snapshot a CSI id names, or None."""
        number = self._number(kind, value)
        if number is None:
            return None
        record = self.core.meta.volume(number)
        if record is None or record.kind != kind:
            return None
        return record

    def _volume_info(self, record: Volume) -> VolumeInfo:
        source_kind: SourceKind = record.source_kind
        source_id = csi_id(self.cluster_id, source_kind, record.source_id) if source_kind else ""
        return VolumeInfo(
            volume_id=csi_id(self.cluster_id, "volume", record.id),
            name=record.name,
            capacity_bytes=record.capacity_bytes,
            # counted as `df` in the volume counts it (FsOps.statfs): its blocks and the blocks its
            # buffered writes will take, so kubelet's figures and the pod's `df` agree
            used_bytes=(record.used_blocks + self.core.data.delayed_blocks(record.id)) * BLOCK_SIZE,
            used_inodes=record.used_inodes,
            inode_limit=record.inode_limit,
            source_kind=source_kind,
            source_id=source_id,
            created_ns=record.created_ns,
        )

    def _snapshot_info(self, record: Volume) -> SnapshotInfo:
        return SnapshotInfo(
            snapshot_id=csi_id(self.cluster_id, "snapshot", record.id),
            name=record.name,
            source_volume_id=csi_id(self.cluster_id, "volume", record.source_id),
            # the data it holds: the least capacity a volume restored from it needs
            size_bytes=record.used_bytes,
            created_ns=record.created_ns,
            ready=True,  # a snapshot is complete when its command has applied
        )

    def _check_fits(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise CapacityOutOfRange(f"capacity {capacity_bytes} must be positive")
        if capacity_bytes > self.total_bytes:
            raise InsufficientCapacity(
                f"{capacity_bytes} bytes exceed the device's data area of {self.total_bytes} bytes"
            )

    def _entry_changed(self, parent_ino: int, name: bytes) -> None:
        if self._invalidate is None:
            return
        try:
            self._invalidate(parent_ino, name)
        except Exception:  # a stale cache entry is cosmetic; the command has applied
            log.exception("invalidating the kernel entry %r failed", name)

    async def _propose(self, command: c.Command[dict[str, Any]]) -> Volume:
        """Propose a command that leaves a volume or snapshot record (create, resize, snapshot)
        and translate the state machine's refusals into the CSI layer's errors."""
        try:
            return await self.core.meta.propose_volume(command)
        except FsError as exc:
            mapped = _volume_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def _propose_delete(self, command: c.Command[bool]) -> None:
        """`_propose` for a deletion (it leaves no record)."""
        try:
            await self.core.meta.propose(command)
        except FsError as exc:
            mapped = _volume_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    # -- VolumeService --------------------------------------------------------------------------
    async def create_volume(
        self,
        name: str,
        capacity_bytes: int,
        *,
        inode_limit: int = 0,
        source_kind: SourceKind = "",
        source_id: str = "",
    ) -> VolumeInfo:
        """Create `name`, or return it when it exists with the same capacity, limit and source."""
        await self._caught_up()
        self._check_fits(capacity_bytes)
        if inode_limit < 0:
            raise CapacityOutOfRange(f"inode limit {inode_limit} must not be negative")
        wanted = (capacity_bytes, inode_limit, source_kind, source_id)
        existing = self.core.meta.volume_by_name("volume", name)
        if existing is not None:
            # checked before the source: a retry after the source snapshot was deleted still succeeds
            return self._compatible(name, existing, wanted)
        source_number = 0
        if source_kind == "snapshot" or source_kind == "volume":
            source = self._record(source_kind, source_id)
            if source is None:
                raise VolumeNotFound(f"{source_kind} {source_id} does not exist")
            source_number = source.id
            if source_kind == "volume":
                await self.core.data.flush_volume(source_number)
                source = self.core.meta.volume(source_number) or source
            if source.used_bytes > capacity_bytes:
                raise CapacityOutOfRange(
                    f"{source_kind} {source_id} holds {source.used_bytes} bytes, more than {capacity_bytes}"
                )
        number = await self.core.ops.new_ino()
        command = c.CreateVolume(
            number, name, number, capacity_bytes, inode_limit, time.time_ns(),
            source_kind=source_kind, source_id=source_number,
        )
        # A racing proposal of the same name (another node) makes the state machine answer with
        # that volume's record, which is then checked for compatibility like any other.
        result = await self._propose(command)
        if result.id == number:
            self._entry_changed(VOLUMES_INO, volume_dir_name(number))
        return self._compatible(name, result, wanted)

    def _compatible(self, name: str, record: Volume, wanted: tuple[int, int, str, str]) -> VolumeInfo:
        """The existing volume `name` if it is what was asked for, else VolumeAlreadyExists."""
        info = self._volume_info(record)
        have = (info.capacity_bytes, info.inode_limit, info.source_kind, info.source_id)
        if have != wanted:
            raise VolumeAlreadyExists(
                f"volume {name!r} exists with (capacity, inode limit, source kind, source) {have}, "
                f"not {wanted}"
            )
        return info

    async def delete_volume(self, volume_id: str) -> None:
        """Delete the volume's tree; its extents stay while snapshots or clones share them."""
        await self._caught_up()
        found = self._record("volume", volume_id)
        if found is None:
            return
        number = found.id
        await self._propose_delete(c.DeleteVolume(number, time.time_ns()))
        # buffered writes into the deleted files would only fail at their next flush: drop them
        self.core.data.forget_volume(number)
        self._entry_changed(VOLUMES_INO, volume_dir_name(number))

    async def get_volume(self, volume_id: str) -> VolumeInfo | None:
        await self._caught_up()
        found = self._record("volume", volume_id)
        return None if found is None else self._volume_info(found)

    async def list_volumes(self) -> list[VolumeInfo]:
        """All volumes by id (the number leads the id, so this is creation order too)."""
        await self._caught_up()
        infos = [self._volume_info(r) for r in self.core.meta.volumes() if r.kind == "volume"]
        return sorted(infos, key=lambda info: info.volume_id)

    async def expand_volume(self, volume_id: str, capacity_bytes: int) -> VolumeInfo:
        """Raise the quota; the same size again is a no-op, a smaller one CapacityOutOfRange."""
        await self._caught_up()
        record = self._record("volume", volume_id)
        if record is None:
            raise VolumeNotFound(f"volume {volume_id} does not exist")
        if capacity_bytes < record.capacity_bytes:
            raise CapacityOutOfRange(f"volume {volume_id} has {record.capacity_bytes} bytes; volumes do not shrink")
        self._check_fits(capacity_bytes)
        if capacity_bytes != record.capacity_bytes:
            record = await self._propose(c.ResizeVolume(record.id, capacity_bytes, time.time_ns()))
        return self._volume_info(record)

    async def create_snapshot(self, name: str, source_volume_id: str) -> SnapshotInfo:
        """Snapshot `source_volume_id` as `name`; the name taken for another volume is ALREADY_EXISTS."""
        await self._caught_up()
        existing = self.core.meta.volume_by_name("snapshot", name)
        if existing is not None:
            if csi_id(self.cluster_id, "volume", existing.source_id) != source_volume_id:
                raise VolumeAlreadyExists(f"snapshot {name!r} exists for another volume")
            return self._snapshot_info(existing)
        found = self._record("volume", source_volume_id)
        if found is None:
            raise VolumeNotFound(f"volume {source_volume_id} does not exist")
        await self.core.data.flush_volume(found.id)
        number = await self.core.ops.new_ino()
        result = await self._propose(c.CreateSnapshot(number, name, found.id, time.time_ns()))
        if result.id == number:
            self._entry_changed(SNAPSHOTS_INO, snapshot_dir_name(number))
        if result.source_id != found.id:  # a racing proposal of the name for another volume
            raise VolumeAlreadyExists(f"snapshot {name!r} exists for another volume")
        return self._snapshot_info(result)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self._caught_up()
        found = self._record("snapshot", snapshot_id)
        if found is None:
            return
        await self._propose_delete(c.DeleteSnapshot(found.id, time.time_ns()))
        self._entry_changed(SNAPSHOTS_INO, snapshot_dir_name(found.id))

    async def get_snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        await self._caught_up()
        found = self._record("snapshot", snapshot_id)
        return None if found is None else self._snapshot_info(found)

    async def list_snapshots(self) -> list[SnapshotInfo]:
        await self._caught_up()
        infos = [self._snapshot_info(r) for r in self.core.meta.volumes() if r.kind == "snapshot"]
        return sorted(infos, key=lambda info: info.snapshot_id)

    async def capacity(self) -> tuple[int, int]:
        """(total, free) bytes of the data area, as statfs reports them (volumes are thin)."""
        stats = self.core.ops.statfs()
        total = stats.total_blocks * stats.block_size
        # statfs counts every delayed free as free, including releases of extents a snapshot or
        # clone still shares, so for a grace period it can exceed the device; never report that
        return total, min(total, stats.free_blocks * stats.block_size)

    def mount_point(self) -> str:
        return str(self.mount)

    def volume_path(self, volume_id: str) -> str:
        """`<mount>/.volumes/vol-%016x`: computed from the id alone, so a bad id never becomes a path."""
        number = self._number("volume", volume_id)
        if number is None:
            raise VolumeNotFound(f"volume {volume_id} does not exist")
        return str(self.mount / VOLUMES_DIR / volume_dir_name(number).decode())

    def snapshot_path(self, snapshot_id: str) -> str:
        """`<mount>/.snapshots/snap-%016x` (read-only); not part of the protocol, handy for restores."""
        number = self._number("snapshot", snapshot_id)
        if number is None:
            raise VolumeNotFound(f"snapshot {snapshot_id} does not exist")
        return str(self.mount / SNAPSHOTS_DIR / snapshot_dir_name(number).decode())

    async def mount_healthy(self) -> bool:
        """True when a stat of the mount root is answered by this filesystem within the timeout."""
        with trio.move_on_after(self._health_timeout_s):
            try:
                st = await trio.to_thread.run_sync(
                    _stat_root, self.mount, limiter=self._health_limiter, abandon_on_cancel=True
                )
            except OSError:
                return False
            return st.st_ino == ROOT_INO  # an unmounted mount point is a plain directory
        return False


def _stat_root(mount: Path) -> os.stat_result:
    """The blocking half of the health check (a module function so tests can hang it)."""
    return os.stat(mount)


def _volume_error(exc: FsError) -> VolumeError | FsError:
    """The CSI error class for a state-machine refusal; anything unexpected stays an FsError."""
    if exc.errno == errno.ENOENT:
        return VolumeNotFound(str(exc.args[1]))
    if exc.errno == errno.EEXIST:
        return VolumeAlreadyExists(str(exc.args[1]))
    if exc.errno in (errno.EDQUOT, errno.EINVAL, errno.EFBIG):
        return CapacityOutOfRange(str(exc.args[1]))
    if exc.errno == errno.ENOSPC:
        return InsufficientCapacity(str(exc.args[1]))
    return exc


async def start_csi(nursery: trio.Nursery, core: Core, settings: Settings) -> None:
    """Serve CSI for this node on `settings.csi.socket`, in the daemon's nursery, until cancelled."""
    from awsomefsd.csi.server import serve_csi

    assert settings.csi.socket is not None
    if settings.mount.path is None:
        raise ValueError("the CSI endpoint needs the filesystem mounted: set [mount] path")
    volumes = CoreVolumes(core, settings.mount.path, invalidate_entry=_invalidate_kernel_entry)
    node_id = settings.csi.node_id or settings.node.name
    address = await nursery.start(serve_csi, volumes, settings.csi.socket, node_id)
    log.info("CSI endpoint on %s (node id %s)", address, node_id)
