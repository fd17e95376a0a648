"""FUSE over io_uring (Linux 6.14+, fs/fuse/dev_uring.c): requests arrive as io_uring completions
into buffers registered per ring entry, and each answer goes back with the command that also
fetches the next request (FUSE_IO_URING_CMD_COMMIT_AND_FETCH): one syscall per request, none to
read it.

How the kernel does it, and what follows for us:
- **Queues.** The kernel has one queue per possible CPU and puts a request on the queue of the
  CPU its caller runs on. It sends nothing over io_uring until every queue has an entry
  registered (FUSE_IO_URING_CMD_REGISTER), so we register `depth` entries on each. All of them
  go through one io_uring instance: every handler runs on the one trio thread anyway, and a
  queue's id is in the command, not in the ring.
- **Buffers.** Each entry has a header buffer (`fuse_uring_req_header`: the in/out header, the
  operation's own header, and the payload size) and a payload buffer as large as the largest
  request (max_pages pages). The request is put back together here as the bytes a read() of
  /dev/fuse would give (header, operation header, payload), so every handler is reused unchanged.
- **What stays on /dev/fuse.** FORGET, BATCH_FORGET and INTERRUPT are still read from the
  descriptor, and notifications are still written to it: the session's read loop keeps running.
  An INTERRUPT cannot be answered for a request that came over the ring (its answer must be the
  commit of its entry), so such requests simply finish.
- **The end.** Unmounting tears every entry down (completions with -ENOTCONN); closing the ring
  makes the kernel cancel the entries still waiting. Nothing unregisters an entry otherwise, so a
  successor daemon (a restart with the descriptor kept) registers entries of its own: the kernel
  accepts more entries on a ring that is ready. Requests the daemon before held in its entries
  are not sent again (FUSE_NOTIFY_RESEND covers /dev/fuse only); docs/fuse-transport.md says
  what that means for a crash and a hand-over.
"""

from __future__ import annotations

import errno
import logging
import mmap
import struct
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import trio

from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.uring import Ring, RingUnavailable

log = logging.getLogger(__name__)

CMD_REGISTER = 1
CMD_COMMIT_AND_FETCH = 2
CMD_REQ = struct.Struct("<QQH6x")  # fuse_uring_cmd_req: flags, commit_id, qid
IN_OUT_SIZE = 128
OP_IN_SIZE = 128
ENT_IN_OUT = struct.Struct("<QQII8x")  # fuse_uring_ent_in_out: flags, commit_id, payload_sz, padding
HEADER_SIZE = IN_OUT_SIZE + OP_IN_SIZE + ENT_IN_OUT.size
HEADER_SLOT = 512
"""Each entry's header buffer, rounded up: entries do not share cache lines."""
ENT_OFFSET = IN_OUT_SIZE + OP_IN_SIZE
IOVEC = struct.Struct("<QQ")
DEFAULT_DEPTH = 16
"""Entries per queue: requests one CPU's callers can have with us at once (fio QD16 on one CPU)."""
U32 = struct.Struct("<I")
DRAIN_S = 2.0

Answer = Callable[[list[bytes | bytearray | memoryview]], None]
StartFn = Callable[[abi.Header, bytes, Answer], Awaitable[None] | None]


def possible_cpus(path: Path = Path("/sys/devices/system/cpu/possible")) -> int:
    """How many queues the kernel makes: num_possible_cpus() ("0-3", "0,2-5")."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        import os

        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += (int(last) - int(first) + 1) if last else 1
    return count


class FuseRing:
    """The ring entries of one FUSE connection (`fd`), `depth` per queue, with `payload_size`
    bytes of payload each (the kernel's max(max_write, max_pages pages))."""

    def __init__(self, fd: int, *, queues: int, depth: int, payload_size: int) -> None:
        self.fd = fd
        self.queues = queues
        self.depth = depth
        self.count = queues * depth
        self.payload_size = payload_size
        self.ring = Ring(_power_of_two(self.count))
        try:
            self.headers = mmap.mmap(-1, self.count * HEADER_SLOT)
            self.payloads = mmap.mmap(-1, self.count * payload_size)
        except BaseException:
            self.ring.close()
            raise
        self._hview = memoryview(self.headers)
        self._pview = memoryview(self.payloads)
        import ctypes

        hbase = ctypes.addressof(ctypes.c_char.from_buffer(self.headers))
        pbase = ctypes.addressof(ctypes.c_char.from_buffer(self.payloads))
        self._iovecs = bytearray(self.count * 2 * IOVEC.size)
        for i in range(self.count):
            IOVEC.pack_into(self._iovecs, i * 2 * IOVEC.size, hbase + i * HEADER_SLOT, HEADER_SIZE)
            IOVEC.pack_into(self._iovecs, (i * 2 + 1) * IOVEC.size, pbase + i * payload_size, payload_size)
        self._iov_base = ctypes.addressof((ctypes.c_char * len(self._iovecs)).from_buffer(self._iovecs))
        self.live = 0
        """Entries registered and not torn down."""
        self.served = 0
        self._batch = False
        self.closed = False

    def register(self) -> None:
        """Register every entry (the kernel answers each with a request, later)."""
        for i in range(self.count):
            qid = i // self.depth
            self.ring.prepare_uring_cmd(self.fd, CMD_REGISTER, i, CMD_REQ.pack(0, 0, qid),
                                        addr=self._iov_base + i * 2 * IOVEC.size, length=2)
        self.ring.submit()
        self.live = self.count

    # -- one request ---------------------------------------------------------------------------
    def request(self, i: int) -> tuple[bytes, int]:
        """The request in entry `i`, as /dev/fuse would give it, and its commit id."""
        h = i * HEADER_SLOT
        hv = self._hview
        _flags, commit_id, payload_sz = ENT_IN_OUT.unpack_from(hv, h + ENT_OFFSET)[:3]
        (length,) = U32.unpack_from(hv, h)
        op_size = length - abi.IN_HEADER.size - payload_sz
        if not 0 <= op_size <= OP_IN_SIZE or payload_sz > self.payload_size:
            return bytes(hv[h:h + abi.IN_HEADER.size]), commit_id  # parse_header calls it malformed
        p = i * self.payload_size
        data = b"".join((hv[h:h + abi.IN_HEADER.size], hv[h + IN_OUT_SIZE:h + IN_OUT_SIZE + op_size],
                         self._pview[p:p + payload_sz]))
        return data, commit_id

    def commit(self, i: int, commit_id: int, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Answer the request in entry `i` with `parts` (a fuse_out_header, then the payload)
        and fetch the next one into it."""
        if self.closed:
            return
        h = i * HEADER_SLOT
        p = i * self.payload_size
        end = p + self.payload_size
        pos = p
        head = b""
        for part in parts:
            if len(head) < abi.OUT_HEADER.size:
                need = abi.OUT_HEADER.size - len(head)
                head += bytes(part[:need])
                part = part[need:]
            if len(part):
                if pos + len(part) > end:  # larger than the kernel asked for: an error instead
                    head = abi.error_reply(abi.OUT_HEADER.unpack_from(head)[2], errno.EIO)
                    pos = p
                    break
                self._pview[pos:pos + len(part)] = part
                pos += len(part)
        self._hview[h:h + abi.OUT_HEADER.size] = head
        ENT_IN_OUT.pack_into(self._hview, h + ENT_OFFSET, 0, commit_id, pos - p, 0)
        self.ring.prepare_uring_cmd(self.fd, CMD_COMMIT_AND_FETCH, i, CMD_REQ.pack(0, commit_id, i // self.depth))
        if not self._batch:
            self.ring.submit()

    # -- serving -------------------------------------------------------------------------------
    async def serve(self, start: StartFn) -> None:
        """Serve requests as they complete on the ring until every entry is torn down (the
        filesystem was unmounted) or this task is cancelled. `start(header, data, answer)`
        handles one request; answer(parts) commits it."""
        ring = self.ring
        while self.live > 0:
            completions = ring.completions()
            if not completions:
                ring.flush_work()
                completions = ring.completions()
            if not completions:
                await trio.lowlevel.wait_readable(ring.fd)
                continue
            self._batch = True
            try:
                for i, res in completions:
                    if res < 0:
                        self._lost(i, -res)
                        continue
                    await self._one(i, start)
            finally:
                self._batch = False
                ring.submit()
            await trio.lowlevel.checkpoint()

    async def drain(self, start: StartFn, running: Callable[[], int]) -> None:
        """Before the ring closes for a hand-over: serve what the kernel gave the entries after
        the reader stopped, until nothing comes and nothing runs (or `DRAIN_S` passed). Only the
        commit of its entry answers such a request, and closing the ring would leave it held:
        nothing unregisters an entry, so the kernel goes on giving requests to ours until the
        ring closes. `running()`: requests still being served."""
        ring = self.ring
        with trio.move_on_after(DRAIN_S):
            while True:
                ring.flush_work()
                completions = ring.completions()
                if not completions:
                    if not running():
                        return
                    await trio.sleep(0.001)
                    continue
                for i, res in completions:
                    if res < 0:
                        self._lost(i, -res)
                    else:
                        await self._one(i, start)
                await trio.lowlevel.checkpoint()
        log.warning("FUSE ring: requests kept arriving for %.0f s after the hand-over began; closing the ring",
                    DRAIN_S)

    async def _one(self, i: int, start: StartFn) -> None:
        data, commit_id = self.request(i)
        self.served += 1

        def answer(parts: list[bytes | bytearray | memoryview]) -> None:
            self.commit(i, commit_id, parts)

        try:
            header = abi.parse_header(data)
        except abi.Malformed as exc:
            log.warning("FUSE ring: dropped a malformed request: %s", exc)
            unique = abi.IN_HEADER.unpack_from(data)[2] if len(data) >= abi.IN_HEADER.size else commit_id
            answer([abi.error_reply(unique, errno.EINVAL)])
            return
        pending = start(header, data, answer)
        if pending is not None:
            await pending

    def _lost(self, i: int, err: int) -> None:
        self.live -= 1
        if err in (errno.ENOTCONN, errno.ECANCELED, errno.ENODEV):
            return  # torn down: unmounted, or the ring closing
        log.error("FUSE ring entry %d (queue %d) failed: %s", i, i // self.depth, errno.errorcode.get(err, err))

    def close(self) -> None:
        """Close the ring: the kernel cancels the entries still waiting for a request."""
        if self.closed:
            return
        self.closed = True
        self.ring.close()
        self._hview.release()
        self._pview.release()


def _power_of_two(n: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return size


def open_ring(fd: int, *, depth: int, payload_size: int) -> FuseRing | None:
    """A ring for the connection on `fd`, or None (logged) when this kernel gives no io_uring."""
    try:
        return FuseRing(fd, queues=possible_cpus(), depth=depth, payload_size=payload_size)
    except (RingUnavailable, OSError) as exc:
        log.warning("FUSE over io_uring is not available here (%s): serving /dev/fuse by read()", exc)
        return None


ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")


def unavailable(parameter: Path = ENABLE_URING) -> str | None:
    """Why this kernel would not serve a new mount over io_uring, or None if it would: checked
    before mounting when io_uring is required, so the refusal is one line and no mount is left."""
    try:
        enabled = parameter.read_text(encoding="ascii").strip()
    except OSError:
        return "this kernel's fuse module has no FUSE over io_uring (Linux 6.14 or later)"
    if enabled not in ("Y", "1"):
        return f"FUSE over io_uring is disabled in the kernel (echo Y > {parameter})"
    try:
        Ring(1).close()
    except RingUnavailable as exc:
        return f"io_uring is not available to this daemon ({exc.strerror}; see the kernel.io_uring_disabled sysctl)"
    return None


def kick_queues(mountpoint: str, queues: int) -> None:
    """Send one STATFS from each CPU. A request queued on a CPU's queue while that queue had no
    entry waits until the next request on the same queue is answered (entries registered later do
    not fetch what waits): after a successor registers, each queue is given that next request."""
    import os

    def statfs_on(cpu: int) -> None:
        try:
            os.sched_setaffinity(0, {cpu})
            os.statvfs(mountpoint)
        except OSError:
            pass

    threads = [threading.Thread(target=statfs_on, args=(cpu,), daemon=True) for cpu in range(queues)]
    for thread in threads:
        thread.start()
