"""Read workers: processes that read the session's requests from cloned /dev/fuse descriptors,
answer reads of cold files themselves and forward everything else to this daemon (the proposer).
docs/multicore.md is the design; this is its step 1, behind `[mount] read_workers`.

- **Spawning.** The proposer clones the session's descriptor (`FUSE_DEV_IOC_CLONE`) for each
  worker and keeps a copy: the kernel takes an answer only on the descriptor that read the
  request, and with the copy the proposer writes the answers to forwarded requests itself, so a
  worker never waits for the proposer. A worker is `awsomefsd fuse-worker` (the same program:
  an interpreter, or the compiled binary), given the clone, one end of a SEQPACKET socket pair,
  the hot map (fs/hotmap.py) and the R3 counters.
- **A worker** (fuse/kernel/worker_loop.py) is one thread without an event loop: it reads every
  request waiting on its clone, starts the device reads of READs of cold files together (native
  AIO) and answers each from LMDB and the device as it completes (fs/coldread.py); anything else
  is sent whole to the proposer. It stops at ENODEV (unmounted: exit 0) or when told (SIGTERM:
  it answers the reads it started, then exits).
- **R3, order.** The proposer takes what workers forward one drain at a time (the task watching
  the socket that became readable drains every socket, then looks again for a while before it
  sleeps), orders what it got by `unique` (the kernel's queue order) and, before a READ or
  LSEEK with unique u, waits for every worker that read a change (WRITE, SETATTR, FALLOCATE)
  before u and has not handed it over (`last_read`, `last_handed`, published in shared memory):
  the changes the kernel sent before the read are then in `ChangesInFlight`, which makes the read
  wait for them. (Not covered: the instant between a worker's read() returning and its storing
  the unique.)
- **R6, a worker dies.** Its forwarded requests are the proposer's already; once they are
  answered the proposer closes its copy of the clone, and the kernel ends the requests the
  dead worker was reading itself with ECONNABORTED (reads only: nothing is lost). No RESEND:
  it would replay requests the other readers are serving. A new worker starts.
- **The proposer dies.** A worker notices (PR_SET_PDEATHSIG) and stops reading, but keeps its
  clone open (requests it forwarded are in its clone's queue) until the next daemon has asked
  the kernel to send those again (FUSE_NOTIFY_RESEND covers every clone) and ends it
  (`end_orphans`), or `ORPHAN_WAIT_S` passed. Without a descriptor store no daemon continues
  the mount: the kernel kills the workers with the proposer, and the mount ends as it does
  without them (a request a worker had read fails with ECONNABORTED, like any in flight).
- **A hand-over** stops the workers first: each finishes its request, the dispatcher drains
  their sockets, the session answers everything; the next daemon starts its own workers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from awsomefsd.fs.coldread import MAX_READ_BYTES
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Op
from awsomefsd.fuse.kernel.session import READS_DATA
from awsomefsd.program import own_command

if TYPE_CHECKING:
    from awsomefsd.config import Settings

log = logging.getLogger(__name__)

FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
SO_SNDBUFFORCE = 32
MAX_MESSAGE = 1 << 21
"""A forwarded request: up to 1 MiB of WRITE data and its headers."""
COUNTERS = struct.Struct("=QQQ")  # a worker's last change read (unique), last handed over, reads served
MAX_WORKERS = 64
WORKER_READ_MAX = MAX_READ_BYTES
"""Larger READs (sequential reads, read-ahead) are forwarded: they are the proposer's, whose reads
of large runs go to threads; measured when workers read with one thread each, sequential 1 MiB
reads fell to 0.58x with every READ served by two workers."""
ORPHAN_WAIT_S = 120.0
DEAD_WORKER_ANSWERS_S = 10.0
"""How long a dead worker's forwarded requests may take before its clone is closed anyway."""
R3_WAIT_S = 0.05
RESTART_PAUSE_S = 0.5
MAX_RESTART_PAUSE_S = 30.0
"""A worker that keeps dying early (it cannot open the metadata, say) is restarted ever more slowly."""
STOP_DEADLINE_S = 5.0
PIDS_FILE = "fuse-workers"
WORKER_COMMAND = "fuse-worker"
NO_ANSWER = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})

Answer = Callable[[list[Any]], None]
Dispatch = Callable[[bytes, Answer], Awaitable[None] | None]
"""The session's entry for a forwarded request: serves it (a task, or awaited inline)."""


@dataclass(frozen=True)
class WorkerConfig:
    """What `[mount] read_workers` needs: how many, and where the committed state is."""

    count: int
    meta_path: Path
    device_path: str
    direct: bool
    grace_s: float


def worker_config(settings: Settings) -> WorkerConfig | None:
    """`[mount] read_workers` as the kernel transport uses it; None when off, or where step 1 does
    not apply (logged): only the local log commits to LMDB what a worker may read."""
    count = settings.mount.read_workers
    if not count or settings.mount.transport != "kernel" or settings.device.path is None:
        return None
    if settings.meta.log != "local":
        log.warning("[mount] read_workers applies to a single node with the local metadata log: ignored")
        return None
    return WorkerConfig(count, settings.node.state_dir / "meta", str(settings.device.path), settings.device.direct_io,
                        settings.data.delayed_free_ms / 1000)


def clone(session_fd: int) -> int:
    """A new /dev/fuse descriptor reading the same session's requests."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("I", session_fd))
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    clone: int
    started: float = 0.0
    pending: int = 0
    """Forwarded requests taken and not answered yet."""
    answered: trio.Event | None = None

    def answer(self, parts: list[Any]) -> None:
        try:
            os.writev(self.clone, parts)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.error("FUSE: the kernel refused an answer through read worker %d: %s", self.index, exc)
        self.pending -= 1
        if self.pending == 0 and self.answered is not None:
            self.answered.set()


class WorkerPool:
    """The proposer's side: starts, feeds on, restarts and stops the workers of one session."""

    def __init__(self, config: WorkerConfig, session_fd: int, hot_fd: int, *, kept: bool,
                 state_dir: Path | None, busy_poll_s: float = 0.0) -> None:
        """`busy_poll_s`: how long to look for the next forwarded request before sleeping (`_linger`)."""
        self.config = config
        self.busy_poll_s = busy_poll_s
        self.session_fd = session_fd
        self.hot_fd = hot_fd
        self.kept = kept
        self.state_dir = state_dir
        self.counters_fd = os.memfd_create("awsomefs-r3", os.MFD_CLOEXEC)
        os.ftruncate(self.counters_fd, COUNTERS.size * MAX_WORKERS)
        self._counters = mmap.mmap(self.counters_fd, COUNTERS.size * MAX_WORKERS)
        self.workers: dict[int, Worker] = {}
        self._stop = trio.Event()
        self._draining = trio.Lock()
        self._lingering = False  # a watcher is looking for the next request (`_linger`)
        self.ended = False
        self.restarts = 0
        self._pause = RESTART_PAUSE_S / 2
        self.forwarded = 0
        self._served_before: dict[int, int] = {}  # per worker index, by the processes before the running one
        self._forwarded_by: dict[int, int] = {}  # per worker index

    # -- starting --------------------------------------------------------------------------------
    def _start(self, index: int) -> Worker:
        fd = clone(self.session_fd)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (mine, theirs):
            try:  # root may pass net.core.wmem_max (212,992 bytes by default: less than a 1 MiB WRITE)
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, MAX_MESSAGE * 2)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE * 2)
        self._served_before[index] = self._served_before.get(index, 0) + self.served_by(index)
        COUNTERS.pack_into(self._counters, index * COUNTERS.size, 0, 0, 0)
        spec = {"clone": fd, "sock": theirs.fileno(), "hot": self.hot_fd, "counters": self.counters_fd,
                "index": index, "meta": str(self.config.meta_path), "device": self.config.device_path,
                "direct": self.config.direct, "grace_s": self.config.grace_s, "parent": os.getpid(),
                "busy_poll_s": self.busy_poll_s,
                "orphan_wait_s": ORPHAN_WAIT_S if self.kept else 0.0}
        try:
            proc = subprocess.Popen([*own_command(), WORKER_COMMAND, json.dumps(spec)], cwd="/",
                                    pass_fds=(fd, theirs.fileno(), self.hot_fd, self.counters_fd))
        except BaseException:
            os.close(fd)
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        worker = Worker(index, proc, mine, fd, started=time.monotonic())
        self.workers[index] = worker
        self._write_pids()
        return worker

    def _write_pids(self) -> None:
        """Where the next daemon finds the workers a crash of this one leaves (`end_orphans`)."""
        if self.state_dir is not None:
            pids = " ".join(str(w.proc.pid) for w in self.workers.values())
            (self.state_dir / PIDS_FILE).write_text(pids + "\n")

    # -- serving ---------------------------------------------------------------------------------
    async def serve(self, dispatch: Dispatch) -> None:
        """Start the workers and serve what they forward until the session ends (a worker saw
        ENODEV) or `stop` (then every worker has exited and all it forwarded is dispatched)."""
        self._stop = trio.Event()
        self._close_workers()  # a hand-over called off: those before have exited, all answered
        try:
            async with trio.open_nursery() as nursery:
                for index in range(self.config.count):
                    self._start(index)
                for worker in list(self.workers.values()):
                    nursery.start_soon(self._watch, worker, dispatch, nursery)
                await self._stop.wait()
                for worker in self.workers.values():
                    if worker.proc.poll() is None:
                        worker.proc.send_signal(signal.SIGTERM)
                for worker in list(self.workers.values()):
                    await trio.to_thread.run_sync(worker.proc.wait)
                await self._drain(dispatch)
                nursery.cancel_scope.cancel()
        finally:
            log.info("read workers: %d reads served by them, %d requests forwarded, %d restarts",
                     self.reads_served(), self.forwarded, self.restarts)

    def served_by(self, index: int) -> int:
        return int(COUNTERS.unpack_from(self._counters, index * COUNTERS.size)[2])

    def per_worker(self) -> list[tuple[int, int, int]]:
        """(index, reads it served, requests it forwarded) per worker since the pool began, the
        processes a restart replaced included (the metrics endpoint: any thread)."""
        return [(index, self._served_before.get(index, 0) + self.served_by(index), self._forwarded_by.get(index, 0))
                for index in range(self.config.count)]

    def reads_served(self) -> int:
        """Reads the workers answered themselves, since the pool began."""
        return sum(served for _index, served, _forwarded in self.per_worker())

    def stop(self) -> None:
        """Stop the workers (a hand-over, or the session ended): `serve` returns once they exited."""
        self._stop.set()

    async def _watch(self, worker: Worker, dispatch: Dispatch, nursery: trio.Nursery) -> None:
        """Serve what the worker forwards (`_drain`: every worker's, in the kernel's order), then
        look for more a little while before sleeping (`_linger`); when it exits, end or replace it."""
        while True:
            try:
                await trio.lowlevel.wait_readable(worker.sock)
                ended = worker.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                continue  # another worker's watcher drained it meanwhile
            except OSError:
                return
            if not ended:
                await self._drain(dispatch)
                await self._linger(dispatch)
                continue
            await trio.to_thread.run_sync(worker.proc.wait)
            await self._drain(dispatch)  # everything it forwarded
            if self._stop.is_set():
                return
            status = worker.proc.returncode
            if status == 0:  # ENODEV: the filesystem was unmounted
                self.ended = True
                self._stop.set()
                return
            log.error("read worker %d (pid %d) exited with status %s: requests it was reading itself fail "
                      "(ECONNABORTED); starting another", worker.index, worker.proc.pid, status)
            await self._retire(worker)
            self.restarts += 1
            early = time.monotonic() - worker.started < MAX_RESTART_PAUSE_S
            self._pause = min(self._pause * 2, MAX_RESTART_PAUSE_S) if early else RESTART_PAUSE_S
            await trio.sleep(self._pause)
            if self._stop.is_set():
                return
            nursery.start_soon(self._watch, self._start(worker.index), dispatch, nursery)
            return

    async def _retire(self, worker: Worker) -> None:
        """Close the proposer's copy of a dead worker's clone once its forwarded requests are
        answered: the kernel then ends what the worker was reading itself (R6)."""
        worker.sock.close()
        if worker.pending:
            worker.answered = trio.Event()
            with trio.move_on_after(DEAD_WORKER_ANSWERS_S):
                await worker.answered.wait()
        os.close(worker.clone)
        worker.clone = -1

    async def _linger(self, dispatch: Dispatch) -> None:
        """After a drain, while nothing forwarded waits for its answer: look for the next request
        for up to `busy_poll_s`, passing through trio's scheduler between looks, before going back
        to sleep. A client that waits for each answer sends its next request within tens of
        microseconds; a proposer asleep in epoll makes each cost a wake-up besides the worker's
        (the session's busy poll, fuse/kernel/busypoll.py, says why that matters in a VM). One
        look at a time: each drains every worker's socket, so a second watcher's would only
        repeat it."""
        if self._lingering:
            return
        self._lingering = True
        try:
            until = time.perf_counter() + self.busy_poll_s
            while time.perf_counter() < until and not any(w.pending for w in self.workers.values()):
                await trio.lowlevel.checkpoint()
                if await self._drain(dispatch):
                    until = time.perf_counter() + self.busy_poll_s
        finally:
            self._lingering = False

    def _received(self) -> list[tuple[int, bytes, Worker]]:
        """Every message queued now on every worker's socket, in the kernel's order (`unique`)."""
        got = []
        for worker in self.workers.values():
            if worker.sock.fileno() < 0:
                continue
            while True:
                try:
                    data = worker.sock.recv(MAX_MESSAGE)
                except (BlockingIOError, OSError):
                    break
                if not data:
                    break
                if len(data) < abi.IN_HEADER.size:  # the kernel sends none; nothing to answer
                    continue
                got.append((abi.IN_HEADER.unpack_from(data)[2], data, worker))
        got.sort(key=lambda item: item[0])
        return got

    async def _drain(self, dispatch: Dispatch) -> int:
        """Dispatch everything forwarded until none is queued; how many requests that was."""
        async with self._draining:  # one at a time: what is dispatched keeps the kernel's order
            return await self._drain_now(dispatch)

    async def _drain_now(self, dispatch: Dispatch) -> int:
        dispatched = 0
        while True:
            batch = self._received()
            if not batch:
                return dispatched
            dispatched += len(batch)
            for i, (unique, data, worker) in enumerate(batch):
                opcode = abi.IN_HEADER.unpack_from(data)[1]
                if opcode in READS_DATA and await self._wait_earlier(unique, worker):
                    rest = batch[i:] + self._received()  # an earlier change arrived: order again
                    rest.sort(key=lambda item: item[0])
                    batch[i:] = rest
                    unique, data, worker = batch[i]
                self.forwarded += 1
                self._forwarded_by[worker.index] = self._forwarded_by.get(worker.index, 0) + 1
                if abi.IN_HEADER.unpack_from(data)[1] not in NO_ANSWER:
                    worker.pending += 1
                pending = dispatch(data, worker.answer)
                if pending is not None:
                    await pending

    async def _wait_earlier(self, unique: int, sender: Worker) -> bool:
        """R3: wait until no other worker holds a change (a WRITE, SETATTR or FALLOCATE) read
        before `unique` and not handed over; True if one was waited for (it may be queued now)."""
        waited = False
        deadline = trio.current_time() + R3_WAIT_S
        while True:
            holding = False
            for worker in self.workers.values():
                if worker is sender or worker.proc.poll() is not None:
                    continue
                last_read, last_handed, _ = COUNTERS.unpack_from(self._counters, worker.index * COUNTERS.size)
                if last_read != last_handed and last_read < unique:
                    holding = True
            if not holding or trio.current_time() > deadline:
                return waited
            await trio.sleep(1e-4 if waited else 0)
            waited = True

    def _close_workers(self) -> None:
        for worker in self.workers.values():
            if worker.clone >= 0:
                os.close(worker.clone)
                worker.clone = -1
            worker.sock.close()
        self.workers.clear()

    def close(self) -> None:
        """Let go of the clones' copies (after the session answered everything) and the counters.
        Workers still running (the daemon stops, the mount may live on lazily while files are
        open) are stopped first: none may go on reading for a proposer that is gone."""
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers.values():
            try:
                worker.proc.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        self._close_workers()
        if self.state_dir is not None:
            (self.state_dir / PIDS_FILE).unlink(missing_ok=True)
        self._counters.close()
        os.close(self.counters_fd)


def end_orphans(state_dir: Path) -> int:
    """After a crash of the daemon before and the RESEND of what it had read: end the workers it
    left (they kept their clones open so that RESEND reaches what they had read). Only processes
    that are `awsomefsd fuse-worker` are signalled (a pid may have been reused)."""
    path = state_dir / PIDS_FILE
    try:
        pids = [int(p) for p in path.read_text().split()]
    except (OSError, ValueError):
        return 0
    ended = 0
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if WORKER_COMMAND.encode() in cmdline:
            try:
                os.kill(pid, signal.SIGTERM)
                ended += 1
            except OSError:
                pass
    path.unlink(missing_ok=True)
    return ended
