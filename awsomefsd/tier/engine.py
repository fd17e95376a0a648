"""The tiering engine: packs cold file data into objects, uploads them, points the files at them,
and deletes objects nothing points into any more (design note 47; the commands in meta/tiered.py).

One engine works at a time: a single node's, or the cluster leader's (its duty), so no two nodes
pack the same data or delete the same object. A pass (`step`):
1. garbage: pending objects older than PENDING_TIMEOUT_S are abandoned (their uploader crashed or
   lost its lead); dead objects are DELETEd from the store once dead for `gc_grace_s`, then
   forgotten;
2. repacking: the live data of objects mostly dead (`repack_below`) moves to a new object;
3. cold data: files not written, changed or given an atime for `cold_after_s` (or
   `cold_after_when_full_s` above the fill watermark) are packed, extent by extent, into objects
   of `object_bytes`: each one planned, PUT, then committed.

Writes never wait for any of this: the engine reads committed blocks and commits only the ranges
still mapped as it read them (CommitTierObject checks), so a file written meanwhile simply keeps
its new data on the device. A store that fails stalls the engine (with backoff, in `stats`), never
the file system. `evict` tiers one file now, whatever the policy says (`awsomefsd tier evict`).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from awsomefsd.config import TierSettings
from awsomefsd.fs.reader import Reader
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError, StoreUnavailable
from awsomefsd.meta.records import MAX_OBJECTS_PER_COMMAND, Extent, Inode, is_tiered, object_of
from awsomefsd.tier.source import device_fill, object_key
from awsomefsd.tier.store import ObjectStore, Retry, StoreError, with_retries

log = logging.getLogger(__name__)

PENDING_TIMEOUT_S = 1800.0
"""A pending object older than this is abandoned: its uploader gave up or died. An uploader that
has not committed within UPLOAD_DEADLINE_S stops trying, well before."""
UPLOAD_DEADLINE_S = 600.0
SCAN_SLICE_INODES = 4096
"""Inodes looked at per metadata read while looking for cold files (the pass yields between)."""
MAX_BACKOFF_S = 600.0
UNREADABLE_FIRST_S = 60.0
"""An object whose data could not be read for a repack is not tried again for this long, doubling
each time (to MAX_BACKOFF_S): a missing or damaged object must not keep the engine busy."""


@dataclass
class EngineStats:
    objects_put: int = 0
    bytes_put: int = 0
    bytes_tiered: int = 0
    """Committed: file data that moved to the store (less than bytes_put when files changed)."""
    objects_deleted: int = 0
    failures: int = 0
    store_ok: bool = True
    last_error: str = ""
    last_pass_ns: int = 0
    candidate_bytes: int = 0
    """Cold data found on the device by the last pass and not yet moved."""
    unreadable_objects: int = 0
    """Objects whose data the last repacks could not read from the store (tried again later)."""
    last_unreadable: str = ""


class TierEngine:
    def __init__(self, meta: MetaClient, reader: Reader, store: ObjectStore, settings: TierSettings, *,
                 cluster_id: str, total_blocks: int, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.meta = meta
        self.reader = reader
        self.store = store
        self.settings = settings
        self.cluster_id = cluster_id
        self.total_blocks = total_blocks
        self.clock_ns = clock_ns
        self.monotonic: Callable[[], float] = time.monotonic
        self.stats = EngineStats()
        self.retry = Retry(deadline_s=UPLOAD_DEADLINE_S / 4, max_s=30.0, attempts=10)
        self._backoff_s = 0.0
        self._scan_after = 0  # the inode the cold-file walk continues after
        self._unrepackable: set[int] = set()
        self._unreadable: dict[int, tuple[float, float]] = {}  # object -> (not before, next wait)
        self._last_contact = float("-inf")  # when a request last reached the store (monotonic)
        self._partial_since: float | None = None  # when a pass first found cold data short of an object

    # -- one pass -----------------------------------------------------------------------------------
    async def step(self) -> float:
        """One pass of garbage collection and tiering; the seconds until the next. A store that
        fails makes the wait grow (to MAX_BACKOFF_S); FsErrors (no leader, a refused commit) are
        the duty's to log and retry."""
        if not self.meta.may_propose(c.PlanTierObject):
            return self.settings.scan_interval_s  # a member's build would not decode the commands yet
        contacts = self.stats.objects_put + self.stats.objects_deleted
        try:
            await self.collect_garbage()
            full = await self.repack() or await self.tier_cold()
            if self.stats.objects_put + self.stats.objects_deleted == contacts:
                await self._probe()  # nothing went to the store: ask it, so status tells the truth
        except StoreError as exc:
            self._store_failed(exc)
            return self._backoff_s
        self._store_answered()
        self._backoff_s = 0.0
        self.stats.last_pass_ns = self.clock_ns()
        return 0.0 if full else self.settings.scan_interval_s

    async def check_store(self, every_s: float) -> None:
        """Ask the store whether it answers, unless a request reached it within `every_s` (a
        node that runs no engine passes keeps `stats.store_ok` true to the store this way)."""
        if self.monotonic() - self._last_contact < every_s:
            return
        try:
            await self._probe()
        except StoreError as exc:
            self.stats.store_ok = False
            self.stats.last_error = str(exc)
            return
        self._store_answered()

    async def _probe(self) -> None:
        await trio.to_thread.run_sync(self.store.probe, abandon_on_cancel=True)

    def _store_answered(self) -> None:
        self.stats.store_ok = True
        self._last_contact = self.monotonic()

    def _store_failed(self, exc: StoreError) -> None:
        self.stats.failures += 1
        self.stats.store_ok = False
        self.stats.last_error = str(exc)
        self._backoff_s = min(MAX_BACKOFF_S, max(self.settings.scan_interval_s / 4, self._backoff_s * 2))
        log.warning("tiering stalled, the object store failed: %s (again in %.0fs)", exc, self._backoff_s)

    async def collect_garbage(self) -> int:
        """Abandon stale pending objects, delete dead ones from the store and forget them; returns
        how many were deleted."""
        now = self.clock_ns()
        objects = self.meta.tier_objects()
        stale = tuple(o.id for o in objects
                      if o.state == "pending" and now - o.created_ns > PENDING_TIMEOUT_S * 1e9)[:MAX_OBJECTS_PER_COMMAND]
        if stale:
            await self.meta.propose(c.AbandonTierObjects(stale, now))
            log.info("abandoned %d objects whose uploads never committed", len(stale))
        due = [o for o in self.meta.tier_objects()
               if o.state == "dead" and now - o.changed_ns >= self.settings.gc_grace_s * 1e9][:MAX_OBJECTS_PER_COMMAND]
        deleted: list[int] = []
        if due:
            # A DELETE cannot be taken back: the commands that killed these objects (a repack, a
            # free, an abandonment) must be durable first, or a crash could bring back file maps
            # that point into an object no longer in the store (the local log commits in groups).
            await self.meta.barrier(report=False)
        try:
            for obj in due:
                key = object_key(self.cluster_id, obj.id)
                await trio.to_thread.run_sync(with_retries, lambda k=key: self.store.delete(k), self.retry,
                                              f"DELETE {key}", abandon_on_cancel=True)
                deleted.append(obj.id)
        finally:
            if deleted:
                await self.meta.propose(c.ForgetTierObjects(tuple(deleted)))
                self.stats.objects_deleted += len(deleted)
                log.info("deleted %d dead objects from the object store", len(deleted))
        return len(deleted)

    async def repack(self) -> bool:
        """Move the live data of objects that are mostly dead into one new object (they die once
        empty, and GC deletes them); True when there was some. An object whose data cannot all
        move (a snapshot or clone shares it) is not tried again by this engine."""
        threshold = self.settings.repack_below
        now = self.monotonic()
        sparse = {o.id for o in self.meta.tier_objects()
                  if o.state == "live" and o.live_blocks < threshold * o.blocks and o.id not in self._unrepackable
                  and self._unreadable.get(o.id, (0.0, 0.0))[0] <= now}
        if not sparse:
            return False
        limit = self.settings.object_bytes // BLOCK_SIZE
        batch: list[tuple[int, Extent]] = []
        blocks = 0
        later: set[int] = set()  # objects with data for the next object
        for ino, ext in self.meta.extents_in_objects(sparse):
            if self.meta.shares_blocks(ext):
                continue
            if blocks + ext.count > limit:
                later.add(object_of(ext.dev_block)[0])
                continue
            batch.append((ino, ext))
            blocks += ext.count
        touched = {object_of(ext.dev_block)[0] for _, ext in batch}
        self._unrepackable |= sparse - touched - later  # nothing of theirs can move: stop looking
        if not batch:
            return False
        moved = await self.upload(batch)
        if not moved:
            return False  # nothing could move (unreadable, or rewritten meanwhile): cold data goes on
        log.info("repacked %d MiB out of %d mostly dead objects", moved >> 20, len(touched))
        return True

    def _unreadable_object(self, object_id: int, exc: FsError) -> None:
        """A repack could not read this object's data: back off for it (doubling), say so once
        per try, and leave it out of repacks meanwhile; the rest of the engine goes on."""
        _, wait = self._unreadable.get(object_id, (0.0, UNREADABLE_FIRST_S / 2))
        wait = min(MAX_BACKOFF_S, wait * 2)
        self._unreadable[object_id] = (self.monotonic() + wait, wait)
        self.stats.unreadable_objects = len(self._unreadable)
        self.stats.last_unreadable = f"object {object_key(self.cluster_id, object_id)}: {exc.args[1]}"
        log.warning("cannot repack object %s, its data does not read back: %s (again in %.0fs)",
                    object_key(self.cluster_id, object_id), exc.args[1], wait)

    async def tier_cold(self) -> bool:
        """Pack cold data into one object and tier it; True when an object was filled (there may
        be more: the next pass comes at once)."""
        cold_s = self.settings.cold_after_s
        short_of_space = self.device_fill() > self.settings.fill_watermark
        if short_of_space:
            cold_s = min(cold_s, self.settings.cold_after_when_full_s)
        cold_before = self.clock_ns() - int(cold_s * 1e9)
        excluded = self._excluded_volumes()
        limit = self.settings.object_bytes // BLOCK_SIZE
        batch: list[tuple[int, Extent]] = []
        blocks = 0
        while blocks < limit:
            files, self._scan_after = self.meta.cold_files(self._scan_after, cold_before, self.settings.min_file_bytes,
                                                           SCAN_SLICE_INODES)
            for inode in files:
                if inode.volume in excluded:
                    continue
                for ext in self._movable(inode):
                    take = min(ext.count, limit - blocks)
                    batch.append((inode.ino, ext.slice(ext.file_block, ext.file_block + take)))
                    blocks += take
                    if blocks >= limit:
                        break
                if blocks >= limit:
                    self._scan_after = inode.ino - 1  # the rest of this file comes next time
                    break
            await trio.lowlevel.checkpoint()
            if self._scan_after == 0:
                break  # the end of the table: the next pass starts over
        self.stats.candidate_bytes = blocks * BLOCK_SIZE
        if not batch:
            self._partial_since = None
            return False
        if blocks < limit and not self._partial_due(short_of_space):
            return False
        await self.upload(batch)
        self._partial_since = None
        return blocks >= limit

    def _partial_due(self, short_of_space: bool) -> bool:
        """May cold data that does not fill an object go now? Only once it has waited
        `partial_object_after_s` for more (objects stay large: fewer requests, less to track), or
        at once when the device is past its fill watermark."""
        now = self.monotonic()
        if self._partial_since is None:
            self._partial_since = now
        return short_of_space or now - self._partial_since >= self.settings.partial_object_after_s

    def _movable(self, inode: Inode) -> list[Extent]:
        """The file's extents that can move: written, on the device, shared with nothing."""
        return [ext for ext in self.meta.all_extents(inode.ino)
                if not ext.unwritten and not is_tiered(ext.dev_block) and not self.meta.shares_blocks(ext)]

    def device_fill(self) -> float:
        """The fraction of the device's data blocks in use (delayed frees count as free)."""
        return device_fill(self.meta, self.total_blocks)

    def _excluded_volumes(self) -> set[int]:
        names = set(self.settings.exclude_volumes)
        return {v.id for v in self.meta.volumes() if v.kind == "volume" and v.name in names} if names else set()

    # -- one object ---------------------------------------------------------------------------------
    async def upload(self, batch: list[tuple[int, Extent]]) -> int:
        """Read `batch` (inode, extent) from the device, PUT it as one object and commit it;
        returns the bytes that moved. A StoreError abandons the object and is raised."""
        data = bytearray()
        inos: list[int] = []
        sources: list[Extent] = []
        for ino, ext in batch:
            try:
                with self.reader.holding_map():
                    data += await self.reader.read_extent(ext, ext.file_block, ext.end_block,
                                                          ext.file_block * BLOCK_SIZE, ext.end_block * BLOCK_SIZE)
            except StoreUnavailable as exc:  # repacking an object the store does not give back
                if is_tiered(ext.dev_block):
                    self._unreadable_object(object_of(ext.dev_block)[0], exc)
                continue
            except FsError as exc:  # rewritten and reused since it was looked up, or unreadable
                log.debug("not tiering inode %d blocks %d+%d: %s", ino, ext.file_block, ext.count, exc)
                continue
            if is_tiered(ext.dev_block) and self._unreadable.pop(object_of(ext.dev_block)[0], None) is not None:
                self.stats.unreadable_objects = len(self._unreadable)
            inos.append(ino)
            sources.append(ext)
        if not sources:
            return 0
        object_id = await self.meta.propose(c.PlanTierObject(self.clock_ns()))
        key = object_key(self.cluster_id, object_id)
        try:
            await trio.to_thread.run_sync(with_retries, lambda: self.store.put(key, data), self.retry,
                                          f"PUT {key}", abandon_on_cancel=True)
        except StoreError:
            await self.meta.propose(c.AbandonTierObjects((object_id,), self.clock_ns()))
            raise
        self.stats.objects_put += 1
        self.stats.bytes_put += len(data)
        try:
            live = await self.meta.propose(c.CommitTierObject(object_id, tuple(inos), tuple(sources), self.clock_ns()))
        except FsError as exc:
            if exc.errno != errno.ESTALE:
                raise
            log.warning("object %d was abandoned before its commit (the upload took too long)", object_id)
            return 0
        self.stats.bytes_tiered += live * BLOCK_SIZE
        log.info("tiered %d MiB to object %s (%d MiB uploaded)", live * BLOCK_SIZE >> 20, key, len(data) >> 20)
        return live * BLOCK_SIZE

    async def evict(self, ino: int) -> int:
        """Tier the file's data now, whatever the policy; returns the bytes moved."""
        inode = self.meta.require_inode(ino)
        if not inode.is_reg:
            raise FsError(errno.EINVAL, "only regular files have data to tier")
        if not self.meta.may_propose(c.PlanTierObject):
            raise FsError(errno.EAGAIN, "not every member's build can tier data yet (a rolling upgrade)")
        limit = self.settings.object_bytes // BLOCK_SIZE
        moved = 0
        batch: list[tuple[int, Extent]] = []
        blocks = 0
        for ext in self._movable(inode):
            pos = ext.file_block
            while pos < ext.end_block:
                take = min(ext.end_block - pos, limit - blocks)
                batch.append((ino, ext.slice(pos, pos + take)))
                blocks += take
                pos += take
                if blocks >= limit:
                    moved += await self._upload_or_eio(batch)
                    batch, blocks = [], 0
        if batch:
            moved += await self._upload_or_eio(batch)
        return moved

    async def _upload_or_eio(self, batch: list[tuple[int, Extent]]) -> int:
        try:
            return await self.upload(batch)
        except StoreError as exc:
            self._store_failed(exc)
            raise FsError(errno.EIO, f"the object store failed: {exc}") from None
