"""Flushing: buffered writes to the device and their mapping into the metadata.

A flush takes the file's dirty runs (they become in flight, still seen by reads: fs/buffer.py),
writes them in batches of at most FLUSH_BATCH_BYTES with one WriteData each (fs/writer.py),
stamped with the time of the last write they carry, and reports a write error the file kept
from an earlier background flush. Flush, truncate and compaction of one file share its lock.

In the background, files are flushed when their buffer is full (the writer asks, `request`) or
older than the flush interval (a timer); at most FLUSH_CONCURRENCY at once, and at most one
waiting for its turn per file (one waiting flushes all the file has by then; the timer also leaves
alone a file a flush is at work on). A background flush that fails keeps its error for the
application's next fsync or close.

A flush refused by the device's write fence (this node's lease lapsed) fails with EIO but keeps
the runs it could not write buffered, under any bytes written meanwhile: a flush after the lease
is renewed writes them. While fenced the timer does not retry.
"""

from __future__ import annotations

import errno
import logging
import time

import trio

from awsomefsd.fs.buffer import FileState, Run, WriteBuffer
from awsomefsd.fs.compactor import Compactor
from awsomefsd.fs.losses import LossLedger
from awsomefsd.fs.writer import RunWriter
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.fence import WriteFencedError
from awsomefsd.meta.errors import FsError, StoreUnavailable

log = logging.getLogger(__name__)

FLUSH_CONCURRENCY = 4
FLUSHER_TICK_S = 0.1
STORE_RETRY_S = 10.0
"""A flush that waited on an unreachable object store is not tried again sooner: a store outage
must not hold the flush slots that other files need."""
FLUSH_BATCH_BYTES = 8 << 20  # runs written and committed together by one WriteData
FLUSH_BATCH_RUNS = 1024
QUEUE_FILES = 1024


class Flusher:
    def __init__(self, buffer: WriteBuffer, writer: RunWriter, compactor: Compactor, device: BlockDevice,
                 lost_writes: LossLedger, *, flush_interval_ms: int) -> None:
        self.buffer = buffer
        self.lost_writes = lost_writes
        self.writer = writer
        self.compactor = compactor
        self.device = device
        self.flush_interval_s = flush_interval_ms / 1000
        self._send, self._receive = trio.open_memory_channel[int](QUEUE_FILES)
        self._waiting: set[int] = set()
        """Files a background flush is started for that has not yet its turn (a slot)."""
        self._at_work: set[int] = set()
        """Files a background flush holds a slot for."""
        self.background_flushes = 0
        """Background flushes run (each took a slot)."""

    async def flush(self, ino: int) -> None:
        """Write the file's dirty bytes and commit their mapping; raise a deferred write error."""
        if ino not in self.buffer.files:
            return
        async with self.buffer.locked(ino) as st:
            await self.flush_held(st)

    async def flush_pinned(self, st: FileState) -> None:
        """`flush` of a state the caller holds pinned."""
        async with st.lock:
            await self.flush_held(st)

    async def flush_held(self, st: FileState) -> None:
        """`flush` with the file's state pinned and its lock held."""
        if st.dirty:
            written_ns, changed_ns = st.written_ns, st.changed_ns
            losses = self.lost_writes.losses
            runs = self.buffer.take(st)
            self.compactor.note_runs(st.ino, runs)
            written = 0
            try:
                for batch in _flush_batches(runs):
                    # no stamped write among them (the kernel's write-back, or a time set since
                    # committed: ops_base.py `_set_times_over_buffered`): the times stay, and the
                    # time of the change all the same says the content changed (write_runs)
                    await self.writer.write_runs(st, batch, mtime_ns=written_ns or changed_ns or self.writer.clock_ns(),
                                                 keep_mtime=not written_ns)
                    written += len(batch)
            except StoreUnavailable as exc:
                # Completing a partial block needed its old bytes from the object store, which did
                # not answer: nothing was allocated or proposed, so the writes stay buffered and a
                # later flush (not before STORE_RETRY_S) tries again. The caller hears EIO now.
                self.buffer.keep_unwritten(st, runs[written:])
                st.dirty_since = time.monotonic() + STORE_RETRY_S
                log.warning("flushing inode %d needs tiered data the object store did not give (%s): "
                            "its buffered writes are kept and retried", st.ino, exc.args[1])
                raise FsError(errno.EIO, f"the object store did not answer ({exc.args[1]}); the writes stay "
                                         "buffered and are retried", cause="store") from exc
            except FsError as exc:
                # The runs are gone with the failed flush. Every descriptor open on the file must
                # hear it (as Linux reports a writeback error to each open file), not only the one
                # that takes `st.error`: appends from two descriptors share these runs, and the
                # other's fsync would otherwise succeed with its record lost (a nemesis run).
                st.error = FsError(exc.errno, f"a flush of the file's buffered writes failed: {exc.args[1]}",
                                   cause=exc.cause)
                self.lost_writes.mark_lost(st.ino, exc.errno)
                log.warning("flushing inode %d failed (%s): its buffered writes are lost, and each descriptor "
                            "open on it reports that once", st.ino, exc.args[1])
            except WriteFencedError as exc:
                if self.lost_writes.losses == losses:  # the lease may still be renewed: retried then
                    self.buffer.keep_unwritten(st, runs[written:])
                else:  # the lease was lost while this flush ran: after the renewal these runs
                    st.written_ns = 0  # would be written over what other nodes wrote meanwhile
                    self.lost_writes.mark_lost(st.ino)
                raise FsError(errno.EIO, exc.strerror or "", cause="fence") from exc
            finally:
                self.buffer.flushed(st)
            if st.written_ns == written_ns and not st.dirty:
                st.written_ns = 0  # committed (or failed for good): the inode holds the time now
        if st.error is not None:
            error, st.error = st.error, None
            raise error

    async def flush_all(self) -> None:
        errors = []
        for ino in list(self.buffer.files):
            await trio.lowlevel.checkpoint()  # a member's flush of a small fresh file may not yield
            try:
                await self.flush(ino)
            except FsError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def request(self, ino: int) -> bool:
        """Ask the background flusher to flush the file soon; False when its queue is full."""
        try:
            self._send.send_nowait(ino)
        except trio.WouldBlock:
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush files whose buffers are full (asked) or older than the flush interval."""
        limiter = trio.CapacityLimiter(FLUSH_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            task_status.started()
            nursery.start_soon(self._timer, nursery, limiter)
            async for ino in self._receive:
                self._start(nursery, ino, limiter)

    async def _timer(self, nursery: trio.Nursery, limiter: trio.CapacityLimiter) -> None:
        while True:
            await trio.sleep(FLUSHER_TICK_S)
            if not self.device.fence.is_open():
                continue  # flushes would only fail; the data stays buffered until the lease is renewed
            now = time.monotonic()
            for ino, st in list(self.buffer.files.items()):
                if st.dirty and now - st.dirty_since >= self.flush_interval_s and ino not in self._at_work:
                    self._start(nursery, ino, limiter)

    def _start(self, nursery: trio.Nursery, ino: int, limiter: trio.CapacityLimiter) -> None:
        """One more background flush of the file, unless one is waiting for a slot already: it
        will take everything the file has buffered by then. Without this check every tick added
        a flush for each file older than the interval while slower flushes held the slots, and
        the tasks piled up (tests/unit/test_flusher_backlog.py: 173 flushes for 120 files)."""
        if ino not in self._waiting:
            self._waiting.add(ino)
            nursery.start_soon(self._flush_quietly, ino, limiter)

    async def _flush_quietly(self, ino: int, limiter: trio.CapacityLimiter) -> None:
        try:
            async with limiter:
                self._waiting.discard(ino)
                self._at_work.add(ino)
                self.background_flushes += 1
                try:
                    await self.flush_keeping_error(ino)
                finally:
                    self._at_work.discard(ino)
        finally:
            self._waiting.discard(ino)

    async def flush_keeping_error(self, ino: int) -> None:
        """A flush no application waits for: an error is kept for the file's next fsync or close."""
        if ino not in self.buffer.files:
            return
        async with self.buffer.locked(ino) as st:
            await self.flush_held_keeping_error(st)

    async def flush_held_keeping_error(self, st: FileState) -> None:
        """`flush_keeping_error` with the file's state pinned and its lock held."""
        try:
            await self.flush_held(st)
        except FsError as exc:
            if isinstance(exc.__cause__, (WriteFencedError, StoreUnavailable)):
                # the data is still buffered and the next flush retries it: no deferred error
                log.debug("background flush of inode %d deferred: %s", st.ino, exc)
                return
            # Kept for the application's next fsync or close, stored while the state is
            # pinned: a state holding an error is not idle, so it is not dropped with it.
            st.error = exc
            log.warning("background flush of inode %d failed: %s", st.ino, exc)


def _flush_batches(runs: list[Run]) -> list[list[Run]]:
    """Runs grouped for one WriteData each: bounded in bytes and in extents per command."""
    batches: list[list[Run]] = []
    size = 0
    for run in runs:
        if not batches or size + len(run[1]) > FLUSH_BATCH_BYTES or len(batches[-1]) >= FLUSH_BATCH_RUNS:
            batches.append([])
            size = 0
        batches[-1].append(run)
        size += len(run[1])
    return batches
