"""A test-only `VolumeService`: volumes are real directories under a temporary root.

This stands in for the filesystem core (awsomefsd/daemon/volumes.py) so the gRPC layer's tests run fast and
in-process, with fault injection; the same tests also run against the real daemon (see the
`volume_service` fixture in conftest.py). It keeps the contract's semantics the servicers rely on:

- idempotent create by name (same capacity and source: the same volume; otherwise
  VolumeAlreadyExists), idempotent deletes, ids in the `ids.py` shape, lists ordered by id;
- snapshots and clones are full copies (the core does copy-on-write; the observable content is
  the same), and a volume from a snapshot may not be smaller than the snapshot;
- capacity is thick-provisioned against `total_bytes`, so over-asking is InsufficientCapacity.

What it does not do: enforce the quota on writes (the core returns EDQUOT at the limit).
Because volumes are real directories, NodePublish's bind mounts in the tests are real mounts.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import trio

from awsomefsd.csi import ids
from awsomefsd.csi.backend import (
    CapacityOutOfRange,
    InsufficientCapacity,
    SnapshotInfo,
    VolumeAlreadyExists,
    VolumeInfo,
    VolumeNotFound,
)

MAX_WALK_ENTRIES = 100_000  # usage accounting walks the tree; tests stay far below this


def _usage(directory: Path) -> tuple[int, int]:
    """(bytes, inodes) used below `directory`, the directory itself not counted."""
    used_bytes = used_inodes = 0
    for n, (root, dirs, files) in enumerate(os.walk(directory)):
        assert n < MAX_WALK_ENTRIES
        for name in dirs + files:
            used_inodes += 1
            if name in files:
                used_bytes += os.lstat(os.path.join(root, name)).st_size
    return used_bytes, used_inodes


class DirectoryVolumes:
    """In-memory records plus one real directory per volume and per snapshot."""

    def __init__(self, root: Path, total_bytes: int = 1 << 40) -> None:
        self.root = root
        self.total_bytes = total_bytes
        self.healthy = True  # tests flip this to see Probe and NodeStage react
        self._volumes: dict[str, VolumeInfo] = {}
        self._snapshots: dict[str, SnapshotInfo] = {}
        self._lock = trio.Lock()
        (root / "volumes").mkdir(parents=True, exist_ok=True)
        (root / "snapshots").mkdir(parents=True, exist_ok=True)

    def _snapshot_dir(self, snapshot_id: str) -> Path:
        assert ids.is_snapshot_id(snapshot_id), snapshot_id
        return self.root / "snapshots" / snapshot_id

    def _allocated_bytes(self) -> int:
        return sum(v.capacity_bytes for v in self._volumes.values())

    async def _with_usage(self, info: VolumeInfo) -> VolumeInfo:
        used_bytes, used_inodes = await trio.to_thread.run_sync(
            _usage, Path(self.volume_path(info.volume_id))
        )
        return replace(info, used_bytes=used_bytes, used_inodes=used_inodes)

    async def create_volume(
        self,
        name: str,
        capacity_bytes: int,
        *,
        inode_limit: int = 0,
        source_kind: Literal["", "snapshot", "volume"] = "",
        source_id: str = "",
    ) -> VolumeInfo:
        async with self._lock:
            volume_id = ids.derive_volume_id(name)
            existing = self._volumes.get(volume_id)
            if existing is not None:
                if (existing.capacity_bytes, existing.source_kind, existing.source_id) != (
                    capacity_bytes,
                    source_kind,
                    source_id,
                ):
                    raise VolumeAlreadyExists(f"volume {name!r} exists with another size or source")
                return await self._with_usage(existing)
            source_dir: Path | None = None
            if source_kind == "snapshot":
                snapshot = self._snapshots.get(source_id)
                if snapshot is None:
                    raise VolumeNotFound(f"snapshot {source_id} does not exist")
                if capacity_bytes < snapshot.size_bytes:
                    raise CapacityOutOfRange(f"snapshot {source_id} needs {snapshot.size_bytes} bytes")
                source_dir = self._snapshot_dir(source_id)
            elif source_kind == "volume":
                source_volume = self._volumes.get(source_id)
                if source_volume is None:
                    raise VolumeNotFound(f"volume {source_id} does not exist")
                if capacity_bytes < source_volume.capacity_bytes:
                    raise CapacityOutOfRange(f"volume {source_id} needs {source_volume.capacity_bytes} bytes")
                source_dir = Path(self.volume_path(source_id))
            if capacity_bytes > self.total_bytes - self._allocated_bytes():
                raise InsufficientCapacity(f"{capacity_bytes} bytes do not fit")
            target = Path(self.volume_path(volume_id))
            if source_dir is not None:
                await trio.to_thread.run_sync(shutil.copytree, source_dir, target)
            else:
                target.mkdir()
            info = VolumeInfo(
                volume_id=volume_id,
                name=name,
                capacity_bytes=capacity_bytes,
                used_bytes=0,
                used_inodes=0,
                inode_limit=inode_limit,
                source_kind=source_kind,
                source_id=source_id,
                created_ns=time.time_ns(),
            )
            self._volumes[volume_id] = info
            return await self._with_usage(info)

    async def delete_volume(self, volume_id: str) -> None:
        async with self._lock:
            if self._volumes.pop(volume_id, None) is not None:
                await trio.to_thread.run_sync(shutil.rmtree, self.volume_path(volume_id))

    async def get_volume(self, volume_id: str) -> VolumeInfo | None:
        info = self._volumes.get(volume_id)
        return await self._with_usage(info) if info is not None else None

    async def list_volumes(self) -> list[VolumeInfo]:
        return [await self._with_usage(self._volumes[k]) for k in sorted(self._volumes)]

    async def expand_volume(self, volume_id: str, capacity_bytes: int) -> VolumeInfo:
        async with self._lock:
            info = self._volumes.get(volume_id)
            if info is None:
                raise VolumeNotFound(f"volume {volume_id} does not exist")
            if capacity_bytes < info.capacity_bytes:
                raise CapacityOutOfRange("volumes do not shrink")
            if capacity_bytes - info.capacity_bytes > self.total_bytes - self._allocated_bytes():
                raise InsufficientCapacity(f"{capacity_bytes} bytes do not fit")
            self._volumes[volume_id] = info = replace(info, capacity_bytes=capacity_bytes)
            return await self._with_usage(info)

    async def create_snapshot(self, name: str, source_volume_id: str) -> SnapshotInfo:
        async with self._lock:
            snapshot_id = ids.derive_snapshot_id(name)
            existing = self._snapshots.get(snapshot_id)
            if existing is not None:
                if existing.source_volume_id != source_volume_id:
                    raise VolumeAlreadyExists(f"snapshot {name!r} exists for another volume")
                return existing
            source = self._volumes.get(source_volume_id)
            if source is None:
                raise VolumeNotFound(f"volume {source_volume_id} does not exist")
            await trio.to_thread.run_sync(
                shutil.copytree, self.volume_path(source_volume_id), self._snapshot_dir(snapshot_id)
            )
            info = SnapshotInfo(
                snapshot_id=snapshot_id,
                name=name,
                source_volume_id=source_volume_id,
                size_bytes=source.capacity_bytes,
                created_ns=time.time_ns(),
                ready=True,
            )
            self._snapshots[snapshot_id] = info
            return info

    async def delete_snapshot(self, snapshot_id: str) -> None:
        async with self._lock:
            if self._snapshots.pop(snapshot_id, None) is not None:
                await trio.to_thread.run_sync(shutil.rmtree, self._snapshot_dir(snapshot_id))

    async def get_snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        return self._snapshots.get(snapshot_id)

    async def list_snapshots(self) -> list[SnapshotInfo]:
        return [self._snapshots[k] for k in sorted(self._snapshots)]

    async def capacity(self) -> tuple[int, int]:
        return self.total_bytes, self.total_bytes - self._allocated_bytes()

    def mount_point(self) -> str:
        return str(self.root)

    def volume_path(self, volume_id: str) -> str:
        assert ids.is_volume_id(volume_id), volume_id
        return str(self.root / "volumes" / volume_id)

    async def mount_healthy(self) -> bool:
        return self.healthy and await trio.to_thread.run_sync(os.path.isdir, self.root)
