"""The tiering engine in-process, against the real S3 API server through the fault proxy: cold data
moves to objects and reads back byte for byte (through the caches, from the store), the device
space comes free, overwrites and deletes release objects that GC then deletes, a crash between
PUT and commit leaks nothing, and a store outage fails reads with EIO in bounded time while writes
go on. fsck agrees with the result each time."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest
import trio

from awsomefsd.cli.fsck import run_fsck
from awsomefsd.config import TierSettings
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.tier import engine as engine_module
from awsomefsd.tier.sigv4 import Credentials
from awsomefsd.tier.source import object_key
from awsomefsd.tier.store import ObjectStore
from tests.support.s3 import TEST_KEY_ID, TEST_SECRET, FaultProxy, S3Server
from tests.support.tiering import OBJECT_BYTES, Node, a_file, tier_settings, tiered_node
from tests.unit.test_fs_api import File


async def test_cold_files_move_to_objects_and_read_back_byte_for_byte(node: Node, s3: S3Server) -> None:
    files = [await a_file(node, b"f%d" % i, size, seed=i) for i, size in enumerate((700_000, 3 * OBJECT_BYTES // 2, 5000))]
    free_before = node.core.meta.free_blocks()
    assert not await node.engine.tier_cold() and node.placement(files[0]) == (171, 0)  # not cold yet
    await node.everything_cold()
    assert await node.engine.tier_cold()  # the first object is full: more to do
    while await node.engine.tier_cold():
        pass
    for f in files:
        assert node.placement(f)[0] == 0, "every block of every file is in the store"
        await f.check()
    live = [o for o in node.core.meta.tier_objects() if o.state == "live"]
    assert len(live) >= 2 and all(o.blocks * BLOCK_SIZE <= OBJECT_BYTES for o in live)
    assert {node.key(o.id) for o in live} <= set(s3.stored())
    assert node.tiering.reader.gets > 0, "the reads came from the store"
    await trio.sleep(0.3)  # the delayed-free grace (200 ms)
    await node.core.meta.propose(c.ReclaimFrees(time.time_ns()))
    assert node.core.meta.free_blocks() >= free_before + sum(len(f.model) // BLOCK_SIZE for f in files)
    node.check_space()


async def test_an_overwrite_or_a_delete_releases_tiered_data_and_gc_deletes_dead_objects(node: Node, s3: S3Server) -> None:
    f = await a_file(node, b"f", 64 * BLOCK_SIZE, seed=1)
    g = await a_file(node, b"g", 64 * BLOCK_SIZE, seed=2)
    await node.evict(f)
    await node.evict(g)
    assert node.placement(f) == (0, 64) and node.placement(g) == (0, 64)
    await f.write(10 * BLOCK_SIZE + 100, b"new bytes over tiered ones")
    await node.core.data.flush(f.ino)
    assert node.placement(f) == (1, 63)
    await f.check()
    await node.core.ops.unlink(ROOT_INO, b"g", is_dir=False)
    await node.core.ops.release(g.fh)
    await trio.sleep(0.3)
    await node.core.meta.propose(c.ReclaimFrees(time.time_ns()))
    objects = {o.id: o for o in node.core.meta.tier_objects()}
    (f_object,), (g_object,) = ([o for o in objects.values() if o.live_blocks == n] for n in (63, 0))
    assert g_object.state == "dead" and f_object.state == "live"
    events: list[str] = []
    real_barrier, real_delete = node.core.meta.barrier, node.engine.store.delete

    async def barrier(inode: int | None = None, *, report: bool = True) -> None:
        events.append("barrier")
        await real_barrier(inode, report=report)

    def delete(key: str) -> None:
        events.append("delete")
        real_delete(key)
    node.core.meta.barrier, node.engine.store.delete = barrier, delete  # type: ignore[method-assign]
    assert await node.engine.collect_garbage() == 1
    assert events[:2] == ["barrier", "delete"], "an object was deleted before its death was durable"
    assert node.key(g_object.id) not in s3.stored() and node.key(f_object.id) in s3.stored()
    assert [o.id for o in node.core.meta.tier_objects()] == [f_object.id]
    await f.check()
    node.check_space()


async def test_a_crash_between_put_and_commit_leaks_nothing_and_loses_nothing(
        node: Node, s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    f = await a_file(node, b"f", 32 * BLOCK_SIZE, seed=3)
    real_propose = node.core.meta.propose

    async def crash_at_commit(command: object, **kwargs: object) -> object:
        if isinstance(command, c.CommitTierObject):
            raise trio.Cancelled._create()  # the node died here: the PUT is done, the commit never sent
        return await real_propose(command, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node.core.meta, "propose", crash_at_commit)
    with trio.move_on_after(30):
        with pytest.raises(trio.Cancelled):
            await node.evict(f)
    monkeypatch.setattr(node.core.meta, "propose", real_propose)
    (pending,) = node.core.meta.tier_objects()
    assert pending.state == "pending" and node.key(pending.id) in s3.stored()
    assert node.placement(f) == (32, 0)
    await f.check()
    assert await node.engine.collect_garbage() == 0  # a young pending object may still be uploading
    later = pending.created_ns + int(engine_module.PENDING_TIMEOUT_S * 1e9) + 1
    node.engine.clock_ns = lambda: later
    assert await node.engine.collect_garbage() == 1
    assert node.core.meta.tier_objects() == [] and node.key(pending.id) not in s3.stored()
    await f.check()
    node.check_space()


async def test_a_store_outage_fails_tiered_reads_in_bounded_time_and_stalls_only_tiering(
        node: Node, proxy: FaultProxy) -> None:
    f = await a_file(node, b"f", 16 * BLOCK_SIZE, seed=4)
    await node.evict(f)
    proxy.plan("status", times=10_000, status=503)
    started = trio.current_time()
    with pytest.raises(FsError) as failed:
        await f.read_all()
    assert failed.value.errno == errno.EIO
    assert trio.current_time() - started < node.settings.tier.read_timeout_s + 2
    other = await a_file(node, b"other", 40 * BLOCK_SIZE, seed=5)  # writes do not wait for the store
    await other.check()
    await node.everything_cold()
    node.engine.retry = engine_module.Retry(attempts=2, base_s=0.01, deadline_s=1)
    delay = await node.engine.step()
    assert not node.engine.stats.store_ok and delay > 0 and node.engine.stats.failures == 1
    assert node.placement(other) == (40, 0)
    assert all(o.state != "pending" for o in node.core.meta.tier_objects()), "a failed upload is abandoned"
    proxy.clear()
    await f.check()
    await node.engine.step()
    assert node.engine.stats.store_ok and node.placement(other) == (0, 40)


async def test_a_partial_write_into_tiered_data_during_an_outage_is_kept_until_the_store_answers(
        node: Node, proxy: FaultProxy) -> None:
    """Completing a partial block needs its old bytes, which are in the store: while it does not
    answer, fsync says EIO but the written bytes stay buffered, and they reach the device after."""
    f = await a_file(node, b"cold.log", 8 * BLOCK_SIZE, seed=8)
    await node.evict(f)
    proxy.plan("status", times=10_000, status=503)
    await f.write(3 * BLOCK_SIZE + 100, b"appended while the store is down")
    with pytest.raises(FsError) as failed:
        await node.core.ops.fsync(f.fh, False)
    assert failed.value.errno == errno.EIO and failed.value.cause == "store"
    assert f.ino in node.core.data.files and node.core.data.files[f.ino].dirty, "the writes were dropped"
    proxy.clear()
    await node.core.ops.fsync(f.fh, False)
    await f.check()


async def test_an_object_mostly_dead_is_repacked_and_then_deleted(node: Node, s3: S3Server) -> None:
    a = await a_file(node, b"a", 150 * BLOCK_SIZE, seed=6)
    b = await a_file(node, b"b", 50 * BLOCK_SIZE, seed=7)
    await node.everything_cold()
    await node.engine.tier_cold()
    (packed,) = node.core.meta.tier_objects()
    assert packed.blocks == 200 and node.placement(a) == (0, 150) and node.placement(b) == (0, 50)
    assert not await node.engine.repack()  # all of it in use
    await node.core.ops.unlink(ROOT_INO, b"a", is_dir=False)
    await node.core.ops.release(a.fh)
    await trio.sleep(0.3)
    await node.core.meta.propose(c.ReclaimFrees(time.time_ns()))
    assert node.core.meta.tier_object(packed.id).live_blocks == 50
    assert await node.engine.repack()
    assert node.placement(b) == (0, 50)
    await trio.sleep(0.3)
    await node.core.meta.propose(c.ReclaimFrees(time.time_ns()))
    assert node.core.meta.tier_object(packed.id).state == "dead"
    assert await node.engine.collect_garbage() == 1
    (repacked,) = node.core.meta.tier_objects()
    assert repacked.blocks == 50 and repacked.live_blocks == 50
    assert node.key(packed.id) not in s3.stored() and node.key(repacked.id) in s3.stored()
    await b.check()
    node.check_space()


async def test_reads_through_small_caches_stay_right_and_within_their_limits(tmp_path: Path, s3: S3Server) -> None:
    settings = tier_settings(tmp_path, s3.endpoint, s3.bucket, memory_cache_bytes=1 << 20, cache_bytes=2 << 20)
    async with tiered_node(settings) as node:
        f = await a_file(node, b"f", 6 << 20, seed=8)
        await node.evict(f)
        for _ in range(2):
            await f.check()
        stats = node.tiering.cache.stats
        assert stats.disk_bytes <= 2 << 20 and stats.memory_bytes <= 1 << 20 and stats.evicted > 0
        cache_files = sum(p.stat().st_size for p in (settings.node.state_dir / "tier-cache").iterdir())
        assert cache_files <= 2 << 20
        gets = node.tiering.reader.gets
        await node.core.ops.read(f.fh, 6 * (1 << 20) - 4096, 4096)  # the last chunk read: cached
        await node.core.ops.read(f.fh, 6 * (1 << 20) - 4096, 4096)
        assert node.tiering.reader.gets == gets


def test_fsck_verifies_tiered_data_against_the_store(tmp_path: Path, s3: S3Server) -> None:
    settings = tier_settings(tmp_path, s3.endpoint, s3.bucket)

    async def tier_a_file() -> tuple[str, int]:
        async with tiered_node(settings) as node:
            f = await a_file(node, b"f", 20 * BLOCK_SIZE, seed=9)
            await node.evict(f)
            (obj,) = node.core.meta.tier_objects()
            return object_key(node.cluster_id, obj.id), obj.bytes

    key, size = trio.run(tier_a_file)
    assert run_fsck(settings, repair=False, verify_data=True) == 0
    store = ObjectStore(s3.endpoint, s3.bucket, Credentials(TEST_KEY_ID, TEST_SECRET), prefix=settings.tier.prefix)
    store.put(key, bytes(size))  # the store now holds other bytes under the key
    assert run_fsck(settings, repair=False, verify_data=True) == 4
    unconfigured = settings.model_copy(update={"tier": TierSettings()})
    assert run_fsck(unconfigured, repair=False, verify_data=True) == 4  # cannot check: says so


async def test_a_file_read_again_later_comes_back_to_the_device(node: Node) -> None:
    f = await a_file(node, b"f", 24 * BLOCK_SIZE, seed=10)
    await node.evict(f)
    now = [5000.0]
    node.core.data.recall_policy.clock = lambda: now[0]
    node.core.data.recall_policy.recall_reads = 2
    await f.check()
    await trio.sleep(0.05)
    assert node.placement(f) == (0, 24), "one read: it stays in the store"
    now[0] += 60
    await f.check()
    with trio.fail_after(20):
        while node.placement(f) != (24, 0):
            await trio.sleep(0.02)
    await f.check()
    assert node.core.data.compactor.recalls == 1


async def test_volumes_opted_out_and_small_files_stay_on_the_device(node: Node) -> None:
    from awsomefsd.daemon.volumes import CoreVolumes

    await CoreVolumes(node.core, "/nonexistent").create_volume("keep", 16 << 20)
    volume = node.core.meta.volume_by_name("volume", "keep")
    assert volume is not None
    kept = await File.create(node.core, b"db", parent=volume.root)
    await kept.write(0, bytes(range(256)) * 256)
    await node.core.data.flush(kept.ino)
    small = await a_file(node, b"small", 3 * BLOCK_SIZE, seed=11)
    moved = await a_file(node, b"big", 40 * BLOCK_SIZE, seed=12)
    await node.everything_cold()
    node.engine.settings = node.engine.settings.model_copy(
        update={"exclude_volumes": ["keep"], "min_file_bytes": 8 * BLOCK_SIZE})
    await node.engine.tier_cold()
    assert node.placement(moved) == (0, 40)
    assert node.placement(kept) == (16, 0) and node.placement(small) == (3, 0)
    await kept.check()


async def test_cold_data_short_of_an_object_waits_for_more_unless_space_is_short(node: Node) -> None:
    f = await a_file(node, b"f", 8 * BLOCK_SIZE, seed=13)
    await node.everything_cold()
    now = [100.0]
    node.engine.monotonic = lambda: now[0]
    node.engine.settings = node.engine.settings.model_copy(update={"partial_object_after_s": 600})
    assert not await node.engine.tier_cold() and node.placement(f) == (8, 0)
    assert node.engine.stats.candidate_bytes == 8 * BLOCK_SIZE
    now[0] += 599
    await node.engine.tier_cold()
    assert node.placement(f) == (8, 0), "still waiting for more"
    now[0] += 1
    await node.engine.tier_cold()
    assert node.placement(f) == (0, 8)
    g = await a_file(node, b"g", 8 * BLOCK_SIZE, seed=14)
    await node.everything_cold()
    node.engine.settings = node.engine.settings.model_copy(update={"partial_object_after_s": 600})
    await node.engine.tier_cold()
    assert node.placement(g) == (8, 0)
    node.engine.settings = node.engine.settings.model_copy(update={"fill_watermark": 0.0001})
    await node.engine.tier_cold()
    assert node.placement(g) == (0, 8), "past the watermark, space comes first"


async def test_a_snapshot_shares_tiered_data_and_keeps_it_where_it_is(node: Node) -> None:
    from awsomefsd.daemon.volumes import CoreVolumes
    from awsomefsd.fs.xattr_ops import TIER_XATTR

    volumes = CoreVolumes(node.core, "/nonexistent")
    made = await volumes.create_volume("data", 16 << 20)
    volume = node.core.meta.volume_by_name("volume", "data")
    assert volume is not None
    f = await File.create(node.core, b"f", parent=volume.root)
    await f.write(0, bytes(range(256)) * 20)
    await node.evict(f)
    await volumes.create_snapshot("snap", made.volume_id)
    snap = node.core.meta.volume_by_name("snapshot", "snap")
    assert snap is not None
    copy_ino = node.core.meta.lookup(snap.root, b"f")
    assert copy_ino is not None
    assert node.core.meta.all_extents(copy_ino) == node.core.meta.all_extents(f.ino), "the same object blocks"
    assert await node.core.data.recall(copy_ino) == 0
    with pytest.raises(FsError) as refused:
        await node.core.ops.setxattr(copy_ino, TIER_XATTR, b"recall", 0)
    assert refused.value.errno == errno.EROFS
    await f.write(0, b"changed")  # the origin moves on; the snapshot keeps the tiered bytes
    await node.core.data.flush(f.ino)
    snapshot_bytes = await node.core.data.read(node.core.meta.require_inode(copy_ino), 0, 5120)
    assert snapshot_bytes == (bytes(range(256)) * 20)[:5120]
    await f.check()
    node.check_space()


async def test_a_recalled_file_counts_as_hot_and_is_not_tiered_again(node: Node) -> None:
    f = await a_file(node, b"f", 24 * BLOCK_SIZE, seed=12)
    node.engine.settings = node.settings.tier.model_copy(update={"cold_after_s": 1.0})
    with trio.fail_after(20):
        while node.placement(f) != (0, 24):
            await node.engine.step()
            await trio.sleep(0.05)
    assert await node.core.data.recall(f.ino) == 24
    assert node.placement(f) == (24, 0)
    await node.engine.step()
    assert node.placement(f) == (24, 0), "a file just recalled was tiered again"
    assert node.core.meta.require_inode(f.ino).atime_ns > time.time_ns() - 10**9
    await f.check()


async def test_an_object_gone_from_the_store_backs_off_and_cold_tiering_goes_on(node: Node, s3: S3Server) -> None:
    a = await a_file(node, b"a", 150 * BLOCK_SIZE, seed=13)
    b = await a_file(node, b"b", 50 * BLOCK_SIZE, seed=14)
    await node.everything_cold()
    await node.engine.tier_cold()
    (packed,) = node.core.meta.tier_objects()
    await node.core.ops.unlink(ROOT_INO, b"a", is_dir=False)
    await node.core.ops.release(a.fh)
    await trio.sleep(0.3)
    await node.core.meta.propose(c.ReclaimFrees(time.time_ns()))
    assert node.core.meta.tier_object(packed.id).live_blocks == 50  # mostly dead: to be repacked
    s3.client().delete_object(Bucket=s3.bucket, Key=node.key(packed.id))
    later = await a_file(node, b"later", 30 * BLOCK_SIZE, seed=15)
    await node.everything_cold()
    assert await node.engine.step() == node.settings.tier.scan_interval_s, "no pass at once after a failure"
    assert node.placement(later) == (0, 30), "cold tiering went on"
    assert node.engine.stats.unreadable_objects == 1
    assert "no object" in node.engine.stats.last_unreadable and node.key(packed.id).endswith(
        node.engine.stats.last_unreadable.split()[1].rstrip(":"))
    gets = node.tiering.reader.gets
    await node.engine.step()
    assert node.tiering.reader.gets == gets, "the object was asked for again at once"
    assert node.placement(b) == (0, 50)


async def test_an_idle_engine_and_a_node_without_it_find_out_that_the_store_is_gone(
        node: Node, proxy: FaultProxy) -> None:
    def store_up() -> float:
        (up,) = [m for m in node.tiering.collect() if m.name == "awsomefs_tier_store_up"]
        return float(up.samples[0].value)

    await node.engine.step()  # nothing to tier: the store is asked anyway
    assert node.engine.stats.store_ok and store_up() == 1
    proxy.plan("status", times=10_000, status=503, code="SlowDown")
    await node.engine.step()
    assert not node.engine.stats.store_ok and "HTTP 503 SlowDown" in node.engine.stats.last_error
    assert store_up() == 0
    proxy.clear()
    await node.engine.check_store(every_s=0)  # what a node that runs no passes does
    assert node.engine.stats.store_ok and store_up() == 1
    proxy.plan("status", times=10_000, status=404, code="NoSuchBucket")
    await node.engine.check_store(every_s=0)
    assert "no such bucket: bucket" in node.engine.stats.last_error and store_up() == 0
