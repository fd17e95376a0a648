"""Tell systemd how the daemon is doing: the sd_notify protocol over `$NOTIFY_SOCKET`.

The unit is `Type=notify`: systemd considers the service started only when it receives
`READY=1`, so `systemctl start` returns once the filesystem is mounted and serving, and units
ordered after it can use the mount. `STOPPING=1` marks a deliberate shutdown; `WATCHDOG=1`
pings prove the event loop still runs when `WatchdogSec=` is set (a stuck loop gets the
service restarted instead of leaving a hung mount).

The protocol is one datagram of newline-separated `KEY=value` fields on a unix socket, so this
is plain socket code rather than a dependency. Outside systemd (`awsomefsd dev`, tests, a
container) `$NOTIFY_SOCKET` is unset and every call is a cheap no-op returning False. A failed
send is logged and never raised: losing a status update must not take the filesystem down.

Under the Nuitka onefile executable, systemd's main process is the onefile bootstrap and the
daemon is its child; the unit therefore sets `NotifyAccess=all`, and `watchdog_interval_s()`
accepts a `WATCHDOG_PID` naming that bootstrap (`$NUITKA_ONEFILE_PARENT`).
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import time

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
# Fields longer than this are cut: a status line is for `systemctl status`, not a log.
MAX_STATUS_CHARS = 200


def _socket_address(raw: str) -> str | bytes | None:
    """`@name` is an abstract socket (leading NUL); a path is used as is; anything else is ignored."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. `"READY=1"`, `"STATUS=mounted"`) in one datagram; True if sent.

    The socket is opened per call: notifications are rare (a few at start and stop, one
    watchdog ping every few seconds), and holding no socket means nothing to clean up or leak
    into child processes.
    """
    return notify_fds([], *fields)


def notify_fds(fds: list[int], *fields: str) -> bool:
    """`notify` with descriptors attached (SCM_RIGHTS): `FDSTORE=1` keeps them in systemd's store."""
    raw = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if not raw:
        return False
    address = _socket_address(raw)
    if address is None:
        log.warning("ignoring %s=%r: neither a path nor an abstract socket", NOTIFY_SOCKET_ENV, raw)
        return False
    for field in fields:
        assert "\n" not in field and "=" in field, f"malformed sd_notify field {field!r}"
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            if fds:
                sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))], 0, address)
            else:
                sock.sendto(message, address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc)
        return False
    return True


def barrier(timeout_s: float) -> bool:
    """Wait until systemd has processed every message sent before (`BARRIER=1`, systemd 246+):
    True then, False when it did not say so within `timeout_s` or no systemd listens. It closes
    its copy of the pipe sent with the barrier once it reaches it, and the pipe hangs up here.
    A daemon that names its successor the main process (`MAINPID=`) waits so before it exits:
    systemd must not see the main process exit and restart the service."""
    read_end, write_end = os.pipe()
    try:
        sent = notify_fds([write_end], "BARRIER=1")
        os.close(write_end)
        write_end = -1
        if not sent:
            return False
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(left * 1000)):
                return True
        return False
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def _status_field(text: str) -> str:
    line = " ".join(text.split())
    return f"STATUS={line[:MAX_STATUS_CHARS]}"


def ready(status: str | None = None) -> bool:
    """The daemon is mounted and serving: `systemctl start` returns now. Send once."""
    return notify("READY=1", *([_status_field(status)] if status else []))


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun (SIGTERM/SIGINT received): systemd shows "deactivating" meanwhile."""
    return notify("STOPPING=1", *([_status_field(status)] if status else []))


def reloading(status: str | None = None) -> bool:
    """Configuration reload in progress; follow with `ready()` when done."""
    return notify("RELOADING=1", *([_status_field(status)] if status else []))


def status(text: str) -> bool:
    """A one-line human status for `systemctl status` (e.g. "leader, 3 nodes, 2 volumes")."""
    return notify(_status_field(text))


def watchdog() -> bool:
    """Ping the watchdog: the event loop is alive. Call every `watchdog_interval_s()` seconds."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before systemd gives up on a slow start or stop (e.g. a long replay)."""
    assert seconds > 0, seconds
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval_s() -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is expected from this process.

    Half of `WatchdogSec=` (from `$WATCHDOG_USEC`), as sd_watchdog_enabled(3) recommends, so a
    single late ping does not kill a healthy daemon. `$WATCHDOG_PID`, when set, names the process
    systemd expects pings from: ours, or the onefile bootstrap that started us.
    """
    usec_text = os.environ.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = os.environ.get("WATCHDOG_PID", "")
    if pid_text:
        onefile_parent = os.environ.get("NUITKA_ONEFILE_PARENT", "")
        ours = {str(os.getpid())}
        if onefile_parent and onefile_parent == str(os.getppid()):
            ours.add(onefile_parent)
        if pid_text not in ours:
            return None
    return usec / 2 / 1_000_000


async def run_watchdog() -> None:
    """Ping the watchdog for as long as the calling nursery lives; returns at once if none is set.

    Start it in the daemon's top nursery (`nursery.start_soon(sdnotify.run_watchdog)`): because the
    pings come from the trio event loop itself, a blocked loop stops them and systemd restarts
    the service, which is the point.
    """
    import trio

    interval_s = watchdog_interval_s()
    if interval_s is None:
        return
    while True:
        watchdog()
        await trio.sleep(interval_s)
