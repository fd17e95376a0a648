"""Closed small files' data written together (issue 40): an untar's, an rsync's.

A close (FLUSH) used to write the file's buffered data and commit its mapping before it was
answered: per small file one device write and one WriteData, on the request reader's thread. On a
single node whose log is the local one (meta/log.py `LocalLog`), a close of a file with little
buffered is answered at once instead and the file joins `pending`; the pending files are then
written together when the log commits next: one allocation, one device write, one WriteData each.

What the close promised still holds, because the pending files are written before the log
commits anything (`LocalLog.prepare` runs `before_commit`): every command proposed after the
close commits in the same batch as the file's data or a later one. So a crash still leaves a
prefix of the closes and the metadata changes (design note 1), and a rename over a closed file's
name never commits without that file's data (the replace pattern; ext4's `auto_da_alloc`). Reads
on the node see buffered bytes as before; fsync flushes its file and then commits, and the
commit writes every pending file first. What moves is where a device error is told: a batch
that fails keeps the error in the file's state for its next close or fsync, as a background
flush does (Flusher), instead of answering the close that deferred it.

While a commit prepares (`before_commit`), closes flush as before: what the commit must contain
cannot grow under it. A cluster member never defers: close-to-open needs the data committed
before another node opens the file. Nor does a node whose liveness lease (the device's write
fence, io/fence.py) is not current or would lapse before the batch is written: a fenced flush
fails, and that close must hear it (EIO) rather than answer before anything was tried.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from awsomefsd.fs.buffer import FileState, Run, WriteBuffer
from awsomefsd.fs.compactor import Compactor
from awsomefsd.fs.flusher import Flusher
from awsomefsd.fs.losses import LossLedger
from awsomefsd.fs.writer import RunWriter
from awsomefsd.meta.errors import FsError

log = logging.getLogger(__name__)

DEFER_FILE_BYTES = 256 << 10
"""A file with more buffered than this is flushed at its close, as before (it makes its own device
write of a useful size)."""
DEFER_FILE_RUNS = 16
DEFER_MAX_BYTES = 16 << 20
DEFER_MAX_FILES = 2048
"""Past either bound a close flushes its own file: memory and the commit's wait stay bounded."""
BATCH_BYTES = 4 << 20
BATCH_FILES = 512
"""When the pending files reach either, the batch is written at once rather than at the tick."""
BATCH_TICK_S = 0.5
"""Pending files are written at the latest this long after the last batch, when no commit came
first (a file rewritten in place makes no command, so no commit follows its close)."""
DEFER_LEASE_S = 2.0
"""A close is deferred only while the node's lease lasts this long past the fence's margin: the
batch is written within BATCH_TICK_S, and a loaded machine may run it later than that."""


class CommitHooks(Protocol):
    """What the log offers: awaited before each commit, and whether that has work to do."""

    prepare: Callable[[], Awaitable[None]] | None
    preparing: Callable[[], bool]


class ClosedBatch:
    """The closed files whose data waits for the next batch (see the module docstring)."""

    def __init__(self, buffer: WriteBuffer, writer: RunWriter, flusher: Flusher, compactor: Compactor,
                 lost_writes: LossLedger, fits: Callable[[int], bool], lease_left: Callable[[], float]) -> None:
        self.buffer = buffer
        self.fits = fits
        """Does everything buffered fit the device and the given volume's quota? (A failure of a
        deferred write reaches only the file's next close or fsync: none may be foreseeable.)"""
        self.lease_left = lease_left
        """Seconds until the device's fence closes (infinite on a node without a lease)."""
        self.writer = writer
        self.flusher = flusher
        self.compactor = compactor
        self.lost_writes = lost_writes
        self.enabled = False
        """Set where it is safe: a single node on the local log, whose commit calls `before_commit`."""
        self.pending: dict[int, None] = {}  # inode numbers, in the order they were closed
        self.pending_bytes = 0  # their buffered bytes when they were closed (a bound, not exact)
        self.batches = 0
        self.batched_files = 0
        self._preparing = 0
        self._writing = trio.Lock()
        self._kick = trio.Event()

    def attach(self, log: CommitHooks | None) -> None:
        """Defer closes when the node's log gives its commits to `before_commit` first (the local
        log, meta/log.py); None: never (a log that commits without asking)."""
        if log is not None:
            self.enabled = True
            log.prepare = self.before_commit
            log.preparing = self.waiting

    def may_defer(self, ino: int) -> bool:
        """Would a close of the file be answered without writing its data (`defer`)?"""
        if not self.enabled or self._preparing or self.lease_left() < DEFER_LEASE_S:
            return False
        st = self.buffer.files.get(ino)
        if st is None or st.inflight or st.error is not None or st.lock.locked():
            return False
        if not st.dirty:
            return ino in self.pending  # already waiting: nothing new
        if st.dirty.dirty_bytes > DEFER_FILE_BYTES or st.dirty.run_count > DEFER_FILE_RUNS:
            return False
        if not self.fits(st.volume):
            return False  # its flush may fail for room: the close that flushes it hears that
        return ino in self.pending or (len(self.pending) < DEFER_MAX_FILES
                                       and self.pending_bytes + st.dirty.dirty_bytes <= DEFER_MAX_BYTES)

    def defer(self, ino: int) -> bool:
        """A close of the file: True when its data joins the next batch (nothing awaited);
        False: the caller flushes it now."""
        if not self.may_defer(ino):
            return False
        if ino not in self.pending:
            self.pending[ino] = None
            self.pending_bytes += self.buffer.files[ino].dirty.dirty_bytes
            if len(self.pending) >= BATCH_FILES or self.pending_bytes >= BATCH_BYTES:
                self._kick.set()
        return True

    async def before_commit(self) -> None:
        """Write every pending file, including those a batch is writing now: the log commits
        next, and nothing closed before that may miss it."""
        self._preparing += 1
        try:
            await self.write_pending()
        finally:
            self._preparing -= 1

    async def _write_pending_quietly(self) -> None:
        """`write_pending` where no application waits: a failure stays with the files it hit."""
        try:
            await self.write_pending()
        except Exception:  # a file's own failure is kept in its state already (`_alone`)
            log.exception("writing the batch of closed files failed")

    def waiting(self) -> bool:
        """Does a commit have files to write first?"""
        return bool(self.pending) or self._writing.locked()

    async def write_pending(self) -> None:
        """Write the pending files (and wait for a batch being written)."""
        async with self._writing:
            while self.pending:
                inos = list(self.pending)
                self.pending.clear()
                self.pending_bytes = 0
                await self._write(inos)

    async def run(self) -> None:
        """Write the pending files when they reach a batch, or BATCH_TICK_S after the last one."""
        while True:
            with trio.move_on_after(BATCH_TICK_S):
                await self._kick.wait()
            self._kick = trio.Event()
            if self.pending:
                await self._write_pending_quietly()

    async def _write(self, inos: list[int]) -> None:
        """One batch: the files this task can lock now go together; a file another task holds
        (a flush, a truncate), or that grew past the bounds since its close, is flushed alone
        after them, waiting its turn, and so is a file whose part of the batch failed."""
        held: list[FileState] = []
        alone: list[int] = []
        for ino in inos:
            st = self.buffer.files.get(ino)
            if st is None or not st.dirty:
                continue  # flushed meanwhile (an fsync), or deleted
            if st.dirty.dirty_bytes > 2 * DEFER_FILE_BYTES or st.dirty.run_count > 2 * DEFER_FILE_RUNS:
                alone.append(ino)
                continue
            try:
                st.lock.acquire_nowait()
            except trio.WouldBlock:
                alone.append(ino)
                continue
            st.users += 1
            held.append(st)
        try:
            alone += await self._write_held(held)
        finally:
            for st in held:
                st.lock.release()
                st.users -= 1
                self.buffer.drop_if_idle(st)
        for ino in alone:
            await self._alone(ino)

    async def _alone(self, ino: int) -> None:
        """Flush one file as the background flusher would. An error no flush path expects (the
        device's own OSError) is kept for the file's next close or fsync too: the commit that
        waits for this batch must go on, and its writes are lost."""
        try:
            await self.flusher.flush_keeping_error(ino)
        except Exception as exc:
            st = self.buffer.files.get(ino)
            if st is None:
                return
            st.error = FsError(errno.EIO, f"writing the file's data after its close failed: {exc}")
            self.lost_writes.mark_lost(ino)
            log.warning("writing closed file %d failed (%s): its buffered writes are lost, and its next "
                        "close or fsync reports it", ino, exc)

    async def _write_held(self, held: list[FileState]) -> list[int]:
        """Write the locked files' dirty runs together; returns the files whose part failed, their
        runs buffered again: flushed alone, the flusher's path tells an error kept for the next
        close or fsync from one worth retrying, as for any flush."""
        files: list[tuple[FileState, list[Run], int, int]] = []
        for st in held:
            runs = self.buffer.take(st)
            self.compactor.note_runs(st.ino, runs)
            files.append((st, runs, st.written_ns, st.changed_ns))
        failed: list[int] = []
        try:
            try:
                outcome = await self.writer.write_files(files)
            except Exception as exc:  # the allocation or the device write: every file
                outcome = [exc] * len(files)
            self.batches += 1
            self.batched_files += len(files)
            for (st, runs, written_ns, _), failure in zip(files, outcome, strict=True):
                if failure is None:
                    if st.written_ns == written_ns and not st.dirty:
                        st.written_ns = 0  # committed: the inode holds the time now
                    continue
                log.info("writing closed file %d with others failed (%s): flushing it alone", st.ino, failure)
                self.buffer.keep_unwritten(st, runs)
                failed.append(st.ino)
        finally:
            for st, _, _, _ in files:
                self.buffer.flushed(st)
        return failed
