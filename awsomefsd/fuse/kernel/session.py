"""One FUSE session on /dev/fuse: INIT, then requests read and answered concurrently on trio.

How requests are served (the reasons, measured, are in docs/design-notes.md):
- **One reader, a task per request.** The descriptor is non-blocking; the reader reads until
  EAGAIN and starts a task for each request, so a request that waits (a lease, the log, the
  device) does not hold up the others. At most `max_in_flight` run at once; past that the reader
  stops reading and the kernel keeps the rest queued. On a single node the common READ of a
  cold file gets no task: the reader submits its device read and the AIO completion
  answers it (`start_read`, `_start_read`).
- **Read workers** (`[mount] read_workers`, workers.py): a READ of a cold file read while another
  read is in flight is handed to a worker process, which answers it on this descriptor; the READs
  of one burst go together when the reader finds no more waiting.
- **Answers** are one writev each (header and payload, no copy of a read's data). An answer the
  kernel no longer wants (the request was aborted: ENOENT) is dropped silently.
- **Bad requests** (shorter than their structures, a name without its NUL) are answered EINVAL
  and logged; an opcode we do not serve is answered ENOSYS and logged once. Nothing a request
  carries can end the session.
- **INTERRUPT** answers the request it names with EINTR at once if that request changes nothing
  (`INTERRUPTIBLE`); its handler's own answer is dropped when it comes. Others finish.
- **Busy polling** (busypoll.py): with nothing in flight the reader looks for the next request
  for up to `busy_poll_s` before it sleeps, and the last answer wakes it to look.
- **The end**: the kernel answers a read with ENODEV once the filesystem is unmounted (by us or
  by `umount`); `serve` then returns.
- **FUSE over io_uring** (fuse_ring.py), when asked for (`uring`) and offered by the kernel at
  INIT: requests come from the ring and are answered by committing their entry; the read loop
  above stays for what the kernel still sends through the descriptor (FORGET, INTERRUPT).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import trio

from awsomefsd.fuse.kernel import abi, fuse_ring
from awsomefsd.fuse.kernel.abi import Body, Header, Init, Malformed, Op
from awsomefsd.fuse.kernel.busypoll import DEFAULT_POLL_S, BusyPoll
from awsomefsd.fuse.kernel.inflight import ChangesInFlight
from awsomefsd.meta.errors import FsError

if TYPE_CHECKING:
    from awsomefsd.fuse.kernel.workers import WorkerPool

log = logging.getLogger(__name__)

MAX_PAGES = 256
"""Pages per request: 1 MiB reads and writes."""
PAGE = 4096
MAX_WRITE = MAX_PAGES * PAGE
READ_BUFFER = MAX_WRITE + PAGE  # the kernel wants room for a full write and its headers
MAX_IN_FLIGHT = 256
MAX_BACKGROUND = 64
"""Asynchronous requests (read-ahead, direct I/O) the kernel keeps in flight to us."""
READS_PER_CHECKPOINT = 64
INTERRUPTIBLE = frozenset({Op.READLINK, Op.READ, Op.READDIR, Op.GETXATTR, Op.LISTXATTR, Op.STATFS, Op.ACCESS,
                           Op.LSEEK})
"""Requests an INTERRUPT answers at once with EINTR: they change nothing, so the answer their
handler gives later can be dropped. Not READDIRPLUS: each entry it answers is a lookup reference
the kernel must receive. Not lookup and getattr: on a cluster member they may queue for a
directory's delegation, and a request left in that queue would be granted to nobody."""

CHANGES_DATA = frozenset({Op.WRITE, Op.SETATTR, Op.FALLOCATE})
"""Requests that may change a file's bytes (SETATTR: a truncate)."""
READS_DATA = frozenset({Op.READ, Op.LSEEK})
"""Requests that must see every change to their file that the kernel sent before them
(`ChangesInFlight`)."""

READ_NAME = abi.OP_NAMES[Op.READ]
"""The operation's name in the latency metric, as `_handle` gives it."""

NO_REPLY: Any = type("NoReply", (), {"__repr__": lambda self: "NO_REPLY"})()
"""What a handler returns for a request the kernel expects no answer to (FORGET)."""
Payload = bytes | bytearray | list[bytes] | None
Handler = Callable[[Header, Body], Awaitable[Payload]]
ObserveFn = Callable[[str, float, int], None]
ReportEioFn = Callable[[str, Header, FsError], None]
StartRead = Callable[[bytes, Callable[[memoryview], None], Callable[[], None]], bool]
"""Start a READ (its bytes) without a task, answered through `send(payload)`, or `fail()` (then
served the usual way); False: not started (KernelHandlers.start_read)."""

WANTED = (Init.ASYNC_READ | Init.ATOMIC_O_TRUNC | Init.EXPORT_SUPPORT | Init.BIG_WRITES
          | Init.AUTO_INVAL_DATA | Init.DO_READDIRPLUS | Init.READDIRPLUS_AUTO | Init.ASYNC_DIO
          | Init.PARALLEL_DIROPS | Init.MAX_PAGES | Init.ABORT_ERROR | Init.HANDLE_KILLPRIV_V2 | Init.POSIX_ACL
          | Init.DIRECT_IO_ALLOW_MMAP)
"""Capabilities we ask for when the kernel offers them (docs/fuse-transport.md says why each)."""
WANTED_SINGLE_NODE = WANTED & ~Init.AUTO_INVAL_DATA
"""On a single node every change to a file comes through this kernel, which knows it: dropping
the page cache whenever the mtime moves would only throw away what this kernel's own writes put
there (a read after each write would reread the whole file) and widen the window
`ChangesInFlight` describes."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What INIT settled: the kernel's protocol minor and the capabilities both sides have."""

    minor: int
    flags: int
    max_write: int

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


UringMode = Literal["auto", "on", "off"]
""""auto": FUSE over io_uring when the kernel offers it; "on": the same, and a kernel that does not
offer it is refused at INIT; "off": /dev/fuse by read() only."""


class ProtocolError(Exception):
    """The kernel speaks a protocol we cannot (too old), or did not start with INIT."""


class Session:
    """Serves `handlers` (opcode -> handler) on the /dev/fuse descriptor `fd` (non-blocking)."""

    def __init__(self, fd: int, handlers: dict[int, Handler], *, observe: ObserveFn | None = None,
                 report_eio: ReportEioFn | None = None, max_in_flight: int = MAX_IN_FLIGHT,
                 negotiated: Negotiated | None = None, inline: frozenset[int] = frozenset(),
                 inline_when: dict[int, Callable[[bytes], bool]] | None = None, wanted: int = WANTED,
                 uring: UringMode = "off", ring_depth: int = fuse_ring.DEFAULT_DEPTH,
                 start_read: StartRead | None = None, busy_poll_s: float = DEFAULT_POLL_S) -> None:
        """`negotiated`: the session continues one a daemon before this one began (its INIT is
        answered already: docs/fuse-transport.md, Restarts). `inline`: opcodes the reader handles
        itself instead of starting a task (fuse/kernel/inline.py); `inline_when`: opcodes it
        handles itself when the request (its bytes) says it will not wait. `wanted`: the
        capabilities to ask for (`WANTED`, or `WANTED_SINGLE_NODE`). `uring`: FUSE over
        io_uring (`UringMode`), with `ring_depth` entries per CPU. `start_read`: READs the
        reader starts itself, without a task, when it says it can (`_start_read`). `busy_poll_s`:
        how long the reader looks for a request before it sleeps (busypoll.py; 0: never, and never
        when this process may use only one CPU, where looking would keep the client off it)."""
        self.poll = BusyPoll(busy_poll_s if len(os.sched_getaffinity(0)) > 1 else 0.0, self._read,
                             lambda: bool(self._running or self._reads_started
                                          or (self.workers is not None and self.workers.holding())))
        self.uring = uring
        self.ring_depth = ring_depth
        self.ring: fuse_ring.FuseRing | None = None
        self.on_ring_started: Callable[[fuse_ring.FuseRing], None] | None = None
        """Called once the ring's entries are registered (a successor's queues need a request each)."""
        self.wanted = wanted
        self.inline = inline
        self.inline_when = inline_when or {}
        self.fd = fd
        self.handlers = handlers
        self.observe = observe
        self.report_eio = report_eio
        self.negotiated = negotiated
        self._reading = trio.CancelScope()
        self.workers: WorkerPool | None = None
        """Read workers (`[mount] read_workers`): the READs of cold files this session reads are
        handed to them (fuse/kernel/workers.py); what they send back is served here."""
        self._buffer = bytearray(READ_BUFFER)
        self.max_in_flight = max_in_flight
        self._running = 0  # requests being handled
        self._room = trio.Event()  # set when a request ends while the reader waits for room
        self._interruptible: set[int] = set()  # uniques of INTERRUPTIBLE requests in tasks
        self._abandoned: set[int] = set()  # those answered EINTR: their handlers' answers are dropped
        self._changes = ChangesInFlight()
        self._unsupported: set[int] = set()
        self.start_read = start_read
        self._reads_started = 0  # by `start_read`, not answered yet
        self._reads_ended = trio.Event()  # set when that count falls to 0 while `serve` waits for it
        self.requests = 0
        self.malformed = 0
        self.interrupted = 0
        self._routes: dict[int, tuple[Handler, str, bool, Callable[[bytes], bool] | None]] = {
            op: (handler, abi.OP_NAMES.get(op, str(op)), op in inline, self.inline_when.get(op))
            for op, handler in handlers.items() if op in inline or op in self.inline_when}
        """Per opcode the reader may serve itself: its handler, its name in the metrics, always
        (`inline`), or when the request's bytes say so (`inline_when`)."""

    # -- reading -------------------------------------------------------------------------------
    def _read(self) -> bytes | None:
        """One request, or None when none is queued. Raises EOFError once unmounted."""
        while True:
            try:
                n = os.readv(self.fd, [self._buffer])
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR):  # aborted before we read it
                    continue
                if exc.errno == errno.ENODEV:
                    raise EOFError from None
                raise
            if n == 0:
                raise EOFError
            return bytes(memoryview(self._buffer)[:n])

    async def _next(self) -> bytes:
        while True:
            data = self._read()
            if data is not None:
                return data
            await trio.lowlevel.wait_readable(self.fd)

    # -- INIT ----------------------------------------------------------------------------------
    async def negotiate(self) -> Negotiated:
        """Answer the kernel's INIT (the first request after mount)."""
        while True:
            data = await self._next()
            header = abi.parse_header(data)
            if header.opcode != Op.INIT:
                raise ProtocolError(f"the kernel's first request was {abi.OP_NAMES.get(header.opcode, header.opcode)}, not INIT")
            body = Body(data)
            major, minor, max_readahead, flags = body.take(abi.INIT_IN)
            if flags & Init.INIT_EXT:
                (flags2,) = body.take(abi.U32)
                flags |= flags2 << 32
            if major > abi.MAJOR:  # a newer major: tell it ours, it asks again
                self._write([abi.reply(header.unique, abi.INIT_OUT.pack(abi.MAJOR, abi.MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0))])
                continue
            if major < abi.MAJOR or minor < abi.MIN_MINOR:
                self._write([abi.error_reply(header.unique, errno.EPROTO)])
                raise ProtocolError(f"the kernel speaks FUSE {major}.{minor}; we need {abi.MAJOR}.{abi.MIN_MINOR} or later")
            agreed = flags & self.wanted
            if self.uring == "on" and not flags & Init.OVER_IO_URING:
                self._write([abi.error_reply(header.unique, errno.EPROTO)])
                raise ProtocolError("the kernel does not offer FUSE over io_uring (Linux 6.14 or later, with "
                                    "/sys/module/fuse/parameters/enable_uring set to Y); [mount] io_uring = "
                                    "\"auto\" falls back to /dev/fuse")
            if self.uring != "off" and flags & Init.OVER_IO_URING:
                self.ring = fuse_ring.open_ring(self.fd, depth=self.ring_depth, payload_size=MAX_WRITE)
                if self.ring is not None:
                    agreed |= Init.OVER_IO_URING
            minor = min(minor, abi.MINOR)
            self.negotiated = Negotiated(minor, agreed, MAX_WRITE)
            ext = flags & Init.INIT_EXT  # flags2 is read from our answer only when the kernel has it
            out = abi.INIT_OUT.pack(abi.MAJOR, minor, max_readahead, (agreed & 0xFFFFFFFF) | ext,
                                    MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, MAX_WRITE, 1, MAX_PAGES, 0,
                                    agreed >> 32 if ext else 0)
            self._write([abi.reply(header.unique, out)])
            log.info("FUSE session: protocol 7.%d, capabilities %#x, requests up to %d KiB, served by %s", minor,
                     agreed, MAX_WRITE >> 10, self.path)
            return self.negotiated

    def kernel_has(self, capability: int) -> bool:
        """Did INIT settle `capability` (abi.Init)? (Nothing is, before INIT.)"""
        return self.negotiated is not None and self.negotiated.has(capability)

    @property
    def path(self) -> str:
        """Which transport serves the requests: "io_uring" or "read" (/dev/fuse by read())."""
        return "io_uring" if self.negotiated is not None and self.negotiated.has(Init.OVER_IO_URING) else "read"

    # -- serving -------------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[Negotiated] = trio.TASK_STATUS_IGNORED) -> None:
        """INIT, then serve until the filesystem is unmounted. Requests in flight then finish
        (their answers go nowhere; a change half made is worse than one made unheard)."""
        negotiated = self.negotiated or await self.negotiate()
        if negotiated.has(Init.OVER_IO_URING) and self.ring is None:
            # A mount continued from a daemon before: the kernel sends requests only to ring
            # entries now, and that daemon's entries went with it.
            self.ring = fuse_ring.open_ring(self.fd, depth=self.ring_depth, payload_size=negotiated.max_write)
            if self.ring is None:
                raise ProtocolError("this mount is served over io_uring, and this daemon cannot open one")
            continued = True
        else:
            continued = False
        task_status.started(negotiated)
        try:
            async with trio.open_nursery() as nursery:
                workers = self.workers if self.ring is None else None
                if workers is not None:
                    await nursery.start(workers.serve, lambda data: self._given_back(nursery, data))
                with self._reading:
                    async with trio.open_nursery() as readers:
                        if self.ring is not None:
                            self.ring.register()
                            if continued and self.on_ring_started is not None:
                                self.on_ring_started(self.ring)
                            readers.start_soon(self.ring.serve, lambda h, d, a: self._start(nursery, h, d, a))
                        await self._read_requests(nursery)
                        readers.cancel_scope.cancel()
                if workers is not None:  # they answer what they took; what they did not is served here
                    workers.stop()
                while self._reads_started:  # their answers, or fallback tasks, still to come
                    self._reads_ended = trio.Event()
                    await self._reads_ended.wait()
                if self.ring is not None and self._reading.cancel_called:
                    await self.ring.drain(lambda h, d, a: self._start(nursery, h, d, a), lambda: self._running)
        finally:
            if self.ring is not None:
                self.ring.close()
                log.info("FUSE session: %d requests served over io_uring, %d by read()", self.ring.served,
                         self.requests - self.ring.served)
                self.ring = None  # a `serve` after `resume_reading` registers entries anew
        if self._reading.cancel_called:
            log.info("FUSE session: stopped reading, every request read is answered")
        else:
            log.info("FUSE session ended: the filesystem was unmounted")

    def stop_reading(self) -> None:
        """Read no more requests (the kernel keeps them for the next daemon); `serve` returns once
        the requests in flight are answered (those handed to read workers included)."""
        self._reading.cancel()

    def resume_reading(self) -> None:
        """After `stop_reading`: the next `serve` reads again (a hand-over called off)."""
        self._reading = trio.CancelScope()

    def resend(self) -> bool:
        """Ask the kernel to send again every request it sent and saw no answer to (those a
        crashed daemon had read): FUSE_NOTIFY_RESEND, Linux 6.9 and later. False if refused."""
        try:
            self.notify(abi.Notify.RESEND, b"")
        except OSError as exc:
            log.warning("the kernel cannot resend requests the daemon before read (%s): their callers "
                        "wait until interrupted", exc)
            return False
        return True

    def forget_names(self) -> bool:
        """Make the kernel look up again every name it caches, positive or negative, before it
        uses it (FUSE_NOTIFY_INC_EPOCH, Linux 6.16 and later): after a crash of the daemon
        before, names it answered may be gone (a rename the crash took), and which is unknown.
        The lookups also renew the attributes of the inodes they reach. False if refused: the
        names then stay cached until their entry timeout."""
        try:
            self.notify(abi.Notify.INC_EPOCH, b"")
        except OSError as exc:
            log.warning("the kernel cannot be told to look every cached name up again (%s): names a crash "
                        "took stay visible until their entry timeout", exc)
            return False
        return True

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        """Read and serve until unmounted. A request the reader answers itself (`inline`) goes
        straight to its handler (`_inline`). After an answer the queue is read at once, before
        waiting for the descriptor: even a client that waits for each answer has often sent its
        next request by then (it runs on another CPU while the reader finishes the answer).
        Waiting first, to spare the read that fails, served one request at a time no cheaper."""
        read_since_checkpoint = 0
        routes = self._routes
        workers = self.workers if self.ring is None else None
        while True:
            while self._running >= self.max_in_flight:
                if workers is not None:
                    workers.flush()
                self._room = trio.Event()
                await self._room.wait()
            try:
                data = self._read()
                if data is None and workers is not None:
                    workers.flush()
                if data is None and self.poll.seconds and self.ring is None:
                    data = await self.poll.next_request(self.fd)
                while data is None:  # none queued: wait, then read (not read, fail and wait)
                    read_since_checkpoint = 0
                    await trio.lowlevel.wait_readable(self.fd)
                    data = self._read()
            except EOFError:
                return
            header = self._dispatch(nursery, data)
            if header is not None:
                route = routes.get(header.opcode)
                if route is not None and (route[2] or (route[3] is not None and route[3](data))):
                    self.requests += 1
                    await self._inline(header, data, route[0], route[1])
                elif header.opcode == Op.READ and workers is not None and (self._reads_started or workers.holding()) \
                        and not self._changes.any(header.nodeid) and workers.offer(header.nodeid, header.unique, data):
                    self.requests += 1
                elif header.opcode == Op.READ and self.start_read is not None \
                        and not self._changes.any(header.nodeid) and self._start_read(nursery, header, data):
                    pass
                else:
                    pending = self._start(nursery, header, data, None)
                    if pending is not None:
                        await pending
            read_since_checkpoint += 1
            if read_since_checkpoint >= READS_PER_CHECKPOINT:
                read_since_checkpoint = 0
                if workers is not None:
                    workers.flush()
                await trio.lowlevel.checkpoint()

    async def _inline(self, header: Header, data: bytes, handler: Handler, name: str) -> None:
        """A request the reader serves itself (`inline`, `inline_when`), on /dev/fuse: `_handle`
        without what only a task needs (waiting for earlier changes, INTERRUPT, the count of
        requests in flight: the reader reads nothing meanwhile)."""
        start = time.perf_counter()
        err = 0
        payload: Payload = None
        try:
            payload = await handler(header, Body(data))
        except FsError as exc:
            err = exc.errno
            if err == errno.EIO and self.report_eio is not None:
                self.report_eio(name, header, exc)
        except Malformed as exc:
            err = errno.EINVAL
            self.malformed += 1
            log.warning("FUSE: malformed %s request: %s", name, exc)
        except Exception:
            err = errno.EIO
            log.exception("FUSE %s failed", name)
        if payload is NO_REPLY:
            return
        self._answer(self._write, header.unique, err, payload)
        if self.observe is not None:
            self.observe(name, time.perf_counter() - start, err)

    def _start(self, nursery: trio.Nursery, header: Header, data: bytes,
               answer: Callable[[list[Any]], None] | None) -> Awaitable[None] | None:
        """Serve a request: a task of its own, or (returned, for the reader to await) inline.
        `answer`: where its answer goes (a ring entry's commit); None: written to /dev/fuse."""
        self.requests += 1
        self._running += 1
        quick = self.inline_when.get(header.opcode)
        if header.opcode in self.inline or (quick is not None and quick(data)):
            return self._handle(header, data, inline=True, answer=answer)
        follows = self._changes.before(header.nodeid) if header.opcode in READS_DATA else ()
        change = self._changes.begin(header.nodeid) if header.opcode in CHANGES_DATA else None
        nursery.start_soon(self._handle, header, data, follows, change, answer)
        return None

    def _start_read(self, nursery: trio.Nursery, header: Header, data: bytes) -> bool:
        """A READ started without a task (the daemon's common read of a cold file: one AIO read,
        answered from its completion; ~a third of the CPU of a task's path). Only when no change
        to the file is in flight (`ChangesInFlight`: such a READ waits in a task). Not
        interruptible: it is short. If its read fails, the usual path serves it (and reports)."""
        began = time.perf_counter()
        unique = header.unique

        def send(payload: memoryview) -> None:
            try:
                self._write([abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), 0, unique), payload])
            finally:
                self._read_ended()
            if self.observe is not None:
                self.observe(READ_NAME, time.perf_counter() - began, 0)

        def fail() -> None:
            self._read_ended()
            self.requests -= 1  # counted again by `_start`
            self._start(nursery, header, data, None)

        assert self.start_read is not None
        self._reads_started += 1  # before: `send` may come at once (bench/kernelfloor.py's reads)
        if not self.start_read(data, send, fail):
            self._reads_started -= 1  # neither `send` nor `fail` was called
            return False
        self.requests += 1
        return True

    def _read_ended(self) -> None:
        self._reads_started -= 1
        if not self._reads_started:
            self._reads_ended.set()
        self.poll.answered()

    def _given_back(self, nursery: trio.Nursery, data: bytes) -> Awaitable[None] | None:
        """A READ this session handed to a read worker, served here after all: the worker sent it
        back, or died or stopped without answering it (then the kernel may refuse this answer:
        ENOENT, dropped). Counted when it was handed."""
        header = abi.parse_header(data)  # read and parsed here before it was handed
        self.requests -= 1  # counted again by `_start`
        return self._start(nursery, header, data, None)

    def _dispatch(self, nursery: trio.Nursery, data: bytes) -> Header | None:
        """The request's header if it is to be handled; malformed ones and INTERRUPT end here."""
        try:
            header = abi.parse_header(data)
        except Malformed as exc:
            self.malformed += 1
            log.warning("FUSE: dropped a malformed request: %s", exc)
            if len(data) >= abi.IN_HEADER.size:
                self._write([abi.error_reply(abi.IN_HEADER.unpack_from(data)[2], errno.EINVAL)])
            return None
        if header.opcode == Op.INTERRUPT:
            self._interrupt(header, data)
            return None
        return header

    def _interrupt(self, header: Header, data: bytes) -> None:
        try:
            (unique,) = Body(data).take(abi.U64)
        except Malformed:
            return
        if unique in self._interruptible:
            # Answered now; the handler runs on and its answer is dropped. A cancel scope per
            # request would let it stop early instead, but entering and leaving one cost random
            # 4 KiB reads 14 % (20.0-20.1k against 23.1-23.6k IOPS, design note 40), to save
            # work only for a request the application gave up on.
            self._interruptible.discard(unique)
            self._abandoned.add(unique)
            self.interrupted += 1
            self._write([abi.error_reply(unique, errno.EINTR)])

    async def _handle(self, header: Header, data: bytes, follows: tuple[trio.Event, ...] = (),
                      change: trio.Event | None = None, answer: Callable[[list[Any]], None] | None = None, *,
                      inline: bool = False) -> None:
        """Serve one request and answer it. `follows`: the changes to its file it must see
        (`ChangesInFlight`); `change`: the event that marks this change answered. `inline`: the
        reader serves it itself, so no INTERRUPT can be read before it is answered. `answer`:
        its ring entry's commit; such a request cannot be answered by an INTERRUPT (only its
        entry's commit answers it), so it is not `INTERRUPTIBLE`."""
        send = self._write if answer is None else answer
        opcode = header.opcode
        handler = self.handlers.get(opcode)
        start = time.perf_counter()
        err = 0
        payload: Payload = None
        try:
            for earlier in follows:
                await earlier.wait()
            if handler is None:
                err = errno.ENOSYS
                if opcode not in self._unsupported:
                    self._unsupported.add(opcode)
                    log.info("FUSE: %s is not served (ENOSYS)", abi.OP_NAMES.get(opcode, opcode))
            else:
                if opcode in INTERRUPTIBLE and not inline and answer is None:
                    self._interruptible.add(header.unique)
                payload = await handler(header, Body(data))
        except FsError as exc:
            err = exc.errno
            if err == errno.EIO and self.report_eio is not None:
                self.report_eio(abi.OP_NAMES.get(opcode, str(opcode)), header, exc)
        except Malformed as exc:
            err = errno.EINVAL
            self.malformed += 1
            log.warning("FUSE: malformed %s request: %s", abi.OP_NAMES.get(opcode, opcode), exc)
        except Exception:
            err = errno.EIO
            log.exception("FUSE %s failed", abi.OP_NAMES.get(opcode, opcode))
        finally:
            if change is not None:
                self._changes.end(header.nodeid, change)
            self._interruptible.discard(header.unique)
            self._running -= 1
            self._room.set()
            self.poll.answered()
        if payload is NO_REPLY:
            return
        if self._abandoned and header.unique in self._abandoned:
            self._abandoned.discard(header.unique)  # answered EINTR already (`_interrupt`)
            if self.observe is not None:
                self.observe(abi.OP_NAMES.get(opcode, str(opcode)), time.perf_counter() - start, errno.EINTR)
            return
        self._answer(send, header.unique, err, payload)
        if self.observe is not None:
            self.observe(abi.OP_NAMES.get(opcode, str(opcode)), time.perf_counter() - start, err)

    @staticmethod
    def _answer(send: Callable[[list[Any]], None], unique: int, err: int, payload: Payload) -> None:
        """One answer, header and payload in one write (a list payload: its parts in order)."""
        if err:
            send([abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -err, unique)])
        elif payload is None:
            send([abi.OUT_HEADER.pack(abi.OUT_HEADER.size, 0, unique)])
        elif type(payload) is list:
            size = abi.OUT_HEADER.size
            for part in payload:
                size += len(part)
            send([abi.OUT_HEADER.pack(size, 0, unique), *payload])
        else:
            send([abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), 0, unique), payload])

    # -- writing -------------------------------------------------------------------------------
    def _write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the request was aborted (its caller was killed)
                return
            if exc.errno == errno.ENODEV:  # unmounted meanwhile
                return
            log.error("FUSE: the kernel refused an answer (%d bytes): %s", sum(len(p) for p in parts), exc)

    def notify(self, code: int, payload: bytes) -> None:
        """Send a notification (any thread). Raises OSError like the kernel (ENOENT: nothing cached)."""
        os.write(self.fd, abi.notification(code, payload))

    def invalidate_inode(self, ino: int, attr_only: bool) -> None:
        """Drop the kernel's attributes of `ino` and, unless `attr_only`, its page cache."""
        self.notify(abi.Notify.INVAL_INODE, abi.INVAL_INODE_OUT.pack(ino, -1 if attr_only else 0, 0))

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Drop the kernel's dentry `name` in `parent` (positive or negative)."""
        self.notify(abi.Notify.INVAL_ENTRY, abi.INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0")
