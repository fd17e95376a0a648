"""Reads of tiered data: byte ranges of objects, through the caches, checked block by block.

An object is read in aligned chunks (1 MiB by default): a chunk comes from the memory cache, the
disk cache, or one ranged GET, which concurrent readers of the same chunk share. Every block handed
back is checked against the CRC32C kept in metadata. On a mismatch the chunks are dropped from the
caches and fetched from the store once more; a second mismatch is EIO, never wrong data.

A read waits for the store at most `read_timeout_s` (retries included), then fails with EIO: an
outage of the store makes reads of tiered data fail, never hang. The kernel asks again at once
for a buffered read that failed (its read-ahead first, then the page itself), so the deadline
belongs to the chunks rather than to one request: a read of a chunk that failed less than
FAILED_MEMORY_S ago gets only what is left of that failed read's deadline (nothing: EIO at once),
and the application sees its EIO after one `read_timeout_s`, not two. Reading on from where the last
read of an object ended counts as sequential and queues the next chunks for the prefetcher
(`run`), which fetches them in the background.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import trio

from awsomefsd.io.checksum import CHECKSUM_BYTES, first_bad_block
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.tier.cache import ChunkCache
from awsomefsd.tier.store import ObjectStore, Retry, StoreError, with_retries

log = logging.getLogger(__name__)
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_TRACKED_OBJECTS = 1024
PREFETCH_QUEUE = 256
FAILED_MEMORY_S = 1.0
"""How long a chunk's failed read lends its deadline to the next reads of that chunk: long enough
for the kernel's second try (it comes at once), short enough that a store back up is asked anew."""


class TierReadError(OSError):
    """A read of tiered data that cannot return the right bytes (errno EIO)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


@dataclass(frozen=True)
class TieredRange:
    """Whole blocks of one object: `checksums` holds the CRC32C of each block from `offset` on."""

    key: str
    object_bytes: int
    offset: int
    checksums: bytes

    @property
    def length(self) -> int:
        return len(self.checksums) // CHECKSUM_BYTES * BLOCK_SIZE

    def __post_init__(self) -> None:
        assert self.offset % BLOCK_SIZE == 0 and self.length > 0, (self.offset, self.length)
        assert self.offset + self.length <= self.object_bytes, (self.offset, self.length, self.object_bytes)


def _first_bad(data: bytes, wanted: TieredRange) -> int:
    """The first block of `data` that fails its checksum (-1: none); a cached chunk cut short
    fails at its first missing block."""
    if len(data) != wanted.length:
        return min(len(data), wanted.length) // BLOCK_SIZE
    return first_bad_block(data, wanted.checksums)


def _first(group: BaseExceptionGroup[TierReadError]) -> TierReadError:
    found = group.exceptions[0]
    return found if isinstance(found, TierReadError) else _first(found)


class TieredReader:
    def __init__(self, store: ObjectStore, cache: ChunkCache, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 read_timeout_s: float = 30.0, prefetch_chunks: int = 4, fetch_threads: int = 8) -> None:
        assert chunk_bytes % BLOCK_SIZE == 0 and chunk_bytes > 0
        self.store = store
        self.cache = cache
        self.chunk_bytes = chunk_bytes
        self.read_timeout_s = read_timeout_s
        self.retry = Retry(deadline_s=read_timeout_s)
        self.prefetch_chunks = prefetch_chunks
        self.limiter = trio.CapacityLimiter(fetch_threads)
        self.gets = 0
        """Ranged GETs sent to the store (status and tests)."""
        self._inflight: dict[tuple[str, int], trio.Event] = {}
        self._last_end: OrderedDict[str, int] = OrderedDict()
        self._failed: OrderedDict[tuple[str, int], tuple[float, float, str]] = OrderedDict()
        """(object, chunk) -> (the failed read's deadline, when to forget it, why it failed)."""
        self._prefetch_send, self._prefetch_receive = trio.open_memory_channel[tuple[str, int, int]](PREFETCH_QUEUE)

    async def read(self, wanted: TieredRange) -> bytes:
        """The range's bytes, each block checked; TierReadError (EIO) when that cannot be done."""
        first = wanted.offset // self.chunk_bytes
        last = (wanted.offset + wanted.length - 1) // self.chunk_bytes
        deadline = self._deadline(wanted.key, first, last)
        try:
            data = await self._read(wanted, first, last, deadline)
        except TierReadError as exc:
            forget_at = time.monotonic() + FAILED_MEMORY_S
            for index in range(first, last + 1):
                self._failed[(wanted.key, index)] = (deadline, forget_at, exc.strerror or "cannot read tiered data")
                self._failed.move_to_end((wanted.key, index))
            while len(self._failed) > MAX_TRACKED_OBJECTS:
                self._failed.popitem(last=False)
            raise
        if self._failed:
            for index in range(first, last + 1):
                self._failed.pop((wanted.key, index), None)
        return data

    def _deadline(self, key: str, first: int, last: int) -> float:
        """When a read of these chunks must give up: `read_timeout_s` from now, or sooner, the
        deadline of a read of one of them that failed just now (TierReadError if it has passed)."""
        now = time.monotonic()
        deadline = now + self.read_timeout_s
        for index in range(first, last + 1) if self._failed else ():
            failed = self._failed.get((key, index))
            if failed is None:
                continue
            earlier, forget_at, why = failed
            if now >= forget_at:
                del self._failed[(key, index)]
            elif now >= earlier:
                raise TierReadError(why)
            else:
                deadline = min(deadline, earlier)
        return deadline

    async def _read(self, wanted: TieredRange, first: int, last: int, deadline: float) -> bytes:
        with trio.move_on_at(trio.current_time() + deadline - time.monotonic()):
            data = await self._assemble(wanted, first, last, from_store=False)
            bad = _first_bad(data, wanted)
            if bad >= 0:
                log.warning("tiered data of %s at byte %d failed its checksum: fetching it again", wanted.key,
                            wanted.offset + bad * BLOCK_SIZE)
                data = await self._assemble(wanted, first, last, from_store=True)
                bad = _first_bad(data, wanted)
                if bad >= 0:
                    for index in range(first, last + 1):
                        self.cache.drop(wanted.key, index)
                    raise TierReadError(f"checksum mismatch in object {wanted.key} at byte "
                                        f"{wanted.offset + bad * BLOCK_SIZE} (fetched twice)")
            self._note_position(wanted, last)
            return data
        raise TierReadError(f"the object store did not answer within {self.read_timeout_s:g}s "
                            f"(reading {wanted.key})")

    async def _assemble(self, wanted: TieredRange, first: int, last: int, *, from_store: bool) -> bytes:
        """The range's bytes, chunk by chunk: only the bytes asked for are copied (a 4 KiB read
        of a cached 1 MiB chunk copies 4 KiB). One chunk is read without a nursery."""
        end = wanted.offset + wanted.length

        def part(index: int) -> tuple[int, int]:
            base = index * self.chunk_bytes
            return max(wanted.offset, base) - base, min(end, base + self.chunk_bytes) - base

        if first == last:
            return await self._chunk(wanted.key, wanted.object_bytes, first, *part(first), from_store=from_store)
        pieces: dict[int, bytes] = {}

        async def one(index: int) -> None:
            pieces[index] = await self._chunk(wanted.key, wanted.object_bytes, index, *part(index),
                                              from_store=from_store)

        try:
            async with trio.open_nursery() as nursery:
                for index in range(first, last + 1):
                    nursery.start_soon(one, index)
        except BaseExceptionGroup as group:  # one chunk's failure is the read's
            failed = group.subgroup(TierReadError)
            if failed is None:
                raise
            raise _first(failed) from None
        return b"".join(pieces[i] for i in range(first, last + 1))

    async def _chunk(self, key: str, object_bytes: int, index: int, start: int = 0, end: int | None = None, *,
                     from_store: bool) -> bytes:
        """Bytes [start, end) of one chunk (all of it by default): from memory, from the disk
        cache (just those bytes), or fetched once however many readers want the chunk now."""
        if from_store:
            self.cache.drop(key, index)
        while True:
            cached = self.cache.get_hot(key, index)
            if cached is not None:
                return cached[start:end]
            part = await trio.to_thread.run_sync(self.cache.get_warm, key, index, start, end, limiter=self.limiter)
            if part is not None:
                return part
            pending = self._inflight.get((key, index))
            if pending is None:
                break
            await pending.wait()  # another reader fetches it; then look again (its fetch may have failed)
        done = self._inflight[(key, index)] = trio.Event()
        try:
            return (await self._fetch(key, object_bytes, index))[start:end]
        finally:
            del self._inflight[(key, index)]
            done.set()

    async def _fetch(self, key: str, object_bytes: int, index: int) -> bytes:
        start = index * self.chunk_bytes
        length = min(self.chunk_bytes, object_bytes - start)
        assert length > 0, (key, index, object_bytes)

        def get() -> bytes:
            data = with_retries(lambda: self.store.get(key, start, length), self.retry, f"GET {key} [{start}+{length}]")
            self.cache.put(key, index, data)
            return data

        self.gets += 1
        try:
            return await trio.to_thread.run_sync(get, abandon_on_cancel=True, limiter=self.limiter)
        except StoreError as exc:
            raise TierReadError(f"cannot read tiered data: {exc}") from None

    # --- sequential reads and prefetch -----------------------------------------------------------
    def _note_position(self, wanted: TieredRange, last: int) -> None:
        sequential = self._last_end.get(wanted.key) == wanted.offset
        self._last_end[wanted.key] = wanted.offset + wanted.length
        self._last_end.move_to_end(wanted.key)
        while len(self._last_end) > MAX_TRACKED_OBJECTS:
            self._last_end.popitem(last=False)
        if not sequential:
            return
        chunks = (wanted.object_bytes + self.chunk_bytes - 1) // self.chunk_bytes
        for index in range(last + 1, min(chunks, last + 1 + self.prefetch_chunks)):
            try:
                self._prefetch_send.send_nowait((wanted.key, wanted.object_bytes, index))
            except trio.WouldBlock:  # the prefetcher is behind: reads will fetch for themselves
                return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The prefetcher: fetches queued chunks in the background until cancelled."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for key, object_bytes, index in self._prefetch_receive:
                nursery.start_soon(self._prefetch, key, object_bytes, index)

    async def _prefetch(self, key: str, object_bytes: int, index: int) -> None:
        if (key, index) in self._inflight:
            return
        with trio.move_on_after(self.read_timeout_s):
            try:
                await self._chunk(key, object_bytes, index, from_store=False)
            except TierReadError as exc:
                log.debug("prefetch of %s chunk %d failed: %s", key, index, exc)
