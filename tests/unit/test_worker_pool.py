"""The proposer's side of read workers (fuse/kernel/workers.py): which READs it hands, how they
go (a message per flush), what it forgets once a worker's counters say it is answered, and what
the session serves when a worker dies. A worker is its socket pair and its counters (all the pool
sees of one); no worker process is started."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from awsomefsd.fs.hotmap import HotMap
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel import workers as workers_module
from awsomefsd.fuse.kernel.abi import Op
from awsomefsd.fuse.kernel.workers import (
    COUNTERS,
    HAND_TOGETHER,
    NONE_HELD,
    WORKER_READ_MAX,
    Worker,
    WorkerConfig,
    WorkerPool,
)

COLD, HOT = 7, 8


class _Running:
    def poll(self) -> None:
        return None

    def kill(self) -> None:
        raise AssertionError("a running worker was killed")


def read_request(unique: int, ino: int = COLD, size: int = 4096) -> bytes:
    body = abi.READ_IN.pack(1, 0, size, 0, 0, 0, 0)
    return abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), int(Op.READ), unique, ino, 0, 0, 1, 0, 0) + body


def uniques(message: bytes) -> list[int]:
    """The uniques of the requests in one message, in order."""
    found, at = [], 0
    while at < len(message):
        length, _opcode, unique = abi.IN_HEADER.unpack_from(message, at)[:3]
        found.append(unique)
        at += length
    return found


class Rig:
    def __init__(self, tmp: Path, workers: int = 1) -> None:
        self.hot = HotMap(lambda: 0, lambda: 0, lambda ino: False)
        self.hot.hold(HOT)
        self.pool = WorkerPool(WorkerConfig(workers, tmp, "/dev/null", False, 1.0), -1, self.hot, state_dir=None)
        self.ends: list[socket.socket] = []
        for index in range(workers):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            mine.setblocking(False)
            theirs.settimeout(5)
            worker = Worker(index, _Running(), mine)  # type: ignore[arg-type]
            self.pool.workers[index] = worker
            self.pool._ready.append(worker)
            self.ends.append(theirs)
            self.publish(index, 0, NONE_HELD)

    def publish(self, index: int, taken: int, oldest: int) -> None:
        """What a worker's loop publishes (worker_loop._Loop._publish)."""
        struct.pack_into("=QQ", self.pool._counters, index * COUNTERS.size, taken, oldest)

    def offer(self, unique: int, ino: int = COLD, size: int = 4096) -> bool:
        return self.pool.offer(ino, unique, read_request(unique, ino, size))

    def close(self) -> None:
        for end in self.ends:
            end.close()
        self.pool._close_workers()  # no processes to stop
        self.pool.close()
        self.hot.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_cold_small_reads_are_handed_in_one_message_per_flush(rig: Rig) -> None:
    assert all(rig.offer(u) for u in (1, 2, 3))
    rig.ends[0].setblocking(False)
    with pytest.raises(BlockingIOError):
        rig.ends[0].recv(1 << 16)  # nothing sent before the flush
    rig.pool.flush()
    rig.ends[0].setblocking(True)
    assert uniques(rig.ends[0].recv(1 << 16)) == [1, 2, 3]
    assert rig.pool.handed == 3


def test_a_full_message_goes_without_waiting_for_the_flush(rig: Rig) -> None:
    for unique in range(1, HAND_TOGETHER + 1):
        assert rig.offer(unique)
    assert uniques(rig.ends[0].recv(1 << 16)) == list(range(1, HAND_TOGETHER + 1))


def test_hot_files_large_reads_and_a_pool_without_workers_are_the_sessions(rig: Rig) -> None:
    assert not rig.offer(1, ino=HOT)
    assert not rig.offer(2, size=WORKER_READ_MAX + 4096)
    assert not rig.pool.offer(COLD, 3, read_request(3)[:-8]), "a READ shorter than its structures"
    rig.pool._ready.clear()
    assert not rig.offer(4)
    assert rig.pool.handed == 0


def test_reads_go_round_the_workers(tmp_path: Path) -> None:
    r = Rig(tmp_path, workers=2)
    try:
        for unique in range(1, 5):
            assert r.offer(unique)
        r.pool.flush()
        got = sorted(uniques(end.recv(1 << 16)) for end in r.ends)
        assert got == [[1, 3], [2, 4]]
    finally:
        r.close()


def test_what_a_worker_answered_is_forgotten_and_what_it_holds_or_never_took_is_kept(rig: Rig) -> None:
    for unique in range(10, 16):
        rig.offer(unique)
    rig.pool.flush()
    assert rig.pool.holding()
    rig.publish(0, taken=4, oldest=12)  # took 10-13; 10 and 11 answered, 12 held (13 answered or held)
    rig.pool._prune(rig.pool.workers[0])
    assert [u for u, _ in rig.pool.workers[0].handed] == [12, 13, 14, 15]
    rig.publish(0, taken=6, oldest=NONE_HELD)
    assert not rig.pool.holding(), "every READ handed is answered"


def test_a_dead_workers_reads_are_served_by_the_session(rig: Rig) -> None:
    """R6: what it sent back, then every READ it may not have answered; none it did answer."""
    for unique in range(20, 26):
        rig.offer(unique)
    rig.pool.flush()
    rig.ends[0].recv(1 << 16)
    rig.ends[0].send(read_request(21))  # sent back: a mismatch, say
    rig.publish(0, taken=4, oldest=22)  # took 20-23: 20 and 21 done, 22 held; 24 and 25 never taken
    rig.ends[0].close()
    served: list[int] = []

    def dispatch(data: bytes) -> None:
        served.append(abi.IN_HEADER.unpack_from(data)[2])

    trio.run(rig.pool._retire, rig.pool.workers[0], dispatch)
    assert served == [21, 22, 23, 24, 25]
    assert rig.pool.given_back == 1 and rig.pool.served_again == 4


class _Stuck:
    """A worker process that is alive and takes nothing (stopped, wedged): killed once."""

    def __init__(self) -> None:
        self.killed = 0

    def poll(self) -> int | None:
        return -9 if self.killed else None

    def kill(self) -> None:
        self.killed += 1


def test_a_worker_whose_socket_is_full_is_killed_and_its_reads_are_the_sessions(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A worker that takes nothing fills its socket; the READ that no longer fits is not dropped:
    the worker is killed (its watcher then retires it), gets no READ more, and every READ handed
    to it, those sent and those that did not fit, is served by the session."""
    stuck = _Stuck()
    worker = rig.pool.workers[0]
    worker.proc = stuck  # type: ignore[assignment]
    offered = []
    unique = 100
    while worker.alive:
        assert rig.offer(unique), "handed while the worker counts as running"
        offered.append(unique)
        rig.pool.flush()
        unique += 1
        assert unique < 1_000_000, "the socket never filled"
    assert stuck.killed == 1 and worker not in rig.pool._ready
    assert "READs not handed" in caplog.text
    assert not rig.offer(unique), "no READ is handed to it any more: the session serves it"
    rig.ends[0].close()
    served: list[int] = []
    trio.run(rig.pool._retire, worker, lambda data: served.append(abi.IN_HEADER.unpack_from(data)[2]))
    assert served == offered, "every READ handed to it, sent or not, served once, in order"


def test_drained_waits_for_the_reads_handed_before_it_and_no_longer_than_half_the_grace_period(rig: Rig) -> None:
    """What lets a write short of space take superseded blocks back early (fs/space.py)."""
    for unique in (30, 31):
        rig.offer(unique)
    rig.publish(0, taken=2, oldest=31)  # 30 answered, 31 still read from the device

    async def main() -> tuple[float, float]:
        async with trio.open_nursery() as nursery:
            async def answered_later() -> None:
                await trio.sleep(0.05)
                rig.publish(0, taken=2, oldest=NONE_HELD)

            nursery.start_soon(answered_later)
            began = trio.current_time()
            await rig.pool.drained()
            waited = trio.current_time() - began
        rig.offer(32)  # taken by nobody: a worker stuck, say
        began = trio.current_time()
        await rig.pool.drained()
        return waited, trio.current_time() - began

    waited, stuck = trio.run(main)
    assert 0.05 <= waited < 0.4, "until the read handed before it was answered"
    assert 0.5 <= stuck < 1.0, "half the grace period (1 s) at most: a worker drops a read that took longer"


def test_a_worker_that_cannot_be_started_leaves_every_read_to_the_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Workers are on by default (note 134): a spawn that fails must not take the mount down."""
    monkeypatch.setattr(workers_module, "running_command", lambda: [str(tmp_path / "no-such-program")])
    hot = HotMap(lambda: 0, lambda: 0, lambda ino: False)
    session = os.open("/dev/null", os.O_RDWR)  # stands for the session's descriptor: never read here
    pool = WorkerPool(WorkerConfig(1, tmp_path, "/dev/null", False, 1.0), session, hot, state_dir=None)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(pool.serve, lambda data: None)
                assert not pool.offer(COLD, 1, read_request(1)), "no worker runs: the session serves it"
                pool.stop()

    try:
        trio.run(main)
        assert "read worker 0 could not be started" in caplog.text
    finally:
        pool.close()
        hot.close()
        os.close(session)
