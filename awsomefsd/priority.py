"""A starting daemon runs ahead of the applications waiting for it (issue 41 item 5).

While a daemon starts after a crash or a hand-over, every application using its mount waits; on
a busy machine the start (mostly loading code: about 0.8 s of CPU) competes for the processors
with the very load it is stalling, and took 2.5-3 s at a load of 16-20 on two CPUs. So the
daemon raises its own priority for the start and gives it back once it serves: serving then
competes as before, and nothing is left raised when something goes wrong later. Raising a
priority needs CAP_SYS_NICE (root has it); without it the start runs as it did.

Linux applies a nice value per thread, and a thread inherits its creator's, so going back sets
every thread this process has by then.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

START_NICE = -10
"""The nice value of a starting daemon: about nine times a default process's share of a CPU."""

_to_restore: list[int] = []
"""The nice value the process had before `raise_for_start` (one at most): process-wide, as the
value itself is."""


def raise_for_start() -> None:
    """Run this process at START_NICE until `restore` (unchanged if it runs there or higher
    already, or may not raise it)."""
    if _to_restore:
        return
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        if before > START_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, START_NICE)
            _to_restore.append(before)
    except OSError as exc:  # no CAP_SYS_NICE: the start competes as any process does
        log.debug("starting at the priority given: %s", exc)


def restore() -> None:
    """Give back what `raise_for_start` took, for every thread of the process."""
    if not _to_restore:
        return
    before = _to_restore.pop()
    for _ in range(2):  # a thread started meanwhile by a raised one inherited the raised value
        try:
            tids = [int(name) for name in os.listdir("/proc/self/task")]
        except OSError:
            tids = [0]
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, before)
            except OSError as exc:  # a thread that has ended meanwhile
                log.debug("thread %d kept its start priority: %s", tid, exc)
