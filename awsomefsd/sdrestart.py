"""Is systemd stopping this service only to start it again (`systemctl restart`)? And a
hand-over's start that systemd should not count as a failed one (`forget_starts`).

At SIGTERM a daemon cannot tell `systemctl stop` from `systemctl restart`: both send it. The
difference matters to a FUSE daemon. After a stop nobody serves the mount, so the daemon must
unmount. After a restart the next daemon can continue the mount from systemd's file descriptor
store. The store keeps its descriptors while a restart job is pending and flushes them only when
the unit stops for good. So nothing unmounts, and applications see a pause, not an error.

systemd knows which it is doing: it runs a job on the unit, of type "restart" or "stop", until
the next daemon has started. The daemon asks with `systemctl list-jobs UNIT`. As root this goes
to systemd's private socket, without D-Bus. The unit is read from /proc/self/cgroup. When any
step fails (not run by systemd, no `systemctl`, no answer within QUERY_TIMEOUT_S), the answer
is "no", and the daemon unmounts as at a stop. That is the safe default: a mount left with no
daemon would hang its users.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

RESTART_JOB_TYPES = frozenset({"restart", "try-restart"})
"""Job types that stop the unit and then start it again (`systemctl restart`, `try-restart`,
`reload-or-restart` on a unit that cannot reload; a `Restart=` restart is no job at all, and its
descriptors are kept anyway)."""
QUERY_TIMEOUT_S = 5.0
SYSTEMD_INVOCATION_ENV = "INVOCATION_ID"  # set by systemd for every service it starts (v232+)

Runner = Callable[[list[str]], str]


def unit_of_cgroup(cgroup_text: str) -> str | None:
    """The service a /proc/PID/cgroup's contents place the process in, or None.

    The unified line ("0::/system.slice/awsomefsd.service") or the v1 "name=systemd" line; the
    last path component that names a service (a service may have cgroups of its own below it)."""
    for line in cgroup_text.splitlines():
        _hierarchy, _sep, rest = line.partition(":")
        controllers, _sep, path = rest.partition(":")
        if controllers not in ("", "name=systemd"):
            continue
        services = [part for part in path.split("/") if part.endswith(".service")]
        if services:
            return services[-1]
    return None


def restart_job_in(list_jobs_output: str, unit: str) -> bool:
    """Does `systemctl list-jobs --no-legend --plain` output show a restart job for `unit`?

    Each line is "ID UNIT TYPE STATE"."""
    for line in list_jobs_output.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit and fields[2] in RESTART_JOB_TYPES:
            return True
    return False


def _systemctl(args: list[str]) -> str:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=True)
    return done.stdout


def own_unit(cgroup_file: Path = Path("/proc/self/cgroup")) -> str | None:
    """The systemd service this process runs in, or None (not started by systemd)."""
    if not os.environ.get(SYSTEMD_INVOCATION_ENV):
        return None
    try:
        return unit_of_cgroup(cgroup_file.read_text())
    except OSError as exc:
        log.warning("cannot read %s: %s", cgroup_file, exc)
        return None


def forget_starts(run: Runner = _systemctl, cgroup_file: Path = Path("/proc/self/cgroup")) -> bool:
    """Reset the start rate limit of the service this process runs in (`systemctl reset-failed`);
    False when not run by systemd or when systemd did not answer.

    A hand-over ends in a start (exit 75, `RestartForceExitStatus=`), and systemd counts every
    start against `StartLimitBurst=`, whatever caused it: the fifth `systemctl reload` within the
    interval made it refuse the start, and the unit failed with its mount handed over to nobody
    (tests/packaging/test_systemd_service.py). A hand-over is asked for, not a crash, so
    `awsomefsd hand-over` (the unit's ExecReload) resets the count first. Crash loops are still
    cut short: a crash is no hand-over."""
    unit = own_unit(cgroup_file)
    if unit is None:
        return False
    try:
        run(["reset-failed", unit])
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot reset the start limit of %s (%s): many hand-overs in a row may hit it", unit, exc)
        return False
    return True


def restart_pending(run: Runner = _systemctl, cgroup_file: Path = Path("/proc/self/cgroup")) -> bool:
    """True when systemd is restarting the service this process runs in. Blocking (a
    `systemctl` call, at most QUERY_TIMEOUT_S): call it from a worker thread."""
    unit = own_unit(cgroup_file)
    if unit is None:
        return False
    try:
        jobs = run(["list-jobs", "--no-legend", "--plain", "--full", unit])
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot ask systemd whether it restarts %s (%s): taking SIGTERM as a stop", unit, exc)
        return False
    return restart_job_in(jobs, unit)
