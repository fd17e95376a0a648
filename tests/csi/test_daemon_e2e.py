"""End to end: the real daemon (a separate `awsomefsd dev --csi-socket` process) driven over gRPC.

What the fake backend cannot show: the quota enforced on writes through a pod's bind mount,
snapshots and clones as copy-on-write trees of the real filesystem (including data still in the
daemon's write buffer), volume ids that survive a restart, and the daemon never wedging itself
(every path check below the FUSE mount runs off its event loop). Every step is sent twice.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from awsomefsd.csi import ids, mounts
from awsomefsd.csi.generated import csi_pb2, csi_pb2_grpc
from awsomefsd.daemon.volumes import csi_id
from tests.csi.conftest import NODE_ID, Csi, MiB, mount_capability
from tests.csi.daemon_backend import DaemonVolumes, start_daemon
from tests.support.daemon import wait_for

pytestmark = pytest.mark.daemon_only
Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
PAYLOAD = bytes(range(256)) * 1024  # 256 KiB, not block-aligned in content, deterministic
FILL_CHUNK = MiB
INODE_LIMIT = 100


async def twice(csi: Csi, method: Any, request: Any) -> Any:
    first = await csi.call(method, request)
    assert await csi.call(method, request) == first, "a retried call answers the same"
    return first


def create_request(name: str, size: int, **fields: Any) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_capability(Mode.MULTI_NODE_MULTI_WRITER)],
        **fields,
    )


def fill_until_refused(path: Path, limit_bytes: int) -> tuple[int, int]:
    """Append FILL_CHUNK pieces to `path` until a write fails; (bytes written, errno)."""
    written = 0
    with open(path, "wb", buffering=0) as fh:
        for _ in range(limit_bytes // FILL_CHUNK + 2):
            try:
                written += fh.write(bytes(FILL_CHUNK))
            except OSError as exc:
                return written, exc.errno or 0
    return written, 0


async def test_full_lifecycle(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    volumes: DaemonVolumes = csi.volumes
    volume = (
        await twice(
            csi, csi.controller.CreateVolume, create_request("pvc-e2e", 4 * MiB, parameters={"inodeLimit": "100"})
        )
    ).volume
    assert ids.is_volume_id(volume.volume_id) and volume.capacity_bytes == 4 * MiB
    volume_dir = Path(volumes.volume_path(volume.volume_id))
    assert volume_dir.is_dir() and volume_dir.parent == volumes.daemon.mount / ".volumes"

    staging = csi.workdir / "staging"
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging), volume_capability=mount_capability()
    )
    await twice(csi, csi.node.NodeStageVolume, stage)
    target = csi.workdir / "pods" / "uid-1" / "volumes" / "data"
    publish = csi.publish_request(volume.volume_id, target)
    await twice(csi, csi.node.NodePublishVolume, publish)
    assert mounts.mount_at(str(target)) is not None and mounts.same_directory(str(target), str(volume_dir))

    (target / "data.bin").write_bytes(PAYLOAD)
    assert (volume_dir / "data.bin").read_bytes() == PAYLOAD
    with open(target / "open.log", "wb", buffering=0) as still_open:
        still_open.write(b"in the daemon's write buffer")  # no close: the snapshot must flush it
        snapshot = (
            await twice(
                csi,
                csi.controller.CreateSnapshot,
                csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap-e2e"),
            )
        ).snapshot
    assert ids.is_snapshot_id(snapshot.snapshot_id) and snapshot.ready_to_use
    assert snapshot.source_volume_id == volume.volume_id and snapshot.size_bytes >= len(PAYLOAD)
    (target / "data.bin").write_bytes(b"changed after the snapshot")

    restore = create_request(
        "pvc-e2e-restored",
        4 * MiB,
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
        ),
    )
    restored = (await twice(csi, csi.controller.CreateVolume, restore)).volume
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    restored_dir = Path(volumes.volume_path(restored.volume_id))
    assert (restored_dir / "data.bin").read_bytes() == PAYLOAD, "the snapshot's bytes, not today's"
    assert (restored_dir / "open.log").read_bytes() == b"in the daemon's write buffer"
    (restored_dir / "data.bin").write_bytes(b"the restored copy is writable and separate")
    assert (volume_dir / "data.bin").read_bytes() == b"changed after the snapshot"

    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB)
    )
    assert (await twice(csi, csi.controller.ControllerExpandVolume, expand)).capacity_bytes == 8 * MiB

    written, err = await trio.to_thread.run_sync(fill_until_refused, target / "fill", 8 * MiB)
    assert err in (errno.EDQUOT, errno.ENOSPC), f"writing past the quota did not fail ({written} bytes went in)"
    assert 4 * MiB < written <= 8 * MiB, "the expansion raised the quota, which still holds"

    stats_request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(target))
    usage = {u.unit: u for u in (await twice(csi, csi.node.NodeGetVolumeStats, stats_request)).usage}
    byte_usage, inode_usage = usage[csi_pb2.VolumeUsage.BYTES], usage[csi_pb2.VolumeUsage.INODES]
    assert byte_usage.total == 8 * MiB and written < byte_usage.used <= 8 * MiB
    assert byte_usage.available == byte_usage.total - byte_usage.used
    assert (inode_usage.total, inode_usage.used) == (INODE_LIMIT, 3)  # data.bin, open.log, fill
    # df in the pod: the claim's size and use, not the shared device's
    fs = await trio.to_thread.run_sync(os.statvfs, target / "fill")
    assert fs.f_blocks * fs.f_frsize == 8 * MiB and fs.f_files == INODE_LIMIT and fs.f_ffree == INODE_LIMIT - 3
    assert fs.f_bavail * fs.f_frsize == byte_usage.available

    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
    await twice(csi, csi.node.NodeUnpublishVolume, unpublish)
    assert mounts.mount_at(str(target)) is None and not target.exists()
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=str(staging))
    await twice(csi, csi.node.NodeUnstageVolume, unstage)

    await twice(csi, csi.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    listed = await csi.call(csi.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest())
    assert list(listed.entries) == []
    assert (restored_dir / "open.log").read_bytes() == b"in the daemon's write buffer", "shared extents survive"
    for vid in (volume.volume_id, restored.volume_id):
        await twice(csi, csi.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))
    assert list((await csi.call(csi.controller.ListVolumes, csi_pb2.ListVolumesRequest())).entries) == []
    # the directories went away in the metadata; the kernel's cached entries are invalidated
    await trio.to_thread.run_sync(
        wait_for, lambda: not volume_dir.exists() and not restored_dir.exists(), 10.0, "the kernel to forget"
    )


async def test_error_codes(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    volume = (await csi.call(csi.controller.CreateVolume, create_request("pvc-err", 4 * MiB))).volume
    await csi.fails(Code.ALREADY_EXISTS, csi.controller.CreateVolume, create_request("pvc-err", 8 * MiB))
    await csi.fails(
        Code.RESOURCE_EXHAUSTED,
        csi.controller.CreateVolume,
        create_request("pvc-huge", csi.volumes.total_bytes + MiB),
    )
    unknown = [
        csi_id(csi.volumes.daemon.cluster_id, "volume", 1 << 40),  # well-formed, never created
        csi_id(str(uuid.uuid4()), "volume", int(volume.volume_id[4:20], 16)),  # another cluster's
        ids.derive_volume_id("pvc-err"),  # the name-derived shape names nothing here
    ]
    for bad in unknown:
        expand = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=bad, capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB)
        )
        await csi.fails(Code.NOT_FOUND, csi.controller.ControllerExpandVolume, expand)
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=bad, staging_target_path=str(csi.workdir / "s"), volume_capability=mount_capability()
        )
        await csi.fails(Code.NOT_FOUND, csi.node.NodeStageVolume, stage)
        await csi.fails(
            Code.NOT_FOUND,
            csi.controller.CreateSnapshot,
            csi_pb2.CreateSnapshotRequest(source_volume_id=bad, name="snap-of-nothing"),
        )
        await csi.call(csi.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=bad))
    await csi.fails(Code.INVALID_ARGUMENT, csi.controller.CreateVolume, create_request("", MiB))
    await csi.fails(
        Code.INVALID_ARGUMENT, csi.controller.CreateVolume, csi_pb2.CreateVolumeRequest(name="pvc-nocaps")
    )
    await csi.fails(
        Code.INVALID_ARGUMENT,
        csi.node.NodeStageVolume,
        csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, volume_capability=mount_capability()),
    )
    await csi.fails(Code.INVALID_ARGUMENT, csi.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest())

    target = csi.workdir / "t"
    await csi.call(csi.node.NodePublishVolume, csi.publish_request(volume.volume_id, target))
    await trio.to_thread.run_sync((target / "big").write_bytes, bytes(2 * MiB))
    snap = csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap-err")
    snapshot = (await csi.call(csi.controller.CreateSnapshot, snap)).snapshot
    other = (await csi.call(csi.controller.CreateVolume, create_request("pvc-err-2", MiB))).volume
    await csi.fails(
        Code.ALREADY_EXISTS,
        csi.controller.CreateSnapshot,
        csi_pb2.CreateSnapshotRequest(source_volume_id=other.volume_id, name="snap-err"),
    )
    too_small = create_request(
        "pvc-too-small",
        MiB,
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
        ),
    )
    await csi.fails(Code.OUT_OF_RANGE, csi.controller.CreateVolume, too_small)
    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
    await csi.call(csi.node.NodeUnpublishVolume, unpublish)


async def test_concurrent_creates_make_one_volume_per_name(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    results: list[tuple[int, str]] = []

    async def create(size: int) -> None:
        try:
            response = await csi.call(csi.controller.CreateVolume, create_request("pvc-race", size))
        except grpc.RpcError as exc:
            assert exc.code() == Code.ALREADY_EXISTS, exc
            results.append((size, ""))
        else:
            results.append((size, response.volume.volume_id))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(create, (4 if i % 3 else 8) * MiB)
    listed = (await csi.call(csi.controller.ListVolumes, csi_pb2.ListVolumesRequest())).entries
    assert len(listed) == 1, "one name, one volume"
    winner = listed[0].volume
    assert {vid for size, vid in results if size == winner.capacity_bytes} == {winner.volume_id}
    assert {vid for size, vid in results if size != winner.capacity_bytes} == {""}


async def test_identity_probe_and_capacity(csi_endpoint: Csi) -> None:
    csi = csi_endpoint
    assert (await csi.call(csi.identity.Probe, csi_pb2.ProbeRequest())).ready.value
    info = await csi.call(csi.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest())
    assert info.node_id == NODE_ID
    capacity = await csi.call(
        csi.controller.GetCapacity, csi_pb2.GetCapacityRequest(volume_capabilities=[mount_capability()])
    )
    total, _free = await csi.volumes.capacity()
    assert 0 < capacity.available_capacity <= total
    assert 0 < capacity.maximum_volume_size.value <= capacity.available_capacity
    # a path check inside the mount must not wedge the daemon: it answers the next call at once
    inside = csi.publish_request(
        (await csi.call(csi.controller.CreateVolume, create_request("pvc-inside", MiB))).volume.volume_id,
        csi.volumes.daemon.mount / "not-a-pod-dir",
    )
    await csi.fails(Code.INVALID_ARGUMENT, csi.node.NodePublishVolume, inside)
    assert (await csi.call(csi.identity.Probe, csi_pb2.ProbeRequest())).ready.value


def test_ids_survive_a_restart() -> None:
    """A separate daemon: stop it, start it on the same state, and the same ids answer."""
    with start_daemon(node_id="restart-node") as running:

        def controller() -> tuple[grpc.Channel, Any]:
            channel = grpc.insecure_channel("unix://" + os.fspath(running.socket))
            return channel, csi_pb2_grpc.ControllerStub(channel)

        channel, stub = controller()
        try:
            volume = stub.CreateVolume(create_request("pvc-durable", MiB), timeout=30).volume
            snapshot = stub.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap-durable"), timeout=30
            ).snapshot
        finally:
            channel.close()
        assert running.daemon.stop() == 0
        running.daemon.start()
        channel, stub = controller()
        try:
            again = stub.CreateVolume(create_request("pvc-durable", MiB), timeout=30).volume
            assert again.volume_id == volume.volume_id
            listed = stub.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snapshot.snapshot_id), timeout=30)
            assert [e.snapshot for e in listed.entries] == [snapshot]
        finally:
            channel.close()
