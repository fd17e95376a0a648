"""When tiered data is hot again: the recall policy.

A file whose tiered data is read in `recall_reads` different minutes is recalled to the device
(Compactor.recall). One pass over everything (a backup, a grep, an indexer) reads most files in a
single minute and leaves them where they are; a file someone keeps coming back to returns to the
device. Counted per node, in memory: each node recalls what its own readers use.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_TRACKED_FILES = 65536


class RecallPolicy:
    def __init__(self, recall: Callable[[int], None], *, recall_reads: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`recall(ino)` is called once a file qualifies; `recall_reads` 0 never recalls."""
        self.recall = recall
        self.recall_reads = recall_reads
        self.clock = clock
        self._minutes: OrderedDict[int, tuple[int, int]] = OrderedDict()
        """inode -> (the last minute its tiered data was read in, minutes counted so far)."""

    def noted(self, ino: int) -> None:
        """A read of `ino` reached tiered data."""
        if not self.recall_reads:
            return
        minute = int(self.clock() // 60)
        last, count = self._minutes.get(ino, (-1, 0))
        if minute == last:
            return
        count += 1
        if count >= self.recall_reads:
            self._minutes.pop(ino, None)
            self.recall(ino)
            return
        self._minutes[ino] = (minute, count)
        self._minutes.move_to_end(ino)
        while len(self._minutes) > MAX_TRACKED_FILES:
            self._minutes.popitem(last=False)
