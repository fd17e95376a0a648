"""A read worker process (`awsomefsd fuse-worker SPEC`, started by fuse/kernel/workers.py).

`THREADS` reader threads share the worker's clone of the session's descriptor. Each loops: a
blocking read() of the clone (the kernel wakes one blocked reader per request), then a READ of a
cold file answered from LMDB and the device (fs/coldread.py), anything else sent whole to the
proposer. The GIL is released in every system call, so the threads' device reads overlap.

The reads go through libc (ctypes), not `os.readv`: Python retries a system call a signal
interrupted unless a handler raises, and handlers run only in the main thread, so a thread in
`os.readv` could never be told to stop. To stop (SIGTERM from the proposer: a hand-over; or the
proposer died), the main thread marks the worker stopping and interrupts each thread's read with
SIGUSR1 until every thread has ended; a read an interruption ends has taken no request, and a
thread that holds one finishes it first. The worker exits 0 when the session ended (ENODEV) or
after a stop, 2 when the proposer is gone (after waiting as an orphan, workers.py says why), 1
after an error (one line in the daemon's log; the proposer starts another).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Op
from awsomefsd.fuse.kernel.session import CHANGES_DATA
from awsomefsd.fuse.kernel.workers import COUNTERS, MAX_WORKERS, THREADS, WORKER_READ_MAX

REQUEST_BYTES = 1 << 20 | 1 << 13
"""A full 1 MiB WRITE and its headers."""
STOP_POLL_S = 0.05
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
        self.failed: str | None = None


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        return _serve(spec)
    except Exception as exc:  # one line in the daemon's log; the daemon starts another
        print(f"awsomefsd: read worker {spec.get('index')}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


def _serve(spec: dict[str, Any]) -> int:
    from awsomefsd.fs.coldread import ColdReader
    from awsomefsd.fs.hotmap import HotView

    parent = spec["parent"]
    # Without a descriptor store the mount ends with the proposer, as it does without workers:
    # at once (SIGKILL: nothing to finish, the requests read are lost with the proposer anyway).
    _die_with_parent(signal.SIGTERM if spec["orphan_wait_s"] else signal.SIGKILL)
    state = _State()

    def on_stop(_signum: int, _frame: object) -> None:
        state.stopping = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGUSR1, lambda *_: None)  # interrupts a thread's read() (no SA_RESTART)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the daemon's to handle
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if os.getppid() != parent:
        return 2
    sock = socket.socket(fileno=spec["sock"])
    counters = mmap.mmap(spec["counters"], COUNTERS.size * MAX_WORKERS * THREADS)
    hot = HotView(spec["hot"])
    first = ColdReader(Path(spec["meta"]), spec["device"], direct=spec["direct"], grace_s=spec["grace_s"], hot=hot)
    readers = [first, *(first.sibling() for _ in range(THREADS - 1))]
    threads = [threading.Thread(target=_reader, args=(spec, state, sock, counters, spec["index"] * THREADS + t, reader),
                                daemon=True) for t, reader in enumerate(readers)]
    for thread in threads:
        thread.start()
    while not state.stopping and all(t.is_alive() for t in threads):
        time.sleep(STOP_POLL_S)
    state.stopping = True
    while any(t.is_alive() for t in threads):
        for thread in threads:
            if thread.is_alive() and thread.ident is not None:
                signal.pthread_kill(thread.ident, signal.SIGUSR1)
        for thread in threads:
            thread.join(STOP_POLL_S)
    if state.failed is not None:
        print(f"awsomefsd: read worker {spec['index']}: {state.failed}", file=sys.stderr, flush=True)
        return 1
    if state.unmounted:
        return 0
    if state.proposer_gone or os.getppid() != parent:
        _wait_as_orphan(spec["orphan_wait_s"])
        return 2
    return 0


def _reader(spec: dict[str, Any], state: _State, sock: socket.socket, counters: mmap.mmap, slot: int,
            reader: Any) -> None:
    """One reader thread (see the module's docstring); `slot`: its R3 counters."""
    try:
        _read_loop(spec["clone"], state, sock, counters, slot * COUNTERS.size, reader)
    except Exception as exc:
        state.failed = f"{type(exc).__name__}: {exc}"
        state.stopping = True


def _read_loop(fd: int, state: _State, sock: socket.socket, counters: mmap.mmap, at: int, reader: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.read.restype = ctypes.c_ssize_t
    libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    request = bytearray(REQUEST_BYTES)
    address = ctypes.addressof((ctypes.c_char * REQUEST_BYTES).from_buffer(request))
    writev, pack_out, pack_into = os.writev, abi.OUT_HEADER.pack, struct.pack_into
    while not state.stopping:
        n = libc.read(fd, address, REQUEST_BYTES)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.ENOENT):  # told to stop (looked at above), or aborted
                continue
            if err == errno.ENODEV:
                state.unmounted = state.stopping = True
                return
            raise OSError(err, os.strerror(err))
        opcode, unique, nodeid = _HEAD.unpack_from(request, 4)
        if opcode == READ and n >= READ_REQUEST_BYTES:  # served here: the request is not copied
            offset, size = _READ_AT.unpack_from(request, _READ_AT_OFFSET)
            out = reader.read(nodeid, offset, size) if size <= WORKER_READ_MAX else None
            if out is not None:
                try:
                    writev(fd, [pack_out(OUT_HEADER_BYTES + len(out), 0, unique), out])
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENODEV):
                        raise
                pack_into("=Q", counters, at + 16, reader.served)
                continue
        data = bytes(memoryview(request)[:n])
        change = opcode in CHANGES_DATA
        if change:  # R3: the proposer orders reads after it; other requests need no order
            struct.pack_into("=Q", counters, at, unique)
        try:
            sock.send(data)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                # the request stays in this clone's queue for the next daemon's RESEND
                state.proposer_gone = state.stopping = True
                return
            print(f"awsomefsd: a read worker cannot forward a request of {len(data)} bytes: {exc.strerror}",
                  file=sys.stderr, flush=True)
            os.write(fd, abi.error_reply(unique, errno.EIO))
        if change:
            struct.pack_into("=Q", counters, at + 8, unique)


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
