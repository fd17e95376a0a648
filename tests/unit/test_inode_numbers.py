"""Inode numbers reserved ahead (fs/inode_numbers.py): a steady stream of creates never waits for
a reservation once the first range is in, every number is handed out once, concurrent takers at an
empty range share the one reservation in flight, and a reservation that fails in the background
is made again by the take that needs it, which reports its error."""

from __future__ import annotations

import errno
import random

import pytest
import trio
import trio.testing

from awsomefsd.fs.inode_numbers import RESERVATION, InodeNumbers
from awsomefsd.meta.errors import FsError
from tests.support import seeds

ROUND_S = 0.05  # a reservation's round of the log


class FakeLog:
    """ReserveInodes as the log answers it: consecutive ranges, each after a round."""

    def __init__(self, *, round_s: float = ROUND_S) -> None:
        self.next = 1000
        self.round_s = round_s
        self.calls: list[bool] = []  # each reservation's `hurry`
        self.fail_next = 0

    async def reserve(self, hurry: bool) -> tuple[int, int]:
        self.calls.append(hurry)
        await trio.sleep(self.round_s)
        if self.fail_next:
            self.fail_next -= 1
            raise FsError(errno.EIO, "no leader")
        first, self.next = self.next, self.next + RESERVATION
        return first, self.next


async def test_a_steady_stream_of_takes_waits_only_for_the_first_range(autojump_clock: trio.testing.MockClock) -> None:
    log, made = FakeLog(), []
    numbers = InodeNumbers(log.reserve, made.append)
    taken: list[int] = []
    with trio.fail_after(60):
        for _ in range(10 * RESERVATION):
            if taken:
                assert numbers.at_once()
            taken.append(await numbers.take())
            await trio.sleep(0.2 / RESERVATION)  # a create's worth of time: a range lasts 4 rounds
    assert numbers.waits == 1, "only the very first take waited"
    assert len(set(taken)) == len(taken) and taken == sorted(taken)
    assert log.calls[0] is True and not any(log.calls[1:]), "the reservations ahead ride the next batch"
    assert made == [first for first in range(1000, 1000 + 10 * RESERVATION, RESERVATION)]


@pytest.mark.parametrize("seed", seeds.params("inode-numbers", 3))
async def test_concurrent_takers_share_the_reservation_in_flight(seed: int, autojump_clock: trio.testing.MockClock) -> None:
    log = FakeLog()
    numbers = InodeNumbers(log.reserve)
    rng = random.Random(seed)
    taken: list[int] = []

    async def taker(count: int) -> None:
        for _ in range(count):
            taken.append(await numbers.take())
            await trio.sleep(rng.random() * 0.001)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(taker, 3 * RESERVATION // 8)
    assert len(set(taken)) == len(taken) == 3 * RESERVATION
    assert len(log.calls) <= 4, f"{len(log.calls)} reservations for 3 ranges' worth of takes"


async def test_a_failed_reservation_ahead_is_made_again_by_the_take_that_needs_it(
        autojump_clock: trio.testing.MockClock) -> None:
    log = FakeLog()
    numbers = InodeNumbers(log.reserve)
    with trio.fail_after(60):  # a reservation whose waiters are never woken fails here, not hangs
        first = await numbers.take()
        log.fail_next = 1  # the reservation ahead fails
        taken = [first] + [await numbers.take() for _ in range(RESERVATION - 1)]
        await trio.sleep(1)
        assert not numbers.at_once(), "the range is used up and nothing was reserved ahead"
        taken.append(await numbers.take())  # reserves itself
        assert len(set(taken)) == len(taken) and numbers.waits == 2
        log.fail_next = 2  # ahead (at half the new range) and then the take's own
        for _ in range(RESERVATION - 1):
            taken.append(await numbers.take())
        await trio.sleep(1)
        with pytest.raises(FsError) as info:
            await numbers.take()
        assert info.value.errno == errno.EIO, "the take that needed the numbers reports why there are none"
        taken.append(await numbers.take())  # the log answers again
    assert len(set(taken)) == len(taken)
