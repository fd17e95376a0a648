"""Progress of a long operation on a terminal: done of total, rate and time left, on one line that
rewrites itself a few times a second. Nothing at all when the output is not a terminal, so logs
and pipes stay quiet; the caller prints its own summary when it is done."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

REDRAW_S = 0.2


def _amount(value: float, in_bytes: bool) -> str:
    if not in_bytes:
        return f"{value:,.0f}"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`advance(n)` as work is done; `close()` at the end (clears the line). `total` may be an
    estimate: the percentage is capped at 100 and the time left at zero."""

    def __init__(self, label: str, total: int, *, in_bytes: bool = False, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = max(total, 1)
        self.in_bytes = in_bytes
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.shown = self.stream.isatty()
        self.done = 0
        self._started = clock()
        self._drawn = float("-inf")
        self._width = 0

    def advance(self, amount: int) -> None:
        self.done += amount
        if self.shown and self.clock() - self._drawn >= REDRAW_S:
            self._draw()

    def line(self) -> str:
        """What the terminal shows now."""
        elapsed = max(self.clock() - self._started, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0) / rate if rate else 0.0
        pct = min(100.0, 100.0 * self.done / self.total)
        per = "/s" if self.in_bytes else " per s"
        return (f"{self.label}: {_amount(self.done, self.in_bytes)} of {_amount(self.total, self.in_bytes)} "
                f"({pct:.0f}%), {_amount(rate, self.in_bytes)}{per}, {_duration(left)} left")

    def _draw(self) -> None:
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)
        self._drawn = self.clock()

    def close(self) -> None:
        if self.shown and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
