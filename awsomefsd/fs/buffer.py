"""The write buffer: this node's written-but-not-committed bytes, one `FileState` per file.

Concurrency (docs/design-notes.md, "Concurrency"; everything runs on the trio thread):
- `put` copies a write into the file's dirty runs and notes when it happened: no await, so it is
  atomic under trio. `take` moves the dirty runs to `inflight`, where reads still see them, until
  the flush that took them has committed or failed.
- A file's state lives while anything uses it: every task that works on a file holds it `pinned`
  (and flush, truncate and compaction hold it `locked`: the per-file lock), and a state is dropped
  only when idle (nothing buffered, in flight, pending or pinned). So two tasks never hold the
  locks of two different states of one file.
- `buffered_copies` copies the in-flight and dirty bytes of a range: a read takes them in the same
  step as the block map, so the pair is one instant's view of the file.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from awsomefsd.fs.dirty import MAX_RUNS, DirtyRanges
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Inode

Run = tuple[int, bytearray]
"""(file offset, bytes): a contiguous run of buffered bytes."""


class FileState:
    """Per-inode buffered state on this node."""

    __slots__ = ("changed_ns", "dirty", "dirty_since", "error", "inflight", "inflight_end", "ino", "lock", "users",
                 "volume", "written_ns")

    def __init__(self, ino: int, volume: int) -> None:
        self.ino = ino
        self.volume = volume
        self.dirty = DirtyRanges()
        self.inflight: list[Run] = []
        self.inflight_end = 0  # one past the last in-flight byte (runs are in offset order)
        self.lock = trio.Lock()
        self.users = 0  # tasks that pinned this state (WriteBuffer.pinned): it stays registered
        self.dirty_since = 0.0
        self.error: FsError | None = None  # a deferred write error, reported by the next flush/fsync
        self.written_ns = 0  # when the last write not yet committed happened: the file's mtime
        self.changed_ns = 0
        """When the last buffered write came, stamped or not (the kernel's write-back): the time of
        the content change a flush commits, which a linked site stamps it with (meta/sites/capture.py
        `content_time`), where `written_ns` is 0 or a time the application set."""

    def end_offset(self) -> int:
        return max(self.dirty.end_offset, self.inflight_end)

    def set_inflight(self, runs: list[Run]) -> None:
        self.inflight = runs
        self.inflight_end = runs[-1][0] + len(runs[-1][1]) if runs else 0

    def idle(self) -> bool:
        """Nothing buffered, pending or in use: the state may be dropped."""
        return not (self.users or self.dirty or self.inflight or self.error is not None or self.written_ns)

    def buffered_ranges(self) -> list[tuple[int, int]]:
        """(start, end) of every buffered run, in flight or dirty (they may overlap)."""
        return [(start, start + len(data)) for start, data in self.inflight] + self.dirty.ranges()

    def buffered_copies(self, offset: int, size: int) -> list[tuple[int, bytes]]:
        """Copies of the buffered bytes in [offset, offset+size), oldest first (in-flight, then
        dirty): what a read overlays on the committed bytes it reads from the device. Copies, so
        writes and flushes after this call cannot change what the read returns."""
        end = offset + size
        out = []
        runs = self.inflight
        i = max(bisect.bisect_right(runs, offset, key=_run_start) - 1, 0)  # disjoint, in offset order
        while i < len(runs) and runs[i][0] < end:
            start, data = runs[i]
            lo, hi = max(offset, start), min(end, start + len(data))
            if lo < hi:
                out.append((lo, bytes(data[lo - start : hi - start])))
            i += 1
        out.extend(self.dirty.copies(offset, end))
        return out


class WriteBuffer:
    """Every file's FileState, the buffer limits and the count of dirty bytes."""

    def __init__(self, *, file_buffer_bytes: int, write_buffer_bytes: int, clock_ns: Callable[[], int]) -> None:
        self.file_buffer_bytes = file_buffer_bytes
        self.write_buffer_bytes = write_buffer_bytes
        self.clock_ns = clock_ns
        self.files: dict[int, FileState] = {}
        self.total_dirty_bytes = 0
        self.inflight_bytes = 0
        """Bytes taken by flushes still running: they need device blocks until the flush ends."""

    # -- states ---------------------------------------------------------------------------------
    def state(self, ino: int, volume: int = 0) -> FileState:
        st = self.files.get(ino)
        if st is None:
            st = self.files[ino] = FileState(ino, volume)
        return st

    @asynccontextmanager
    async def pinned(self, ino: int, volume: int = 0) -> AsyncIterator[FileState]:
        """The file's state, kept registered until the block is left (then dropped if idle)."""
        st = self.state(ino, volume)
        st.users += 1
        try:
            yield st
        finally:
            st.users -= 1
            self.drop_if_idle(st)

    @asynccontextmanager
    async def locked(self, ino: int, volume: int = 0) -> AsyncIterator[FileState]:
        """The file's state, pinned and locked: no flush, truncate or compaction of it meanwhile.
        A free lock is taken without a checkpoint: a cluster member's reader flushes a small fresh
        file inline (fs/data.py `flushes_at_once`), where nothing may yield."""
        async with self.pinned(ino, volume) as st:
            try:
                st.lock.acquire_nowait()
            except trio.WouldBlock:
                await st.lock.acquire()
            try:
                yield st
            finally:
                st.lock.release()

    def drop_if_idle(self, st: FileState) -> None:
        if st.idle() and self.files.get(st.ino) is st:
            del self.files[st.ino]

    def forget(self, ino: int) -> None:
        """Drop the buffers of an inode that no longer exists (purged): nothing will read them."""
        st = self.files.pop(ino, None)
        if st is not None:
            self.total_dirty_bytes -= st.dirty.dirty_bytes

    # -- what applications see ------------------------------------------------------------------
    def effective_size(self, ino: int, size: int) -> int:
        """The size a reader sees: the committed size or the end of buffered data, if further."""
        st = self.files.get(ino)
        return size if st is None else max(size, st.end_offset())

    def with_buffered(self, inode: Inode) -> Inode:
        """`inode` as this node's applications see it: buffered writes count in its size and times
        (a write changes mtime and ctime when it happens, not when its data is committed)."""
        st = self.files.get(inode.ino)
        if st is not None and inode.is_reg:
            inode.size = max(inode.size, st.end_offset())
            if st.written_ns:
                inode.mtime_ns = st.written_ns
                inode.ctime_ns = max(inode.ctime_ns, st.written_ns)
        return inode

    def dirty_blocks(self) -> int:
        """Blocks the buffer will need when flushed (with slack for partial blocks). Runs a flush
        has taken count until it ends: a flush reads the blocks around its partial runs before it
        allocates, and a write checked for room meanwhile must not be promised those blocks
        (it was, under the kernel's writeback cache, and its flush then failed with ENOSPC). From
        the allocation to the end of the flush they count twice, which errs on the safe side."""
        return (self.total_dirty_bytes + self.inflight_bytes) // BLOCK_SIZE + 2 * len(self.files)

    def dirty_bytes_of(self, volume: int) -> int:
        """Dirty bytes of the volume's files (what its quota check adds to its usage)."""
        return sum(f.dirty.dirty_bytes for f in self.files.values() if f.volume == volume)

    # -- writing and taking ---------------------------------------------------------------------
    def put(self, st: FileState, offset: int, data: bytes | memoryview, *, stamp: bool = True) -> None:
        """Buffer a write (no await: atomic) and, with `stamp`, note when it happened."""
        before = st.dirty.dirty_bytes
        if not st.dirty:
            st.dirty_since = time.monotonic()
        st.dirty.write(offset, data)
        st.changed_ns = now = self.clock_ns()
        if stamp:
            st.written_ns = now
        self.total_dirty_bytes += st.dirty.dirty_bytes - before

    def must_flush(self, st: FileState) -> bool:
        """The file holds more than its writer may leave behind: the writer flushes it itself
        (the background flusher is behind)."""
        return st.dirty.dirty_bytes >= 2 * self.file_buffer_bytes or st.dirty.run_count >= MAX_RUNS

    def should_flush(self, st: FileState) -> bool:
        """The file, or the whole buffer, is full enough to ask the background flusher."""
        return st.dirty.dirty_bytes >= self.file_buffer_bytes or self.total_dirty_bytes >= self.write_buffer_bytes

    def take(self, st: FileState) -> list[Run]:
        """Move the file's dirty runs in flight (still seen by reads) for a flush to write."""
        runs = st.dirty.take()
        taken = sum(len(d) for _, d in runs)
        self.total_dirty_bytes -= taken
        self.inflight_bytes += taken
        st.set_inflight(runs)
        return runs

    def flushed(self, st: FileState) -> None:
        """The flush that took the file's runs has ended (written, failed or put back)."""
        self.inflight_bytes -= sum(len(d) for _, d in st.inflight)
        st.set_inflight([])

    def keep_unwritten(self, st: FileState, runs: list[Run]) -> None:
        """Buffer again the runs a fenced flush could not write (their extents were released and no
        mapping was proposed), under the bytes written since the flush took them: those are newer."""
        if self.files.get(st.ino) is not st:
            return  # forgotten meanwhile: the inode is gone
        newer = st.dirty.take()
        newer_bytes = sum(len(data) for _, data in newer)
        for start, data in itertools.chain(runs, newer):
            st.dirty.write(start, memoryview(data))
        self.total_dirty_bytes += st.dirty.dirty_bytes - newer_bytes

    def drop_dirty(self, st: FileState) -> None:
        """Forget the file's dirty bytes and their time (they must never reach the device)."""
        self.total_dirty_bytes -= st.dirty.dirty_bytes
        st.dirty = DirtyRanges()
        st.written_ns = 0


def _run_start(run: Run) -> int:
    return run[0]
