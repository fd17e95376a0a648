"""Every failure answers with the status code the CSI spec assigns to it.

Missing fields are INVALID_ARGUMENT, ids that name nothing are NOT_FOUND (including ids crafted to
traverse paths), a name reused with another size is ALREADY_EXISTS, impossible capacity ranges are
OUT_OF_RANGE, block volumes are INVALID_ARGUMENT, a bad pagination token is ABORTED.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from awsomefsd.csi.generated import csi_pb2
from tests.csi.conftest import Csi, MiB, block_capability, mount_capability

Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
UNKNOWN_VOLUME = "vol-" + "0" * 32
UNKNOWN_SNAPSHOT = "snap-" + "0" * 32
TRAVERSAL_IDS = [
    "../../etc",
    "vol-../../../etc/passwd",
    "vol-" + "0" * 32 + "/../../x",
    "vol-" + "A" * 32,
    "/etc",
    "vol-\x00" + "0" * 31,
    "snap-" + "0" * 32,
]


def cap_range(required: int = 0, limit: int = 0) -> csi_pb2.CapacityRange:
    return csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)


def create_req(**fields: object) -> csi_pb2.CreateVolumeRequest:
    fields.setdefault("name", "pvc-x")
    fields.setdefault("volume_capabilities", [mount_capability()])
    return csi_pb2.CreateVolumeRequest(**fields)  # type: ignore[arg-type]


async def test_create_volume_argument_errors(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    no_mode = csi_pb2.VolumeCapability()
    no_mode.mount.SetInParent()
    no_type = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
    )
    cases = [
        create_req(name=""),
        create_req(name="x" * 129),
        create_req(name="bad\x01name"),
        create_req(volume_capabilities=[]),
        create_req(volume_capabilities=[block_capability()]),
        create_req(volume_capabilities=[mount_capability(), block_capability()]),
        create_req(volume_capabilities=[no_mode]),
        create_req(volume_capabilities=[no_type]),
        create_req(volume_capabilities=[mount_capability(flags=("bogus-flag",))]),
        create_req(capacity_range=cap_range(required=-1)),
        create_req(parameters={"unknownParameter": "1"}),
        create_req(parameters={"inodeLimit": "-5"}),
        create_req(volume_content_source=csi_pb2.VolumeContentSource()),
    ]
    ext4 = mount_capability()
    ext4.mount.fs_type = "ext4"
    cases.append(create_req(volume_capabilities=[ext4]))
    for request in cases:
        await csi.fails(Code.INVALID_ARGUMENT, csi.controller.CreateVolume, request)
    details = await csi.fails(
        Code.INVALID_ARGUMENT,
        csi.controller.CreateVolume,
        create_req(volume_capabilities=[block_capability()]),
    )
    assert "block volumes are not supported" in details
    assert (
        await csi.call(csi.controller.ListVolumes, csi_pb2.ListVolumesRequest())
        == csi_pb2.ListVolumesResponse()
    )


async def test_capacity_out_of_range(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    for rng in (cap_range(required=2 * MiB, limit=MiB), cap_range(limit=100), cap_range(required=1 << 60)):
        await csi.fails(Code.OUT_OF_RANGE, csi.controller.CreateVolume, create_req(capacity_range=rng))
    exact = await csi.call(csi.controller.CreateVolume, create_req(capacity_range=cap_range(MiB, MiB)))
    assert exact.volume.capacity_bytes == MiB
    capped = await csi.call(
        csi.controller.CreateVolume, create_req(name="capped", capacity_range=cap_range(limit=MiB))
    )
    assert capped.volume.capacity_bytes == MiB


async def test_same_name_other_size_is_already_exists(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    await csi.create("pvc-same", 4 * MiB)
    assert (await csi.create("pvc-same", 4 * MiB)).capacity_bytes == 4 * MiB
    request = create_req(name="pvc-same", capacity_range=cap_range(8 * MiB))
    await csi.fails(Code.ALREADY_EXISTS, csi.controller.CreateVolume, request)


async def test_snapshot_name_reused_for_another_volume_is_already_exists(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    a, b = await csi.create("pvc-a"), await csi.create("pvc-b")
    await csi.call(
        csi.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(source_volume_id=a.volume_id, name="s")
    )
    await csi.fails(
        Code.ALREADY_EXISTS,
        csi.controller.CreateSnapshot,
        csi_pb2.CreateSnapshotRequest(source_volume_id=b.volume_id, name="s"),
    )


async def test_insufficient_capacity_is_resource_exhausted(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    request = create_req(capacity_range=cap_range(csi.volumes.total_bytes + 4096))
    await csi.fails(Code.RESOURCE_EXHAUSTED, csi.controller.CreateVolume, request)


async def test_unknown_sources_are_not_found(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    from_snapshot = create_req(
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=UNKNOWN_SNAPSHOT)
        )
    )
    from_volume = create_req(
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=UNKNOWN_VOLUME)
        )
    )
    for request in (from_snapshot, from_volume):
        await csi.fails(Code.NOT_FOUND, csi.controller.CreateVolume, request)
    await csi.fails(
        Code.NOT_FOUND,
        csi.controller.CreateSnapshot,
        csi_pb2.CreateSnapshotRequest(source_volume_id=UNKNOWN_VOLUME, name="s"),
    )


async def test_missing_fields_everywhere_are_invalid_argument(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    vol = (await csi.create("pvc-fields")).volume_id
    target = str(csi.workdir / "t")
    c, n = csi.controller, csi.node
    cases = [
        (c.DeleteVolume, csi_pb2.DeleteVolumeRequest()),
        (
            c.ValidateVolumeCapabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_capability()]),
        ),
        (c.ValidateVolumeCapabilities, csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vol)),
        (c.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(volume_id=vol)),
        (c.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(capacity_range=cap_range(MiB))),
        (c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(source_volume_id=vol)),
        (c.CreateSnapshot, csi_pb2.CreateSnapshotRequest(name="s")),
        (c.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest()),
        (c.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=-1)),
        (
            n.NodeStageVolume,
            csi_pb2.NodeStageVolumeRequest(staging_target_path=target, volume_capability=mount_capability()),
        ),
        (
            n.NodeStageVolume,
            csi_pb2.NodeStageVolumeRequest(volume_id=vol, volume_capability=mount_capability()),
        ),
        (n.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(volume_id=vol, staging_target_path=target)),
        (n.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(volume_id=vol)),
        (n.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(staging_target_path=target)),
        (
            n.NodePublishVolume,
            csi_pb2.NodePublishVolumeRequest(volume_id=vol, volume_capability=mount_capability()),
        ),
        (n.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(volume_id=vol, target_path=target)),
        (
            n.NodePublishVolume,
            csi_pb2.NodePublishVolumeRequest(target_path=target, volume_capability=mount_capability()),
        ),
        (n.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol)),
        (n.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(target_path=target)),
        (n.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol)),
        (n.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(volume_path=target)),
        (n.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(volume_id=vol)),
        (n.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(volume_path=target)),
    ]
    for method, request in cases:
        await csi.fails(Code.INVALID_ARGUMENT, method, request)
        for field in ("volume_id", "source_volume_id"):  # a missing field comes before the id's lookup
            if field in request.DESCRIPTOR.fields_by_name and getattr(request, field):
                for bad in (UNKNOWN_VOLUME, TRAVERSAL_IDS[1]):
                    other = type(request)()
                    other.CopyFrom(request)
                    setattr(other, field, bad)
                    await csi.fails(Code.INVALID_ARGUMENT, method, other)
    assert not Path(target).exists()


async def test_node_rows_of_the_spec(csi_endpoint: Csi) -> None:
    """The rows of the Node RPCs' error tables that are not about missing fields or unknown ids:
    a capability the volume cannot serve is "Exceeds capabilities" (FAILED_PRECONDITION) for stage
    and publish but INVALID_ARGUMENT for expand; a malformed one is INVALID_ARGUMENT everywhere; a
    publish without staging_target_path, from a plugin with STAGE_UNSTAGE_VOLUME, is
    FAILED_PRECONDITION once the volume is known to exist."""
    csi = csi_endpoint
    vol = (await csi.create("pvc-rows")).volume_id
    target, staging = csi.workdir / "t", str(csi.workdir / "staging")
    ext4 = mount_capability()
    ext4.mount.fs_type = "ext4"
    no_mode = csi_pb2.VolumeCapability()
    no_mode.mount.SetInParent()
    n = csi.node
    for cap in (block_capability(), ext4):
        stage = csi_pb2.NodeStageVolumeRequest(volume_id=vol, staging_target_path=staging, volume_capability=cap)
        await csi.fails(Code.FAILED_PRECONDITION, n.NodeStageVolume, stage)
        await csi.fails(Code.FAILED_PRECONDITION, n.NodePublishVolume, csi.publish_request(vol, target, volume_capability=cap))
        expand = csi_pb2.NodeExpandVolumeRequest(volume_id=vol, volume_path=str(target), volume_capability=cap)
        await csi.fails(Code.INVALID_ARGUMENT, n.NodeExpandVolume, expand)
    stage = csi_pb2.NodeStageVolumeRequest(volume_id=vol, staging_target_path=staging, volume_capability=no_mode)
    await csi.fails(Code.INVALID_ARGUMENT, n.NodeStageVolume, stage)
    await csi.fails(Code.INVALID_ARGUMENT, n.NodePublishVolume, csi.publish_request(vol, target, volume_capability=no_mode))
    negative = csi_pb2.NodeExpandVolumeRequest(volume_id=vol, volume_path=str(target), capacity_range=cap_range(-1))
    await csi.fails(Code.INVALID_ARGUMENT, n.NodeExpandVolume, negative)
    unstaged = csi.publish_request(vol, target)
    unstaged.ClearField("staging_target_path")
    await csi.fails(Code.FAILED_PRECONDITION, n.NodePublishVolume, unstaged)
    unstaged.volume_id = UNKNOWN_VOLUME
    await csi.fails(Code.NOT_FOUND, n.NodePublishVolume, unstaged)
    assert not target.exists()


async def test_unknown_ids_are_not_found(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    target = str(csi.workdir / "t")
    workdir_before = sorted(p.name for p in csi.workdir.iterdir())
    c, n = csi.controller, csi.node
    for bad in [UNKNOWN_VOLUME, *TRAVERSAL_IDS]:
        cases = [
            (
                c.ValidateVolumeCapabilities,
                csi_pb2.ValidateVolumeCapabilitiesRequest(
                    volume_id=bad, volume_capabilities=[mount_capability()]
                ),
            ),
            (
                c.ControllerExpandVolume,
                csi_pb2.ControllerExpandVolumeRequest(volume_id=bad, capacity_range=cap_range(MiB)),
            ),
            (
                n.NodeStageVolume,
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=bad, staging_target_path=target, volume_capability=mount_capability()
                ),
            ),
            (n.NodePublishVolume, csi.publish_request(bad, Path(target), staging_target_path=str(csi.workdir / "s"))),
            (n.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(volume_id=bad, volume_path=target)),
            (n.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(volume_id=bad, volume_path=target)),
        ]
        for method, request in cases:
            await csi.fails(Code.NOT_FOUND, method, request)
        # Deletes of ids that name nothing succeed: the spec makes them idempotent.
        await csi.call(c.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=bad))
        await csi.call(c.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=bad))
    assert not Path(target).exists()
    assert sorted(p.name for p in csi.workdir.iterdir()) == workdir_before, "nothing was created"


async def test_traversal_in_paths_is_invalid_argument(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    vol = (await csi.create("pvc-paths")).volume_id
    escape = str(csi.workdir / "t" / ".." / ".." / "escaped")
    bad_paths = [
        "relative/target",
        escape,
        str(csi.workdir) + "//double",
        "/",
        str(csi.workdir) + "/t/",
        "\x00/x",
    ]
    for bad in bad_paths:
        request = csi_pb2.NodePublishVolumeRequest(
            volume_id=vol, target_path=bad, volume_capability=mount_capability()
        )
        await csi.fails(Code.INVALID_ARGUMENT, csi.node.NodePublishVolume, request)
        unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol, target_path=bad)
        await csi.fails(Code.INVALID_ARGUMENT, csi.node.NodeUnpublishVolume, unpublish)
    inside = csi.publish_request(vol, Path(csi.volumes.mount_point()) / "inside")
    await csi.fails(Code.INVALID_ARGUMENT, csi.node.NodePublishVolume, inside)
    assert not (csi.workdir.parent / "escaped").exists()


async def test_symlinked_target_is_refused(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    vol = (await csi.create("pvc-link")).volume_id
    elsewhere = csi.workdir / "elsewhere"
    elsewhere.mkdir()
    link = csi.workdir / "link"
    link.symlink_to(elsewhere)
    await csi.fails(Code.INVALID_ARGUMENT, csi.node.NodePublishVolume, csi.publish_request(vol, link))


async def test_controller_publish_is_unimplemented(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    request = csi_pb2.ControllerPublishVolumeRequest(volume_id=UNKNOWN_VOLUME, node_id="n")
    await csi.fails(Code.UNIMPLEMENTED, csi.controller.ControllerPublishVolume, request)


async def test_expand_rules(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    vol = await csi.create("pvc-grow", 8 * MiB)
    shrink_limit = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=cap_range(required=MiB, limit=2 * MiB)
    )
    await csi.fails(Code.OUT_OF_RANGE, csi.controller.ControllerExpandVolume, shrink_limit)
    smaller = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=cap_range(required=MiB)
    )
    assert (await csi.call(csi.controller.ControllerExpandVolume, smaller)).capacity_bytes == 8 * MiB
    block = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=cap_range(16 * MiB), volume_capability=block_capability()
    )
    await csi.fails(Code.INVALID_ARGUMENT, csi.controller.ControllerExpandVolume, block)
    too_far = csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=str(csi.workdir / "t"), capacity_range=cap_range(64 * MiB)
    )
    await csi.fails(Code.OUT_OF_RANGE, csi.node.NodeExpandVolume, too_far)


async def test_validate_volume_capabilities(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    vol = (await csi.create("pvc-validate")).volume_id
    ok = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol, volume_capabilities=[mount_capability(Mode.MULTI_NODE_MULTI_WRITER)]
    )
    response = await csi.call(csi.controller.ValidateVolumeCapabilities, ok)
    assert list(response.confirmed.volume_capabilities) == list(ok.volume_capabilities)
    block = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vol, volume_capabilities=[block_capability()])
    response = await csi.call(csi.controller.ValidateVolumeCapabilities, block)
    assert not response.HasField("confirmed") and "block" in response.message


async def test_stats_for_a_path_that_is_not_the_volume_is_not_found(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    vol = (await csi.create("pvc-stats")).volume_id
    other = csi.workdir / "other"
    other.mkdir()
    for path in (other, csi.workdir / "missing"):
        request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol, volume_path=str(path))
        await csi.fails(Code.NOT_FOUND, csi.node.NodeGetVolumeStats, request)


async def test_relative_volume_path_rows_of_csi_sanity(csi_endpoint: Csi) -> None:
    """csi-sanity v5.4.0's NodeGetVolumeStats "volume is not found" and "volume does not exist on
    the specified path" and NodeExpandVolume "volume is not found": each sends the relative
    volume_path "some/path" and expects NOT_FOUND. The path says where the volume is, so an unknown
    volume is NOT_FOUND whatever the path; for a published volume stats answers NOT_FOUND (the
    table's "does not exist on the specified volume_path"), expand INVALID_ARGUMENT (no row)."""
    csi = csi_endpoint
    n = csi.node
    relative = "some/path"
    await csi.fails(Code.NOT_FOUND, n.NodeGetVolumeStats,
                    csi_pb2.NodeGetVolumeStatsRequest(volume_id=UNKNOWN_VOLUME, volume_path=relative))
    await csi.fails(Code.NOT_FOUND, n.NodeExpandVolume,
                    csi_pb2.NodeExpandVolumeRequest(volume_id=UNKNOWN_VOLUME, volume_path=relative))
    vol = (await csi.create("pvc-sanity-stats")).volume_id
    publish = csi.publish_request(vol, csi.workdir / "target")
    stage = csi_pb2.NodeStageVolumeRequest(volume_id=vol, staging_target_path=publish.staging_target_path,
                                           volume_capability=mount_capability())
    await csi.call(n.NodeStageVolume, stage)
    await csi.call(n.NodePublishVolume, publish)
    try:
        await csi.fails(Code.NOT_FOUND, n.NodeGetVolumeStats,
                        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol, volume_path=relative))
        await csi.fails(Code.INVALID_ARGUMENT, n.NodeExpandVolume,
                        csi_pb2.NodeExpandVolumeRequest(volume_id=vol, volume_path=relative))
        published = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol, volume_path=publish.target_path)
        assert (await csi.call(n.NodeGetVolumeStats, published)).usage
    finally:
        await csi.call(n.NodeUnpublishVolume,
                       csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol, target_path=publish.target_path))


@pytest.mark.fake_only  # fault injection; the daemon's probe is checked in test_daemon_e2e.py
@pytest.mark.parametrize("healthy", [True, False])
async def test_probe_and_stage_follow_mount_health(csi_endpoint: Csi, healthy: bool) -> None:
    csi = csi_endpoint
    vol = (await csi.create("pvc-health")).volume_id
    csi.volumes.healthy = healthy  # fault injection on the fake backend
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=vol, staging_target_path=str(csi.workdir / "stage"), volume_capability=mount_capability()
    )
    if healthy:
        assert (await csi.call(csi.identity.Probe, csi_pb2.ProbeRequest())).ready.value is True
        await csi.call(csi.node.NodeStageVolume, stage)
    else:
        await csi.fails(Code.FAILED_PRECONDITION, csi.identity.Probe, csi_pb2.ProbeRequest())
        await csi.fails(Code.UNAVAILABLE, csi.node.NodeStageVolume, stage)
