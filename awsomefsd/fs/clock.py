"""The clock of file timestamps: precise, or the kernel's own under the writeback cache.

A kernel that caches writes (FUSE_WRITEBACK_CACHE) stamps mtime and ctime itself, with
`current_time()`: the real-time clock as of the last timer tick, behind the precise one by up to
a tick (12 ms seen in this VM). A time this daemon took from the precise clock could then be
later than a kernel stamp taken just after it, and the file's mtime would go back (fsx saw
1.3 ms). So under the writeback cache file times come from the coarse clock too; otherwise from
the precise one, so that a file's mtime is never before the write that made it (as ext4's
fine-grained timestamps are not).
"""

from __future__ import annotations

import time

CLOCK_REALTIME_COARSE = 5
"""Linux's clock id (linux/time.h); Python's time module does not name it."""

_clock_id = time.CLOCK_REALTIME


def file_time_ns() -> int:
    """Now, for a file's atime, mtime or ctime."""
    return time.clock_gettime_ns(_clock_id)


def use_kernel_clock(coarse: bool) -> None:
    """Stamp file times from the kernel's coarse clock (the mount's writeback cache is on) or
    not. One clock per process: a daemon serves one mount."""
    global _clock_id
    _clock_id = CLOCK_REALTIME_COARSE if coarse else time.CLOCK_REALTIME
