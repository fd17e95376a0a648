"""Linux native AIO for small O_DIRECT reads, delivered to waiting trio tasks.

Why: a 4 KiB pread on the trio thread blocks every other FUSE request for the device's latency, so
16 outstanding reads were served one at a time. A thread hop per read costs more than it saves
(measured). With AIO the task submits the read (io_submit) and other tasks run meanwhile. One of
the waiting tasks (the leader) waits on an eventfd the kernel signals per completion
(IOCB_FLAG_RESFD), collects completions with io_getevents and wakes their tasks; when its own read
is done it passes the lead on. A lone read thus wakes straight from epoll, without a second task
switch through a reaper task. No thread, no extra dependency (`outcome` comes with trio): the four
system calls go through libc's `syscall` with ctypes.

What a caller may rely on:
- `read_into` returns the kernel's byte count (a short count is the caller's to judge) or raises
  OSError(EIO) with a log line when the kernel failed the read; the buffer must be block-aligned
  memory (an `aligned_buffer` or a `BufferPool` buffer) and stay valid while the call runs.
- The kernel writes into the buffer until the completion arrives, so a cancelled read does not
  return before that: its task keeps waiting (parked with trio's `Abort.FAILED`, or as the leader
  in an uncancellable wait) and the cancellation is delivered right after the completion. The caller may therefore free or reuse the buffer as soon as the call
  returns or raises, whatever the reason.
- At most `max_in_flight` reads are submitted; more callers wait for a slot, first come first served.
- `worth_submitting` advises an inline read while reads arrive one at a time (AIO then only adds
  its wake-up cost, ~15% at queue depth 1 measured), with a submitted probe every PROBE_EVERY
  reads; one read overlapping another switches back at once.
- `submit` starts a read without a task: the caller's function gets the result from whichever
  task collects completions (a parked `read_into` leading, or `run`'s loop, which leads whenever
  such reads are in flight and no other task does). The session answers the common READ this way
  (fs/reader.py, `Reader.start_read`): no task, no coroutine chain per read. Such reads are
  queued and go to the kernel together, in one io_submit, when the task that collects completions
  next runs (it is woken for that) or when SUBMIT_TOGETHER are queued: the session starts every
  READ of a burst it reads from /dev/fuse before that task runs.
- `run` owns the context's lifetime. When it is cancelled it stops accepting reads
  (ClosedResourceError: the caller reads inline instead), drains the ones in flight and destroys
  the context; io_destroy itself waits for any the drain gave up on, and their tasks get EIO. If
  io_getevents ever fails, the context is destroyed the same way at once.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
from collections.abc import Callable

import outcome
import trio

from awsomefsd.io.aio_abi import (
    IOCB_CMD_PREAD,
    IOCB_FLAG_RESFD,
    AioUnavailableError,
    Iocb,
    IoEvent,
    Timespec,
    open_context,
)
from awsomefsd.io.layout import BLOCK_SIZE

log = logging.getLogger(__name__)

__all__ = ["AioReader", "AioUnavailableError"]

MAX_IN_FLIGHT = 64
MAX_IO_BYTES = 1 << 20  # AIO is for small reads; large ones go to worker threads
DRAIN_TIMEOUT_S = 30.0
# A read that overlaps no other costs more via AIO (~30 µs: eventfd, epoll, io_getevents) than
# inline. After this many such reads in a row callers are told to read inline, except every
# PROBE_EVERY-th read, which is submitted to find out whether concurrency is back.
SOLO_READS_BEFORE_INLINE = 8
PROBE_EVERY = 16  # closing waits this long for reads in flight, then io_destroy waits for the rest
SUBMIT_TOGETHER = 16
"""`submit`'s reads queued at most, then submitted in one io_submit: one plug of the block layer,
so one doorbell of a virtio disk (a VM exit) for them all. One doorbell per 4 KiB read was 12 %
of the daemon's CPU under random reads (design note 130)."""

class AioReader:
    """One AIO context with an eventfd, `max_in_flight` reads at a time. See the module docstring."""

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._sys, self._ctx, self._efd = open_context(max_in_flight)
        self.max_in_flight = max_in_flight
        self._events = (IoEvent * max_in_flight)()
        # One iocb and its one-entry array, filled in per read (`_submit_one`): io_submit copies the
        # iocb before it returns; only the buffer must outlive the read.
        self._iocb = Iocb(aio_lio_opcode=IOCB_CMD_PREAD, aio_flags=IOCB_FLAG_RESFD, aio_resfd=self._efd)
        self._batch = (ctypes.POINTER(Iocb) * 1)(ctypes.pointer(self._iocb))
        # `submit`'s queue: its iocbs filled in per read, submitted together (`submit_queued`)
        self._queued_iocbs = (Iocb * SUBMIT_TOGETHER)()
        for queued in self._queued_iocbs:
            queued.aio_lio_opcode, queued.aio_flags, queued.aio_resfd = IOCB_CMD_PREAD, IOCB_FLAG_RESFD, self._efd
        self._queued_batch = (ctypes.POINTER(Iocb) * SUBMIT_TOGETHER)(*map(ctypes.pointer, self._queued_iocbs))
        self._queued: list[int] = []  # their request ids, in the queue's order
        self._one = ctypes.c_long(1)
        self._no_wait = Timespec(0, 0)
        self._no_wait_ref = ctypes.byref(self._no_wait)
        self._zero, self._max = ctypes.c_long(0), ctypes.c_long(max_in_flight)
        self._ids = itertools.count(1)
        # request id -> its parked task, or None while that task runs (leading, or woken to lead)
        self._waiting: dict[int, trio.lowlevel.Task | None] = {}
        self._done: dict[int, int] = {}  # results of reads whose task was not parked
        # request id -> (what to call with its result, the export of its buffer): `submit`'s reads
        self._callbacks: dict[int, tuple[Callable[[int], None], ctypes.c_char]] = {}
        self._reaper_wake = trio.Event()  # set when `submit`'s reads need a leader and none leads
        self._leading = False  # a task waits on the eventfd
        self._heir = 0  # the request whose task was woken to lead next
        self._slots = trio.Semaphore(max_in_flight)
        self._closing = False
        self._destroyed = False
        self.submitted = 0
        self.completed = 0
        self.submit_calls = 0
        """io_submit calls that took `submit`'s queued reads (each took one or more)."""
        self.peak_in_flight = 0
        self._solo_streak = 0  # submissions in a row that found no other read in flight
        self._skipped = 0  # reads advised inline since the last probe

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._callbacks)

    @property
    def accepting(self) -> bool:
        return not self._closing

    def worth_submitting(self) -> bool:
        """False when reads have been arriving one at a time, so an inline read is cheaper; the
        caller may still submit (correctness does not depend on this advice)."""
        if self._waiting or self._callbacks or self._solo_streak < SOLO_READS_BEFORE_INLINE:
            return True
        self._skipped += 1
        if self._skipped < PROBE_EVERY:
            return False
        self._skipped = 0
        return True

    async def read_into(self, fd: int, view: memoryview, offset_bytes: int) -> int:
        """Read `view.nbytes` bytes at `offset_bytes` of `fd` (opened O_DIRECT) into `view`.

        Returns the byte count the kernel reported (short at the end of a file). ClosedResourceError
        when the reader is closing (nothing was submitted); OSError(EIO) when the read failed.
        """
        length = view.nbytes
        assert 0 < length <= MAX_IO_BYTES and length % BLOCK_SIZE == 0, f"AIO read of {length} bytes"
        assert offset_bytes >= 0 and offset_bytes % BLOCK_SIZE == 0, f"unaligned AIO offset {offset_bytes}"
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        if self._closing:
            self._slots.release()
            raise trio.ClosedResourceError("AIO reader is closing")
        anchor = ctypes.c_char.from_buffer(view)  # holds the buffer export until the kernel is done
        try:
            address = ctypes.addressof(anchor)
            assert address % BLOCK_SIZE == 0, "O_DIRECT buffer is not block aligned"
            try:
                request_id = self._submit_one(fd, address, length, offset_bytes)
            except OSError as exc:
                self._slots.release()
                log.error("io_submit of a %d-byte read at %d failed: %s", length, offset_bytes, exc.strerror)
                raise OSError(errno.EIO, f"io_submit of a read at {offset_bytes}: {exc.strerror}") from exc
            self.peak_in_flight = max(self.peak_in_flight, len(self._waiting) + 1)
            self._solo_streak = 0 if self._waiting else self._solo_streak + 1
            res = await self._completion(request_id)
        finally:
            del anchor
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancellation that waited for the kernel
        if res < 0:
            log.error("AIO read of %d bytes at %d failed: %s", length, offset_bytes, os.strerror(-res))
            raise OSError(errno.EIO, f"read of {length} bytes at {offset_bytes} failed: {os.strerror(-res)}")
        return res

    def submit(self, fd: int, view: memoryview, offset_bytes: int, done: Callable[[int], None]) -> bool:
        """`read_into` without a task: queue the read and return; `done(result)` is called with
        the kernel's byte count (or -errno: also when io_submit refused it) from whichever task
        collects the completion (a waiting `read_into`, or `run`'s). The queue goes to the kernel
        in one io_submit when that task next runs, or at once when it holds SUBMIT_TOGETHER
        reads. False, with nothing queued, when no slot is free or the reader is closing: the
        caller reads another way. `done` must not raise or wait; the buffer must stay valid until
        it is called."""
        if self._closing:
            return False
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return False
        anchor = ctypes.c_char.from_buffer(view)
        request_id = next(self._ids)
        iocb = self._queued_iocbs[len(self._queued)]
        iocb.aio_data, iocb.aio_fildes = request_id, fd
        iocb.aio_buf, iocb.aio_nbytes, iocb.aio_offset = ctypes.addressof(anchor), view.nbytes, offset_bytes
        self._queued.append(request_id)
        self._callbacks[request_id] = (done, anchor)
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        if len(self._queued) == SUBMIT_TOGETHER:
            self.submit_queued()
        elif len(self._queued) == 1:
            self._wake_collector()
        return True

    def _wake_collector(self) -> None:
        """Make the task that collects completions run soon, so that it submits the queue: the
        leader waits on the eventfd (a count written there wakes it, and it finds no completion),
        an heir is about to lead, else `run`'s loop is woken."""
        if self._leading:
            os.eventfd_write(self._efd, 1)
        elif not self._heir:
            self._reaper_wake.set()

    def submit_queued(self) -> None:
        """io_submit every queued read together. The ones the kernel did not take get -errno
        (their callers serve them another way)."""
        count = len(self._queued)
        if not count:
            return
        queued, self._queued = self._queued, []
        try:
            taken = self._sys.call(self._sys.nr_submit, self._ctx, ctypes.c_long(count), self._queued_batch)
            refusal = errno.EAGAIN
        except OSError as exc:
            taken, refusal = 0, exc.errno or errno.EIO
            log.warning("io_submit of %d reads failed: %s", count, exc.strerror)
        self.submit_calls += 1
        self.submitted += taken
        for request_id in queued[taken:]:
            self._finish(request_id, -refusal)

    def _submit_one(self, fd: int, address: int, length: int, offset_bytes: int) -> int:
        """io_submit one read (the caller holds a slot); returns its request id. The one iocb is
        filled in per read: the kernel copies it in io_submit, and building one per read cost
        ~5-10 us."""
        request_id = next(self._ids)
        iocb = self._iocb
        iocb.aio_data = request_id
        iocb.aio_fildes = fd
        iocb.aio_buf = address
        iocb.aio_nbytes = length
        iocb.aio_offset = offset_bytes
        submitted = self._sys.call(self._sys.nr_submit, self._ctx, self._one, self._batch)
        assert submitted == 1, f"io_submit took {submitted} of 1 requests"
        self.submitted += 1
        return request_id

    async def _completion(self, request_id: int) -> int:
        """Wait for the result of a submitted read; not cancellable (the kernel owns the buffer).

        Leader/follower: the first waiter waits on the eventfd itself and collects every completion,
        waking the other waiters; when its own read is done it passes the lead to a parked waiter.
        So a lone read costs no task switch beyond its own wake-up.
        """
        task = trio.lowlevel.current_task()
        while True:
            if request_id in self._done:
                result = self._done.pop(request_id)
                self._pass_the_lead()
                return result
            if not self._leading and self._heir in (0, request_id):
                self._heir = 0
                self._waiting[request_id] = None
                await self._lead()
                continue
            self._waiting[request_id] = task
            value = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
            if value is not None:
                return int(value)
            # woken as heir (our entry is None now): lead, or park again if another task took over

    async def _lead(self) -> None:
        """Wait for completions (not cancellable) and collect them."""
        assert not self._leading
        self.submit_queued()
        if not (self._waiting or self._callbacks):
            return  # the kernel refused every queued read: no completion will come
        self._leading = True
        try:
            try:
                await trio.lowlevel.wait_readable(self._efd)
            except trio.Cancelled:
                # Our read still owns its buffer: keep waiting. Trio cancellation is level-triggered,
                # so read_into's final checkpoint raises Cancelled again once the read is done.
                with trio.CancelScope(shield=True):
                    await trio.lowlevel.wait_readable(self._efd)
            self._reap()
        except trio.ClosedResourceError:
            pass  # destroyed meanwhile (drain timed out): every waiter has its EIO
        except OSError as exc:
            log.error("collecting AIO completions failed (%s); device reads go inline from now on", exc)
            self._closing = True
            self._destroy()
        finally:
            self._leading = False

    def _pass_the_lead(self) -> None:
        """Wake one parked waiter to lead, unless someone leads or has been asked to."""
        if self._leading or self._heir:
            return
        for request_id, task in self._waiting.items():
            if task is not None:
                self._waiting[request_id] = None
                self._heir = request_id
                trio.lowlevel.reschedule(task, outcome.Value(None))
                return
        if self._callbacks:
            self._reaper_wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the context until cancelled, collecting the completions of `submit`'s reads when
        no waiting `read_into` does; then stop accepting reads, drain and destroy it."""
        task_status.started()
        try:
            while True:
                if self._callbacks and not self._leading and not self._heir:
                    await self._lead()
                    self._pass_the_lead()
                    continue
                self._reaper_wake = trio.Event()
                await self._reaper_wake.wait()
        finally:
            self._closing = True
            with trio.CancelScope(shield=True):
                await self._drain()
            self._destroy()

    async def _drain(self) -> None:
        """Wait for the reads in flight; their own tasks collect them (or this one does)."""
        with trio.move_on_after(DRAIN_TIMEOUT_S) as scope:
            while (self._waiting or self._callbacks) and not self._destroyed:
                if self._leading or self._heir:
                    await trio.sleep(0.001)
                else:
                    await self._lead()
                    self._pass_the_lead()
        if scope.cancelled_caught:
            log.error("%d AIO reads still in flight after %.0f s; io_destroy waits for them",
                      self.in_flight, DRAIN_TIMEOUT_S)

    def _reap(self) -> None:
        """Hand out the completions that arrived (never blocks)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        while True:
            got = self._sys.call(self._sys.nr_getevents, self._ctx, self._zero, self._max, self._events,
                                 self._no_wait_ref)
            assert 0 <= got <= self.max_in_flight
            for event in self._events[:got]:
                self._finish(event.data, int(event.res))
            if got < self.max_in_flight:
                return

    def _finish(self, request_id: int, result: int) -> None:
        called = self._callbacks.pop(request_id, None)
        if called is not None:
            self.completed += 1
            self._slots.release()
            try:
                called[0](result)
            except Exception:  # its own failure; the other completions are still handed out
                log.exception("a device read's completion failed")
            return
        task = self._waiting.pop(request_id)
        self.completed += 1
        self._slots.release()
        if task is None:
            self._done[request_id] = result  # its task is running (leading, or about to)
        else:
            trio.lowlevel.reschedule(task, outcome.Value(result))

    def _destroy(self) -> None:
        """io_destroy (the kernel waits for reads still in flight), then fail their tasks."""
        if self._destroyed:
            return
        self._destroyed = True
        self._queued = []  # never submitted: failed below with the rest
        try:
            self._sys.call(self._sys.nr_destroy, self._ctx)
        except OSError as exc:
            log.error("io_destroy failed: %s", exc.strerror)
        trio.lowlevel.notify_closing(self._efd)
        os.close(self._efd)
        for request_id in [*self._waiting, *self._callbacks]:
            self._finish(request_id, -errno.EIO)
