"""Linux native AIO's kernel interface (linux/aio_abi.h) and its four system calls, through libc's
`syscall` with ctypes: what the trio reader (io/aio.py) and a read worker's batches
(io/aio_batch.py) both drive. No compiled dependency."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

__all__ = ["IOCB_CMD_PREAD", "IOCB_FLAG_RESFD", "AioUnavailableError", "IoEvent", "Iocb", "Syscalls", "Timespec",
           "open_context"]

# (io_setup, io_destroy, io_getevents, io_submit) per architecture (asm/unistd_64.h, asm-generic)
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
IOCB_CMD_PREAD = 0
IOCB_FLAG_RESFD = 1 << 0


class AioUnavailableError(OSError):
    """This kernel, architecture or process cannot use native AIO (the caller reads inline)."""


class Iocb(ctypes.Structure):
    """struct iocb (linux/aio_abi.h), little-endian layout."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


assert ctypes.sizeof(Iocb) == 64 and ctypes.sizeof(IoEvent) == 32


class Syscalls:
    """The raw system calls; errors come back as OSError."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or sys.byteorder != "little":
            raise AioUnavailableError(errno.ENOSYS, f"native AIO not wired for {platform.machine()}")
        self.nr_setup, self.nr_destroy, self.nr_getevents, self.nr_submit = numbers
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long

    def call(self, *args: object) -> int:
        while True:
            rc = int(self._syscall(*args))
            if rc >= 0:
                return rc
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))


def open_context(in_flight: int) -> tuple[Syscalls, ctypes.c_ulong, int]:
    """The system calls, a new AIO context for `in_flight` reads at a time and a non-blocking
    eventfd for the completions to signal (IOCB_FLAG_RESFD); AioUnavailableError (the caller
    reads without AIO) when this architecture, kernel or process cannot have a context."""
    if not 0 < in_flight <= 1024:
        raise ValueError(f"{in_flight} reads in flight: outside [1, 1024]")
    try:
        calls = Syscalls()
    except OSError as exc:
        raise AioUnavailableError(exc.errno, f"native AIO unavailable: {exc.strerror}") from None
    context = ctypes.c_ulong(0)
    try:
        calls.call(calls.nr_setup, ctypes.c_uint(in_flight), ctypes.byref(context))
    except OSError as exc:
        raise AioUnavailableError(exc.errno, f"io_setup: {exc.strerror}") from None
    try:
        completions = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    except OSError:
        calls.call(calls.nr_destroy, context)
        raise
    return calls, context, completions
