"""Native AIO reads started together and collected without an event loop: a read worker's device
reads (fuse/kernel/worker_loop.py).

Why not threads: a worker with four reader threads, each a blocking `preadv`, spent most of its
CPU handing the GIL from thread to thread (futex waits and wake-ups: 60 % of its time in the
kernel under random reads, design note 131), and every read was its own virtio doorbell. One
thread that queues the reads of every request it finds waiting, submits them in one `io_submit`
and answers each as its completion arrives pays for neither.

What a caller may rely on: every slot has its own aligned buffer of `buffer_bytes` (`buffer`);
`queue` takes a read into a free slot's buffer (`free` says how many remain), and the buffer is
the caller's to read from once the slot's completion has been collected, until it queues again. `submit` hands every
queued read to the kernel and returns those it refused, with -errno (their slots are free
again). `collect` returns the completions that have arrived, (slot, result), the result the
kernel's byte count or -errno, and with `wait_s` waits up to that long for the first one.
`fileno` is an eventfd that becomes readable when completions wait. `close` waits for every read
in flight (io_destroy does) before it frees the context.
"""

from __future__ import annotations

import ctypes
import errno
import os

from awsomefsd.io.aio_abi import (
    IOCB_CMD_PREAD,
    IOCB_FLAG_RESFD,
    Iocb,
    IoEvent,
    Timespec,
    open_context,
)
from awsomefsd.io.device import aligned_buffer

__all__ = ["ReadBatch"]


class ReadBatch:
    """At most `slots` reads in flight, each with its slot number and buffer (the module docstring)."""

    def __init__(self, slots: int, buffer_bytes: int) -> None:
        self._sys, self._ctx, self._efd = open_context(slots)
        self._iocbs = (Iocb * slots)()
        for slot, iocb in enumerate(self._iocbs):
            iocb.aio_data, iocb.aio_lio_opcode = slot, IOCB_CMD_PREAD
            iocb.aio_flags, iocb.aio_resfd = IOCB_FLAG_RESFD, self._efd
        self._pointers = [ctypes.pointer(iocb) for iocb in self._iocbs]
        self._buffers = [memoryview(aligned_buffer(buffer_bytes)) for _ in range(slots)]
        self._addresses = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in self._buffers]
        self._submission = (ctypes.POINTER(Iocb) * slots)()
        self._events = (IoEvent * slots)()
        self._free = list(range(slots - 1, -1, -1))
        self._queued: list[int] = []
        self._in_flight = 0
        self._slots = slots

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Reads queued or submitted whose completion has not been collected."""
        return self._in_flight

    def fileno(self) -> int:
        return self._efd

    def buffer(self, slot: int) -> memoryview:
        return self._buffers[slot]

    def queue(self, fd: int, length: int, offset: int) -> int:
        """Queue a read of `length` bytes at `offset` of `fd` into a free slot's buffer; the slot."""
        slot = self._free.pop()
        iocb = self._iocbs[slot]
        iocb.aio_fildes, iocb.aio_buf, iocb.aio_nbytes, iocb.aio_offset = fd, self._addresses[slot], length, offset
        self._submission[len(self._queued)] = self._pointers[slot]
        self._queued.append(slot)
        self._in_flight += 1
        return slot

    def submit(self) -> list[tuple[int, int]]:
        """Hand every queued read to the kernel; those it refused, as (slot, -errno), slots freed.
        io_submit takes a prefix: what it did not take is refused with its error (EAGAIN when it
        took some and stopped)."""
        queued, self._queued = self._queued, []
        if not queued:
            return []
        try:
            taken = self._sys.call(self._sys.nr_submit, self._ctx, ctypes.c_long(len(queued)), self._submission)
            error = errno.EAGAIN
        except OSError as exc:  # the first refused (EAGAIN, EINVAL, EBADF): the rest with it
            taken, error = 0, exc.errno or errno.EIO
        refused = [(slot, -error) for slot in queued[taken:]]
        for slot, _ in refused:
            self._release(slot)
        return refused

    def collect(self, wait_s: float = 0.0) -> list[tuple[int, int]]:
        """The completions that have arrived, (slot, result); with `wait_s`, wait up to that long
        for the first when none has."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        if not self._in_flight:
            return []
        least = 1 if wait_s > 0 else 0
        whole = int(wait_s)
        timeout = Timespec(whole, int((wait_s - whole) * 1e9))
        got = self._sys.call(self._sys.nr_getevents, self._ctx, ctypes.c_long(least), ctypes.c_long(self._slots),
                             self._events, ctypes.byref(timeout))
        done = []
        for event in self._events[:got]:
            slot = int(event.data)
            done.append((slot, int(event.res)))
            self._release(slot)
        return done

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        self._in_flight -= 1

    def close(self) -> None:
        """Free the context; io_destroy waits for the reads still in flight first."""
        if self._efd < 0:
            return
        self._sys.call(self._sys.nr_destroy, self._ctx)
        os.close(self._efd)
        self._efd = -1
