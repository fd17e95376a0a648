"""CoreVolumes (the CSI backend) against a real Core on an image file: no FUSE, no gRPC.

The gRPC layer and the mounted path are covered in tests/csi; here the contract itself: ids,
idempotency rules, error classes, quota enforcement through the core, copy-on-write snapshots.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from awsomefsd.config import DeviceSettings, NodeSettings, Settings
from awsomefsd.csi import ids
from awsomefsd.csi.backend import (
    CapacityOutOfRange,
    InsufficientCapacity,
    VolumeAlreadyExists,
    VolumeNotFound,
    VolumeService,
)
from awsomefsd.daemon.node import Core, open_core
from awsomefsd.daemon.volumes import CoreVolumes, csi_id, parse_csi_id
from awsomefsd.io.device import BlockDevice, create_image
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.io.superblock import format_device
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.volumes_sm import VOLUMES_INO

MiB = 1 << 20
IMAGE_BYTES = 256 * MiB


def open_test_core(tmp_path: Path, cluster: uuid.UUID | None = None) -> Core:
    image = tmp_path / "device.img"
    if not image.exists():
        create_image(image, IMAGE_BYTES)
        device = BlockDevice.open(image, direct=False)
        try:
            format_device(device, cluster_id=cluster or uuid.uuid4(), label="test")
        finally:
            device.close()
    settings = Settings(
        node=NodeSettings(state_dir=tmp_path / "state", name="test"),
        device=DeviceSettings(path=image, shared=False, direct_io=False),
    )
    return open_core(settings)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    core = open_test_core(tmp_path)
    try:
        yield core
    finally:
        core.close()


@pytest.fixture
def volumes(core: Core, tmp_path: Path) -> CoreVolumes:
    return CoreVolumes(core, tmp_path / "mnt")


async def write_file(core: Core, volume_root: int, name: bytes, data: bytes) -> int:
    """Create `name` in the volume's root and write `data` through the core (as FUSE would)."""
    fh, inode = await core.ops.create(volume_root, name, stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    try:
        await core.ops.write(fh, 0, data)
        await core.ops.flush(fh)
    finally:
        await core.ops.release(fh)
    return inode.ino


async def read_file(core: Core, directory: int, name: bytes) -> bytes:
    inode = await core.ops.lookup(directory, name)
    fh = await core.ops.open(inode.ino, os.O_RDONLY)
    try:
        return await core.ops.read(fh, 0, inode.size + 1)
    finally:
        await core.ops.release(fh)


def root_of(core: Core, volume_id: str) -> int:
    number = parse_csi_id(str(core.superblock.cluster_id), "volume", volume_id)
    assert number is not None
    record = core.sm.volumes.get(core.log.read_txn(), number)
    assert record is not None
    return int(record["root"])


def test_satisfies_the_protocol(volumes: CoreVolumes) -> None:
    service: VolumeService = volumes  # checked by mypy; the attribute walk below by pytest
    for name in ("create_volume", "delete_volume", "get_volume", "list_volumes", "expand_volume",
                 "create_snapshot", "delete_snapshot", "get_snapshot", "list_snapshots", "capacity",
                 "mount_point", "volume_path", "mount_healthy"):
        assert callable(getattr(service, name)), name


def test_ids_round_trip_and_reject_foreign_tags() -> None:
    cluster, other = str(uuid.uuid4()), str(uuid.uuid4())
    for number in (16, 12345, (1 << 64) - 1):
        vid, sid = csi_id(cluster, "volume", number), csi_id(cluster, "snapshot", number)
        assert ids.is_volume_id(vid) and ids.is_snapshot_id(sid)
        assert parse_csi_id(cluster, "volume", vid) == number
        assert parse_csi_id(cluster, "snapshot", sid) == number
        assert parse_csi_id(other, "volume", vid) is None, "an id of another cluster names nothing"
        assert parse_csi_id(cluster, "snapshot", vid) is None and parse_csi_id(cluster, "volume", sid) is None
    assert parse_csi_id(cluster, "volume", "vol-" + "0" * 32) is None
    assert parse_csi_id(cluster, "volume", ids.derive_volume_id("pvc")) is None
    assert parse_csi_id(cluster, "volume", "../../etc") is None


async def test_create_is_idempotent_and_checks_compatibility(volumes: CoreVolumes, core: Core) -> None:
    info = await volumes.create_volume("pvc-1", 16 * MiB, inode_limit=100)
    assert ids.is_volume_id(info.volume_id) and info.name == "pvc-1"
    assert (info.capacity_bytes, info.inode_limit, info.used_bytes, info.used_inodes) == (16 * MiB, 100, 0, 0)
    assert info.source_kind == "" and info.source_id == "" and info.created_ns > 0
    assert await volumes.create_volume("pvc-1", 16 * MiB, inode_limit=100) == info
    assert await volumes.get_volume(info.volume_id) == info
    with pytest.raises(VolumeAlreadyExists):
        await volumes.create_volume("pvc-1", 32 * MiB, inode_limit=100)
    with pytest.raises(VolumeAlreadyExists):
        await volumes.create_volume("pvc-1", 16 * MiB)
    number = parse_csi_id(volumes.cluster_id, "volume", info.volume_id)
    assert number == root_of(core, info.volume_id), "the volume number is its root inode"
    assert volumes.volume_path(info.volume_id) == str(volumes.mount / ".volumes" / f"vol-{number:016x}")
    assert [v.volume_id for v in await volumes.list_volumes()] == [info.volume_id]


async def test_capacity_limits(volumes: CoreVolumes) -> None:
    total, free = await volumes.capacity()
    assert total == volumes.total_bytes and 0 < free <= total
    with pytest.raises(InsufficientCapacity):
        await volumes.create_volume("too-big", volumes.total_bytes + BLOCK_SIZE)
    whole = await volumes.create_volume("whole-device", volumes.total_bytes)
    assert whole.capacity_bytes == volumes.total_bytes, "thin provisioning: the data area is the limit"
    with pytest.raises(CapacityOutOfRange):
        await volumes.create_volume("empty", 0)
    info = await volumes.create_volume("pvc", 4 * MiB)
    with pytest.raises(CapacityOutOfRange):
        await volumes.expand_volume(info.volume_id, 2 * MiB)
    with pytest.raises(InsufficientCapacity):
        await volumes.expand_volume(info.volume_id, volumes.total_bytes + BLOCK_SIZE)
    assert await volumes.expand_volume(info.volume_id, 4 * MiB) == info
    grown = await volumes.expand_volume(info.volume_id, 8 * MiB)
    assert grown.capacity_bytes == 8 * MiB and (await volumes.get_volume(info.volume_id)) == grown
    with pytest.raises(VolumeNotFound):
        await volumes.expand_volume(csi_id(volumes.cluster_id, "volume", 999_999), 8 * MiB)


async def test_quota_is_enforced_and_expansion_lifts_it(volumes: CoreVolumes, core: Core) -> None:
    info = await volumes.create_volume("pvc-quota", 8 * BLOCK_SIZE)
    root = root_of(core, info.volume_id)
    await write_file(core, root, b"fits", bytes(6 * BLOCK_SIZE))
    with pytest.raises(FsError) as err:
        await write_file(core, root, b"overflows", bytes(4 * BLOCK_SIZE))
    assert err.value.errno == errno.EDQUOT
    used = await volumes.get_volume(info.volume_id)
    assert used is not None and used.used_bytes == 6 * BLOCK_SIZE and used.used_inodes == 2
    await volumes.expand_volume(info.volume_id, 16 * BLOCK_SIZE)
    fh = (await core.ops.open((await core.ops.lookup(root, b"overflows")).ino, os.O_WRONLY))
    try:
        assert await core.ops.write(fh, 0, bytes(4 * BLOCK_SIZE)) == 4 * BLOCK_SIZE
    finally:
        await core.ops.release(fh)


async def test_inode_limit_is_enforced(volumes: CoreVolumes, core: Core) -> None:
    info = await volumes.create_volume("pvc-inodes", MiB, inode_limit=2)
    root = root_of(core, info.volume_id)
    await write_file(core, root, b"a", b"1")
    await write_file(core, root, b"b", b"2")
    with pytest.raises(FsError) as err:
        await write_file(core, root, b"c", b"3")
    assert err.value.errno == errno.EDQUOT


async def test_snapshot_restore_clone_and_delete(volumes: CoreVolumes, core: Core) -> None:
    source = await volumes.create_volume("pvc-src", 4 * MiB)
    root = root_of(core, source.volume_id)
    await write_file(core, root, b"data", b"before the snapshot" * 1000)
    await core.ops.sync_all()

    snap = await volumes.create_snapshot("snap-1", source.volume_id)
    assert ids.is_snapshot_id(snap.snapshot_id) and snap.ready and snap.name == "snap-1"
    assert snap.source_volume_id == source.volume_id
    assert snap.size_bytes == -(-len(b"before the snapshot" * 1000) // BLOCK_SIZE) * BLOCK_SIZE
    assert await volumes.create_snapshot("snap-1", source.volume_id) == snap, "idempotent"
    assert await volumes.get_snapshot(snap.snapshot_id) == snap
    other = await volumes.create_volume("pvc-other", MiB)
    with pytest.raises(VolumeAlreadyExists):
        await volumes.create_snapshot("snap-1", other.volume_id)
    with pytest.raises(VolumeNotFound):
        await volumes.create_snapshot("snap-2", csi_id(volumes.cluster_id, "volume", 999_999))

    fh = await core.ops.open((await core.ops.lookup(root, b"data")).ino, os.O_WRONLY)
    try:
        await core.ops.write(fh, 0, b"AFTER")
    finally:
        await core.ops.release(fh)
    await core.ops.sync_all()

    free_before = (await volumes.capacity())[1]
    restored = await volumes.create_volume(
        "pvc-restored", 4 * MiB, source_kind="snapshot", source_id=snap.snapshot_id
    )
    assert (restored.source_kind, restored.source_id) == ("snapshot", snap.snapshot_id)
    assert restored.used_bytes == snap.size_bytes and (await volumes.capacity())[1] == free_before, "shared"
    assert await read_file(core, root_of(core, restored.volume_id), b"data") == b"before the snapshot" * 1000
    clone = await volumes.create_volume("pvc-clone", 4 * MiB, source_kind="volume", source_id=source.volume_id)
    assert (await read_file(core, root_of(core, clone.volume_id), b"data")).startswith(b"AFTER")
    with pytest.raises(CapacityOutOfRange):
        await volumes.create_volume("pvc-small", BLOCK_SIZE, source_kind="snapshot", source_id=snap.snapshot_id)
    for kind, missing in (("snapshot", csi_id(volumes.cluster_id, "snapshot", 999_999)),
                          ("volume", csi_id(volumes.cluster_id, "volume", 999_999)),
                          ("snapshot", source.volume_id)):
        with pytest.raises(VolumeNotFound):
            await volumes.create_volume("pvc-missing", MiB, source_kind=kind, source_id=missing)  # type: ignore[arg-type]
    assert [s.snapshot_id for s in await volumes.list_snapshots()] == [snap.snapshot_id]

    await volumes.delete_snapshot(snap.snapshot_id)
    await volumes.delete_snapshot(snap.snapshot_id)
    assert await volumes.get_snapshot(snap.snapshot_id) is None
    again = await volumes.create_volume("pvc-restored", 4 * MiB, source_kind="snapshot", source_id=snap.snapshot_id)
    assert again == await volumes.get_volume(restored.volume_id), "a retry after the snapshot went still answers"
    for volume in (source, restored, clone, other):
        await volumes.delete_volume(volume.volume_id)
        await volumes.delete_volume(volume.volume_id)
        assert await volumes.get_volume(volume.volume_id) is None
    assert await volumes.list_volumes() == []
    await volumes.delete_volume(csi_id(volumes.cluster_id, "volume", 999_999))
    await volumes.delete_volume("vol-" + "f" * 32)


async def test_a_recreated_name_gets_a_new_id(volumes: CoreVolumes) -> None:
    first = await volumes.create_volume("pvc-again", MiB)
    await volumes.delete_volume(first.volume_id)
    second = await volumes.create_volume("pvc-again", MiB)
    assert second.volume_id != first.volume_id and await volumes.get_volume(first.volume_id) is None


async def test_kernel_entries_are_invalidated(core: Core, tmp_path: Path) -> None:
    seen: list[tuple[int, bytes]] = []
    volumes = CoreVolumes(core, tmp_path / "mnt", invalidate_entry=lambda parent, name: seen.append((parent, name)))
    info = await volumes.create_volume("pvc-inv", MiB)
    name = os.path.basename(volumes.volume_path(info.volume_id)).encode()
    await volumes.create_volume("pvc-inv", MiB)
    await volumes.delete_volume(info.volume_id)
    assert seen == [(VOLUMES_INO, name), (VOLUMES_INO, name)]


async def test_ids_survive_a_restart(tmp_path: Path) -> None:
    core = open_test_core(tmp_path)
    try:
        volumes = CoreVolumes(core, tmp_path / "mnt")
        info = await volumes.create_volume("pvc-durable", MiB)
        snap = await volumes.create_snapshot("snap-durable", info.volume_id)
    finally:
        core.close()
    core = open_test_core(tmp_path)
    try:
        volumes = CoreVolumes(core, tmp_path / "mnt")
        assert (await volumes.get_volume(info.volume_id)) == info
        assert (await volumes.get_snapshot(snap.snapshot_id)) == snap
    finally:
        core.close()


async def test_mount_health(core: Core, tmp_path: Path) -> None:
    plain = tmp_path / "not-mounted"
    plain.mkdir()
    assert not await CoreVolumes(core, plain).mount_healthy(), "a bare directory is not the filesystem"
    assert not await CoreVolumes(core, tmp_path / "missing").mount_healthy()



async def test_a_hung_mount_is_unhealthy_after_the_timeout(
    core: Core, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def hung_stat(path: Path) -> os.stat_result:
        release.wait(60)  # a FUSE server that never answers; released below
        return os.stat(path)

    monkeypatch.setattr("awsomefsd.daemon.volumes._stat_root", hung_stat)
    volumes = CoreVolumes(core, tmp_path, health_timeout_s=0.2)
    try:
        with trio.fail_after(10):
            assert not await volumes.mount_healthy()
            assert not await volumes.mount_healthy()
    finally:
        release.set()


async def test_snapshot_and_clone_include_buffered_writes(volumes: CoreVolumes, core: Core) -> None:
    source = await volumes.create_volume("pvc-buffered", 4 * MiB)
    root = root_of(core, source.volume_id)
    fh, inode = await core.ops.create(root, b"open-file", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    try:
        await core.ops.write(fh, 0, b"still in the write buffer")
        assert core.data.files[inode.ino].dirty, "the precondition: nothing flushed yet"
        # counted as df in the volume counts it: the block the buffered bytes will take
        used = (await volumes.get_volume(source.volume_id)).used_bytes  # type: ignore[union-attr]
        df = core.ops.statfs(inode.ino)
        assert used == BLOCK_SIZE == (df.total_blocks - df.free_blocks) * df.block_size
        snap = await volumes.create_snapshot("snap-buffered", source.volume_id)
        await core.ops.write(fh, 0, b"STILL")
        clone = await volumes.create_volume("pvc-buffered-clone", 4 * MiB, source_kind="volume",
                                            source_id=source.volume_id)
    finally:
        await core.ops.release(fh)
    snap_number = parse_csi_id(volumes.cluster_id, "snapshot", snap.snapshot_id)
    assert snap_number is not None
    snap_record = core.sm.volumes.get(core.log.read_txn(), snap_number)
    assert snap_record is not None
    assert await read_file(core, snap_record["root"], b"open-file") == b"still in the write buffer"
    assert await read_file(core, root_of(core, clone.volume_id), b"open-file") == b"STILL in the write buffer"


async def test_deleting_a_volume_drops_its_buffered_writes(volumes: CoreVolumes, core: Core) -> None:
    info = await volumes.create_volume("pvc-doomed", 4 * MiB)
    fh, inode = await core.ops.create(root_of(core, info.volume_id), b"f", stat.S_IFREG | 0o644, os.O_WRONLY, 0, 0)
    await core.ops.write(fh, 0, b"never flushed")
    assert inode.ino in core.data.files
    await volumes.delete_volume(info.volume_id)
    assert inode.ino not in core.data.files and core.data.total_dirty_bytes == 0
    await core.ops.sync_all()  # nothing left that would fail to flush
    await core.ops.release(fh)


class LaggingCoherence:
    """A cluster member's coherence whose node has not applied another node's changes yet: they
    arrive (`arrive`, run once) at its first catch-up, as a ReadIndex catch-up brings them."""

    strict = False

    def __init__(self, core: Core, arrive: Any) -> None:
        self.core, self.arrive, self.catch_ups = core, arrive, 0

    async def catch_up(self, *, drain: bool = True) -> None:
        self.catch_ups += 1
        arrive, self.arrive = self.arrive, None
        if arrive is not None:
            self.core.ops.coherence = None  # what arrives is another node's, not a request of ours
            try:
                await arrive()
            finally:
                self.core.ops.coherence = self  # type: ignore[assignment]


async def test_every_call_on_a_member_sees_what_another_node_committed_before_it(
        volumes: CoreVolumes, core: Core) -> None:
    """ListVolumes on the next node missed a volume just made through the first (the dev cluster
    test caught it): each call reads after a catch-up, so it finds what was committed before it,
    and a delete on a node that had not applied the create still deletes."""
    made: dict[str, str] = {}

    async def made_elsewhere(name: str, snapshot: bool = False) -> None:
        info = await volumes.create_volume(name, 4 * MiB)
        made[name] = info.volume_id
        if snapshot:
            made[name + "-snap"] = (await volumes.create_snapshot(name + "-snap", info.volume_id)).snapshot_id

    async def behind(name: str, snapshot: bool = False) -> LaggingCoherence:
        coherence = LaggingCoherence(core, lambda: made_elsewhere(name, snapshot))
        core.ops.coherence = coherence  # type: ignore[assignment]
        return coherence

    def next_id(volume_id: str) -> str:
        """The id the next volume made gets (numbers are handed out in order here)."""
        return csi_id(volumes.cluster_id, "volume", parse_csi_id(volumes.cluster_id, "volume", volume_id) + 1)

    try:
        await behind("listed")
        assert [v.volume_id for v in await volumes.list_volumes()] == [made["listed"]]
        await behind("got")
        found = await volumes.get_volume(next_id(made["listed"]))
        assert found is not None and found.name == "got", "the next volume, made elsewhere a moment ago"
        await behind("expanded")
        assert (await volumes.expand_volume(next_id(made["got"]), 8 * MiB)).capacity_bytes == 8 * MiB
        await behind("again")
        again = await volumes.create_volume("again", 4 * MiB)
        assert again.volume_id == made["again"], "the retry found the volume, not a second one"
        await behind("deleted")
        await volumes.delete_volume(next_id(made["again"]))
        assert made["deleted"] == next_id(made["again"]) and await volumes.get_volume(made["deleted"]) is None
        await behind("snapped")  # the source arrives at the snapshot's own catch-up
        snap = await volumes.create_snapshot("snap", next_id(made["deleted"]))
        assert snap.source_volume_id == made["snapped"]
        await behind("snapped-again", snapshot=True)  # its volume takes the next number, the snapshot the one after
        doomed = csi_id(volumes.cluster_id, "snapshot", parse_csi_id(volumes.cluster_id, "snapshot", snap.snapshot_id) + 2)
        await volumes.delete_snapshot(doomed)
        assert made["snapped-again-snap"] == doomed and await volumes.get_snapshot(doomed) is None
        await behind("listed-snap", snapshot=True)
        assert [s.snapshot_id for s in await volumes.list_snapshots()] == [snap.snapshot_id, made["listed-snap-snap"]]
        await behind("got-snap", snapshot=True)
        got_snap = csi_id(volumes.cluster_id, "snapshot",
                          parse_csi_id(volumes.cluster_id, "snapshot", made["listed-snap-snap"]) + 2)
        assert await volumes.get_snapshot(got_snap) is not None and made["got-snap-snap"] == got_snap
        coherence = await behind("last")
        await volumes.list_volumes()
        assert coherence.catch_ups == 1
    finally:
        core.ops.coherence = None
    assert {v.name for v in await volumes.list_volumes()} == {"listed", "got", "expanded", "again", "snapped",
                                                              "snapped-again", "listed-snap", "got-snap", "last"}
