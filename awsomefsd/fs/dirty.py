"""Dirty bytes of one file waiting to be written: disjoint, sorted runs of contiguous bytes.

Small writes coalesce here so that the device sees few, large, block-aligned writes. Sequential
writes append to the last run (amortised O(1)); overlapping writes merge runs. Pure data structure:
no I/O, no awaits, so it is atomic under trio and tested on its own.
"""

from __future__ import annotations

import bisect

MAX_RUNS = 4096  # a file written in more scattered pieces than this is flushed first


class DirtyRanges:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._runs: list[bytearray] = []
        self.dirty_bytes = 0

    def __bool__(self) -> bool:
        return bool(self._runs)

    @property
    def run_count(self) -> int:
        return len(self._runs)

    @property
    def end_offset(self) -> int:
        """One past the last dirty byte (0 when clean)."""
        if not self._runs:
            return 0
        return self._starts[-1] + len(self._runs[-1])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        assert offset >= 0
        n = len(data)
        if n == 0:
            return
        end = offset + n
        starts, runs = self._starts, self._runs
        if runs:
            last_start = starts[-1]
            last = runs[-1]
            last_end = last_start + len(last)
            if offset == last_end:  # sequential append: the common case
                last += data
                self.dirty_bytes += n
                return
            if last_start <= offset and end <= last_end:  # rewrite inside the last run
                last[offset - last_start : end - last_start] = data
                return
        # general case: merge every run overlapping or touching [offset, end)
        lo = bisect.bisect_right(starts, offset) - 1
        if lo >= 0 and starts[lo] + len(runs[lo]) < offset:
            lo += 1
        lo = max(lo, 0)
        hi = bisect.bisect_right(starts, end)
        if lo >= hi:
            starts.insert(lo, offset)
            runs.insert(lo, bytearray(data))
            self.dirty_bytes += n
            return
        new_start = min(offset, starts[lo])
        new_end = max(end, starts[hi - 1] + len(runs[hi - 1]))
        merged = bytearray(new_end - new_start)
        removed = 0
        for i in range(lo, hi):
            run = runs[i]
            pos = starts[i] - new_start
            merged[pos : pos + len(run)] = run
            removed += len(run)
        merged[offset - new_start : end - new_start] = data
        starts[lo:hi] = [new_start]
        runs[lo:hi] = [merged]
        self.dirty_bytes += len(merged) - removed

    def overlay(self, offset: int, buf: bytearray | memoryview) -> None:
        """Copy the dirty bytes that fall in [offset, offset+len(buf)) over `buf`."""
        end = offset + len(buf)
        starts, runs = self._starts, self._runs
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        while i < len(runs) and starts[i] < end:
            run_start = starts[i]
            run_end = run_start + len(runs[i])
            lo, hi = max(offset, run_start), min(end, run_end)
            if lo < hi:
                buf[lo - offset : hi - offset] = runs[i][lo - run_start : hi - run_start]
            i += 1

    def copies(self, offset: int, end: int) -> list[tuple[int, bytes]]:
        """(start, copy of the bytes) of every dirty piece in [offset, end), in order."""
        out = []
        starts, runs = self._starts, self._runs
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        while i < len(runs) and starts[i] < end:
            run_start = starts[i]
            lo, hi = max(offset, run_start), min(end, run_start + len(runs[i]))
            if lo < hi:
                out.append((lo, bytes(runs[i][lo - run_start : hi - run_start])))
            i += 1
        return out

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) of every dirty run, in order."""
        return [(start, start + len(run)) for start, run in zip(self._starts, self._runs, strict=True)]

    def covers(self, offset: int, length: int) -> bool:
        """True when one run holds all of [offset, offset+length): a read needs no device I/O."""
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and self._starts[i] + len(self._runs[i]) >= offset + length

    def truncate(self, size: int) -> None:
        """Drop dirty bytes at or past `size`."""
        while self._runs and self._starts[-1] >= size:
            self.dirty_bytes -= len(self._runs[-1])
            self._starts.pop()
            self._runs.pop()
        if self._runs:
            keep = size - self._starts[-1]
            run = self._runs[-1]
            if keep < len(run):
                self.dirty_bytes -= len(run) - keep
                del run[keep:]

    def take(self) -> list[tuple[int, bytearray]]:
        """Remove and return all runs, in offset order."""
        out = list(zip(self._starts, self._runs))
        self._starts, self._runs = [], []
        self.dirty_bytes = 0
        return out
