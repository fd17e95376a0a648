"""A read worker process (`awsomefsd fuse-worker SPEC`, started by fuse/kernel/workers.py).

One thread, no event loop: it waits (epoll) for requests on the worker's clone of the session's
descriptor and for device reads to complete. It reads every request waiting (the clone is
non-blocking), starts the device read of each READ of a cold file (fs/coldread.py prepares it;
native AIO, io/aio_batch.py: one io_submit for all of them) and sends anything else whole to the
proposer; each read's completion is verified and answered from its buffer. After a round that
took requests it looks for the next one a while before it sleeps (`_linger`). Four threads with
blocking reads did the same before and spent most of their CPU handing the GIL to each other
(design note 131). Without native AIO the reads are blocking, one at a time.

To stop (SIGTERM from the proposer: a hand-over; or the proposer died) the worker reads no more
requests, answers the reads it started and exits: 0 when the session ended (ENODEV) or after a
stop, 2 when the proposer is gone (after waiting as an orphan, workers.py says why), 1 after an
error (one line in the daemon's log; the proposer starts another).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from awsomefsd.fs.coldread import Answer, ColdReader, RunRead
from awsomefsd.fs.hotmap import HotView
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Op
from awsomefsd.fuse.kernel.session import CHANGES_DATA
from awsomefsd.fuse.kernel.workers import COUNTERS, MAX_WORKERS, WORKER_READ_MAX

REQUEST_BYTES = 1 << 20 | 1 << 13
"""A full 1 MiB WRITE and its headers."""
STOP_POLL_S = 0.05
SUBMIT_TOGETHER = 16
"""Reads queued at most before they go to the kernel (one io_submit, one doorbell of a virtio disk)."""
_HEAD = struct.Struct("<IQQ")
"""opcode, unique, nodeid: the in-header after its length."""
_READ_AT = struct.Struct("<QI")
"""offset, size: READ_IN after its file handle."""
_READ_AT_OFFSET = abi.IN_HEADER.size + 8
READ_REQUEST_BYTES = abi.IN_HEADER.size + abi.READ_IN.size
OUT_HEADER_BYTES = abi.OUT_HEADER.size
READ = int(Op.READ)


class _State:
    def __init__(self) -> None:
        self.stopping = False
        self.unmounted = False
        self.proposer_gone = False


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        return _serve(spec)
    except Exception as exc:  # one line in the daemon's log; the daemon starts another
        print(f"awsomefsd: read worker {spec.get('index')}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


def _serve(spec: dict[str, Any]) -> int:
    parent = spec["parent"]
    # Without a descriptor store the mount ends with the proposer, as it does without workers:
    # at once (SIGKILL: nothing to finish, the requests read are lost with the proposer anyway).
    _die_with_parent(signal.SIGTERM if spec["orphan_wait_s"] else signal.SIGKILL)
    state = _State()

    def on_stop(_signum: int, _frame: object) -> None:
        state.stopping = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the daemon's to handle
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if os.getppid() != parent:
        return 2
    sock = socket.socket(fileno=spec["sock"])
    counters = mmap.mmap(spec["counters"], COUNTERS.size * MAX_WORKERS)
    reader = ColdReader(Path(spec["meta"]), spec["device"], direct=spec["direct"], grace_s=spec["grace_s"],
                        hot=HotView(spec["hot"]))
    try:
        _Loop(spec["clone"], state, sock, counters, spec["index"] * COUNTERS.size, reader,
              busy_poll_s=spec.get("busy_poll_s", 0.0)).run()
    finally:
        reader.close()
    if state.unmounted:
        return 0
    if state.proposer_gone or os.getppid() != parent:
        _wait_as_orphan(spec["orphan_wait_s"])
        return 2
    return 0


class _Loop:
    """The worker's one loop (the module's docstring). `at`: where its R3 counters are;
    `busy_poll_s`: how long it looks for the next request before sleeping (`_linger`)."""

    def __init__(self, fd: int, state: _State, sock: socket.socket, counters: mmap.mmap, at: int,
                 reader: ColdReader, *, busy_poll_s: float = 0.0) -> None:
        self.fd, self.state, self.sock, self.counters, self.at = fd, state, sock, counters, at
        self.reader, self.batch = reader, reader.batch
        self.busy_poll_s = busy_poll_s
        self.took = 0
        """Requests taken since `_linger` last looked."""
        libc = ctypes.CDLL(None, use_errno=True)
        self._read = libc.read
        self._read.restype = ctypes.c_ssize_t
        self._read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self.request = bytearray(REQUEST_BYTES)
        self.address = ctypes.addressof((ctypes.c_char * REQUEST_BYTES).from_buffer(self.request))
        self.reading: dict[int, tuple[RunRead, int, bytes]] = {}
        """slot -> the read, its request's unique, the request (forwarded if the read fails)."""
        self.queued = 0

    def run(self) -> None:
        os.set_blocking(self.fd, False)
        poller = select.epoll()
        poller.register(self.fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        if self.batch is not None:
            poller.register(self.batch.fileno(), select.EPOLLIN)
        try:
            while not self.state.stopping:
                if self.batch is not None and not self.batch.free:
                    self._answer(self.batch.collect(STOP_POLL_S))  # room first
                    continue
                poller.poll(STOP_POLL_S)
                self._take_requests()
                if self.batch is not None:
                    self._answer(self.batch.collect())
                self._linger()
            while self.batch is not None and self.batch.in_flight:  # stopping: answer what was started
                self._answer(self.batch.collect(STOP_POLL_S))
        finally:
            poller.close()

    def _take_requests(self) -> None:
        """Every request waiting on the clone, while there is room for their reads."""
        batch = self.batch
        while not self.state.stopping and (batch is None or batch.free):
            n = self._read(self.fd, self.address, REQUEST_BYTES)
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.ENOENT):  # a signal; a request aborted while read
                    continue
                if err == errno.EAGAIN:
                    break
                if err == errno.ENODEV:
                    self.state.unmounted = self.state.stopping = True
                    break
                raise OSError(err, os.strerror(err))
            self._take(n)
        if batch is not None and self.queued:
            self._submit()

    def _linger(self) -> None:
        """After a round that took requests, while no device read is in flight (its completion
        wakes the loop anyway): look for the next request for up to `busy_poll_s`, again after
        each one found, before sleeping in epoll. A client that waits for each answer sends its
        next request soon after the proposer answered the one forwarded; a worker asleep makes it
        cost a wake-up in this VM besides the proposer's (design note 132: one process's creates
        with one worker went from 0.57-0.70x the daemon alone to 1.25x with the look)."""
        if not self.took or self.busy_poll_s <= 0:
            return
        until = time.perf_counter() + self.busy_poll_s
        while not self.state.stopping and (self.batch is None or not self.batch.in_flight) \
                and time.perf_counter() < until:
            self.took = 0
            self._take_requests()
            if self.took:
                until = time.perf_counter() + self.busy_poll_s
        self.took = 0

    def _take(self, n: int) -> None:
        self.took += 1
        request = self.request
        opcode, unique, nodeid = _HEAD.unpack_from(request, 4)
        if opcode == READ and n >= READ_REQUEST_BYTES:
            offset, size = _READ_AT.unpack_from(request, _READ_AT_OFFSET)
            if size <= WORKER_READ_MAX:
                planned = self.reader.prepare(nodeid, offset, size) if self.batch is not None \
                    else self.reader.read(nodeid, offset, size)
                if isinstance(planned, RunRead):
                    self._start(planned, unique, bytes(memoryview(request)[:n]))
                    return
                if planned is not None:  # answered without a device read of its own
                    self._send(unique, planned)
                    return
        self._forward(bytes(memoryview(request)[:n]), opcode, unique)

    def _start(self, planned: RunRead, unique: int, request: bytes) -> None:
        """Queue the device read of `planned` (submitted with the others read meanwhile)."""
        assert self.batch is not None
        slot = self.batch.queue(self.reader.fd, planned.length, planned.position)
        self.reading[slot] = (planned, unique, request)
        self.queued += 1
        if self.queued >= SUBMIT_TOGETHER:
            self._submit()

    def _submit(self) -> None:
        assert self.batch is not None
        self.queued = 0
        self._answer(self.batch.submit())  # refused: -errno, so forwarded

    def _answer(self, done: list[tuple[int, int]]) -> None:
        """Answer each read done (slot, the device's byte count or -errno), or forward its request."""
        assert self.batch is not None
        for slot, got in done:
            planned, unique, request = self.reading.pop(slot)
            out = self.reader.finish(planned, self.batch.buffer(slot), got)
            if out is None:
                self._forward(request, READ, unique)
            else:
                self._send(unique, out)

    def _send(self, unique: int, out: Answer) -> None:
        try:
            os.writev(self.fd, [abi.OUT_HEADER.pack(OUT_HEADER_BYTES + len(out), 0, unique), out])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):  # aborted, or the session ended
                raise
        struct.pack_into("=Q", self.counters, self.at + 16, self.reader.served)

    def _forward(self, data: bytes, opcode: int, unique: int) -> None:
        change = opcode in CHANGES_DATA
        if change:  # R3: the proposer orders reads after it; other requests need no order
            struct.pack_into("=Q", self.counters, self.at, unique)
        try:
            self.sock.send(data)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                # the request stays in this clone's queue for the next daemon's RESEND
                self.state.proposer_gone = self.state.stopping = True
                return
            print(f"awsomefsd: a read worker cannot forward a request of {len(data)} bytes: {exc.strerror}",
                  file=sys.stderr, flush=True)
            os.write(self.fd, abi.error_reply(unique, errno.EIO))
        if change:
            struct.pack_into("=Q", self.counters, self.at + 8, unique)


def _die_with_parent(signum: int) -> None:
    """`signum` when the proposer exits (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG


def _wait_as_orphan(wait_s: float) -> None:
    """Keep the clone (and what this worker read) until the next daemon ends this process after its
    RESEND, or `wait_s` passed: closing it earlier would fail those requests."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
