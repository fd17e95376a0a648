"""The inode numbers this daemon hands out, from ranges the log reserves for it (ReserveInodes).

A create takes the next number of the current range. The range used to be reserved when it ran
out, by the create that found it empty: that create waited for a round of the log. On a cluster
member the reservation also queued behind every change the node had acknowledged ahead (its
pipeline, meta/ahead.py), so every 1,024th create of a busy member stalled for 50-200 ms (three
creators in their own directories: a dozen such creates in each 3 s run, the longest 130 ms).
Now the next range is reserved in the background once half of the current one is used, riding
the pipeline's next batch; a create waits only if numbers run out faster than a round of the log
(or the background reservation failed: the create then reserves itself and reports its error).
A range reserved and never used is simply skipped: numbers are never used twice, and there are
2^64 of them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

RESERVATION = 1024
"""Inode numbers per ReserveInodes."""
LOW_WATER = RESERVATION // 2
"""When this many numbers are left of the current range, the next one is reserved."""


class InodeNumbers:
    """`take()` the next number; `at_once()`: would it come without waiting?"""

    def __init__(self, reserve: Callable[[bool], Awaitable[tuple[int, int]]],
                 on_range: Callable[[int], None] = lambda _first: None) -> None:
        self._reserve = reserve
        """`await reserve(hurry)`: a new range (first, end) from the log; `hurry` False when no
        create waits for it (on a member it may ride the pipeline's next batch)."""
        self._on_range = on_range
        """Told the first number of each range as it comes into use (the crash ledger's `made`)."""
        self._next = 0
        self._end = 0
        self._spare: tuple[int, int] | None = None  # the next range, reserved ahead
        self._reserving: trio.Event | None = None  # set when the reservation in flight is answered
        self.waits = 0
        """Takes that found no number and waited for a reservation."""

    def at_once(self) -> bool:
        return self._next < self._end or self._spare is not None

    async def take(self) -> int:
        while self._next >= self._end:
            if self._spare is not None:
                (self._next, self._end), self._spare = self._spare, None
                self._on_range(self._next)
                break
            self.waits += 1
            if self._reserving is not None:
                await self._reserving.wait()  # the one in flight; if it failed, the loop reserves
            else:
                await self._reserve_spare(hurry=True)  # its error is this take's
        ino = self._next
        self._next += 1
        if self._end - self._next <= LOW_WATER and self._spare is None and self._reserving is None:
            self._reserving = trio.Event()  # before the task starts: no second one meanwhile
            trio.lowlevel.spawn_system_task(self._reserve_ahead, name="inode numbers reserved ahead")
        return ino

    async def _reserve_ahead(self) -> None:
        """A system task: nothing may escape it (a failure is left for the take that needs it)."""
        try:
            await self._reserve_spare(hurry=False)
        except Exception as exc:
            log.info("reserving inode numbers ahead failed (%s); the create that needs them reserves itself", exc)

    async def _reserve_spare(self, *, hurry: bool) -> None:
        if self._reserving is None:
            self._reserving = trio.Event()
        done = self._reserving
        try:
            first, end = await self._reserve(hurry)
            assert first < end, (first, end)
            if self._spare is None:  # else one came meanwhile: this one goes unused
                self._spare = (first, end)
        finally:
            self._reserving = None
            done.set()
