"""Write-behind: block runs whose device write waits for the proposal that maps them (issue 42).

A cluster member acknowledges a small file's flush ahead of the log (its WriteData runs ahead:
meta/ahead.py) as soon as the data has a place on the device and checksums. Writing those blocks
then, one system call per file on the request's path, was a third of an untar's futimens on a
member. So the blocks wait here instead, and the pipeline writes everything held in one go right
before it proposes a batch (`ExtentIO.settle`, the AheadLog's `before_propose` hook): no
mapping commits before its blocks are on the device, and the blocks of many files go out
together, side by side as they were allocated.

Until then the node's own reads see the held bytes over what the device holds (`overlay`):
the map that names these blocks exists only in this node's view (the overlay of changes run
ahead), so no other node and no read worker (they read the committed map) can look for them.

Each run carries the lease epoch it was allocated under. A run whose epoch is no longer the
node's is dropped unwritten at the next settle: its mapping, proposed under that epoch, is
refused, and its blocks may already be another node's (its groups were taken back). A run whose
write failed stays held and is tried again by the next settle; the batch that needed it fails
meanwhile, so no mapping commits over unwritten blocks.

Bookkeeping happens on the trio thread only; a worker thread reading runs (`ExtentIO.read_runs`)
looks at a copy of the index, taken atomically under the GIL.
"""

from __future__ import annotations

from collections.abc import Iterable

from awsomefsd.io.layout import BLOCK_SIZE

BEHIND_MAX_BYTES = 16 << 20
"""Bytes held at most: past it a flush writes its blocks itself, as before (memory and the next
proposal's wait stay bounded)."""

HeldRun = tuple[int, bytes, int]
"""(first device block, whole blocks of data, the lease epoch it was allocated under)."""


class WriteBehind:
    """The runs held, by first device block; see the module docstring."""

    def __init__(self) -> None:
        self.runs: dict[int, HeldRun] = {}
        self.bytes = 0
        self.held = 0
        """Runs held since start."""
        self.dropped = 0
        """Runs dropped unwritten because the lease epoch they were allocated under ended."""

    def __bool__(self) -> bool:
        return bool(self.runs)

    def fits(self, nbytes: int) -> bool:
        """Would `add` of `nbytes` more stay within BEHIND_MAX_BYTES?"""
        return self.bytes + nbytes <= BEHIND_MAX_BYTES

    def add(self, dev_block: int, data: bytes, epoch: int) -> None:
        assert data and len(data) % BLOCK_SIZE == 0, len(data)
        assert dev_block not in self.runs, dev_block  # freshly allocated blocks: never held twice
        self.runs[dev_block] = (dev_block, data, epoch)
        self.bytes += len(data)
        self.held += 1

    def take_all(self) -> list[HeldRun]:
        """Every run, in device order (they stay held until `written`)."""
        return [self.runs[dev] for dev in sorted(self.runs)]

    def written(self, runs: Iterable[HeldRun]) -> None:
        """These runs are on the device now: reads find them there."""
        for dev, data, _ in runs:
            if self.runs.pop(dev, None) is not None:
                self.bytes -= len(data)

    def drop(self, runs: Iterable[HeldRun]) -> None:
        """These runs go unwritten: the lease epoch they were allocated under ended."""
        runs = list(runs)
        self.dropped += len(runs)
        self.written(runs)

    def discard(self, extents: Iterable[tuple[int, int]]) -> None:
        """The blocks of these extents are given back unmapped: any run held at their first block
        goes unwritten (the blocks may be handed out again, and a late write would land on their
        next owner's data)."""
        for dev, _count in extents:
            run = self.runs.pop(dev, None)
            if run is not None:
                self.bytes -= len(run[1])


def overlay(runs: dict[int, HeldRun], view: memoryview, dev_block: int) -> None:
    """Copy into `view` (the device's bytes from `dev_block` on, whole blocks) every held byte
    it covers: what a read must see instead of the device's old contents. `runs` may be a copy
    of `WriteBehind.runs`."""
    end = dev_block + len(view) // BLOCK_SIZE
    for first, data, _ in runs.values():
        lo, hi = max(first, dev_block), min(first + len(data) // BLOCK_SIZE, end)
        if lo < hi:
            view[(lo - dev_block) * BLOCK_SIZE : (hi - dev_block) * BLOCK_SIZE] = \
                data[(lo - first) * BLOCK_SIZE : (hi - first) * BLOCK_SIZE]


def overlaps(runs: dict[int, HeldRun], dev_block: int, count: int) -> bool:
    """Does any held run share a block with [dev_block, dev_block + count)?"""
    end = dev_block + count
    return any(first < end and first + len(data) // BLOCK_SIZE > dev_block for first, data, _ in runs.values())
