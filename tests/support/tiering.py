"""The tiering node the in-process tiering tests share: a single node's core with [tier] pointing at
the S3 test server, its flusher and prefetcher running, and what the tests ask of it."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from awsomefsd.cli.fsck import Report
from awsomefsd.config import Settings, TierSettings
from awsomefsd.daemon.node import Core, open_core
from awsomefsd.daemon.tiering import Tiering
from awsomefsd.meta.check import check_space
from awsomefsd.meta.log import LocalLog
from awsomefsd.meta.records import is_tiered
from awsomefsd.tier.source import object_key
from tests.support.s3 import TEST_KEY_ID, TEST_SECRET
from tests.unit.test_fs_api import File, settings_for

OBJECT_BYTES = 1 << 20


def tier_settings(tmp_path: Path, endpoint: str, bucket: str, **overrides: object) -> Settings:
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {TEST_KEY_ID}\naws_secret_access_key = {TEST_SECRET}\n")
    os.chmod(credentials, 0o600)
    base = settings_for(tmp_path)
    tier = TierSettings(endpoint=endpoint, bucket=bucket, prefix=f"t{random.randrange(1 << 30)}/",
                        credentials_file=credentials, cold_after_s=3600, object_bytes=OBJECT_BYTES,
                        min_file_bytes=0, gc_grace_s=0, partial_object_after_s=0, recall_reads=0, read_timeout_s=3.0,
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


@asynccontextmanager
async def tiered_node(settings: Settings) -> AsyncIterator[Node]:
    """A single node's core with tiering, its flusher and prefetcher running; closed after."""
    core = open_core(settings)
    tiering = core.tiering
    assert tiering is not None
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
