"""Dirty bytes of one file waiting to be written: disjoint, sorted runs of contiguous bytes.

Small writes coalesce here so that the device sees few, large, block-aligned writes. Sequential
writes append to the last run (amortised O(1)); a write over buffered bytes overwrites them in
place. Runs may touch: merging two large neighbours would copy them, and writes that arrive out of
order (several writers, or the kernel's writeback sending a file's pages concurrently) did exactly
that, so buffering 16 MiB in 1 MiB writes of random order cost 20 times as much as in order. The
flush joins touching runs where they share a block (fs/writer.py) and the device write groups
runs that are consecutive on the device (io/extent_io.py). Pure data structure: no I/O, no awaits,
so it is atomic under trio and tested on its own.
"""

from __future__ import annotations

import bisect

MAX_RUNS = 4096  # a file written in more scattered pieces than this is flushed first
MERGE_BYTES = 64 << 10
"""A piece written just before a run joins it (moving the run's bytes) while both together stay
this small; past it, the two stay apart rather than be copied into one."""


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
        """Buffer `data` at `offset`. Each byte is copied once: into the runs it overlaps, in
        place, and into the gaps between them, where a piece extends the run that ends where it
        starts, or else becomes a run of its own. A run is never copied to make room, except that
        a piece joins the run that starts where it ends while both together stay within
        MERGE_BYTES (small writes in reverse order would otherwise make a run each)."""
        assert offset >= 0
        n = len(data)
        if n == 0:
            return
        starts, runs = self._starts, self._runs
        if runs and offset == starts[-1] + len(runs[-1]):  # sequential append: the common case
            runs[-1] += data
            self.dirty_bytes += n
            return
        view = data if isinstance(data, memoryview) else memoryview(data)
        end = offset + n
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0 or starts[i] + len(runs[i]) <= offset:
            i += 1  # the first run that ends after `offset`
        pos = offset
        while pos < end:
            if i < len(runs) and starts[i] <= pos:  # inside run i: overwrite in place
                run_start, run = starts[i], runs[i]
                stop = min(end, run_start + len(run))
                run[pos - run_start : stop - run_start] = view[pos - offset : stop - offset]
                i += 1
            else:  # a gap, up to the next run or the end of the write
                stop = end if i == len(runs) else min(end, starts[i])
                i = self._fill_gap(i, pos, view[pos - offset : stop - offset])
            pos = stop

    def _fill_gap(self, i: int, pos: int, piece: memoryview) -> int:
        """Put `piece` (at `pos`, before run i and after run i-1, touching neither's bytes) into
        the runs; returns the index of the run at the piece's end, where the write goes on (the
        run the piece joined, when it joined the one after it; else the first run after it)."""
        starts, runs = self._starts, self._runs
        size = len(piece)
        self.dirty_bytes += size
        if i > 0 and starts[i - 1] + len(runs[i - 1]) == pos:
            runs[i - 1] += piece  # amortised like any append: the run grows in place
            if i < len(runs) and starts[i] == pos + size and len(runs[i]) <= MERGE_BYTES:
                runs[i - 1] += runs[i]  # the gap is closed and the run after it is small: one run
                del starts[i], runs[i]
                return i - 1
            return i
        if i < len(runs) and starts[i] == pos + size and len(runs[i]) + size <= MERGE_BYTES:
            runs[i][0:0] = piece  # moves the run's bytes: only while it is small
            starts[i] = pos
            return i
        starts.insert(i, pos)
        runs.insert(i, bytearray(piece))
        return i + 1

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
        """True when the runs hold all of [offset, offset+length) without a gap: a read needs no
        device I/O."""
        starts, runs = self._starts, self._runs
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            return False
        end = offset + length
        reach = starts[i] + len(runs[i])
        while reach < end:
            i += 1
            if i == len(runs) or starts[i] != reach:
                return False
            reach += len(runs[i])
        return True

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
