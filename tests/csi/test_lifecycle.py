"""The life of a volume as Kubernetes drives it, over real gRPC with real bind mounts.

create -> stage -> publish (write through the pod's path, see it in the volume) -> snapshot ->
volume from the snapshot -> clone -> expand -> stats -> unpublish -> unstage -> delete.
Every step is sent twice: the CSI spec makes every call idempotent, and the CO does retry.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import grpc
import pytest

from awsomefsd.csi import mounts
from awsomefsd.csi.generated import csi_pb2
from awsomefsd.io.layout import BLOCK_SIZE
from tests.csi.conftest import Csi, MiB, mount_capability

Mode = csi_pb2.VolumeCapability.AccessMode.Mode


async def twice(csi: Csi, method, request):  # type: ignore[no-untyped-def]
    first = await csi.call(method, request)
    second = await csi.call(method, request)
    return first, second


async def test_full_lifecycle(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    create = csi_pb2.CreateVolumeRequest(
        name="pvc-lifecycle",
        capacity_range=csi_pb2.CapacityRange(required_bytes=10 * MiB + 1),
        volume_capabilities=[mount_capability(Mode.MULTI_NODE_MULTI_WRITER)],
        parameters={"inodeLimit": "1000", "csi.storage.k8s.io/pvc/name": "data"},
    )
    first, again = await twice(csi, csi.controller.CreateVolume, create)
    volume = first.volume
    assert again.volume == volume
    assert volume.volume_id.startswith("vol-")
    assert volume.capacity_bytes == 10 * MiB + 4096  # rounded up to whole blocks
    assert [dict(t.segments) for t in volume.accessible_topology] == [
        {"topology.awsomefs.csi.io/cluster": "awsomefs"}
    ]
    volume_dir = Path(csi.volumes.volume_path(volume.volume_id))
    assert volume_dir.is_dir()

    staging = csi.workdir / "staging" / volume.volume_id
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging), volume_capability=mount_capability()
    )
    await twice(csi, csi.node.NodeStageVolume, stage)

    target = csi.workdir / "pods" / "uid-1" / "volumes" / "mount"
    publish = csi.publish_request(volume.volume_id, target)
    await twice(csi, csi.node.NodePublishVolume, publish)
    assert mounts.mount_at(str(target)) is not None
    (target / "hello.txt").write_text("written through the pod's path")
    assert (volume_dir / "hello.txt").read_text() == "written through the pod's path"

    stats_request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(target))
    stats = await csi.call(csi.node.NodeGetVolumeStats, stats_request)
    usage = {u.unit: u for u in stats.usage}
    assert usage[csi_pb2.VolumeUsage.BYTES].total == volume.capacity_bytes
    # the fake counts bytes; the core charges whole blocks once close() has flushed the file
    assert usage[csi_pb2.VolumeUsage.BYTES].used in (len("written through the pod's path"), BLOCK_SIZE)
    assert usage[csi_pb2.VolumeUsage.INODES].total == 1000
    assert usage[csi_pb2.VolumeUsage.INODES].used == 1

    snap_request = csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap-1")
    snap_first, snap_again = await twice(csi, csi.controller.CreateSnapshot, snap_request)
    snapshot = snap_first.snapshot
    assert snap_again.snapshot == snapshot
    assert snapshot.snapshot_id.startswith("snap-") and snapshot.ready_to_use
    assert snapshot.source_volume_id == volume.volume_id
    assert snapshot.creation_time.seconds > 0
    (target / "hello.txt").write_text("changed after the snapshot")

    restore = csi_pb2.CreateVolumeRequest(
        name="pvc-restored",
        capacity_range=csi_pb2.CapacityRange(required_bytes=volume.capacity_bytes),
        volume_capabilities=[mount_capability()],
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
        ),
    )
    restored = (await twice(csi, csi.controller.CreateVolume, restore))[0].volume
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    restored_dir = Path(csi.volumes.volume_path(restored.volume_id))
    assert (restored_dir / "hello.txt").read_text() == "written through the pod's path"

    clone = csi_pb2.CreateVolumeRequest(
        name="pvc-clone",
        capacity_range=csi_pb2.CapacityRange(required_bytes=volume.capacity_bytes),
        volume_capabilities=[mount_capability()],
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume.volume_id)
        ),
    )
    cloned = (await twice(csi, csi.controller.CreateVolume, clone))[0].volume
    assert cloned.content_source.volume.volume_id == volume.volume_id
    assert (
        Path(csi.volumes.volume_path(cloned.volume_id)) / "hello.txt"
    ).read_text() == "changed after the snapshot"

    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)
    )
    expanded, expanded_again = await twice(csi, csi.controller.ControllerExpandVolume, expand)
    assert expanded.capacity_bytes == expanded_again.capacity_bytes == 64 * MiB
    assert not expanded.node_expansion_required
    node_expand = csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.volume_id,
        volume_path=str(target),
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
    )
    node_expanded = (await twice(csi, csi.node.NodeExpandVolume, node_expand))[0]
    assert node_expanded.capacity_bytes == 64 * MiB

    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
    await twice(csi, csi.node.NodeUnpublishVolume, unpublish)
    assert mounts.mount_at(str(target)) is None
    assert not target.exists()
    assert (volume_dir / "hello.txt").read_text() == "changed after the snapshot"

    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=str(staging))
    await twice(csi, csi.node.NodeUnstageVolume, unstage)

    for vid in (volume.volume_id, restored.volume_id, cloned.volume_id):
        await twice(csi, csi.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))
    delete_snap = csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
    await twice(csi, csi.controller.DeleteSnapshot, delete_snap)
    assert not volume_dir.exists()
    listed = await csi.call(csi.controller.ListVolumes, csi_pb2.ListVolumesRequest())
    assert list(listed.entries) == []


async def test_publish_read_only_rejects_writes(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    volume = await csi.create("pvc-ro")
    volume_dir = Path(csi.volumes.volume_path(volume.volume_id))
    (volume_dir / "existing.txt").write_text("data")
    target = csi.workdir / "ro-target"
    request = csi.publish_request(volume.volume_id, target, readonly=True)
    await csi.call(csi.node.NodePublishVolume, request)
    await csi.call(csi.node.NodePublishVolume, request)  # same options again: success
    assert (target / "existing.txt").read_text() == "data"
    with pytest.raises(OSError) as err:
        (target / "new.txt").write_text("nope")
    assert err.value.errno == errno.EROFS
    assert "ro" in mounts.mount_at(str(target)).options  # type: ignore[union-attr]

    rw_again = csi.publish_request(volume.volume_id, target, readonly=False)
    await csi.fails(grpc.StatusCode.ALREADY_EXISTS, csi.node.NodePublishVolume, rw_again)
    await csi.call(
        csi.node.NodeUnpublishVolume,
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target)),
    )
    assert not target.exists()
    assert (volume_dir / "existing.txt").exists()


async def test_reader_only_mode_publishes_read_only(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    volume = await csi.create("pvc-reader")
    target = csi.workdir / "reader"
    cap = mount_capability(Mode.MULTI_NODE_READER_ONLY)
    await csi.call(
        csi.node.NodePublishVolume, csi.publish_request(volume.volume_id, target, volume_capability=cap)
    )
    with pytest.raises(OSError) as err:
        (target / "x").write_text("x")
    assert err.value.errno == errno.EROFS
    await csi.call(
        csi.node.NodeUnpublishVolume,
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target)),
    )


async def test_every_access_mode_is_accepted(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    for mode in Mode.values():
        if mode == Mode.UNKNOWN:
            continue
        request = csi_pb2.CreateVolumeRequest(
            name=f"pvc-mode-{mode}",
            capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
            volume_capabilities=[mount_capability(mode)],
        )
        assert (await csi.call(csi.controller.CreateVolume, request)).volume.volume_id


async def test_publish_of_another_volume_on_a_used_target_is_already_exists(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    first = await csi.create("pvc-one")
    second = await csi.create("pvc-two")
    target = csi.workdir / "shared-target"
    await csi.call(csi.node.NodePublishVolume, csi.publish_request(first.volume_id, target))
    await csi.fails(
        grpc.StatusCode.ALREADY_EXISTS,
        csi.node.NodePublishVolume,
        csi.publish_request(second.volume_id, target),
    )
    await csi.call(
        csi.node.NodeUnpublishVolume,
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=first.volume_id, target_path=str(target)),
    )


async def test_unpublish_never_deletes_files_left_in_an_unmounted_target(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    volume = await csi.create("pvc-keep")
    target = csi.workdir / "not-a-mount"
    target.mkdir()
    (target / "precious").write_text("keep me")
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
    await csi.fails(grpc.StatusCode.FAILED_PRECONDITION, csi.node.NodeUnpublishVolume, request)
    assert (target / "precious").read_text() == "keep me"
    os.unlink(target / "precious")
