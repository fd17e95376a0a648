"""A read worker process (`awsomefsd fuse-worker SPEC`, started by fuse/kernel/workers.py).

One thread, no event loop: it waits (epoll) for the READs the proposer hands it over a SEQPACKET
socket (a message holds one request or several, each as the kernel gave it) and for device reads
to complete. It takes every message waiting, starts the device read of each READ of a cold file
(fs/coldread.py prepares it; native AIO, io/aio_batch.py: one io_submit for all of them), answers
each from its buffer once its completion is verified, on its copy of the session's descriptor (the
proposer's, which read the request: the kernel takes an answer on the descriptor that read it),
and sends back whole what it cannot serve. After a round that took requests it looks for the next
one a while before it sleeps (`_linger`). Four threads with blocking reads did the same before and
spent most of their CPU handing the GIL to each other (design note 131). Without native AIO the
reads are blocking, one at a time.

What it holds is published in shared memory for the proposer (`COUNTERS`: requests taken, the
oldest unique still held, reads served): a worker that dies leaves the proposer the requests it
took and did not answer, and those it never took (workers.py, R6).

To stop (SIGTERM from the proposer: a hand-over, the session ended) the worker takes no more
requests, answers the reads it started and exits 0; it exits 2 when the proposer is gone (its end
of the socket closed), 1 after an error (one line in the daemon's log; the proposer starts
another). It dies with the proposer (PR_SET_PDEATHSIG): what it held is the proposer's descriptor's,
which the next daemon has the kernel send again.
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
from awsomefsd.fuse.kernel.workers import (
    COUNTERS,
    HAND_TOGETHER,
    MAX_WORKERS,
    NONE_HELD,
    READ_AT,
    READ_AT_OFFSET,
    READ_REQUEST_BYTES,
    WORKER_READ_MAX,
)

MESSAGE_BYTES = 1 << 16
"""A message of handed READs (workers.HAND_TOGETHER of them at most, 80 bytes each)."""
STOP_POLL_S = 0.05
SUBMIT_TOGETHER = 16
"""Reads queued at most before they go to the kernel (one io_submit, one doorbell of a virtio disk)."""
_LENGTH = struct.Struct("<I")
_HEAD = struct.Struct("<IQQ")
"""opcode, unique, nodeid: the in-header after its length."""
OUT_HEADER_BYTES = abi.OUT_HEADER.size
READ = int(Op.READ)


class _State:
    def __init__(self) -> None:
        self.stopping = False
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
    _die_with_parent()
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
        _Loop(spec["fuse"], state, sock, counters, spec["index"] * COUNTERS.size, reader,
              busy_poll_s=spec.get("busy_poll_s", 0.0)).run()
    finally:
        reader.close()
    return 2 if state.proposer_gone or os.getppid() != parent else 0


class _Loop:
    """The worker's one loop (the module's docstring). `fd`: where answers go (the session's
    descriptor); `sock`: the proposer's handed READs come in and what is not served goes back;
    `at`: where its counters are; `busy_poll_s`: how long it looks for the next request before
    sleeping (`_linger`)."""

    def __init__(self, fd: int, state: _State, sock: socket.socket, counters: mmap.mmap, at: int,
                 reader: ColdReader, *, busy_poll_s: float = 0.0) -> None:
        self.fd, self.state, self.sock, self.counters, self.at = fd, state, sock, counters, at
        self.reader, self.batch = reader, reader.batch
        self.busy_poll_s = busy_poll_s
        self.took = 0
        """Requests taken since `_linger` last looked."""
        self.taken = 0
        """Requests taken since the worker started (published: `COUNTERS`)."""
        self.message = bytearray(MESSAGE_BYTES)
        self.reading: dict[int, tuple[RunRead, int, bytes]] = {}
        """slot -> the read, its request's unique, the request (sent back if the read fails)."""
        self.queued = 0

    def run(self) -> None:
        poller = select.epoll()
        poller.register(self.sock.fileno(), select.EPOLLIN)
        if self.batch is not None:
            poller.register(self.batch.fileno(), select.EPOLLIN)
        try:
            while not self.state.stopping:
                if self.batch is not None and self.batch.free < HAND_TOGETHER:
                    self._answer(self.batch.collect(STOP_POLL_S))  # room for a message's reads first
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
        """Every message waiting on the socket, while there is room for their reads."""
        batch = self.batch
        took = False
        while not self.state.stopping and (batch is None or batch.free >= HAND_TOGETHER):
            try:
                n = self.sock.recv_into(self.message, MESSAGE_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                n = 0
            if n == 0:  # the proposer closed its end
                self.state.proposer_gone = self.state.stopping = True
                break
            took = True
            self._take_message(n)
        if batch is not None and self.queued:
            self._submit()
        if took:
            self._publish()

    def _take_message(self, n: int) -> None:
        """The requests of one message, each as the kernel gave it (its length first)."""
        message = self.message
        at = 0
        while at + READ_REQUEST_BYTES <= n:
            (length,) = _LENGTH.unpack_from(message, at)
            if length < READ_REQUEST_BYTES or at + length > n:
                break  # the proposer sends whole READs only
            self._take(at, length)
            at += length

    def _linger(self) -> None:
        """After a round that took requests, once no device read is in flight (a completion wakes
        the loop anyway; the look waits for the round that answers it): look for the next request
        for up to `busy_poll_s`, again after each one found, before sleeping in epoll. A client
        that waits for each answer sends its next request soon after it got one; a worker asleep
        makes it cost a wake-up in this VM."""
        if not self.took or self.busy_poll_s <= 0:
            return
        until = time.perf_counter() + self.busy_poll_s
        while not self.state.stopping and time.perf_counter() < until:
            if self.batch is not None and self.batch.in_flight:
                return  # `took` stays: the round that answers looks
            self.took = 0
            self._take_requests()
            if self.took:
                until = time.perf_counter() + self.busy_poll_s
        self.took = 0

    def _take(self, at: int, n: int) -> None:
        self.took += 1
        self.taken += 1
        message = self.message
        opcode, unique, nodeid = _HEAD.unpack_from(message, at + 4)
        request = bytes(memoryview(message)[at : at + n])
        if opcode == READ:
            offset, size = READ_AT.unpack_from(message, at + READ_AT_OFFSET)
            if size <= WORKER_READ_MAX:
                planned = self.reader.prepare(nodeid, offset, size) if self.batch is not None \
                    else self.reader.read(nodeid, offset, size)
                if isinstance(planned, RunRead):
                    self._start(planned, unique, request)
                    return
                if planned is not None:  # answered without a device read of its own
                    self._send(unique, planned)
                    return
        self._give_back(request, unique)

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
        self._answer(self.batch.submit())  # refused: -errno, so sent back

    def _answer(self, done: list[tuple[int, int]]) -> None:
        """Answer each read done (slot, the device's byte count or -errno), or send its request back."""
        if not done:
            return
        assert self.batch is not None
        for slot, got in done:
            planned, unique, request = self.reading.pop(slot)
            out = self.reader.finish(planned, self.batch.buffer(slot), got)
            if out is None:
                self._give_back(request, unique)
            else:
                self._send(unique, out)
        self._publish()

    def _publish(self) -> None:
        """What this worker holds, for the proposer (R6): the oldest unique it has taken and not
        answered, then how many it has taken; the proposer reads them in the other order."""
        oldest = min((unique for _, unique, _ in self.reading.values()), default=NONE_HELD)
        struct.pack_into("=Q", self.counters, self.at + 8, oldest)
        struct.pack_into("=Q", self.counters, self.at, self.taken)
        struct.pack_into("=Q", self.counters, self.at + 16, self.reader.served)

    def _send(self, unique: int, out: Answer) -> None:
        try:
            os.writev(self.fd, [abi.OUT_HEADER.pack(OUT_HEADER_BYTES + len(out), 0, unique), out])
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):  # aborted, or the session ended
                raise

    def _give_back(self, request: bytes, unique: int) -> None:
        """A request this worker does not serve: the proposer's (its path reads and reports)."""
        try:
            self.sock.send(request)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                # the proposer is gone: the next daemon has the kernel send the request again
                self.state.proposer_gone = self.state.stopping = True
                return
            print(f"awsomefsd: a read worker cannot give back a request of {len(request)} bytes: {exc.strerror}",
                  file=sys.stderr, flush=True)
            os.write(self.fd, abi.error_reply(unique, errno.EIO))


def _die_with_parent() -> None:
    """SIGKILL when the proposer exits (PR_SET_PDEATHSIG): nothing to finish, what was taken is
    the proposer's descriptor's, sent again to the next daemon or failed with the mount."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
