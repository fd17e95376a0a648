"""The raw FUSE transport's protocol, without a kernel: a SOCK_SEQPACKET socket pair stands in for
/dev/fuse (one message per read, as the device gives one request per read), the test plays the
kernel. Generated requests, well-formed and not: INIT negotiation, truncated and oversized
messages, unknown opcodes, INTERRUPT, FORGET, concurrency; then the real filesystem layer behind
the handlers (a single node on an image file), driven request by request and checked answer by
answer."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from awsomefsd.daemon.node import Core
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Body, Header, Init, Op
from awsomefsd.fuse.kernel.handlers import KernelHandlers
from awsomefsd.fuse.kernel.inline import INLINE_SINGLE_NODE
from awsomefsd.fuse.kernel.session import (
    MAX_PAGES,
    MAX_WRITE,
    NO_REPLY,
    WANTED,
    Payload,
    ProtocolError,
    Session,
)
from awsomefsd.meta.errors import FsError

KERNEL_FLAGS = (1 << 31) - 1  # a kernel that offers every capability
UID, GID, PID = 1000, 1000, 4242


class FakeKernel:
    """The kernel's end: sends requests with increasing unique ids, reads answers by unique."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unique = 0
        self.answers: dict[int, tuple[int, bytes]] = {}

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def send(self, opcode: int, nodeid: int = abi.ROOT_ID, body: bytes = b"", *, length: int | None = None) -> int:
        self.unique += 1
        size = abi.IN_HEADER.size + len(body)
        self.send_raw(abi.IN_HEADER.pack(size if length is None else length, opcode, self.unique, nodeid,
                                         UID, GID, PID, 0, 0) + body)
        return self.unique

    async def answer(self, unique: int, timeout_s: float = 5.0) -> tuple[int, bytes]:
        """(errno or 0, payload) of the answer to `unique`."""
        with trio.fail_after(timeout_s):
            while unique not in self.answers:
                await trio.lowlevel.wait_readable(self.sock)
                data = self.sock.recv(2 * MAX_WRITE)
                length, error, got = abi.OUT_HEADER.unpack_from(data)
                assert length == len(data), (length, len(data))
                self.answers[got] = (-error, data[abi.OUT_HEADER.size :])
        return self.answers.pop(unique)

    async def call(self, opcode: int, nodeid: int = abi.ROOT_ID, body: bytes = b"") -> tuple[int, bytes]:
        return await self.answer(self.send(opcode, nodeid, body))

    async def init(self, minor: int = 45, flags: int = KERNEL_FLAGS) -> tuple[int, bytes]:
        return await self.call(Op.INIT, 0, abi.INIT_IN.pack(7, minor, 128 << 10, flags) + bytes(48))

    def nothing_pending(self) -> bool:
        try:
            self.sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return True
        return False


def pair() -> tuple[FakeKernel, int]:
    kernel_end, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel_end.setblocking(False)
    daemon_end.setblocking(False)
    return FakeKernel(kernel_end), daemon_end.detach()


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeKernel, Session, dict[int, trio.Event]]]:
    """A session serving a few test handlers: GETATTR answers 8 bytes, READ waits for the event
    named by its nodeid (interruptible), WRITE waits the same way (not interruptible), FORGET
    records its count."""
    kernel, fd = pair()
    gates: dict[int, trio.Event] = {}
    forgotten: list[int] = []

    async def getattr_(h: Header, body: Body) -> Payload:
        return struct.pack("<Q", h.nodeid)

    async def wait_gate(h: Header, body: Body) -> Payload:
        await gates.setdefault(h.nodeid, trio.Event()).wait()
        return b"done"

    async def forget(h: Header, body: Body) -> Payload:
        forgotten.append(body.take(abi.U64)[0])
        return NO_REPLY

    async def mknod(h: Header, body: Body) -> Payload:
        body.take(abi.MKNOD_IN)
        return body.name()

    session = Session(fd, {Op.GETATTR: getattr_, Op.READ: wait_gate, Op.WRITE: wait_gate,
                           Op.FORGET: forget, Op.MKNOD: mknod})
    session.forgotten = forgotten  # type: ignore[attr-defined]
    async with serving(kernel, fd, session):
        yield kernel, session, gates


@asynccontextmanager
async def serving(kernel: FakeKernel, fd: int, session: Session) -> AsyncIterator[None]:
    """`session` serving past INIT until the block ends; then both ends closed."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        assert (await kernel.init())[0] == 0
        yield
        nursery.cancel_scope.cancel()
    os.close(fd)
    kernel.sock.close()


# -- INIT ------------------------------------------------------------------------------------------
async def test_init_agrees_on_our_minor_and_the_capabilities_both_sides_have() -> None:
    kernel, fd = pair()
    offered = Init.ASYNC_READ | Init.MAX_PAGES | Init.PARALLEL_DIROPS | Init.WRITEBACK_CACHE
    async with trio.open_nursery() as nursery:
        session = Session(fd, {})
        nursery.start_soon(session.negotiate)
        error, out = await kernel.init(minor=45, flags=offered)
    assert error == 0
    major, minor, _ra, flags, max_background, _congestion, max_write, time_gran, max_pages, _align, _flags2 = \
        abi.INIT_OUT.unpack(out)
    assert (major, minor) == (7, abi.MINOR)
    assert flags == offered & WANTED and not flags & Init.WRITEBACK_CACHE  # never more than offered or wanted
    assert (max_write, max_pages, time_gran) == (MAX_WRITE, MAX_PAGES, 1)
    assert max_background > 0
    assert session.negotiated is not None and session.negotiated.minor == abi.MINOR
    os.close(fd)


async def test_an_older_kernel_is_answered_with_its_own_minor() -> None:
    kernel, fd = pair()
    async with trio.open_nursery() as nursery:
        session = Session(fd, {})
        nursery.start_soon(session.negotiate)
        error, out = await kernel.init(minor=34)
    assert error == 0 and abi.INIT_OUT.unpack(out)[1] == 34
    os.close(fd)


async def test_a_kernel_too_old_is_refused_with_eproto() -> None:
    kernel, fd = pair()
    session = Session(fd, {})
    unique = kernel.send(Op.INIT, 0, abi.INIT_IN.pack(7, 20, 0, 0))
    with pytest.raises(ProtocolError, match=r"7\.20"):
        await session.negotiate()
    assert (await kernel.answer(unique))[0] == errno.EPROTO
    os.close(fd)


async def test_a_newer_major_is_told_ours_and_asked_again() -> None:
    kernel, fd = pair()
    async with trio.open_nursery() as nursery:
        session = Session(fd, {})
        nursery.start_soon(session.negotiate)
        error, out = await kernel.call(Op.INIT, 0, abi.INIT_IN.pack(8, 0, 0, 0))
        assert error == 0 and abi.INIT_OUT.unpack(out)[:2] == (7, abi.MINOR)
        error, out = await kernel.init()
        assert error == 0
    os.close(fd)


async def test_a_first_request_other_than_init_ends_the_session() -> None:
    kernel, fd = pair()
    session = Session(fd, {})
    kernel.send(Op.GETATTR)
    with pytest.raises(ProtocolError, match="getattr"):
        await session.negotiate()
    os.close(fd)


# -- malformed and unknown requests ----------------------------------------------------------------
async def test_malformed_requests_get_einval_and_the_session_goes_on(served) -> None:  # type: ignore[no-untyped-def]
    kernel, session, _ = served
    # the header states more bytes than arrived
    error, _ = await kernel.answer(kernel.send(Op.GETATTR, 5, b"", length=abi.IN_HEADER.size + 16))
    assert error == errno.EINVAL
    # a body shorter than its structure
    assert (await kernel.call(Op.MKNOD, 1, b"\0" * 4))[0] == errno.EINVAL
    # a name without its NUL
    assert (await kernel.call(Op.MKNOD, 1, abi.MKNOD_IN.pack(0o644, 0, 0, 0) + b"name"))[0] == errno.EINVAL
    # shorter than a header: nothing to answer, nothing to crash
    kernel.send_raw(b"\1\2\3")
    # a body longer than needed is fine: the extra bytes are ignored
    assert await kernel.call(Op.MKNOD, 1, abi.MKNOD_IN.pack(0o644, 0, 0, 0) + b"name\0" + b"x" * 100) == (0, b"name")
    assert await kernel.call(Op.GETATTR, 7) == (0, struct.pack("<Q", 7))
    assert session.malformed == 4


async def test_an_unknown_opcode_gets_enosys(served) -> None:  # type: ignore[no-untyped-def]
    kernel, _, _ = served
    assert (await kernel.call(999, 1))[0] == errno.ENOSYS
    assert (await kernel.call(Op.IOCTL, 1))[0] == errno.ENOSYS
    assert await kernel.call(Op.GETATTR, 9) == (0, struct.pack("<Q", 9))


# -- FORGET, INTERRUPT, concurrency ----------------------------------------------------------------
async def test_forget_is_not_answered(served) -> None:  # type: ignore[no-untyped-def]
    kernel, session, _ = served
    kernel.send(Op.FORGET, 12, abi.U64.pack(3))
    assert await kernel.call(Op.GETATTR, 2) == (0, struct.pack("<Q", 2))
    assert session.forgotten == [3]
    assert kernel.nothing_pending()


async def test_a_waiting_request_does_not_hold_up_the_others(served) -> None:  # type: ignore[no-untyped-def]
    kernel, _, gates = served
    waiting = kernel.send(Op.READ, 50)
    for ino in range(2, 20):
        assert await kernel.call(Op.GETATTR, ino) == (0, struct.pack("<Q", ino))
    gates.setdefault(50, trio.Event()).set()
    assert await kernel.answer(waiting) == (0, b"done")


async def test_interrupt_answers_a_read_only_request_with_eintr_at_once(served) -> None:  # type: ignore[no-untyped-def]
    kernel, session, gates = served
    waiting = kernel.send(Op.READ, 60)
    await kernel.call(Op.GETATTR, 2)  # the read is in flight now
    kernel.send(Op.INTERRUPT, 0, abi.U64.pack(waiting))
    assert (await kernel.answer(waiting))[0] == errno.EINTR
    assert session.interrupted == 1
    # its handler finishes later: that answer is not sent (the kernel has forgotten the request)
    gates.setdefault(60, trio.Event()).set()
    assert await kernel.call(Op.GETATTR, 3) == (0, struct.pack("<Q", 3))
    await trio.testing.wait_all_tasks_blocked()
    kernel.send(Op.INTERRUPT, 0, abi.U64.pack(waiting))  # again, once answered: ignored
    assert await kernel.call(Op.GETATTR, 4) == (0, struct.pack("<Q", 4))
    assert waiting not in kernel.answers and kernel.nothing_pending()
    assert session.interrupted == 1


async def test_interrupt_lets_a_change_finish(served) -> None:  # type: ignore[no-untyped-def]
    kernel, session, gates = served
    waiting = kernel.send(Op.WRITE, 70)
    await kernel.call(Op.GETATTR, 2)
    kernel.send(Op.INTERRUPT, 0, abi.U64.pack(waiting))
    kernel.send(Op.INTERRUPT, 0, abi.U64.pack(12345))  # names nothing in flight: ignored
    await kernel.call(Op.GETATTR, 3)
    gates.setdefault(70, trio.Event()).set()
    assert await kernel.answer(waiting) == (0, b"done")
    assert session.interrupted == 0


@pytest.mark.parametrize("fast_reads", [False, True], ids=["tasks", "fast_reads"])
async def test_a_read_waits_for_the_writes_to_its_file_that_arrived_before_it(fast_reads: bool) -> None:
    """The kernel may send a READ while a WRITE to the same pages is in flight (it unlocks the
    pages before sending the WRITE): the READ must see that write, whatever order the tasks run
    in. Reads of other files, and writes after the read, do not hold it up. With `fast_reads`
    the session also starts READs itself, without a task (`start_read`, as the daemon's cold
    reads are): such a READ must not be started while a change to its file is in flight."""
    kernel, fd = pair()
    release = trio.Event()
    written: set[int] = set()

    def start_read(data: bytes, send: Callable[[memoryview], None], fail: Callable[[], None]) -> bool:
        send(memoryview(b"new" if abi.parse_header(data).nodeid in written else b"old"))
        return True

    async def write(h: Header, body: Body) -> Payload:
        if h.nodeid == 5:
            await release.wait()
        written.add(h.nodeid)
        return b"w"

    async def read(h: Header, body: Body) -> Payload:
        return b"new" if h.nodeid in written else b"old"

    session = Session(fd, {Op.WRITE: write, Op.READ: read}, start_read=start_read if fast_reads else None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        await kernel.init()
        writing = kernel.send(Op.WRITE, 5)
        reading = kernel.send(Op.READ, 5)
        assert await kernel.call(Op.READ, 6) == (0, b"old")  # another file: not held up
        assert await kernel.call(Op.WRITE, 7) == (0, b"w")
        assert await kernel.call(Op.READ, 7) == (0, b"new")
        assert reading not in kernel.answers and kernel.nothing_pending()
        release.set()
        assert await kernel.answer(writing) == (0, b"w")
        assert await kernel.answer(reading) == (0, b"new")
        # a read that arrived first is not made to wait for a later write
        release = trio.Event()
        written.clear()
        early = kernel.send(Op.READ, 5)
        kernel.send(Op.WRITE, 5)
        assert await kernel.answer(early) == (0, b"old")
        release.set()
        nursery.cancel_scope.cancel()
    os.close(fd)


async def test_requests_the_reader_serves_itself_are_answered_and_observed_as_tasks_are() -> None:
    """The reader answers the requests it serves itself (`inline`, `inline_when`) by a path of its
    own: the same requests on a session that gives each a task must get the same answers and the
    same latency observations (name and errno), bad and failing ones included."""

    async def getattr_(h: Header, body: Body) -> Payload:
        if h.nodeid == 13:
            raise FsError(errno.ESTALE)
        if h.nodeid == 14:
            raise RuntimeError("a bug")  # EIO, logged
        return struct.pack("<Q", h.nodeid)

    async def mknod(h: Header, body: Body) -> Payload:
        body.take(abi.MKNOD_IN)
        return [b"entry:", body.name()]  # a list payload: its parts in order

    async def forget(h: Header, body: Body) -> Payload:
        return NO_REPLY

    async def flush(h: Header, body: Body) -> Payload:
        return None

    async def run(inline: frozenset[int]) -> tuple[list[tuple[int, bytes]], list[tuple[str, int]]]:
        kernel, fd = pair()
        seen: list[tuple[str, int]] = []
        session = Session(fd, {Op.GETATTR: getattr_, Op.MKNOD: mknod, Op.FORGET: forget, Op.FLUSH: flush},
                          inline=inline, inline_when={Op.FLUSH: lambda data: True} if inline else None,
                          observe=lambda op, _seconds, err: seen.append((op, err)))
        answers = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            await kernel.init()
            seen.clear()
            kernel.send(Op.FORGET, 12, abi.U64.pack(1))
            for request in ((Op.GETATTR, 7, b""), (Op.GETATTR, 13, b""), (Op.GETATTR, 14, b""),
                            (Op.MKNOD, 1, abi.MKNOD_IN.pack(0o644, 0, 0, 0) + b"f\0"),
                            (Op.MKNOD, 1, abi.MKNOD_IN.pack(0o644, 0, 0, 0) + b"no nul"),
                            (Op.FLUSH, 3, abi.FLUSH_IN.pack(1, 0, 0, 0))):
                answers.append(await kernel.call(*request))
            assert kernel.nothing_pending()  # FORGET got no answer
            nursery.cancel_scope.cancel()
        os.close(fd)
        kernel.sock.close()
        return answers, seen

    by_task = await run(frozenset())
    inline = await run(frozenset({Op.GETATTR, Op.MKNOD, Op.FORGET}))
    assert inline == by_task
    assert by_task[0] == [(0, struct.pack("<Q", 7)), (errno.ESTALE, b""), (errno.EIO, b""), (0, b"entry:f"),
                          (errno.EINVAL, b""), (0, b"")]
    assert by_task[1] == [("getattr", 0), ("getattr", errno.ESTALE), ("getattr", errno.EIO), ("mknod", 0),
                          ("mknod", errno.EINVAL), ("flush", 0)]


async def test_the_session_ends_when_the_kernel_goes_away() -> None:
    kernel, fd = pair()
    session = Session(fd, {})
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            await kernel.init()
            kernel.sock.close()  # what ENODEV (unmounted) is to the device
    os.close(fd)


# -- busy polling ----------------------------------------------------------------------------------
@pytest.fixture
async def polling() -> AsyncIterator[tuple[FakeKernel, Session, dict[int, trio.Event]]]:
    """A session whose reader serves GETATTR itself and polls for up to 0.2 s once nothing is in
    flight; WRITE gets a task that waits for the event its nodeid names in the yielded gates."""
    kernel, fd = pair()
    gates: dict[int, trio.Event] = {}

    async def getattr_(h: Header, body: Body) -> Payload:
        return struct.pack("<Q", h.nodeid)

    async def write(h: Header, body: Body) -> Payload:
        await gates.setdefault(h.nodeid, trio.Event()).wait()
        return b"written"

    session = Session(fd, {Op.GETATTR: getattr_, Op.WRITE: write}, inline=frozenset({Op.GETATTR}),
                      busy_poll_s=0.2)
    async with serving(kernel, fd, session):
        yield kernel, session, gates


async def test_a_request_sent_right_after_an_answer_is_found_by_polling(polling) -> None:  # type: ignore[no-untyped-def]
    kernel, session, _ = polling
    for nodeid in range(2, 12):
        assert await kernel.call(Op.GETATTR, nodeid) == (0, struct.pack("<Q", nodeid))
    assert session.poll.polled >= 9, (session.poll.polls, session.poll.polled)  # the first may follow INIT's own wait


async def test_a_poll_ends_in_its_time_and_lets_every_other_task_run(polling) -> None:  # type: ignore[no-untyped-def]
    kernel, session, _ = polling
    await kernel.call(Op.GETATTR, 2)
    polls, polled = session.poll.polls, session.poll.polled
    with trio.fail_after(0.15):  # a reader that looked without yielding would hold us 0.2 s
        await trio.sleep(0.01)
    await trio.sleep(0.5)  # a gap longer than the poll: the reader must have gone to sleep
    assert await kernel.call(Op.GETATTR, 3) == (0, struct.pack("<Q", 3))
    assert session.poll.polls == polls + 1 and session.poll.polled == polled, "the poll ended, the reader slept, woke"


async def test_the_reader_does_not_poll_while_a_request_it_started_is_in_flight(polling) -> None:  # type: ignore[no-untyped-def]
    kernel, session, gates = polling
    writes = [kernel.send(Op.WRITE, 9), kernel.send(Op.WRITE, 10)]
    await kernel.call(Op.GETATTR, 2)  # read after the WRITEs: their tasks are in flight now
    polls = session.poll.polls
    for nodeid in range(3, 8):
        assert await kernel.call(Op.GETATTR, nodeid) == (0, struct.pack("<Q", nodeid))
    assert session.poll.polls == polls, "no looks while an answer is still to come: they would only burn CPU"
    gates.setdefault(9, trio.Event()).set()
    assert await kernel.answer(writes[0]) == (0, b"written")
    assert session.poll.polls == polls, "one answer of two: the reader sleeps on for the other"
    gates.setdefault(10, trio.Event()).set()
    assert await kernel.answer(writes[1]) == (0, b"written")
    with trio.fail_after(2):  # the last answer wakes the reader to look, before any request comes
        while session.poll.polls == polls:
            await trio.sleep(0.001)
    assert await kernel.call(Op.GETATTR, 11) == (0, struct.pack("<Q", 11))


# -- the filesystem layer behind the handlers ------------------------------------------------------
@pytest.fixture
async def fs(core: Core) -> AsyncIterator[FakeKernel]:
    kernel, fd = pair()
    handlers = KernelHandlers(core.ops, cache_dirs=True)
    session = Session(fd, handlers.table, inline=INLINE_SINGLE_NODE, inline_when=handlers.quick)  # as on a single node
    async with trio.open_nursery() as nursery:
        nursery.start_soon(core.log.run)
        nursery.start_soon(session.serve)
        assert (await kernel.init())[0] == 0
        yield kernel
        nursery.cancel_scope.cancel()
    os.close(fd)


def entry_ino(out: bytes) -> int:
    return abi.ENTRY_OUT.unpack_from(out)[0]


def entry_attr(out: bytes) -> tuple[int, ...]:
    return abi.ATTR.unpack_from(out, abi.ENTRY_OUT.size)


def dirents(out: bytes, *, plus: bool) -> list[tuple[bytes, int, int]]:
    """(name, ino, next offset) of each record."""
    found, pos = [], 0
    while pos < len(out):
        if plus:
            pos += abi.ENTRY_OUT.size + abi.ATTR.size
        ino, off, namelen, _kind = abi.DIRENT.unpack_from(out, pos)
        start = pos + abi.DIRENT.size
        found.append((out[start : start + namelen], ino, off))
        pos = start + namelen + (-(abi.DIRENT.size + namelen) % 8)
    return found


async def test_files_made_read_and_listed_through_the_protocol(fs: FakeKernel, core: Core) -> None:
    error, out = await fs.call(Op.MKDIR, abi.ROOT_ID, abi.MKDIR_IN.pack(0o777, 0o022) + b"d\0")
    assert error == 0
    d = entry_ino(out)
    assert stat.S_IMODE(entry_attr(out)[9]) == 0o755 and stat.S_ISDIR(entry_attr(out)[9])
    assert core.ops.handles.lookups.get(d) == 1, "an entry answer is one kernel reference"

    error, out = await fs.call(Op.CREATE, d, abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o100666, 0o022, 0) + b"f\0")
    assert error == 0
    f = entry_ino(out)
    fh = abi.OPEN_OUT.unpack_from(out, abi.ENTRY_OUT.size + abi.ATTR.size)[0]
    data = bytes(range(256)) * 64
    error, out = await fs.call(Op.WRITE, f, abi.WRITE_IN.pack(fh, 4096, len(data), 0, 0, 0, 0) + data)
    assert (error, abi.WRITE_OUT.unpack(out)[0]) == (0, len(data))
    error, out = await fs.call(Op.READ, f, abi.READ_IN.pack(fh, 0, 3 * 4096 + 10, 0, 0, 0, 0))
    assert error == 0 and out == (bytes(4096) + data)[: 3 * 4096 + 10]
    # a write that states more data than it carries is refused, not cut short
    short = abi.WRITE_IN.pack(fh, 0, 4096, 0, 0, 0, 0) + b"x" * 100
    assert (await fs.call(Op.WRITE, f, short))[0] == errno.EINVAL
    assert (await fs.call(Op.FLUSH, f, abi.FLUSH_IN.pack(fh, 0, 0, 0)))[0] == 0
    assert (await fs.call(Op.RELEASE, f, abi.RELEASE_IN.pack(fh, 0, 0, 0)))[0] == 0

    error, out = await fs.call(Op.GETATTR, f, abi.GETATTR_IN.pack(0, 0, 0))
    attr = abi.ATTR.unpack_from(out, abi.ATTR_OUT.size)
    assert error == 0 and attr[0] == f and attr[1] == 4096 + len(data) and stat.S_IMODE(attr[9]) == 0o644

    # utimensat with a time before 1970, as tar restores it
    valid = abi.Fattr.MTIME | abi.Fattr.ATIME
    error, out = await fs.call(Op.SETATTR, f, abi.SETATTR_IN.pack(valid, 0, 0, 0, 0, 5, -2, 0, 7, 999, 0,
                                                                   0, 0, 0, 0, 0))
    assert error == 0
    attr = abi.ATTR.unpack_from(out, abi.ATTR_OUT.size)
    assert (attr[3], attr[6], attr[4], attr[7]) == (5, 7, -2, 999)

    for name in (b"g", b"h"):
        assert (await fs.call(Op.MKNOD, d, abi.MKNOD_IN.pack(stat.S_IFREG | 0o600, 0, 0, 0) + name + b"\0"))[0] == 0
    error, out = await fs.call(Op.OPENDIR, d, abi.OPEN_IN.pack(0, 0))
    dh, open_flags, _ = abi.OPEN_OUT.unpack(out)
    assert error == 0 and open_flags & abi.Fopen.CACHE_DIR
    before = dict(core.ops.handles.lookups)
    error, out = await fs.call(Op.READDIRPLUS, d, abi.READ_IN.pack(dh, 0, 4096, 0, 0, 0, 0))
    listed = dirents(out, plus=True)
    assert error == 0 and [n for n, _, _ in listed] == [b".", b"..", b"f", b"g", b"h"]
    counted = {ino: core.ops.handles.lookups.get(ino, 0) - before.get(ino, 0) for _, ino, _ in listed[2:]}
    assert set(counted.values()) == {1}, "one reference per entry, none for . and .."
    # a small buffer: the listing continues from the last offset sent
    error, out = await fs.call(Op.READDIR, d, abi.READ_IN.pack(dh, 0, 80, 0, 0, 0, 0))
    first = dirents(out, plus=False)
    error, out = await fs.call(Op.READDIR, d, abi.READ_IN.pack(dh, first[-1][2], 4096, 0, 0, 0, 0))
    assert [n for n, _, _ in first + dirents(out, plus=False)] == [b".", b"..", b"f", b"g", b"h"]

    # xattrs: size 0 asks for the length, a short buffer is ERANGE
    assert (await fs.call(Op.SETXATTR, f, abi.SETXATTR_IN_COMPAT.pack(4, 0) + b"user.c\0blue"))[0] == 0
    error, out = await fs.call(Op.GETXATTR, f, abi.GETXATTR_IN.pack(0, 0) + b"user.c\0")
    assert (error, abi.GETXATTR_OUT.unpack(out)[0]) == (0, 4)
    assert await fs.call(Op.GETXATTR, f, abi.GETXATTR_IN.pack(64, 0) + b"user.c\0") == (0, b"blue")
    assert (await fs.call(Op.GETXATTR, f, abi.GETXATTR_IN.pack(2, 0) + b"user.c\0"))[0] == errno.ERANGE
    assert await fs.call(Op.LISTXATTR, f, abi.GETXATTR_IN.pack(64, 0)) == (0, b"user.c\0")
    assert (await fs.call(Op.SETXATTR, f, abi.SETXATTR_IN_COMPAT.pack(3, os.XATTR_CREATE) + b"user.c\0red"))[0] \
        == errno.EEXIST

    # a lookup miss is cached as absent (nodeid 0), a hit is a reference
    error, out = await fs.call(Op.LOOKUP, d, b"missing\0")
    assert error == 0 and entry_ino(out) == 0
    error, out = await fs.call(Op.LOOKUP, d, b"g\0")
    g = entry_ino(out)
    assert error == 0 and g
    refs = core.ops.handles.lookups[g]
    fs.send(Op.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(g, refs))
    assert (await fs.call(Op.UNLINK, d, b"g\0"))[0] == 0
    assert core.ops.handles.lookups.get(g, 0) == 0
    assert (await fs.call(Op.RENAME2, d, abi.RENAME2_IN.pack(d, 0, 0) + b"h\0i\0"))[0] == 0
    assert (await fs.call(Op.LOOKUP, d, b"i\0"))[0] == 0
    assert (await fs.call(Op.RMDIR, abi.ROOT_ID, b"d\0"))[0] == errno.ENOTEMPTY

    error, out = await fs.call(Op.STATFS, abi.ROOT_ID)
    blocks, bfree, _bavail, _files, _ffree, bsize, namelen, _frsize, _ = abi.STATFS_OUT.unpack(out)
    assert error == 0 and bsize == 4096 and namelen == 255 and 0 < bfree <= blocks


async def create_written(fs: FakeKernel, name: bytes) -> tuple[int, int]:
    """CREATE `name` in the root, open for writing, and WRITE b"bytes" to it: (its inode, its handle)."""
    body = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o100644, 0o022, 0) + name + b"\0"
    error, out = await fs.call(Op.CREATE, abi.ROOT_ID, body)
    assert error == 0
    ino = entry_ino(out)
    fh = abi.OPEN_OUT.unpack_from(out, abi.ENTRY_OUT.size + abi.ATTR.size)[0]
    assert (await fs.call(Op.WRITE, ino, abi.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"bytes"))[0] == 0
    return ino, fh


async def test_an_unlinked_file_goes_with_its_last_handle(fs: FakeKernel, core: Core) -> None:
    """Unlink deletes a closed file at once (its kernel reference alone keeps nothing); an open
    one stays readable, an orphan, until its handle is released, and then goes too."""
    for name, open_at_unlink in ((b"closed", False), (b"open", True)):
        ino, fh = await create_written(fs, name)
        assert (await fs.call(Op.FLUSH, ino, abi.FLUSH_IN.pack(fh, 0, 0, 0)))[0] == 0
        if not open_at_unlink:
            assert (await fs.call(Op.RELEASE, ino, abi.RELEASE_IN.pack(fh, 0, 0, 0)))[0] == 0
        assert (await fs.call(Op.UNLINK, abi.ROOT_ID, name + b"\0"))[0] == 0
        if open_at_unlink:
            assert core.meta.inode(ino) is not None and core.meta.orphan(ino) is not None
            assert await fs.call(Op.READ, ino, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)) == (0, b"bytes")
            assert (await fs.call(Op.RELEASE, ino, abi.RELEASE_IN.pack(fh, 0, 0, 0)))[0] == 0
        assert core.meta.inode(ino) is None and core.meta.orphan(ino) is None, name


async def test_a_closed_files_unlink_is_one_command(fs: FakeKernel, core: Core) -> None:
    """A single node unlinks and deletes a closed file with one command (UnlinkClosed), where it
    took an Unlink and a Purge; a file with another name left is only unlinked."""
    ino, fh = await create_written(fs, b"one")
    assert (await fs.call(Op.RELEASE, ino, abi.RELEASE_IN.pack(fh, 0, 0, 0)))[0] == 0
    assert (await fs.call(Op.LINK, abi.ROOT_ID, abi.U64.pack(ino) + b"two\0"))[0] == 0
    before = core.meta.applied_index
    assert (await fs.call(Op.UNLINK, abi.ROOT_ID, b"one\0"))[0] == 0
    assert core.meta.applied_index == before + 1 and core.meta.inode(ino).nlink == 1
    before = core.meta.applied_index
    assert (await fs.call(Op.UNLINK, abi.ROOT_ID, b"two\0"))[0] == 0
    assert core.meta.applied_index == before + 1, "the unlink and the delete: one command"
    assert core.meta.inode(ino) is None and core.meta.orphan(ino) is None
