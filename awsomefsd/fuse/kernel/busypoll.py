"""The session reader's busy poll: look for the next request a little while before sleeping.

A program that waits for each answer (git, rsync, tar, a shell loop) sends its next request within
tens of microseconds of getting one. A reader asleep in `epoll_wait` makes each such request cost a
wake-up of the daemon besides the client's own: in a VM an inter-processor interrupt and a halt
each time, half of a serial round trip on this machine (design note 128). So once nothing the
session started is in flight, the reader looks for a request for up to `seconds`, passing through
trio's scheduler between looks (every other task and every descriptor trio watches is served
meanwhile), and sleeps only then. While answers are still to come (a request's task, an AIO
read) looking would only burn CPU: the reader sleeps, and the last answer wakes it (`answered`)
to look for what the client sends next.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

DEFAULT_POLL_S = 100e-6
"""How long the reader looks before it sleeps unless told otherwise (`[mount] busy_poll_us`)."""


class BusyPoll:
    """`read`: one request or None (non-blocking); `in_flight`: is an answer still to come?"""

    def __init__(self, seconds: float, read: Callable[[], bytes | None], in_flight: Callable[[], bool]) -> None:
        self.seconds = seconds
        self._read = read
        self._in_flight = in_flight
        self._sleeping: trio.CancelScope | None = None
        self.polls = 0
        """Times the reader looked for a request before sleeping."""
        self.polled = 0
        """Requests it found so."""

    async def next_request(self, fd: int) -> bytes | None:
        """After the reader found the queue empty: the next request, or None when it did not come
        in time (the reader then sleeps until the descriptor is readable). Raises EOFError
        once unmounted (from `read`)."""
        if self._in_flight():
            with trio.CancelScope() as self._sleeping:  # until a request comes or `answered`
                await trio.lowlevel.wait_readable(fd)
            self._sleeping = None
            await trio.lowlevel.checkpoint_if_cancelled()  # a stop asked meanwhile: read nothing more
            data = self._read()
            if data is not None or self._in_flight():
                return data
        return await self._look()

    def answered(self) -> None:
        """An answer went out: if it was the last in flight, wake a reader sleeping for it, to look."""
        if self._sleeping is not None and not self._in_flight():
            self._sleeping.cancel()

    async def _look(self) -> bytes | None:
        until = time.perf_counter() + self.seconds
        self.polls += 1
        while not self._in_flight():
            await trio.lowlevel.checkpoint()
            data = self._read()
            if data is not None:
                self.polled += 1
                return data
            if time.perf_counter() >= until:
                break
        return None
