"""The clock of file timestamps: the kernel's coarse real-time clock.

A kernel that caches writes (FUSE_WRITEBACK_CACHE) stamps mtime and ctime itself, with
`current_time()`: the real-time clock as of the last timer tick, up to a tick (1-4 ms) behind
the precise one. A time this daemon took from the precise clock could be later than a kernel
stamp taken just after it, and the file's mtime would go back (fsx saw 1.3 ms). Both from the
coarse clock, they never do; ext4 stamps from it too.
"""

from __future__ import annotations

import time

CLOCK_REALTIME_COARSE = 5
"""Linux's clock id (linux/time.h); Python's time module does not name it."""


def file_time_ns() -> int:
    """Now, for a file's atime, mtime or ctime."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
