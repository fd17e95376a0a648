"""Pagination of ListVolumes/ListSnapshots, the Identity answers, and a CO racing itself."""

from __future__ import annotations

import re

import grpc
import pytest
import trio

from awsomefsd.csi.generated import csi_pb2
from tests.csi.conftest import Csi, MiB, mount_capability

Code = grpc.StatusCode


async def list_all_volumes(csi: Csi, page_size: int) -> list[str]:
    seen: list[str] = []
    token = ""
    for _ in range(100):
        response = await csi.call(
            csi.controller.ListVolumes,
            csi_pb2.ListVolumesRequest(max_entries=page_size, starting_token=token),
        )
        assert page_size == 0 or len(response.entries) <= page_size
        seen.extend(e.volume.volume_id for e in response.entries)
        token = response.next_token
        if not token:
            return seen
    raise AssertionError("pagination did not end")


async def test_list_volumes_pages_through_everything_once(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    created = sorted([(await csi.create(f"pvc-{i}", MiB)).volume_id for i in range(7)])
    assert await list_all_volumes(csi, 3) == created
    assert await list_all_volumes(csi, 0) == created  # 0: no limit
    first = await csi.call(csi.controller.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=3))
    # A volume deleted between pages is neither repeated nor does it break the token.
    await csi.call(csi.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=first.next_token))
    rest = await csi.call(
        csi.controller.ListVolumes,
        csi_pb2.ListVolumesRequest(max_entries=100, starting_token=first.next_token),
    )
    assert [e.volume.volume_id for e in rest.entries] == created[4:]


async def test_bad_starting_token_is_aborted(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    await csi.create("pvc-token")
    for token in ("garbage", "../../etc", "vol-xyz"):
        await csi.fails(
            Code.ABORTED, csi.controller.ListVolumes, csi_pb2.ListVolumesRequest(starting_token=token)
        )
        await csi.fails(
            Code.ABORTED, csi.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(starting_token=token)
        )
    await csi.fails(
        Code.INVALID_ARGUMENT, csi.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(max_entries=-2)
    )


async def test_list_snapshots_pages_and_filters(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    a, b = await csi.create("pvc-a"), await csi.create("pvc-b")
    snaps_a = []
    for i in range(5):
        request = csi_pb2.CreateSnapshotRequest(source_volume_id=a.volume_id, name=f"a-{i}")
        snaps_a.append((await csi.call(csi.controller.CreateSnapshot, request)).snapshot.snapshot_id)
    request = csi_pb2.CreateSnapshotRequest(source_volume_id=b.volume_id, name="b-0")
    snap_b = (await csi.call(csi.controller.CreateSnapshot, request)).snapshot.snapshot_id

    seen, token = [], ""
    for _ in range(10):
        response = await csi.call(
            csi.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(max_entries=2, starting_token=token)
        )
        seen.extend(e.snapshot.snapshot_id for e in response.entries)
        token = response.next_token
        if not token:
            break
    assert seen == sorted([*snaps_a, snap_b])

    by_source = await csi.call(
        csi.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(source_volume_id=a.volume_id)
    )
    assert sorted(e.snapshot.snapshot_id for e in by_source.entries) == sorted(snaps_a)
    by_id = await csi.call(csi.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(snapshot_id=snap_b))
    assert [e.snapshot.source_volume_id for e in by_id.entries] == [b.volume_id]
    for unknown in ("snap-" + "f" * 32, "../../etc"):
        none = await csi.call(csi.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(snapshot_id=unknown))
        assert list(none.entries) == []
    none = await csi.call(
        csi.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(source_volume_id="vol-" + "f" * 32)
    )
    assert list(none.entries) == []


async def test_concurrent_create_of_one_name_makes_one_volume(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-race",
        capacity_range=csi_pb2.CapacityRange(required_bytes=4 * MiB),
        volume_capabilities=[mount_capability()],
    )
    results: list[str] = []

    async def create() -> None:
        results.append((await csi.call(csi.controller.CreateVolume, request)).volume.volume_id)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(create)
    assert len(results) == 8 and len(set(results)) == 1
    listed = await csi.call(csi.controller.ListVolumes, csi_pb2.ListVolumesRequest())
    assert [e.volume.volume_id for e in listed.entries] == results[:1]


async def test_identity(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    info = await csi.call(csi.identity.GetPluginInfo, csi_pb2.GetPluginInfoRequest())
    assert info.name == "awsomefs.csi.io" and info.vendor_version
    assert len(info.name) <= 63 and re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?", info.name)
    caps = await csi.call(csi.identity.GetPluginCapabilities, csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in caps.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE in services
    controller = await csi.call(
        csi.controller.ControllerGetCapabilities, csi_pb2.ControllerGetCapabilitiesRequest()
    )
    rpcs = {c.rpc.type for c in controller.capabilities}
    RPC = csi_pb2.ControllerServiceCapability.RPC
    assert {RPC.CREATE_DELETE_VOLUME, RPC.CREATE_DELETE_SNAPSHOT, RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME} <= rpcs
    assert RPC.PUBLISH_UNPUBLISH_VOLUME not in rpcs
    node = await csi.call(csi.node.NodeGetCapabilities, csi_pb2.NodeGetCapabilitiesRequest())
    NRPC = csi_pb2.NodeServiceCapability.RPC
    assert {NRPC.STAGE_UNSTAGE_VOLUME, NRPC.GET_VOLUME_STATS, NRPC.EXPAND_VOLUME} <= {
        c.rpc.type for c in node.capabilities
    }
    node_info = await csi.call(csi.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest())
    assert node_info.node_id == "node-a"
    assert dict(node_info.accessible_topology.segments) == {"topology.awsomefs.csi.io/cluster": "awsomefs"}


@pytest.mark.fake_only  # the fake is thick-provisioned (free shrinks by each capacity); the core is thin
async def test_get_capacity(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    total, free_before = await csi.volumes.capacity()
    await csi.create("pvc-cap", 64 * MiB)
    response = await csi.call(
        csi.controller.GetCapacity, csi_pb2.GetCapacityRequest(volume_capabilities=[mount_capability()])
    )
    assert response.available_capacity == free_before - 64 * MiB
    assert 0 < response.maximum_volume_size.value <= response.available_capacity
    block = csi_pb2.VolumeCapability()
    block.block.SetInParent()
    block.access_mode.mode = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    zero = await csi.call(csi.controller.GetCapacity, csi_pb2.GetCapacityRequest(volume_capabilities=[block]))
    assert zero.available_capacity == 0
    elsewhere = csi_pb2.GetCapacityRequest(
        accessible_topology=csi_pb2.Topology(segments={"topology.awsomefs.csi.io/cluster": "other"})
    )
    assert (await csi.call(csi.controller.GetCapacity, elsewhere)).available_capacity == 0
    assert total >= free_before
    wrong_topology = csi_pb2.CreateVolumeRequest(
        name="pvc-elsewhere",
        volume_capabilities=[mount_capability()],
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=[csi_pb2.Topology(segments={"topology.awsomefs.csi.io/cluster": "other"})]
        ),
    )
    await csi.fails(Code.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, wrong_topology)
