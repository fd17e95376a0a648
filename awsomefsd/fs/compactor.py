"""Compaction and recall: rewriting a file's committed extents elsewhere on the device.

Recall (`recall`) brings a file's tiered data back from the object store, the same way, when the
recall policy (fs/recall.py) finds it read again; everything below about compaction's writes holds
for it too.

Compaction: a file fragmented by small random writes is rewritten as large extents.

The flusher counts the small runs it writes per file; after COMPACT_AFTER_SMALL_RUNS of them, or
when the last handle of a file that has some closes, the file is queued here; one queued by the
count waits until the file has been quiet for RECENT_WRITE_S (`check`). Compaction is
copy-on-write like any write: the merged data goes to fresh extents and one WriteData per MiB
(with `touch=False`: the bytes, the size and the times do not change) replaces the fragments,
which are freed after the grace period. Holes stay holes. Each MiB is rewritten under the file's
lock, so no flush or truncate interleaves with it, and only while the file has no buffered data:
a file written again stops its compaction at the next MiB (its writer must not wait for the
rest: a 1 GiB file of 4 KiB fragments held its lock for the seconds the whole rewrite took,
which every flush of it, and so every writer once the buffer filled, waited for). Extents a
snapshot or a clone shares are left as they are: rewriting them would un-share them, and the
space they share would be taken twice.
"""

from __future__ import annotations

import errno
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from awsomefsd.fs.buffer import FileState, WriteBuffer
from awsomefsd.fs.reader import Reader
from awsomefsd.fs.writer import RunWriter
from awsomefsd.io.fence import WriteFencedError
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, Extent, is_tiered

log = logging.getLogger(__name__)

SMALL_RUN_BYTES = 64 * 1024  # a flushed run smaller than this may fragment its file
COMPACT_AFTER_SMALL_RUNS = 32  # check a file for fragmentation after this many small runs
COMPACT_MIN_EXTENTS = 4  # file-contiguous extents in a row worth merging into one
QUEUE_FILES = 256
RECENT_WRITE_S = 1.0
"""A file flushed with small runs within this long is still being written: a check its small-run
count queued waits (`check`)."""


RECALL = object()
"""In the queue in place of `wait_for_quiet`: bring the file's tiered data back."""


class Compactor:
    def __init__(self, meta: MetaClient, buffer: WriteBuffer, reader: Reader, writer: RunWriter) -> None:
        self.meta = meta
        self.buffer = buffer
        self.reader = reader
        self.writer = writer
        self.small_runs: dict[int, int] = {}  # inode -> small runs flushed since its last check
        self.small_written: dict[int, float] = {}  # inode -> when its last small run was flushed
        self.compactions = 0
        self.recalls = 0
        self.may_rewrite: Callable[[int], AbstractAsyncContextManager[bool]] = _always
        """A cluster member's coherence (set once it exists: it needs this FileData's flush):
        compaction rewrites committed blocks, so it may run only while this node holds the file's
        write lease, and keeps it meanwhile (yields False: skip). Another node appending meanwhile
        would otherwise have its acknowledged records replaced by the older copy read here."""
        self.moved: Callable[[int, list[Extent], list[Extent]], None] = lambda ino, old, new: None
        """Hears each committed rewrite: (inode, the extents read, the extents now mapped there),
        the same bytes in the same file blocks. Cross-site replication keeps what the other site
        holds by device block (repl/delta.py, `moved`): a copy must not look like a change."""
        self._send, self._receive = trio.open_memory_channel[tuple[int, object]](QUEUE_FILES)

    def note_runs(self, ino: int, runs: list[tuple[int, bytearray]]) -> None:
        """A flush is writing `runs` of the file: count the small ones; enough of them queue it."""
        small = sum(1 for _, data in runs if len(data) < SMALL_RUN_BYTES)
        if not small:
            return
        self.small_written[ino] = time.monotonic()
        total = self.small_runs.get(ino, 0) + small
        if total < COMPACT_AFTER_SMALL_RUNS:
            self.small_runs[ino] = total
            return
        self._request(ino, wait_for_quiet=True)

    def closed(self, ino: int) -> None:
        """The last handle open for writing was released: a file left fragmented by its last
        writes is checked now."""
        if self.small_runs.get(ino, 0) >= COMPACT_MIN_EXTENTS:
            self._request(ino)

    def forget(self, ino: int) -> None:
        self.small_runs.pop(ino, None)
        self.small_written.pop(ino, None)

    def _request(self, ino: int, *, wait_for_quiet: bool = False) -> None:
        """Queue a check of `ino`. `wait_for_quiet`: it is still being written; skip it if it was
        flushed with small runs within `RECENT_WRITE_S` when its turn comes: its writer would wait on the file's
        lock while the compactor reads and rewrites, and its next small writes would fragment it
        again (16 threads of 4 KiB random writes went from 12.9k to 1.7k IOPS when compaction
        kept catching the file between two flushes). It gets another check after more small
        runs, and at its last close."""
        self.small_runs.pop(ino, None)
        try:
            self._send.send_nowait((ino, wait_for_quiet))
        except trio.WouldBlock:
            pass  # the compactor is busy; the file gets another chance after more small writes

    async def check(self, ino: int, *, wait_for_quiet: bool) -> int:
        """A queued check: compact the file unless it waits for quiet and was written just now."""
        if wait_for_quiet and time.monotonic() - self.small_written.get(ino, float("-inf")) < RECENT_WRITE_S:
            return 0
        self.small_written.pop(ino, None)
        return await self.compact(ino)

    async def compact(self, ino: int) -> int:
        """Rewrite runs of small, file-contiguous extents as large ones, a window of at most
        MAX_EXTENT_BLOCKS at a time (`_compact_window`); returns extents removed."""
        removed = 0
        async with self.may_rewrite(ino) as allowed:
            if not allowed:
                return 0
            # unwritten extents stay where they are, for the writes they were reserved for; tiered
            # ones stay in their objects (bringing them back is `recall`)
            windows = [(lo, min(lo + MAX_EXTENT_BLOCKS, run[-1].end_block))
                       for run in _fragmented_runs(self.meta.all_extents(ino), self._stays)
                       for lo in range(run[0].file_block, run[-1].end_block, MAX_EXTENT_BLOCKS)]
            for lo, hi in windows:
                rewritten = await self._compact_window(ino, lo, hi)
                if rewritten < 0:
                    break
                removed += rewritten
        if removed:
            self.compactions += 1
            log.debug("compacted inode %d: %d fewer extents", ino, removed)
        return removed

    def _stays(self, ext: Extent) -> bool:
        """An extent compaction leaves where it is: unwritten, tiered, or shared."""
        return ext.unwritten or is_tiered(ext.dev_block) or self.meta.shares_blocks(ext)

    async def _compact_window(self, ino: int, lo: int, hi: int) -> int:
        """Rewrite file blocks [lo, hi) as one extent per file-contiguous run of fragments, as the
        map is now, under the file's lock; returns extents removed (-1: stop, the file is gone or
        being written again)."""
        removed = 0
        async with self.buffer.locked(ino) as st:
            inode = self.meta.inode(ino)
            if st.dirty or st.inflight or inode is None or not inode.is_reg:
                return -1
            for run in _contiguous_runs(self.meta.extents(ino, lo, hi), self._stays):
                if _device_contiguous(run):
                    continue  # as good as one extent (a single one too)
                rewritten = await self._rewrite(st, run, lo, hi)
                if rewritten < 0:
                    return -1
                removed += rewritten - 1
        return removed

    async def recall(self, ino: int) -> int:
        """Bring the file's tiered data back to the device (copy-on-write, mtime and ctime unchanged,
        atime now: `_read_now`; its blocks in the object store are freed after the grace period);
        returns the blocks moved.
        Skipped (0) while the file has buffered data: its next flush would race the rewrite."""
        moved = 0
        inode = self.meta.inode(ino)
        volume = self.meta.volume(inode.volume) if inode is not None and inode.volume else None
        if inode is None or not inode.is_reg or (volume is not None and volume.kind == "snapshot"):
            return 0  # a snapshot's data stays where it is (and shared with its origin)
        async with self.may_rewrite(ino) as allowed, self.buffer.locked(ino) as st:
            if not allowed or st.dirty or st.inflight:
                return 0
            for ext in self.meta.all_extents(ino):
                if not is_tiered(ext.dev_block):
                    continue
                for lo in range(ext.file_block, ext.end_block, MAX_EXTENT_BLOCKS):
                    hi = min(lo + MAX_EXTENT_BLOCKS, ext.end_block)
                    if await self._rewrite(st, [ext], lo, hi) < 0:
                        return moved
                    moved += hi - lo
            if moved:
                await self._read_now(ino)
        if moved:
            self.recalls += 1
            log.info("recalled %d blocks of inode %d from the object store", moved, ino)
        return moved

    async def _read_now(self, ino: int) -> None:
        """A recalled file is in use (it was read, or asked back): give it the atime a read gives
        on ext4, so the tiering engine, on whichever node, does not find it cold and tier it
        again at once. Its ctime stays (a read changes no attribute), as do the other times: the
        command carries the ctime just read as its `now_ns`, under the file's lock (a chmod
        committed in between would lose its ctime, never its mode)."""
        inode = self.meta.inode(ino)
        if inode is not None:
            await self.meta.propose(c.SetAttr(ino, inode.ctime_ns, atime_ns=max(time.time_ns(), inode.atime_ns)))

    async def _rewrite(self, st: FileState, pieces: list[Extent], lo: int, hi: int) -> int:
        """Read file blocks [lo, hi) through `pieces` (file-contiguous extents, each overlapping
        them) and write them to fresh device blocks; returns how many pieces (-1: the file is
        gone)."""
        data = bytearray()
        with self.reader.holding_map():  # the file may be deleted meanwhile: then its blocks
            current = self.meta.inode(st.ino)  # wait for these reads before reuse
            if current is None:
                return -1
            start = max(pieces[0].file_block, lo)
            for ext in pieces:
                a, b = max(ext.file_block, lo), min(ext.end_block, hi)
                data += await self.reader.read_extent(ext, a, b, a * BLOCK_SIZE, b * BLOCK_SIZE)
        await self.writer.write_runs(st, [(start * BLOCK_SIZE, data)], size=current.size, keep_mtime=True)
        end = start + len(data) // BLOCK_SIZE
        read = [e.slice(max(e.file_block, start), min(e.end_block, end)) for e in pieces]
        # the file's lock is held: the map of [start, end) is what write_runs committed
        self.moved(st.ino, read, self.meta.extents(st.ino, start, end))
        return len(pieces)

    def request_recall(self, ino: int) -> None:
        """Queue `ino` to have its tiered data brought back (the recall policy found it hot)."""
        try:
            self._send.send_nowait((ino, RECALL))
        except trio.WouldBlock:
            pass  # busy: the file's next tiered reads ask again

    async def run(self) -> None:
        """Compact (or recall) the files queued, one at a time, until cancelled."""
        async for ino, what in self._receive:
            try:
                if what is RECALL:
                    await self.recall(ino)
                else:
                    await self.check(ino, wait_for_quiet=bool(what))
            except FsError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE):
                    log.debug("inode %d was deleted before its compaction", ino)
                else:
                    log.warning("rewriting inode %d failed: %s", ino, exc)
            except WriteFencedError as exc:  # fenced: the committed fragments stay as they are
                log.warning("rewriting inode %d failed: %s", ino, exc)


@asynccontextmanager
async def _always(_ino: int) -> AsyncIterator[bool]:
    """A single node rewrites its files whenever it likes."""
    yield True


def _contiguous_runs(extents: list[Extent], stays: Callable[[Extent], bool]) -> list[list[Extent]]:
    """Maximal runs of file-contiguous extents none of which `stays`."""
    runs: list[list[Extent]] = []
    current: list[Extent] = []
    for ext in extents:
        if stays(ext):  # ends a run, and stays
            current = []
        elif current and current[-1].end_block == ext.file_block:
            current.append(ext)
        else:
            current = [ext]
            runs.append(current)
    return runs


def _device_contiguous(run: list[Extent]) -> bool:
    """Do the extents follow each other on the device too (as good as one extent)?"""
    return all(a.dev_block + a.count == b.dev_block for a, b in itertools.pairwise(run))


def _fragmented_runs(extents: list[Extent], stays: Callable[[Extent], bool]) -> list[list[Extent]]:
    """The `_contiguous_runs` worth compacting: at least COMPACT_MIN_EXTENTS pieces, not already
    device-contiguous."""
    return [r for r in _contiguous_runs(extents, stays) if len(r) >= COMPACT_MIN_EXTENTS and not _device_contiguous(r)]
