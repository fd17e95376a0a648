"""CSI Node service: publish a volume's directory into a pod by bind-mounting it.

Stage checks that this node's AwsomeFS mount answers and the volume exists (there is nothing to
attach or format: the volume already lives in the mounted tree). Publish bind-mounts the volume
directory onto the target path kubelet chose, read-only when asked; Unpublish unmounts it and
removes the (then empty) target directory, never anything below it. All of them are idempotent:
an already-published target with the same volume and the same read-only setting is success, a
different one is ALREADY_EXISTS, as the spec asks.

Mount syscalls block (path lookup can wait on the FUSE server), so they run in worker threads,
bounded by a limiter and a timeout; calls on one target path are serialised.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import grpc
import trio

from awsomefsd.csi import mounts
from awsomefsd.csi.backend import VolumeInfo, VolumeService
from awsomefsd.csi.generated import csi_pb2
from awsomefsd.csi.identity import mount_is_healthy
from awsomefsd.csi.locks import KeyedLock
from awsomefsd.csi.validate import (
    READ_ONLY_MODES,
    check_capability,
    check_capacity_range,
    invalid,
    node_path,
    not_found,
    require_fields,
    volume_id_or_not_found,
    within,
)
from awsomefsd.rpc.bridge import RpcAbort

T = TypeVar("T")

MOUNT_TIMEOUT_S = 30.0
MAX_MOUNT_THREADS = 4
TARGET_DIR_MODE = 0o750

_RPC = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = (
    _RPC.STAGE_UNSTAGE_VOLUME,
    _RPC.GET_VOLUME_STATS,
    _RPC.EXPAND_VOLUME,
    _RPC.SINGLE_NODE_MULTI_WRITER,
)
_Usage = csi_pb2.VolumeUsage


class NodeServicer:
    def __init__(self, volumes: VolumeService, node_id: str, topology_segments: Mapping[str, str]) -> None:
        assert node_id and len(node_id.encode()) <= 256, node_id  # the spec's node_id limit
        self._volumes = volumes
        self._node_id = node_id
        self._segments = dict(topology_segments)
        self._locks = KeyedLock()
        self._mount_limiter = trio.CapacityLimiter(MAX_MOUNT_THREADS)

    async def _blocking(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking filesystem call in a thread; a hung one is abandoned after the timeout."""
        with trio.fail_after(MOUNT_TIMEOUT_S):
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self._mount_limiter, abandon_on_cancel=True
            )

    async def _healthy_volume(self, volume_id: str) -> tuple[VolumeInfo, str]:
        """The volume and its directory on this node; NOT_FOUND / UNAVAILABLE as the spec maps them."""
        info = await self._volumes.get_volume(volume_id)
        if info is None:
            raise not_found(f"volume {volume_id} does not exist")
        if not await mount_is_healthy(self._volumes):
            raise RpcAbort(
                grpc.StatusCode.UNAVAILABLE, "this node's AwsomeFS mount does not answer; retry later"
            )
        directory = self._volumes.volume_path(volume_id)
        # `within` resolves symlinks, i.e. lstat()s below the mount: in the daemon that is a FUSE
        # request this very thread must answer, so it runs in a worker thread like every mount call
        if not os.path.isabs(directory) or not await self._blocking(within, directory, self._volumes.mount_point()):
            raise RpcAbort(grpc.StatusCode.INTERNAL, f"volume {volume_id} resolves outside the mount")
        return info, directory

    async def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        require_fields(request, "volume_id", "staging_target_path", "volume_capability")
        node_path(request.staging_target_path, "staging_target_path")
        check_capability(request.volume_capability, unsupported=grpc.StatusCode.FAILED_PRECONDITION)
        volume_id = volume_id_or_not_found(request.volume_id)
        _info, directory = await self._healthy_volume(volume_id)
        if not await self._blocking(os.path.isdir, directory):
            raise not_found(f"volume {volume_id} has no directory on this node")
        return csi_pb2.NodeStageVolumeResponse()

    async def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        require_fields(request, "volume_id", "staging_target_path")
        node_path(request.staging_target_path, "staging_target_path")
        volume_id_or_not_found(request.volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        require_fields(request, "volume_id", "target_path", "volume_capability")
        target = node_path(request.target_path, "target_path")
        if request.staging_target_path:
            node_path(request.staging_target_path, "staging_target_path")
        cap = request.volume_capability
        check_capability(cap, unsupported=grpc.StatusCode.FAILED_PRECONDITION)
        readonly = (
            request.readonly or cap.access_mode.mode in READ_ONLY_MODES or "ro" in cap.mount.mount_flags
        )
        flags = (frozenset(cap.mount.mount_flags) - {"rw", "ro"}) | ({"ro"} if readonly else set())
        if await self._blocking(within, target, self._volumes.mount_point()):  # lstat()s: see above
            raise invalid("target_path must not lie inside the AwsomeFS mount itself")
        volume_id = volume_id_or_not_found(request.volume_id)
        _info, directory = await self._healthy_volume(volume_id)
        if not request.staging_target_path:  # this plugin has STAGE_UNSTAGE_VOLUME: the spec's row
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                           "staging_target_path is not set: NodeStageVolume must succeed first")
        async with self._locks.hold("target:" + target):
            await self._blocking(_publish, directory, target, flags, readonly)
        return csi_pb2.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        require_fields(request, "volume_id", "target_path")
        target = node_path(request.target_path, "target_path")
        volume_id_or_not_found(request.volume_id)
        async with self._locks.hold("target:" + target):
            await self._blocking(_unpublish, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    async def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        require_fields(request, "volume_id", "volume_path")
        volume_id = volume_id_or_not_found(request.volume_id)
        info, directory = await self._healthy_volume(volume_id)
        # volume_path says where the volume is: checked after the volume's existence, and a path
        # that cannot be absolute and normal holds no volume, the table's NOT_FOUND ("does not
        # exist on the specified volume_path"; csi-sanity sends "some/path" and expects it)
        try:
            volume_path = node_path(request.volume_path, "volume_path")
        except RpcAbort as exc:
            raise not_found(f"volume {volume_id} is not at that volume_path: {exc.message}") from None
        if request.staging_target_path:
            node_path(request.staging_target_path, "staging_target_path")
        try:
            same = await self._blocking(mounts.same_directory, volume_path, directory)
            fs = await self._blocking(os.statvfs, directory)
        except FileNotFoundError:
            raise not_found(f"volume_path {volume_path} does not exist") from None
        if not same:
            raise not_found(f"volume {volume_id} is not published at {volume_path}")
        inode_total = info.inode_limit or info.used_inodes + fs.f_favail
        usage = [
            _Usage(
                unit=_Usage.BYTES,
                total=info.capacity_bytes,
                used=info.used_bytes,
                available=max(0, info.capacity_bytes - info.used_bytes),
            ),
            _Usage(
                unit=_Usage.INODES,
                total=inode_total,
                used=info.used_inodes,
                available=max(0, inode_total - info.used_inodes),
            ),
        ]
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage)

    async def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        """Nothing to grow on the node: the quota lives in the shared metadata. Reports the size."""
        require_fields(request, "volume_id", "volume_path")
        if request.HasField("volume_capability"):
            check_capability(request.volume_capability)  # the table's "Exceeds capabilities": INVALID_ARGUMENT
        check_capacity_range(request.capacity_range)
        volume_id = volume_id_or_not_found(request.volume_id)
        info = await self._volumes.get_volume(volume_id)
        if info is None:
            raise not_found(f"volume {volume_id} does not exist")
        # the paths say where the volume is, so they come after its existence (an unknown volume
        # at "some/path" is NOT_FOUND, as csi-sanity checks); a malformed one is INVALID_ARGUMENT
        node_path(request.volume_path, "volume_path")
        if request.staging_target_path:
            node_path(request.staging_target_path, "staging_target_path")
        wanted = request.capacity_range.required_bytes
        if wanted > info.capacity_bytes:
            raise RpcAbort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"volume {volume_id} has {info.capacity_bytes} bytes; ControllerExpandVolume grows it first",
            )
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=info.capacity_bytes)

    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        caps = [csi_pb2.NodeServiceCapability(rpc=_RPC(type=t)) for t in CAPABILITIES]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self._node_id,
            max_volumes_per_node=0,
            accessible_topology=csi_pb2.Topology(segments=self._segments),
        )


def _publish(directory: str, target: str, flags: frozenset[str], readonly: bool) -> None:
    """Bind `directory` onto `target` (thread side). Idempotent; a conflicting mount is ALREADY_EXISTS."""
    existing = mounts.mount_at(target)
    if existing is not None:
        if mounts.same_directory(target, directory) and ("ro" in existing.options) == readonly:
            return
        raise RpcAbort(
            grpc.StatusCode.ALREADY_EXISTS,
            f"{target} is already published with another volume or read-only setting",
        )
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        os.makedirs(target, mode=TARGET_DIR_MODE, exist_ok=True)
    else:
        if not os.path.isdir(target) or os.path.islink(target) or st.st_nlink == 0:
            raise invalid(f"target_path {target} exists and is not a directory")
    try:
        mounts.bind_mount(directory, target, flags)
    except FileNotFoundError:
        raise not_found(f"the volume directory vanished before it could be mounted on {target}") from None
    except OSError as exc:
        raise RpcAbort(grpc.StatusCode.INTERNAL, f"bind mount onto {target} failed: {exc.strerror}") from None


def _unpublish(target: str) -> None:
    """Unmount whatever is stacked on `target`, then remove the empty directory (thread side)."""
    try:
        mounts.unmount_all(target)
    except OSError as exc:
        raise RpcAbort(grpc.StatusCode.INTERNAL, f"unmounting {target} failed: {exc.strerror}") from None
    try:
        os.rmdir(target)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        raise invalid(f"target_path {target} is not a directory") from None
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            raise RpcAbort(
                grpc.StatusCode.FAILED_PRECONDITION, f"{target} is not empty after unmounting; left in place"
            ) from None
        raise RpcAbort(grpc.StatusCode.INTERNAL, f"removing {target} failed: {exc.strerror}") from None
