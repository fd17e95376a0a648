"""A minimal io_uring over ctypes: io_uring_setup and io_uring_enter as raw syscalls, the rings
mmap'ed into this process.

Why not a binding from PyPI: the maintained ones (liburing's Python wrappers) compile against
liburing, and none exposes 128-byte submission entries with IORING_OP_URING_CMD's `cmd` area,
which FUSE over io_uring needs; the transport needs three syscalls and two shared rings, which
fit here without a new compiled dependency (docs/fuse-transport.md, FUSE over io_uring).

Only what the FUSE ring (fuse_ring.py) uses is here: IORING_SETUP_SQE128 entries, submission of
prepared entries, and reaping of completions. IORING_SETUP_COOP_TASKRUN: the kernel hands a
request to an entry as work run in this thread's context; without it, it interrupts the thread
for that (an IPI while it runs Python); with it, the work runs at this thread's next syscall,
and a sleeping thread is still woken. One thread (the trio thread) prepares, submits
and reaps: nothing here is thread-safe. The submission tail is published by io_uring_enter
(a syscall on this thread), and completions are read after the ring's descriptor polled
readable, so the kernel's stores are visible by then on every architecture.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import struct

NR_IO_URING_SETUP = 425
NR_IO_URING_ENTER = 426
"""The same numbers on every architecture since Linux 5.1 (asm-generic and x86_64 agree)."""

SETUP_CQSIZE = 1 << 3
SETUP_COOP_TASKRUN = 1 << 8
SETUP_SQE128 = 1 << 10
ENTER_GETEVENTS = 1 << 0
FEAT_SINGLE_MMAP = 1 << 0
OFF_SQ_RING = 0
OFF_CQ_RING = 0x8000000
OFF_SQES = 0x10000000
OP_URING_CMD = 46
SQE_SIZE = 128
CQE = struct.Struct("<QiI")  # user_data, res, flags
SQE_HEAD = struct.Struct("<BBHiIIQII")  # opcode, flags, ioprio, fd, cmd_op, pad, addr, len, op_flags
USER_DATA = struct.Struct("<Q")
CMD_OFFSET = 48
"""Where an IORING_OP_URING_CMD's own bytes begin in its (128-byte) entry."""

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SqOffsets(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")] + \
               [("resv2", ctypes.c_uint64)]


class _CqOffsets(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")] + \
               [("resv2", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", _SqOffsets), ("cq_off", _CqOffsets)]


class RingUnavailable(OSError):
    """This kernel (or its seccomp policy, or io_uring_disabled) gives no io_uring."""


def _u32(buf: mmap.mmap, offset: int) -> ctypes.c_uint32:
    return ctypes.c_uint32.from_buffer(buf, offset)


class Ring:
    """One io_uring instance with 128-byte submission entries. `entries` submission slots; the
    completion ring is twice as large, so completions cannot overflow while every slot is used."""

    def __init__(self, entries: int) -> None:
        params = _Params()
        params.flags = SETUP_SQE128 | SETUP_CQSIZE | SETUP_COOP_TASKRUN
        params.cq_entries = entries * 2
        fd = _libc.syscall(NR_IO_URING_SETUP, ctypes.c_uint(entries), ctypes.byref(params))
        if fd < 0:
            err = ctypes.get_errno()
            raise RingUnavailable(err, f"io_uring_setup: {os.strerror(err)}")
        self.fd = int(fd)
        try:
            sq, cq = params.sq_off, params.cq_off
            sq_size = sq.array + params.sq_entries * 4
            cq_size = cq.cqes + params.cq_entries * CQE.size
            if params.features & FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
            self._sq_map = mmap.mmap(self.fd, sq_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=OFF_SQ_RING)
            self._cq_map = self._sq_map if params.features & FEAT_SINGLE_MMAP else mmap.mmap(
                self.fd, cq_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=OFF_CQ_RING)
            self._sqes = mmap.mmap(self.fd, params.sq_entries * SQE_SIZE, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        self.sq_entries = params.sq_entries
        self._sq_tail = _u32(self._sq_map, sq.tail)
        self._sq_head = _u32(self._sq_map, sq.head)
        self._sq_mask = _u32(self._sq_map, sq.ring_mask).value
        self._sq_array = (ctypes.c_uint32 * params.sq_entries).from_buffer(self._sq_map, sq.array)
        self._cq_head = _u32(self._cq_map, cq.head)
        self._cq_tail = _u32(self._cq_map, cq.tail)
        self._cq_mask = _u32(self._cq_map, cq.ring_mask).value
        self._cqes = cq.cqes
        self._blank = bytes(SQE_SIZE)
        self.pending = 0
        """Entries prepared and not yet submitted."""

    def prepare_uring_cmd(self, fd: int, cmd_op: int, user_data: int, cmd: bytes, addr: int = 0,
                          length: int = 0) -> None:
        """An IORING_OP_URING_CMD on `fd` with `cmd` (at most 80 bytes) as its command area;
        `submit` sends it. The ring must have a free slot (the FUSE ring never has more entries
        outstanding in submission than it has ring entries)."""
        tail = self._sq_tail.value
        if tail - self._sq_head.value >= self.sq_entries:
            self.submit()  # the kernel consumes every submitted entry at once (no SQPOLL)
        index = tail & self._sq_mask
        offset = index * SQE_SIZE
        sqes = self._sqes
        sqes[offset:offset + SQE_SIZE] = self._blank
        SQE_HEAD.pack_into(sqes, offset, OP_URING_CMD, 0, 0, fd, cmd_op, 0, addr, length, 0)
        USER_DATA.pack_into(sqes, offset + 32, user_data)
        sqes[offset + CMD_OFFSET:offset + CMD_OFFSET + len(cmd)] = cmd
        self._sq_array[index] = index
        self._sq_tail.value = (tail + 1) & 0xFFFFFFFF
        self.pending += 1

    def submit(self) -> None:
        """Hand every prepared entry to the kernel. A FUSE command is executed right here (a
        commit answers its request and may deliver the next as a completion)."""
        while self.pending:
            done = _libc.syscall(NR_IO_URING_ENTER, ctypes.c_uint(self.fd), ctypes.c_uint(self.pending),
                                 ctypes.c_uint(0), ctypes.c_uint(0), None, ctypes.c_size_t(0))
            if done < 0:
                err = ctypes.get_errno()
                if err in (4, 11):  # EINTR, EAGAIN: try again
                    continue
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            self.pending -= int(done)

    def flush_work(self) -> None:
        """Let the kernel run this task's pending io_uring work (completions it posts from our
        own context), without waiting for any."""
        _libc.syscall(NR_IO_URING_ENTER, ctypes.c_uint(self.fd), ctypes.c_uint(0), ctypes.c_uint(0),
                      ctypes.c_uint(ENTER_GETEVENTS), None, ctypes.c_size_t(0))

    def completions(self) -> list[tuple[int, int]]:
        """Every completion posted so far, as (user_data, result), oldest first."""
        head = self._cq_head.value
        tail = self._cq_tail.value
        if head == tail:
            return []
        out = []
        cq, mask, base, unpack = self._cq_map, self._cq_mask, self._cqes, CQE.unpack_from
        while head != tail:
            user_data, res, _flags = unpack(cq, base + (head & mask) * CQE.size)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self._cq_head.value = head
        return out

    def close(self) -> None:
        """Close the ring: the kernel cancels every command still waiting in it."""
        if self.fd < 0:
            return
        del self._sq_tail, self._sq_head, self._sq_array, self._cq_head, self._cq_tail
        for buf in {id(m): m for m in (self._sq_map, self._cq_map, self._sqes)}.values():
            buf.close()
        os.close(self.fd)
        self.fd = -1
