"""The contract between the CSI servicers and the filesystem core.

The CSI layer speaks gRPC and the CSI spec's error codes; the core owns volumes, quotas and
snapshots as replicated metadata. This protocol is the seam: the servicers translate requests into
these calls and the exceptions below into status codes. Every call is idempotent where the CSI spec
asks for it, so a retried RPC never creates a second volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    name: str
    capacity_bytes: int
    used_bytes: int
    used_inodes: int
    inode_limit: int  # 0 means unlimited
    source_kind: Literal["", "snapshot", "volume"]
    source_id: str
    created_ns: int


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    name: str
    source_volume_id: str
    size_bytes: int
    created_ns: int
    ready: bool


class VolumeError(Exception):
    """Base of the errors the CSI layer maps onto status codes."""


class VolumeNotFound(VolumeError):
    """NOT_FOUND: the volume or snapshot id names nothing."""


class VolumeAlreadyExists(VolumeError):
    """ALREADY_EXISTS: the name is taken by a volume or snapshot incompatible with the request."""


class CapacityOutOfRange(VolumeError):
    """OUT_OF_RANGE: the requested capacity cannot be satisfied (or shrinks a volume)."""


class InsufficientCapacity(VolumeError):
    """RESOURCE_EXHAUSTED: the device has no room for the requested capacity."""


class VolumeBusy(VolumeError):
    """FAILED_PRECONDITION: e.g. deleting a volume that still has snapshots depending on it."""


class VolumeService(Protocol):
    """Volumes are directory trees with an enforced quota; snapshots are copy-on-write trees."""

    async def create_volume(
        self,
        name: str,
        capacity_bytes: int,
        *,
        inode_limit: int = 0,
        source_kind: Literal["", "snapshot", "volume"] = "",
        source_id: str = "",
    ) -> VolumeInfo:
        """Create (or return the existing compatible) volume called `name`."""
        ...

    async def delete_volume(self, volume_id: str) -> None:
        """Delete a volume and its data; deleting an unknown id succeeds (idempotent)."""
        ...

    async def get_volume(self, volume_id: str) -> VolumeInfo | None: ...

    async def list_volumes(self) -> list[VolumeInfo]:
        """All volumes, ordered by volume_id (stable, so the servicer can paginate)."""
        ...

    async def expand_volume(self, volume_id: str, capacity_bytes: int) -> VolumeInfo: ...

    async def create_snapshot(self, name: str, source_volume_id: str) -> SnapshotInfo:
        """Create (or return the existing) snapshot called `name` of `source_volume_id`."""
        ...

    async def delete_snapshot(self, snapshot_id: str) -> None: ...

    async def get_snapshot(self, snapshot_id: str) -> SnapshotInfo | None: ...

    async def list_snapshots(self) -> list[SnapshotInfo]:
        """All snapshots, ordered by snapshot_id."""
        ...

    async def capacity(self) -> tuple[int, int]:
        """(total_bytes, free_bytes) of the device's data area."""
        ...

    def mount_point(self) -> str:
        """Where this node mounts the filesystem; volumes live below it."""
        ...

    def volume_path(self, volume_id: str) -> str:
        """Absolute path of the volume's root directory on this node's mount."""
        ...

    async def mount_healthy(self) -> bool:
        """True when the node's FUSE mount answers (a stat of its root succeeds)."""
        ...
