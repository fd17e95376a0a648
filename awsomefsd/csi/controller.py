"""CSI Controller service: volumes and snapshots as quota'd, copy-on-write directory trees.

Every RPC validates its request first (INVALID_ARGUMENT, or NOT_FOUND for an id that cannot name
anything), then makes one idempotent call into the core's `VolumeService`. Calls on the same CO
name are queued (`KeyedLock`), so a CO racing itself after a restart still gets one volume.
ControllerPublish/Unpublish are not offered: volumes need no attach step (CSIDriver
attachRequired: false), so those RPCs answer UNIMPLEMENTED through the bridge.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from awsomefsd.csi import ids
from awsomefsd.csi.backend import SnapshotInfo, VolumeInfo, VolumeService
from awsomefsd.csi.generated import csi_pb2
from awsomefsd.csi.locks import KeyedLock
from awsomefsd.csi.validate import (
    ALIGN_BYTES,
    DEFAULT_CAPACITY_BYTES,
    K8S_PARAM_PREFIX,
    MAX_CAPACITY_BYTES,
    backend_errors,
    capability_problem,
    capacity_from_range,
    check_capabilities,
    check_capability,
    check_capacity_range,
    inode_limit_from_parameters,
    invalid,
    not_found,
    page,
    require_fields,
    snapshot_id_or_not_found,
    volume_id_or_not_found,
)
from awsomefsd.rpc.bridge import RpcAbort

_RPC = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = (
    _RPC.CREATE_DELETE_VOLUME,
    _RPC.LIST_VOLUMES,
    _RPC.GET_CAPACITY,
    _RPC.CREATE_DELETE_SNAPSHOT,
    _RPC.LIST_SNAPSHOTS,
    _RPC.CLONE_VOLUME,
    _RPC.EXPAND_VOLUME,
    _RPC.SINGLE_NODE_MULTI_WRITER,
)


def topology_matches(topology: csi_pb2.Topology, segments: Mapping[str, str]) -> bool:
    """True when every segment the CO asks for is one this cluster has."""
    return all(segments.get(key) == value for key, value in topology.segments.items())


def volume_message(info: VolumeInfo, segments: Mapping[str, str]) -> csi_pb2.Volume:
    assert ids.is_volume_id(info.volume_id), info.volume_id
    volume = csi_pb2.Volume(
        capacity_bytes=info.capacity_bytes,
        volume_id=info.volume_id,
        accessible_topology=[csi_pb2.Topology(segments=dict(segments))],
    )
    if info.source_kind == "snapshot":
        volume.content_source.snapshot.snapshot_id = info.source_id
    elif info.source_kind == "volume":
        volume.content_source.volume.volume_id = info.source_id
    return volume


def snapshot_message(info: SnapshotInfo) -> csi_pb2.Snapshot:
    assert ids.is_snapshot_id(info.snapshot_id), info.snapshot_id
    snapshot = csi_pb2.Snapshot(
        size_bytes=info.size_bytes,
        snapshot_id=info.snapshot_id,
        source_volume_id=info.source_volume_id,
        ready_to_use=info.ready,
    )
    snapshot.creation_time.FromNanoseconds(info.created_ns)
    return snapshot


class ControllerServicer:
    def __init__(self, volumes: VolumeService, topology_segments: Mapping[str, str]) -> None:
        self._volumes = volumes
        self._segments = dict(topology_segments)
        self._locks = KeyedLock()

    async def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        require_fields(request, "name", "volume_capabilities")
        problem = ids.name_problem(request.name)
        if problem is not None:
            raise invalid(problem)
        check_capabilities(request.volume_capabilities, "volume_capabilities")
        capacity = capacity_from_range(
            request.capacity_range, request.HasField("capacity_range"), DEFAULT_CAPACITY_BYTES
        )
        inode_limit = inode_limit_from_parameters(request.parameters)
        source_kind, source_id = "", ""
        source = request.volume_content_source
        if request.HasField("volume_content_source"):
            kind = source.WhichOneof("type")
            if kind == "snapshot":
                source_kind = "snapshot"
                source_id = snapshot_id_or_not_found(source.snapshot.snapshot_id, "snapshot_id")
            elif kind == "volume":
                source_kind = "volume"
                source_id = volume_id_or_not_found(source.volume.volume_id, "volume_id")
            else:
                raise invalid("volume_content_source needs a snapshot or a volume")
        requisite = request.accessibility_requirements.requisite
        if requisite and not any(topology_matches(t, self._segments) for t in requisite):
            raise RpcAbort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"volumes are only accessible in topology {self._segments}",
            )
        async with self._locks.hold("volume-name:" + request.name):
            with backend_errors():
                info = await self._volumes.create_volume(
                    request.name,
                    capacity,
                    inode_limit=inode_limit,
                    source_kind=source_kind,  # type: ignore[arg-type]  # one of the literals above
                    source_id=source_id,
                )
        assert info.name == request.name and info.capacity_bytes >= capacity, (info, capacity)
        return csi_pb2.CreateVolumeResponse(volume=volume_message(info, self._segments))

    async def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        require_fields(request, "volume_id")
        if ids.is_volume_id(request.volume_id):  # a malformed id names nothing: already deleted
            async with self._locks.hold("volume-id:" + request.volume_id):
                with backend_errors():
                    await self._volumes.delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    async def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        require_fields(request, "volume_id", "volume_capabilities")
        volume_id = volume_id_or_not_found(request.volume_id)
        if await self._volumes.get_volume(volume_id) is None:
            raise not_found(f"volume {volume_id} does not exist")
        for cap in request.volume_capabilities:
            problem = capability_problem(cap)
            if problem is not None:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)
        try:
            inode_limit_from_parameters(request.parameters)
        except RpcAbort as abort:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=abort.message)
        response = csi_pb2.ValidateVolumeCapabilitiesResponse()
        response.confirmed.volume_capabilities.extend(request.volume_capabilities)
        response.confirmed.volume_context.update(request.volume_context)
        response.confirmed.parameters.update(request.parameters)
        return response

    async def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        volumes = sorted(await self._volumes.list_volumes(), key=lambda v: v.volume_id)
        entries, next_token = page(
            volumes, request.max_entries, request.starting_token, ids.is_volume_id, lambda v: v.volume_id
        )
        return csi_pb2.ListVolumesResponse(
            entries=[
                csi_pb2.ListVolumesResponse.Entry(volume=volume_message(v, self._segments)) for v in entries
            ],
            next_token=next_token,
        )

    async def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        """Free space of the shared device; 0 for capabilities or a topology we cannot serve."""
        usable = all(capability_problem(cap) is None for cap in request.volume_capabilities)
        if request.HasField("accessible_topology") and not topology_matches(
            request.accessible_topology, self._segments
        ):
            usable = False
        try:
            inode_limit_from_parameters(request.parameters)
        except RpcAbort:
            usable = False
        if not usable:
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        _total, free = await self._volumes.capacity()
        response = csi_pb2.GetCapacityResponse(available_capacity=free)
        response.maximum_volume_size.value = min(free, MAX_CAPACITY_BYTES) // ALIGN_BYTES * ALIGN_BYTES
        response.minimum_volume_size.value = ALIGN_BYTES
        return response

    async def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        caps = [csi_pb2.ControllerServiceCapability(rpc=_RPC(type=t)) for t in CAPABILITIES]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)

    async def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        """Raise the quota; asking for no more than the current size is an idempotent success."""
        require_fields(request, "volume_id", "capacity_range")
        if request.HasField("volume_capability"):
            check_capability(request.volume_capability)  # the table's "Exceeds capabilities": INVALID_ARGUMENT
        check_capacity_range(request.capacity_range)
        volume_id = volume_id_or_not_found(request.volume_id)
        async with self._locks.hold("volume-id:" + volume_id):
            info = await self._volumes.get_volume(volume_id)
            if info is None:
                raise not_found(f"volume {volume_id} does not exist")
            limit = request.capacity_range.limit_bytes
            if limit and 0 < limit < info.capacity_bytes:
                raise RpcAbort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"limit_bytes {limit} is below the current size {info.capacity_bytes}; volumes do not shrink",
                )
            capacity = capacity_from_range(request.capacity_range, True, info.capacity_bytes)
            if capacity > info.capacity_bytes:
                with backend_errors():
                    info = await self._volumes.expand_volume(volume_id, capacity)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=info.capacity_bytes, node_expansion_required=False
        )

    async def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        require_fields(request, "source_volume_id", "name")
        problem = ids.name_problem(request.name)
        if problem is not None:
            raise invalid(problem)
        unknown = sorted(k for k in request.parameters if not k.startswith(K8S_PARAM_PREFIX))
        if unknown:
            raise invalid(f"unknown snapshot parameters {unknown}")
        source = volume_id_or_not_found(request.source_volume_id, "source_volume_id")
        async with self._locks.hold("snapshot-name:" + request.name):
            with backend_errors():
                info = await self._volumes.create_snapshot(request.name, source)
        if info.source_volume_id != source:
            raise RpcAbort(
                grpc.StatusCode.ALREADY_EXISTS, f"snapshot {request.name!r} exists for another source volume"
            )
        return csi_pb2.CreateSnapshotResponse(snapshot=snapshot_message(info))

    async def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        require_fields(request, "snapshot_id")
        if ids.is_snapshot_id(request.snapshot_id):
            with backend_errors():
                await self._volumes.delete_snapshot(request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    async def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        """All snapshots, or those matching the filters; an unknown filter id yields an empty list."""
        if request.snapshot_id:
            found = (
                await self._volumes.get_snapshot(request.snapshot_id)
                if ids.is_snapshot_id(request.snapshot_id)
                else None
            )
            snapshots = [found] if found is not None else []
        else:
            snapshots = await self._volumes.list_snapshots()
        if request.source_volume_id:
            snapshots = [s for s in snapshots if s.source_volume_id == request.source_volume_id]
        snapshots.sort(key=lambda s: s.snapshot_id)
        entries, next_token = page(
            snapshots,
            request.max_entries,
            request.starting_token,
            ids.is_snapshot_id,
            lambda s: s.snapshot_id,
        )
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=snapshot_message(s)) for s in entries],
            next_token=next_token,
        )
