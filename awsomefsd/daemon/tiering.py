"""Tiering on one node: the store client, the caches and reads of tiered data (`TierReads`, built
before the file data, which reads through its `source`: fs/tiered.py), and the engine where this
node runs it (a single node always; in a cluster, the leader) with the eviction the file system
is given (`Tiering`, built over the file data).

Built at start from `[tier]` (awsomefsd/config/__init__.py). A configuration that cannot work (no
credentials, a bad endpoint) stops the start with one line. After each engine pass the node writes
`<state>/tier-status.json`, which `awsomefsd tier status` shows with the objects table.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from awsomefsd.config import Settings
from awsomefsd.duty import DutyBook, run_duty
from awsomefsd.fs.data import FileData
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.client import MetaClient
from awsomefsd.metrics import Metric, counter, gauge
from awsomefsd.tier.cache import ChunkCache
from awsomefsd.tier.credentials import CredentialsError, load_credentials
from awsomefsd.tier.engine import TierEngine
from awsomefsd.tier.reader import TieredReader
from awsomefsd.tier.source import TierSource
from awsomefsd.tier.store import ObjectStore

log = logging.getLogger(__name__)
STATUS_FILE = "tier-status.json"
IDLE_CHECK_S = 5.0
"""How often a node that does not run the engine asks whether it now should (it became leader)."""


class TierConfigError(Exception):
    """[tier] settings that cannot work: one line for the operator."""


def open_store(settings: Settings) -> ObjectStore:
    """The store client `[tier]` describes; TierConfigError (one line) when it cannot work: no
    credentials, an endpoint that is no URL, a cache directory that cannot be made. Checked
    before the daemon starts (actions.preflight), and again when it builds its tiering."""
    tier = settings.tier
    try:
        credentials = load_credentials(tier.credentials_file, tier.profile)
        store = ObjectStore(tier.endpoint, tier.bucket, credentials, region=tier.region, prefix=tier.prefix,
                            path_style=tier.path_style, timeout_s=min(tier.read_timeout_s, 30.0))
    except (CredentialsError, ValueError) as exc:
        raise TierConfigError(f"[tier]: {exc}") from None
    try:
        cache_directory(settings).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise TierConfigError(f"[tier] cache_dir {cache_directory(settings)}: {exc.strerror}") from None
    return store


def cache_directory(settings: Settings) -> Path:
    return settings.tier.cache_dir or settings.node.state_dir / "tier-cache"


class TierReads:
    """The store client, the caches and the reads of tiered blocks (`source`: the port the file
    system reads them through, tier/source.py), built before the file data, which is given it."""

    def __init__(self, settings: Settings, meta: MetaClient, *, cluster_id: str, total_blocks: int) -> None:
        tier = settings.tier
        self.settings = settings
        self.meta = meta
        self.cluster_id = cluster_id
        self.total_blocks = total_blocks
        self.store = open_store(settings)
        self.cache = ChunkCache(cache_directory(settings), disk_bytes=tier.cache_bytes,
                                memory_bytes=tier.memory_cache_bytes)
        self.reader = TieredReader(self.store, self.cache, read_timeout_s=tier.read_timeout_s)
        self.source = TierSource(meta, self.reader, cluster_id=cluster_id, total_blocks=total_blocks,
                                 fill_watermark=tier.fill_watermark)


class Tiering:
    """The rest of a node's tiering, over its file data (which reads through `reads`): the engine,
    the eviction the file system is given (`evict`), the status and the metrics."""

    def __init__(self, reads: TierReads, data: FileData) -> None:
        self.store = reads.store
        self.state_dir = reads.settings.node.state_dir
        self.cache = reads.cache
        self.reader = reads.reader
        self.engine = TierEngine(reads.meta, data.reader, self.store, reads.settings.tier,
                                 cluster_id=reads.cluster_id, total_blocks=reads.total_blocks)
        self.meta = reads.meta
        self.data = data
        log.info("tiering cold data to %r", self.store)

    async def evict(self, ino: int) -> int:
        """Move the file's data to the store now (fs/tiered.py EvictFile); the status follows."""
        moved = await self.engine.evict(ino)
        self.write_status()
        return moved

    async def run(self, *, book: DutyBook, runs_engine: Callable[[], bool] = lambda: True,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The prefetcher and, while `runs_engine()`, the engine's passes (a duty: errors are
        logged once per kind and retried)."""
        async def step() -> float:
            if not runs_engine():
                # for awsomefs_tier_store_up here; `tier status` asks the store itself, and the
                # status file stays the engine's (only the node that ran passes has one)
                await self.engine.check_store(self.engine.settings.scan_interval_s)
                return IDLE_CHECK_S
            delay = await self.engine.step()
            self.write_status()
            return delay

        async with trio.open_nursery() as nursery:
            await nursery.start(self.reader.run)
            nursery.start_soon(lambda: run_duty("tiering engine", step, book=book, period_s=IDLE_CHECK_S))
            task_status.started()

    def write_status(self) -> None:
        """This node's view for `awsomefsd tier status` (written atomically)."""
        path = self.state_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.describe()))
        os.replace(tmp, path)

    def describe(self) -> dict[str, Any]:
        stats = self.cache.stats
        return {
            "store": repr(self.store),
            "engine": asdict(self.engine.stats),
            "cache": {"hit_rate": stats.hit_rate, "memory_bytes": stats.memory_bytes, "disk_bytes": stats.disk_bytes,
                      "memory_hits": stats.memory_hits, "disk_hits": stats.disk_hits, "misses": stats.misses},
            "gets": self.reader.gets,
            "recalls": self.data.compactor.recalls,
        }

    def collect(self) -> Iterator[Metric]:
        engine = self.engine.stats
        stats = self.cache.stats
        objects = self.meta.tier_objects()
        live = [o for o in objects if o.state == "live"]
        yield gauge("awsomefs_tier_objects", "objects in the object store (live)", len(live))
        yield gauge("awsomefs_tier_stored_bytes", "bytes of live objects in the store", sum(o.bytes for o in live))
        yield gauge("awsomefs_tier_live_bytes", "file data the live objects still hold",
                    sum(o.live_blocks for o in live) * BLOCK_SIZE)
        yield gauge("awsomefs_tier_dead_objects", "objects waiting to be deleted from the store",
                    sum(1 for o in objects if o.state == "dead"))
        yield gauge("awsomefs_tier_store_up", "the store answered the last request or probe (1) or not (0)",
                    1 if engine.store_ok else 0)
        yield counter("awsomefs_tier_put_bytes", "bytes uploaded by this node", engine.bytes_put)
        yield counter("awsomefs_tier_tiered_bytes", "file data this node moved to the store", engine.bytes_tiered)
        yield counter("awsomefs_tier_deleted_objects", "objects this node deleted", engine.objects_deleted)
        yield counter("awsomefs_tier_failures", "engine passes the store failed", engine.failures)
        yield counter("awsomefs_tier_gets", "ranged GETs of tiered data", self.reader.gets)
        yield counter("awsomefs_tier_cache_hits", "tiered chunks read from the caches",
                      stats.memory_hits + stats.disk_hits)
        yield counter("awsomefs_tier_cache_misses", "tiered chunks fetched from the store", stats.misses)
        yield gauge("awsomefs_tier_cache_disk_bytes", "bytes in the disk cache", stats.disk_bytes)
        yield counter("awsomefs_tier_recalls", "files brought back to the device", self.data.compactor.recalls)


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """What the node wrote after its last engine pass (None: tiering never ran there)."""
    try:
        data: dict[str, Any] = json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data
