"""Read workers: processes that serve the READs of cold files this daemon (the proposer) reads
and hands them, beside it, on the other cores. docs/multicore.md is the design; this is its step
1, behind `[mount] read_workers`.

- **Who reads the kernel.** The session reads every request itself, as without workers. A READ of
  at most `WORKER_READ_MAX` bytes of a file the hot map says is cold (fs/hotmap.py, R1), with no
  change to it in flight here (`ChangesInFlight`), is handed to a worker (`offer`), round robin;
  everything else the session serves itself. Before (design note 133), each worker read its own
  clone of the descriptor and forwarded all it could not serve: every metadata request then paid
  a hop through a worker (creates 0.57-0.70x the daemon alone), and reads had to be ordered after
  changes other workers held (R3, counters and waits). Now the kernel's order is the session's.
- **Spawning.** A worker is `awsomefsd fuse-worker` (the same program: an interpreter, or the
  compiled binary), given the session's descriptor (it writes its answers there: the kernel takes
  an answer on the descriptor that read the request), one end of a SEQPACKET socket pair, the hot
  map and its counters.
- **A worker** (fuse/kernel/worker_loop.py) is one thread without an event loop: it takes the
  handed READs from the socket, starts their device reads together (native AIO) and answers each
  from LMDB and the device as it completes (fs/coldread.py); one it cannot serve (hot by its
  second look, a checksum mismatch, a tiered block) it sends back, and the session serves it.
- **R6, a worker dies.** The requests it took are read from the proposer's descriptor: the kernel
  ends none of them. The proposer keeps what it handed each worker until the worker's counters
  (`COUNTERS`: requests taken, the oldest still held) say it is answered; when the worker dies,
  what it sent back is served, then every request it may not have answered is served again by the
  session (an answer the worker did give makes the kernel refuse the second one: ENOENT, dropped).
  A new worker starts.
- **The proposer dies.** Its workers die with it (PR_SET_PDEATHSIG, SIGKILL): what they held is
  the proposer's descriptor's, which the next daemon's RESEND covers (or the mount ends with it,
  without a descriptor store, as without workers).
- **A stop** (a hand-over, the session's end) stops the session reading first, then the workers:
  each answers the reads it started and exits; what they sent back and what they never answered
  is served by the session; the next daemon starts its own workers.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from awsomefsd.fs.coldread import MAX_READ_BYTES
from awsomefsd.fuse.kernel import abi
from awsomefsd.program import own_environment, running_command

if TYPE_CHECKING:
    from awsomefsd.config import Settings
    from awsomefsd.fs.hotmap import HotMap

log = logging.getLogger(__name__)

SO_SNDBUFFORCE = 32
SOCKET_BUFFER = 1 << 20
"""Each way of a worker's socket: handed READs (80 bytes each) and what comes back."""
MAX_MESSAGE = 1 << 16
COUNTERS = struct.Struct("=QQQ")
"""Per worker, in shared memory: requests taken, the oldest unique it holds (`NONE_HELD`), reads served."""
NONE_HELD = (1 << 64) - 1
_WORD = struct.Struct("=Q")
MAX_WORKERS = 64
WORKER_READ_MAX = MAX_READ_BYTES
"""Larger READs (sequential reads, read-ahead) stay the session's: they are the proposer's, whose reads
of large runs go to threads; measured when workers read with one thread each, sequential 1 MiB
reads fell to 0.58x with every READ served by two workers."""
DEFAULT_WORKERS = 1
"""Where `[mount] read_workers` is unset and more than one CPU is there: on 2 cores a second worker
added nothing (design notes 131, 133)."""
HAND_TOGETHER = 16
"""READs handed to a worker in one message at most."""
READ_AT = struct.Struct("<QI")
"""offset, size: READ_IN after its file handle."""
READ_AT_OFFSET = abi.IN_HEADER.size + 8
READ_REQUEST_BYTES = abi.IN_HEADER.size + abi.READ_IN.size
PRUNE_EVERY = 64
"""Handed requests between two looks at what a worker has answered (`_prune`)."""
DRAIN_LOOK_S = 0.0005
"""How often `drained` looks at the workers' counters (they tell the proposer nothing themselves)."""
RESTART_PAUSE_S = 0.5
MAX_RESTART_PAUSE_S = 30.0
"""A worker that keeps dying early (it cannot open the metadata, say) is restarted ever more slowly."""
STOP_DEADLINE_S = 5.0
"""How long a stopping worker is waited for before it is killed (one stopped with SIGSTOP, say)."""
STUCK_S = 10.0
"""A worker holding the same READ unanswered this long is stuck (stopped, or wedged): it is
killed, and the session serves what it held (R6) while another starts. The kernel itself never
times a FUSE request out, so without this an application's read would wait as long as the worker."""
PIDS_FILE = "fuse-workers"
WORKER_COMMAND = "fuse-worker"

Dispatch = Callable[[bytes], Awaitable[None] | None]
"""The session's entry for a request to serve itself (sent back, or not answered by a dead worker)."""


@dataclass(frozen=True)
class WorkerConfig:
    """What `[mount] read_workers` needs: how many, and where the committed state is."""

    count: int
    meta_path: Path
    device_path: str
    direct: bool
    grace_s: float
    asked: bool = True
    """Set in the configuration (False: the default): where workers do not apply, that is logged."""


def worker_config(settings: Settings) -> WorkerConfig | None:
    """`[mount] read_workers` as the kernel transport uses it; None when off, or where step 1 does
    not apply (logged when set): only the local log commits to LMDB what a worker may read. Unset:
    one worker where the daemon may use more than one CPU (on one, a worker only takes turns with
    the daemon)."""
    count = settings.mount.read_workers
    if count is None:
        count = DEFAULT_WORKERS if len(os.sched_getaffinity(0)) > 1 else 0
    elif settings.meta.log != "local" and count:
        log.warning("[mount] read_workers applies to a single node with the local metadata log: ignored")
    if not count or settings.mount.transport != "kernel" or settings.device.path is None \
            or settings.meta.log != "local":
        return None
    return WorkerConfig(count, settings.node.state_dir / "meta", str(settings.device.path), settings.device.direct_io,
                        settings.data.delayed_free_ms / 1000, asked=settings.mount.read_workers is not None)


def for_mount(config: WorkerConfig | None, *, single_node: bool) -> WorkerConfig | None:
    """`config` where the mount is a single node's (a cluster member's reads need its leases:
    docs/multicore.md, step 4); elsewhere None, logged only when the setting was asked for."""
    if config is None or single_node:
        return config
    if config.asked:
        log.warning("[mount] read_workers applies to a single node (docs/multicore.md, step 1): ignored")
    return None


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    started: float = 0.0
    alive: bool = True
    handed: deque[tuple[int, bytes]] = field(default_factory=deque)
    """(unique, request) handed to it and maybe not answered yet, in the order handed."""
    pruned: int = 0
    """Requests taken off the left of `handed` since the worker started."""
    outbox: list[bytes] = field(default_factory=list)
    """Requests offered and not sent yet (`flush`)."""
    oldest_seen: int | None = None
    oldest_since: float = 0.0
    """The oldest request it held at the last look for stuck workers, and since when (`_look_for_stuck`)."""


class WorkerPool:
    """The proposer's side: starts, hands READs to, restarts and stops the workers of one session."""

    def __init__(self, config: WorkerConfig, session_fd: int, hot: HotMap, *, state_dir: Path | None,
                 busy_poll_s: float = 0.0) -> None:
        """`busy_poll_s`: how long a worker looks for the next READ before sleeping (worker_loop.py)."""
        self.config = config
        self.busy_poll_s = busy_poll_s
        self.session_fd = session_fd
        self.hot = hot
        self.state_dir = state_dir
        self.counters_fd = os.memfd_create("awsomefs-workers", os.MFD_CLOEXEC)
        os.ftruncate(self.counters_fd, COUNTERS.size * MAX_WORKERS)
        self._counters = mmap.mmap(self.counters_fd, COUNTERS.size * MAX_WORKERS)
        self.workers: dict[int, Worker] = {}
        self._ready: list[Worker] = []
        """The live workers, in the order `offer` hands to them."""
        self._next = 0
        self._stop = trio.Event()
        self.restarts = 0
        self._pause = RESTART_PAUSE_S / 2
        self.handed = 0
        self.given_back = 0
        self.served_again = 0
        """Requests a dead or stopped worker may not have answered, served by the session."""
        self._served_before: dict[int, int] = {}  # per worker index, by the processes before the running one
        self._given_back_by: dict[int, int] = {}  # per worker index

    # -- starting --------------------------------------------------------------------------------
    def _start(self, index: int) -> Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (mine, theirs):
            try:  # root may pass net.core.wmem_max
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self._served_before[index] = self._served_before.get(index, 0) + self.served_by(index)
        COUNTERS.pack_into(self._counters, index * COUNTERS.size, 0, NONE_HELD, 0)
        spec = {"fuse": self.session_fd, "sock": theirs.fileno(), "hot": self.hot.fd, "counters": self.counters_fd,
                "index": index, "meta": str(self.config.meta_path), "device": self.config.device_path,
                "direct": self.config.direct, "grace_s": self.config.grace_s, "parent": os.getpid(),
                "busy_poll_s": self.busy_poll_s}
        try:
            proc = subprocess.Popen([*running_command(), WORKER_COMMAND, json.dumps(spec)], cwd="/", env=own_environment(),
                                    pass_fds=(self.session_fd, theirs.fileno(), self.hot.fd, self.counters_fd))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        worker = Worker(index, proc, mine, started=time.monotonic())
        self.workers[index] = worker
        self._ready.append(worker)
        self._write_pids()
        return worker

    def _write_pids(self) -> None:
        """Where the next daemon finds workers still running after a crash of this one (`end_orphans`)."""
        if self.state_dir is not None:
            pids = " ".join(str(w.proc.pid) for w in self.workers.values())
            (self.state_dir / PIDS_FILE).write_text(pids + "\n")

    # -- handing READs ---------------------------------------------------------------------------
    def offer(self, nodeid: int, unique: int, data: bytes) -> bool:
        """Hand a READ the session read (`data`) to a worker, if one is running, the READ is small
        enough and the file is cold now; False: the session serves it. Sent at `flush`."""
        ready = self._ready
        if not ready or len(data) < READ_REQUEST_BYTES \
                or READ_AT.unpack_from(data, READ_AT_OFFSET)[1] > WORKER_READ_MAX or self.hot.count(nodeid):
            return False
        self._next = (self._next + 1) % len(ready)
        worker = ready[self._next]
        worker.outbox.append(data)
        worker.handed.append((unique, data))
        if len(worker.outbox) >= HAND_TOGETHER:
            self._send(worker)
        self.handed += 1
        if len(worker.handed) > PRUNE_EVERY:
            self._prune(worker)
        return True

    def flush(self) -> None:
        """Send what `offer` took (the session calls it before it waits for the kernel)."""
        for worker in self._ready:
            if worker.outbox:
                self._send(worker)

    def _send(self, worker: Worker) -> None:
        message = b"".join(worker.outbox)
        worker.outbox.clear()
        try:
            worker.sock.send(message)
        except OSError as exc:  # full (a worker stuck) or gone: served again when it is retired
            log.warning("read worker %d: %d READs not handed (%s); served when it is replaced", worker.index,
                        len(message) // READ_REQUEST_BYTES, exc.strerror)
            self._lost(worker)

    def _lost(self, worker: Worker) -> None:
        """A worker that cannot take requests: none is handed to it any more; `_watch` retires it."""
        worker.alive = False
        if worker in self._ready:
            self._ready.remove(worker)
        if worker.proc.poll() is None:
            worker.proc.kill()

    def holding(self) -> bool:
        """Has a worker taken a READ it has not answered, or not taken one handed to it? (The
        session's busy poll does not look for the next request meanwhile: the answer goes to the
        kernel from the worker, the next request wakes the session.)"""
        for worker in self._ready:
            if worker.handed:
                self._prune(worker)
                if worker.handed:
                    return True
        return False

    async def drained(self) -> None:
        """Return once every READ handed so far is answered or given back, or has run for half
        the grace period (a worker then drops its bytes: `ColdReader._checked`): after this, no
        worker reads blocks from a map looked up before the call. What lets a write short of space
        on a single node take superseded blocks back without sitting out the grace period
        (fs/space.py `reads_drained`), as the daemon's own reads let it (`Reader.drained`)."""
        self.flush()
        marks = [(worker, worker.pruned + len(worker.handed)) for worker in self._ready]
        deadline = trio.current_time() + self.config.grace_s / 2
        while trio.current_time() < deadline:
            waiting = False
            for worker, mark in marks:
                if worker.alive and worker.pruned < mark:
                    self._prune(worker)
                    waiting = waiting or worker.pruned < mark
            if not waiting:
                return
            await trio.sleep(DRAIN_LOOK_S)

    def _prune(self, worker: Worker) -> None:
        """Forget the requests the worker has answered (or sent back): taken, and older than the
        oldest it holds. `taken` is read first: the worker publishes `oldest` before it."""
        at = worker.index * COUNTERS.size
        (taken,) = _WORD.unpack_from(self._counters, at)
        (oldest,) = _WORD.unpack_from(self._counters, at + 8)
        handed = worker.handed
        while handed and worker.pruned < taken and handed[0][0] < oldest:
            handed.popleft()
            worker.pruned += 1

    # -- serving ---------------------------------------------------------------------------------
    async def serve(self, dispatch: Dispatch, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers, serve what they send back until `stop`; then stop them and serve
        what they did not answer (every worker has exited when this returns)."""
        self._stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                for index in range(self.config.count):
                    self._try_start(index)
                for worker in list(self.workers.values()):
                    nursery.start_soon(self._watch, worker, dispatch, nursery)
                nursery.start_soon(self._look_for_stuck)
                task_status.started()
                await self._stop.wait()
                self.flush()
                self._ready.clear()
                for worker in self.workers.values():
                    if worker.proc.poll() is None:
                        worker.proc.send_signal(signal.SIGTERM)
                for worker in list(self.workers.values()):
                    await trio.to_thread.run_sync(_wait_or_kill, worker.proc)
                nursery.cancel_scope.cancel()  # the watchers: `_retire` below reads their sockets
            for worker in list(self.workers.values()):
                await self._retire(worker, dispatch)
        finally:
            self._close_workers()
            log.info("read workers: %d reads served by them, %d sent back, %d served again, %d restarts",
                     self.reads_served(), self.given_back, self.served_again, self.restarts)

    def served_by(self, index: int) -> int:
        return int(COUNTERS.unpack_from(self._counters, index * COUNTERS.size)[2])

    def per_worker(self) -> list[tuple[int, int, int]]:
        """(index, reads it served, requests it sent back) per worker since the pool began, the
        processes a restart replaced included (the metrics endpoint: any thread)."""
        return [(index, self._served_before.get(index, 0) + self.served_by(index), self._given_back_by.get(index, 0))
                for index in range(self.config.count)]

    def reads_served(self) -> int:
        """Reads the workers answered themselves, since the pool began."""
        return sum(served for _index, served, _back in self.per_worker())

    def stop(self) -> None:
        """Stop the workers (a hand-over, or the session ended): `serve` returns once they exited
        and what they did not answer is served."""
        self._stop.set()

    async def _look_for_stuck(self) -> None:
        """Every STUCK_S / 4, kill a running worker that has held its oldest READ for STUCK_S: its
        watcher then serves what it held and starts another (`_watch`)."""
        while True:
            await trio.sleep(STUCK_S / 4)
            now = time.monotonic()
            for worker in list(self._ready):
                self._prune(worker)
                oldest = worker.handed[0][0] if worker.handed else None
                if oldest is None or oldest != worker.oldest_seen:
                    worker.oldest_seen, worker.oldest_since = oldest, now
                elif now - worker.oldest_since >= STUCK_S:
                    log.error("read worker %d (pid %d) has held a READ for %.0f s: stopped or wedged; killed, the "
                              "session serves what it held", worker.index, worker.proc.pid, now - worker.oldest_since)
                    self._lost(worker)

    async def _watch(self, worker: Worker, dispatch: Dispatch, nursery: trio.Nursery) -> None:
        """Serve what the worker sends back; when it exits, serve what it did not answer and
        start another."""
        while True:
            try:
                await trio.lowlevel.wait_readable(worker.sock)
            except OSError:
                return
            if await self._take_back(worker, dispatch):
                continue
            await trio.to_thread.run_sync(worker.proc.wait)
            if self._stop.is_set():
                return  # `serve` retires it
            self._lost(worker)
            log.error("read worker %d (pid %d) exited with status %s: the session serves the READs it held; "
                      "starting another", worker.index, worker.proc.pid, worker.proc.returncode)
            await self._retire(worker, dispatch)
            self.restarts += 1
            early = time.monotonic() - worker.started < MAX_RESTART_PAUSE_S
            self._pause = min(self._pause * 2, MAX_RESTART_PAUSE_S) if early else RESTART_PAUSE_S
            await trio.sleep(self._pause)
            if self._stop.is_set():
                return
            replacement = self._try_start(worker.index)
            if replacement is not None:
                nursery.start_soon(self._watch, replacement, dispatch, nursery)
            return

    def _try_start(self, index: int) -> Worker | None:
        """`_start`, or None when the process cannot be started (logged): the session then serves
        the READs that worker would have had (`offer` hands only to workers running)."""
        try:
            return self._start(index)
        except OSError as exc:
            log.error("read worker %d could not be started (%s): the daemon serves its reads itself", index, exc)
            return None

    async def _take_back(self, worker: Worker, dispatch: Dispatch) -> bool:
        """Serve every request the worker sent back now; False once its end is closed."""
        while True:
            try:
                data = worker.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self.given_back += 1
            self._given_back_by[worker.index] = self._given_back_by.get(worker.index, 0) + 1
            pending = dispatch(data)
            if pending is not None:
                await pending

    async def _retire(self, worker: Worker, dispatch: Dispatch) -> None:
        """After the worker exited: serve what it sent back, then every request it may not have
        answered (R6; a second answer to one it did answer is refused by the kernel, harmlessly)."""
        await self._take_back(worker, dispatch)
        worker.outbox.clear()
        self._prune(worker)
        while worker.handed:
            _unique, data = worker.handed.popleft()
            self.served_again += 1
            pending = dispatch(data)
            if pending is not None:
                await pending
        worker.sock.close()

    def _close_workers(self) -> None:
        for worker in self.workers.values():
            worker.sock.close()
        self.workers.clear()
        self._ready.clear()

    def close(self) -> None:
        """Stop workers still running (the daemon stops; the mount may live on lazily while files
        are open) and let go of the counters."""
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        for worker in self.workers.values():
            _wait_or_kill(worker.proc)
        self._close_workers()
        if self.state_dir is not None:
            (self.state_dir / PIDS_FILE).unlink(missing_ok=True)
        self._counters.close()
        os.close(self.counters_fd)


def end_orphans(state_dir: Path) -> int:
    """After a crash of the daemon before and the RESEND of what it had read: end any worker it
    left running (its death signal comes with the daemon's exit; a build before this one kept
    them waiting for that RESEND). Only processes that are `awsomefsd fuse-worker` are signalled
    (a pid may have been reused)."""
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


def _wait_or_kill(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a worker told to stop, STOP_DEADLINE_S at most, then kill it (a stopped process
    keeps SIGTERM pending; SIGKILL ends it anyway). Blocking: from a thread where the loop runs."""
    try:
        proc.wait(STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        log.error("read worker (pid %d) did not stop within %.0f s: killed", proc.pid, STOP_DEADLINE_S)
        proc.kill()
        proc.wait()
