"""The proposer's side of read workers (fuse/kernel/workers.py): after a drain it looks for the next
forwarded request a while before sleeping, and only while nothing forwarded waits for its answer.
The worker is its socket pair (what a worker process writes there is all the pool sees); no worker
process is started."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Op
from awsomefsd.fuse.kernel.workers import Worker, WorkerConfig, WorkerPool

POLL_S = 1.0


class _Running:
    def poll(self) -> None:
        return None


def _request(unique: int) -> bytes:
    return abi.IN_HEADER.pack(abi.IN_HEADER.size, int(Op.GETATTR), unique, 1, 0, 0, 1, 0, 0)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[WorkerPool, socket.socket]]:
    hot = os.memfd_create("hot")
    pool = WorkerPool(WorkerConfig(1, tmp_path, "/dev/null", False, 1.0), -1, hot, kept=False, state_dir=None,
                      busy_poll_s=POLL_S)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setblocking(False)
    pool.workers[0] = Worker(0, _Running(), mine, -1)  # type: ignore[arg-type]
    yield pool, theirs
    mine.close()
    theirs.close()
    os.close(hot)


def test_after_a_drain_the_next_forwarded_request_is_taken_without_sleeping(
        pool: tuple[WorkerPool, socket.socket]) -> None:
    workers, worker_end = pool
    dispatched: list[tuple[int, float]] = []

    def dispatch(data: bytes, answer: Any) -> None:
        dispatched.append((abi.IN_HEADER.unpack_from(data)[2], trio.current_time()))
        workers.workers[0].pending -= 1  # answered at once, as an inline request is

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def client() -> None:
                await trio.sleep(0.01)  # within the look
                worker_end.send(_request(8))

            nursery.start_soon(client)
            began = trio.current_time()
            await workers._linger(dispatch)
            ended = trio.current_time()
        assert [u for u, _ in dispatched] == [8], "the request sent during the look was dispatched by it"
        assert dispatched[0][1] - began < POLL_S
        assert ended - dispatched[0][1] >= POLL_S * 0.9, "the look starts again after a request"

    trio.run(main)


def test_no_look_while_a_forwarded_request_waits_for_its_answer(pool: tuple[WorkerPool, socket.socket]) -> None:
    workers, worker_end = pool
    workers.workers[0].pending = 1  # a forwarded request's task is still to answer
    worker_end.send(_request(9))
    dispatched: list[bytes] = []

    async def main() -> None:
        with trio.fail_after(POLL_S / 2):
            await workers._linger(lambda data, answer: dispatched.append(data))

    trio.run(main)
    assert dispatched == [], "the sleeping reader is woken by the socket, not by a look"


def test_one_look_at_a_time(pool: tuple[WorkerPool, socket.socket]) -> None:
    workers, _ = pool
    returned: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def look() -> None:
                await workers._linger(lambda data, answer: None)
                returned.append(trio.current_time())

            began = trio.current_time()
            nursery.start_soon(look)
            await trio.sleep(0.01)  # the first look is under way
            await workers._linger(lambda data, answer: None)
            assert trio.current_time() - began < POLL_S / 2, "a second watcher's look returns at once"
        assert returned and returned[0] - began >= POLL_S * 0.9

    trio.run(main)
