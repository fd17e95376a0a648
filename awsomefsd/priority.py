"""A starting daemon runs ahead of the applications waiting for it (issue 41 item 5).

While a daemon starts after a crash or a hand-over, every application using its mount waits; on
a busy machine the start (mostly loading code: about 0.8 s of CPU) competes for the processors
with the very load it is stalling: it took 2.5-3.5 s at a load of 10-20 on two CPUs. So the
daemon raises its own priority for the start and gives it back once it serves: serving then
competes as before, and nothing is left raised when something goes wrong later. Raising a
priority needs CAP_SYS_NICE (root has it); without it the start runs as it did.

Two values are raised. Linux shares the CPUs first between autogroups (one per session, when
kernel.sched_autogroup_enabled is 1, the default of most distributions) and only then by each
thread's nice value: a nice value alone changed nothing against other sessions' load (3.4 s
either way), the session's autogroup at -10 made it 0.8-1.0 s. The autogroup is the whole
session's, so only a daemon that leads its session raises it: a service (systemd makes each
its own session) or a container's process, whose autogroup ends with it even when it dies
during the start. One started from a shell would raise the shell's session and, killed before
it serves, leave it raised.
Linux applies a nice value per thread, and a thread inherits its creator's, so going back sets
every thread this process has by then.

Serving may stay raised (`[node] serve_nice`, off by default). Each request is a round trip: the
application waits for the daemon's answer and the daemon for its next request, so on a loaded
machine every request waits for a CPU twice, and the daemon's waits add up for every application
it serves. At a load average of 15-18 on two CPUs (other sessions' work), `rsync -a` of a
3,000-entry tree took 28-37 s with the daemon's autogroup at 0 (the daemon's thread waited 19-26 s
for a CPU, preempted at nearly every answer) and 9.7-12.7 s at -19 (0.2-0.6 s waiting); its nice
value alone (-19) changed nothing, as at the start (docs/fuse-transport.md, "Measured").

The start also runs without Python's cyclic garbage collector: loading the code creates some
hundred thousand objects that all live as long as the daemon, and the collections they set off
found nothing to free while costing 3% of the start's instructions. Once the daemon serves, the
objects it has by then are frozen out of later collections (`gc.freeze`) and the collector runs
again.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

START_NICE = -10
"""The nice value of a starting daemon (and of its session's autogroup): about nine times a
default process's share of a CPU."""

AUTOGROUP = Path("/proc/self/autogroup")

_to_restore: dict[str, int] = {}
"""What `raise_for_start` changed, and the value before: process-wide, as the values are."""


def raise_for_start() -> None:
    """Run this process (and its autogroup, when it leads its session) at START_NICE until
    `restore`; each is left as it is when it runs there or higher already, or when it may not be
    raised."""
    if _to_restore:
        return
    if gc.isenabled():
        gc.disable()
        _to_restore["gc"] = 1
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        if before > START_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, START_NICE)
            _to_restore["thread"] = before
    except OSError as exc:  # no CAP_SYS_NICE: the start competes as any process does
        log.debug("starting at the priority given: %s", exc)
    group = _autogroup_nice() if os.getsid(0) == os.getpid() else None
    if group is not None and group > START_NICE:
        try:
            AUTOGROUP.write_text(f"{START_NICE}\n")
            _to_restore["autogroup"] = group
        except OSError as exc:
            log.debug("starting in an autogroup of the priority given: %s", exc)


def restore(serve_nice: int | None = None) -> None:
    """Give back what `raise_for_start` took: the autogroup's value, every thread's, and the
    garbage collector. With `serve_nice` (`[node] serve_nice`), serve at that value instead:
    every thread, and the autogroup when this process leads its session."""
    if _to_restore.pop("gc", None):
        freeze_loaded()
        gc.enable()
    group = _to_restore.pop("autogroup", None)
    if serve_nice is not None and os.getsid(0) == os.getpid() and _autogroup_nice() is not None:
        group = serve_nice
    if group is not None:
        try:
            AUTOGROUP.write_text(f"{group}\n")
        except OSError as exc:
            log.warning("could not set the session's CPU priority to nice %d: %s", group, exc)
    before = _to_restore.pop("thread", None)
    if serve_nice is not None:
        before = serve_nice
    if before is None:
        return
    for _ in range(2):  # a thread started meanwhile by a raised one inherited the raised value
        try:
            tids = [int(name) for name in os.listdir("/proc/self/task")]
        except OSError:
            tids = [0]
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, before)
            except PermissionError as exc:  # no CAP_SYS_NICE for a raised serve_nice
                log.warning("serving at the priority given, not nice %d: %s", before, exc)
                return
            except OSError as exc:  # a thread that has ended meanwhile
                log.debug("thread %d kept its start priority: %s", tid, exc)


def freeze_loaded() -> None:
    """Move every object this process has now out of later collections (`gc.freeze`): once it
    serves, what it loaded lives as long as it does. A cluster member's start is not raised
    (`cli/cluster.py` gives the start back before the member opens), so nothing froze its objects
    and its full collections walked all of them: about 19 ms each, during which no request was
    answered; it freezes when its mount serves (design note 158)."""
    gc.freeze()


def _autogroup_nice() -> int | None:
    """This session's autogroup's nice value ("/autogroup-25 nice 0"); None without autogroups."""
    try:
        return int(AUTOGROUP.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
