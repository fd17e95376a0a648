"""The tiering engine in-process, against the real S3 API server through the fault proxy: cold data
moves to objects and reads back byte for byte (through the caches, from the store), the device
space comes free, overwrites and deletes release objects that GC then deletes, a crash between
PUT and commit leaks nothing, and a store outage fails reads with EIO in bounded time while writes
go on. fsck agrees with the result each time."""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from awsomefsd.config import Settings, TierSettings
from awsomefsd.fsck import Report
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.check import check_space
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.log import LocalLog
from awsomefsd.meta.records import ROOT_INO, is_tiered
from awsomefsd.node import Core, open_core
from awsomefsd.tier import engine as engine_module
from awsomefsd.tier.service import Tiering
from awsomefsd.tier.source import object_key
from tests.support.s3 import TEST_KEY_ID, TEST_SECRET, FaultProxy, S3Server
from tests.unit.test_fs_api import File, settings_for

OBJECT_BYTES = 1 << 20


def tier_settings(tmp_path: Path, endpoint: str, bucket: str, **overrides: object) -> Settings:
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {TEST_KEY_ID}\naws_secret_access_key = {TEST_SECRET}\n")
    os.chmod(credentials, 0o600)
    base = settings_for(tmp_path)
    tier = TierSettings(endpoint=endpoint, bucket=bucket, prefix=f"t{random.randrange(1 << 30)}/",
                        credentials_file=credentials, cold_after_s=3600, object_bytes=OBJECT_BYTES,
                        min_file_bytes=0, gc_grace_s=0, recall_reads=0, read_timeout_s=3.0,
                        **overrides)  # type: ignore[arg-type]
    return base.model_copy(update={"tier": tier})


class Node:
    def __init__(self, core: Core, tiering: Tiering, settings: Settings) -> None:
        self.core, self.tiering, self.settings = core, tiering, settings
        self.engine = tiering.engine
        self.cluster_id = str(core.superblock.cluster_id)

    def key(self, object_id: int) -> str:
        return self.settings.tier.prefix + object_key(self.cluster_id, object_id)

    async def evict(self, f: File) -> int:
        await self.core.data.flush(f.ino)
        return await self.engine.evict(f.ino)

    def placement(self, f: File) -> tuple[int, int]:
        """(device blocks, tiered blocks) the file maps."""
        extents = self.core.meta.all_extents(f.ino)
        return (sum(e.count for e in extents if not is_tiered(e.dev_block)),
                sum(e.count for e in extents if is_tiered(e.dev_block)))

    async def everything_cold(self) -> None:
        """Every file written so far counts as cold (not changed for a millisecond)."""
        self.engine.settings = self.settings.tier.model_copy(update={"cold_after_s": 0.001})
        await trio.sleep(0.01)

    def check_space(self) -> None:
        """fsck's space check (meta/check.py) finds nothing: every tiered block in a live object, whose
        live count is what the files and the pending frees refer to."""
        report = Report()
        layout = self.core.superblock.layout
        assert isinstance(self.core.log, LocalLog)
        check_space(self.core.log, self.core.sm, (layout.data_start_block, layout.data_blocks), report, False)
        assert report.problems == []


@pytest.fixture
async def node(tmp_path: Path, proxy: FaultProxy, s3: S3Server) -> AsyncIterator[Node]:
    settings = tier_settings(tmp_path, proxy.endpoint, s3.bucket, memory_cache_bytes=0, cache_bytes=0)
    core = open_core(settings)
    tiering = Tiering(settings, core.meta, core.data, core.ops, cluster_id=str(core.superblock.cluster_id),
                      total_blocks=core.ops.total_blocks)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(core.data.run)
            await nursery.start(tiering.reader.run)
            yield Node(core, tiering, settings)
            nursery.cancel_scope.cancel()
    finally:
        await core.ops.sync_all()
        core.close()


async def a_file(node: Node, name: bytes, size: int, seed: int) -> File:
    f = await File.create(node.core, name)
    await f.write(0, random.Random(seed).randbytes(size))
    await node.core.data.flush(f.ino)
    return f


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
    assert await node.engine.collect_garbage() == 1
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
