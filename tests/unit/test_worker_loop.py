"""A read worker's loop (fuse/kernel/worker_loop.py) with its real parts: the reads prepared and
finished by fs/coldread.py, native AIO (io/aio_batch.py) on an image file, the hot map over a
memfd. Two stand-ins: the session's descriptor, where answers go, is one end of a SEQPACKET socket
pair (a message per answer, as /dev/fuse takes them), and the committed metadata is one file's
inode and extent (the metadata reader is not under test here). The proposer's end of the worker's
socket is the test's: it hands READs (a message of one or several) and takes what comes back."""

from __future__ import annotations

import mmap
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from awsomefsd.fs import coldread
from awsomefsd.fs.coldread import READS_IN_FLIGHT, RUN_BYTES, ColdReader
from awsomefsd.fs.hotmap import HotMap, HotView
from awsomefsd.fuse.kernel import abi, worker_loop
from awsomefsd.fuse.kernel.abi import Op
from awsomefsd.fuse.kernel.worker_loop import _Loop, _State
from awsomefsd.fuse.kernel.workers import COUNTERS, MAX_WORKERS, NONE_HELD
from awsomefsd.io.checksum import block_checksums
from awsomefsd.io.device import create_image
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.records import Extent

INO = 42
BLOCKS = 64
FIRST_DEVICE_BLOCK = 16
WAIT_S = 10.0


def _content(block: int) -> bytes:
    return (block * 7919 % 251).to_bytes(1, "little") * BLOCK_SIZE


class _OneFile:
    """The committed metadata: one regular file of BLOCKS blocks at FIRST_DEVICE_BLOCK."""

    extent: Extent

    def __init__(self, _path: Path) -> None:
        pass

    def file_map(self, ino: int, first: int, end: int) -> tuple[object, list[Extent]]:
        if ino != INO:
            return None, []
        return SimpleNamespace(size=BLOCKS * BLOCK_SIZE, is_reg=stat.S_ISREG(stat.S_IFREG)), [self.extent]

    def close(self) -> None:
        pass


class Rig:
    """A worker loop on its own thread; the test plays the kernel on `kernel` (answers) and the
    proposer on `proposer` (handed READs, and what comes back)."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, busy_poll_s: float = 0.0) -> None:
        image = tmp / "device.img"
        create_image(image, (FIRST_DEVICE_BLOCK + BLOCKS) * BLOCK_SIZE)
        data = b"".join(_content(b) for b in range(BLOCKS))
        with open(image, "r+b") as f:
            f.seek(FIRST_DEVICE_BLOCK * BLOCK_SIZE)
            f.write(data)
        _OneFile.extent = Extent(0, FIRST_DEVICE_BLOCK, BLOCKS, block_checksums(data))
        monkeypatch.setattr(coldread, "CommittedReader", _OneFile)
        self.data = data
        self.image = image
        self.hot = HotMap(lambda: 0, lambda: 0, lambda ino: False)
        reader = ColdReader(tmp / "meta", str(image), direct=False, grace_s=60.0, hot=HotView(self.hot.fd))
        self.kernel, fuse = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proposer, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fuse, self.sock = fuse, sock
        self.counters = mmap.mmap(-1, COUNTERS.size * MAX_WORKERS)
        self.state = _State()
        assert reader.batch is not None, "native AIO"
        self.reader, self.batch = reader, reader.batch
        self.loop = _Loop(fuse.fileno(), self.state, sock, self.counters, 0, reader, busy_poll_s=busy_poll_s)
        self.failed: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:
            self.failed.append(exc)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.state.stopping = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the loop did not stop"
        assert not self.failed, self.failed

    def close(self) -> None:
        for s in (self.kernel, self.fuse, self.proposer, self.sock):
            s.close()
        self.reader.close()
        self.hot.close()

    def send_read(self, unique: int, offset: int, size: int) -> None:
        """Hand one READ, a message of its own."""
        self.proposer.send(read_request(unique, offset, size))

    def hand(self, reads: dict[int, tuple[int, int]]) -> None:
        """Hand READs (unique: offset, size) in one message, as the proposer's `flush` does."""
        self.proposer.send(b"".join(read_request(u, offset, size) for u, (offset, size) in reads.items()))

    def published(self) -> tuple[int, int, int]:
        """The worker's counters: requests taken, the oldest unique it holds, reads served."""
        return COUNTERS.unpack_from(self.counters, 0)

    def answers(self, count: int) -> dict[int, bytes]:
        """`count` answers from the loop, by unique."""
        self.kernel.settimeout(WAIT_S)
        got = {}
        for _ in range(count):
            message = self.kernel.recv(RUN_BYTES + 64)
            length, error, unique = abi.OUT_HEADER.unpack_from(message)
            assert error == 0 and length == len(message)
            got[unique] = message[abi.OUT_HEADER.size:]
        return got

    def given_back(self, count: int) -> list[int]:
        """The uniques of `count` requests the loop sent back to the proposer."""
        self.proposer.settimeout(WAIT_S)
        return [abi.IN_HEADER.unpack_from(self.proposer.recv(1 << 16))[2] for _ in range(count)]


def read_request(unique: int, offset: int, size: int) -> bytes:
    body = abi.READ_IN.pack(1, offset, size, 0, 0, 0, 0)
    return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), int(Op.READ), unique, INO, 0, 0, 1, 0, 0) + body


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    r = Rig(tmp_path, monkeypatch)
    yield r
    r.state.stopping = True
    if r.thread.is_alive():
        r.thread.join(WAIT_S)
    r.close()


def test_the_reads_of_waiting_requests_go_to_the_kernel_together_and_are_answered_with_the_files_bytes(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    submits: list[int] = []
    real_submit = rig.batch.submit

    def counted() -> list[tuple[int, int]]:
        submits.append(rig.batch.in_flight)
        return real_submit()

    monkeypatch.setattr(rig.batch, "submit", counted)
    reads = {100 + i: ((i * 5) % BLOCKS * BLOCK_SIZE + i, 3000 + i) for i in range(8)}
    rig.hand(dict(list(reads.items())[:5]))  # all waiting before the loop looks: a message of five,
    for unique, (offset, size) in list(reads.items())[5:]:  # and three of one each
        rig.send_read(unique, offset, size)
    rig.start()
    got = rig.answers(len(reads))
    for unique, (offset, size) in reads.items():
        assert got[unique] == rig.data[offset : offset + size]
    assert submits == [len(reads)], f"one io_submit for the eight reads waiting, got {submits}"
    rig.send_read(200, BLOCKS * BLOCK_SIZE - 10, 4096)  # the last 10 bytes
    assert rig.answers(1) == {200: rig.data[-10:]}
    wait_until(lambda: rig.published() == (9, NONE_HELD, 9), "the counters: 9 taken, none held, 9 served")
    rig.stop()


def test_the_counters_show_the_oldest_read_still_held(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the proposer relies on to know which handed READs a dead worker may not have answered."""
    real_collect = rig.batch.collect
    release = threading.Event()

    def slow_device(wait_s: float = 0.0) -> list[tuple[int, int]]:
        return real_collect(wait_s) if release.is_set() else []

    monkeypatch.setattr(rig.batch, "collect", slow_device)
    rig.hand({11: (0, 4096), 12: (BLOCK_SIZE, 4096)})
    rig.start()
    wait_until(lambda: rig.published()[:2] == (2, 11), "two taken, 11 the oldest held")
    release.set()
    assert set(rig.answers(2)) == {11, 12}
    wait_until(lambda: rig.published()[:2] == (2, NONE_HELD), "none held once both are answered")
    rig.stop()


def test_the_loop_ends_when_the_proposer_closes_its_end(rig: Rig) -> None:
    rig.start()
    rig.proposer.shutdown(socket.SHUT_RDWR)
    rig.thread.join(WAIT_S)
    assert not rig.thread.is_alive() and not rig.failed
    assert rig.state.proposer_gone


def test_a_read_during_which_the_file_turned_hot_is_given_back_not_answered(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    real_collect = rig.batch.collect

    def a_write_arrives_meanwhile(wait_s: float = 0.0) -> list[tuple[int, int]]:
        done = real_collect(wait_s)
        if done:
            rig.hot.hold(INO)  # R2: the second look must see this
        return done

    monkeypatch.setattr(rig.batch, "collect", a_write_arrives_meanwhile)
    rig.send_read(7, 0, 4096)
    rig.start()
    assert rig.given_back(1) == [7]
    rig.stop()
    rig.kernel.setblocking(False)
    with pytest.raises(BlockingIOError):
        rig.kernel.recv(1 << 16)


def test_a_block_that_fails_its_checksum_is_given_back(rig: Rig) -> None:
    with open(rig.image, "r+b") as f:
        f.seek((FIRST_DEVICE_BLOCK + 3) * BLOCK_SIZE + 100)
        f.write(b"\xff\xfe")
    rig.send_read(1, 0, 4096)
    rig.send_read(2, 3 * BLOCK_SIZE, 4096)
    rig.start()
    assert rig.answers(1) == {1: rig.data[:4096]}
    assert rig.given_back(1) == [2]
    rig.stop()


def test_a_stop_answers_the_reads_already_started(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    real_submit = rig.batch.submit

    def stop_told_meanwhile() -> list[tuple[int, int]]:
        refused = real_submit()
        rig.state.stopping = True  # SIGTERM while the reads are in flight
        return refused

    real_collect = rig.batch.collect

    def not_done_at_a_glance(wait_s: float = 0.0) -> list[tuple[int, int]]:
        return real_collect(wait_s) if wait_s > 0 else []  # a file's reads complete at once; a device's later

    monkeypatch.setattr(rig.batch, "submit", stop_told_meanwhile)
    monkeypatch.setattr(rig.batch, "collect", not_done_at_a_glance)
    for unique in range(1, 6):
        rig.send_read(unique, unique * BLOCK_SIZE, 4096)
    rig.start()
    rig.thread.join(WAIT_S)
    assert not rig.thread.is_alive() and not rig.failed
    got = rig.answers(5)
    assert got == {u: rig.data[u * BLOCK_SIZE : (u + 1) * BLOCK_SIZE] for u in range(1, 6)}
    assert rig.batch.in_flight == 0


def test_reads_the_kernel_refuses_to_start_are_given_back(rig: Rig) -> None:
    device_fd = rig.loop.reader.fd
    rig.loop.reader.fd = 1 << 20  # no such descriptor: io_submit refuses the read (EBADF)
    rig.send_read(1, 0, 4096)
    rig.start()
    assert rig.given_back(1) == [1]
    rig.loop.reader.fd = device_fd
    rig.send_read(2, BLOCK_SIZE, 4096)
    assert rig.answers(1) == {2: rig.data[BLOCK_SIZE : 2 * BLOCK_SIZE]}
    rig.stop()
    assert rig.batch.in_flight == 0 and rig.batch.free == READS_IN_FLIGHT


def test_after_taking_requests_the_loop_looks_for_the_next_before_it_sleeps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    woken: list[list[int]] = []
    real_epoll = select.epoll

    class CountedEpoll:
        def __init__(self) -> None:
            self._epoll = real_epoll()

        def register(self, fd: int, mask: int) -> None:
            self._epoll.register(fd, mask)

        def poll(self, timeout: float) -> list[tuple[int, int]]:
            events = self._epoll.poll(timeout)
            woken.append([fd for fd, _ in events])
            return events

        def close(self) -> None:
            self._epoll.close()

    monkeypatch.setattr(worker_loop.select, "epoll", CountedEpoll)
    rig = Rig(tmp_path, monkeypatch, busy_poll_s=5.0)
    real_collect = rig.batch.collect
    glances: list[float] = []

    def done_later_the_first_time(wait_s: float = 0.0) -> list[tuple[int, int]]:
        glances.append(wait_s)
        return [] if len(glances) == 1 else real_collect(wait_s)  # as a device's, not a file's

    monkeypatch.setattr(rig.batch, "collect", done_later_the_first_time)
    try:
        rig.send_read(1, 0, 4096)
        rig.start()
        assert rig.answers(1) == {1: rig.data[:4096]}
        time.sleep(0.1)  # the loop is past that round by then: looking, or asleep in epoll
        rig.send_read(2, BLOCK_SIZE, 4096)
        assert rig.answers(1) == {2: rig.data[BLOCK_SIZE : 2 * BLOCK_SIZE]}
        by_socket = [fds for fds in woken if rig.sock.fileno() in fds]
        assert len(by_socket) == 1, f"the second READ was taken by the look, not by a wake-up: {woken}"
        rig.stop()
    finally:
        rig.state.stopping = True
        rig.close()


def test_without_native_aio_the_reads_are_blocking_and_answered_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = Rig(tmp_path, monkeypatch)
    try:
        assert rig.reader.batch is not None
        rig.reader.batch.close()
        rig.reader.batch = None  # what ColdReader keeps when io_setup is refused
        rig.loop = _Loop(rig.fuse.fileno(), rig.state, rig.sock, rig.counters, 0, rig.reader)
        rig.send_read(1, 5 * BLOCK_SIZE + 7, 6000)
        rig.send_read(2, BLOCKS * BLOCK_SIZE - 100, 4096)
        rig.start()
        assert rig.answers(2) == {1: rig.data[5 * BLOCK_SIZE + 7 : 5 * BLOCK_SIZE + 6007], 2: rig.data[-100:]}
        rig.stop()
    finally:
        rig.state.stopping = True
        rig.close()
