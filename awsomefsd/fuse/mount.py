"""Mount points: find a stale FUSE mount left by a crash and clear it before mounting again.

A daemon killed with SIGKILL leaves its mount behind; every access then fails with ENOTCONN
("Transport endpoint is not connected"). The next start detects that and lazily unmounts it, but
refuses to touch a mount that still answers: that one belongs to a live daemon.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
FSTYPE = "fuse.awsomefs"
FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = Path("/etc/fuse.conf")


class MountError(Exception):
    pass


def check_can_mount(path: Path, *, transport: str, allow_other: bool, device: str = FUSE_DEVICE) -> None:
    """Refuse a mount that cannot work, in one line that says what to do, before anything is
    created or formatted: a mount point that is not a directory, no /dev/fuse, or a user who
    cannot mount. The kernel transport mounts with mount(2), which only root can do; pyfuse3
    mounts through the setuid fusermount3, which lets a user mount when /dev/fuse is open to
    them (and, for allow_other, /etc/fuse.conf says user_allow_other). Not switched for the
    user: the transports differ (pyfuse3 has no writeback cache and no descriptor hand-over),
    so which one runs is the operator's choice."""
    where = path.parent.resolve() / path.name  # not the point itself: a stat of a kept mount waits
    if not mounts_at(where, resolved=True):
        try:
            if where.exists() and not where.is_dir():
                raise MountError(f"the mount point {path} is not a directory: give a directory, or a path "
                                 "that does not exist yet")
        except OSError as exc:
            raise MountError(f"the mount point {path}: {exc.strerror}") from None
    if not os.path.exists(device):
        raise MountError(f"{device} does not exist: load the fuse module (modprobe fuse); in a container, "
                         f"pass the device in (e.g. docker run --device {device})")
    if os.geteuid() == 0:
        return
    if transport == "kernel":
        raise MountError("mounting with the kernel transport needs root: run awsomefsd as root, or mount through "
                         "fusermount3 as this user with [mount] transport = \"pyfuse3\" "
                         "(AWSOMEFS_MOUNT__TRANSPORT=pyfuse3)")
    if not os.access(device, os.R_OK | os.W_OK):
        mode = _mode(device)
        raise MountError(f"{device} is not open to this user (mode {mode}): run awsomefsd as root, or let users "
                         f"open it (chmod 0666 {device}, its usual mode)")
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is missing (the pyfuse3 transport mounts through it): install fuse3, "
                         "or run awsomefsd as root")
    if allow_other and not user_allow_other():
        raise MountError(f"[mount] allow_other needs user_allow_other in {FUSE_CONF} when not root: add that line, "
                         "or set allow_other = false (AWSOMEFS_MOUNT__ALLOW_OTHER=false)")


def _mode(path: str) -> str:
    try:
        return f"{os.stat(path).st_mode & 0o7777:04o}"
    except OSError:
        return "unknown"


def user_allow_other() -> bool:
    """Whether /etc/fuse.conf lets users mount with allow_other (an uncommented user_allow_other)."""
    try:
        lines = FUSE_CONF.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines)




def mounts_at(path: Path, *, resolved: bool = False) -> list[tuple[str, str]]:
    """(source, fstype) of every mount at `path`, innermost last. `resolved`: `path` is already
    free of symlinks, and is not stat()ed (a stat of a mount nobody serves yet waits)."""
    target = str(path) if resolved else os.path.realpath(path)
    found = []
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 3 and unescape_mount_field(fields[1]) == target:
                found.append((fields[0], fields[2]))
    return found


def unescape_mount_field(field: str) -> str:
    """A field of /proc/mounts or mountinfo as the path it names: the kernel writes space, tab,
    newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = os.fsencode(field)
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


PROBE_TIMEOUT_S = 5.0


def is_stale(path: Path) -> bool:
    """True when `path` is a FUSE mount whose daemon is gone.

    statvfs, because the kernel answers stat() of a mount root from its attribute cache even for a
    dead connection; statfs always reaches the daemon. Probed in a thread with a timeout: a hung
    (stopped) daemon must not hang us too.
    """
    outcome: queue.Queue[BaseException | None] = queue.Queue()

    def probe() -> None:
        try:
            os.statvfs(path)
        except BaseException as exc:
            outcome.put(exc)
        else:
            outcome.put(None)

    threading.Thread(target=probe, daemon=True, name="mount-probe").start()
    try:
        result = outcome.get(timeout=PROBE_TIMEOUT_S)
    except queue.Empty:
        raise MountError(f"{path} does not answer: a stopped awsomefsd still holds it") from None
    if isinstance(result, OSError):
        return result.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def prepare_mount_point(path: Path) -> None:
    """Create the mount point, clearing a stale mount of ours; refuse a live mount."""
    if is_stale(path):
        log.warning("clearing stale mount at %s (left by a daemon that did not unmount)", path)
        lazy_unmount(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MountError(f"the mount point {path} is not a directory: give a directory, or a path that "
                         "does not exist yet") from None
    except OSError as exc:
        raise MountError(f"cannot create the mount point {path}: {exc.strerror}") from None
    current = mounts_at(path)
    if any(fstype == FSTYPE for _, fstype in current):
        raise MountError(f"{path} is already mounted by a running awsomefsd; stop it first")


def lazy_unmount(path: Path) -> None:
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError:
            continue
        if result.returncode == 0:
            return
    if is_stale(path):
        raise MountError(f"cannot clear the stale mount at {path}; run: umount -l {path}")


def mount_device(path: Path) -> str | None:
    """major:minor of our mount at `path` (the innermost), from /proc/self/mountinfo: one per FUSE
    connection. Read, not stat()ed: a stat of a mount nobody serves yet (before INIT, or while
    its daemon is replaced) waits."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 4 and unescape_mount_field(fields[4]) == target and f" - {FSTYPE} " in line:
                found = fields[2]
    return found


WRITEBACK_MAX_RATIO = 20
"""The share (%) of the kernel's dirty-page limit our mount's pages may take under the writeback
cache (FUSE's default: 1 %)."""


def bdi_of(path: Path) -> Path | None:
    """The /sys/class/bdi directory of our mount at `path` (None: not mounted)."""
    device = mount_device(path)
    return None if device is None else Path("/sys/class/bdi") / device


def tune_bdi(path: Path, *, read_ahead_kb: int = 4096, writeback_cache: bool = False) -> bool:
    """Raise the kernel read-ahead of our mount so sequential reads arrive as 1 MiB requests.

    Under the writeback cache also let its dirty pages take WRITEBACK_MAX_RATIO % of the dirty
    limit and lift FUSE's strict limit, which throttles a writer against the mount's own small
    share from the first page: sequential writes ran at 350 MiB/s with it, 750 without (about
    what they reach with no writeback cache). The share stays bounded, so a stuck daemon's dirty
    pages cannot take the whole system's dirty limit, which is why FUSE has the strict limit."""
    bdi = bdi_of(path)
    if bdi is None:
        return False
    settings = {"read_ahead_kb": read_ahead_kb}
    if writeback_cache:
        settings.update(max_ratio=WRITEBACK_MAX_RATIO, strict_limit=0)
    try:
        for name, value in settings.items():
            (bdi / name).write_text(str(value))
    except OSError as exc:
        log.info("cannot tune %s: %s", bdi, exc)
        return False
    return True


ANSWERED_DEADLINE_S = 10.0


def sync_mount(path: Path) -> None:
    """syncfs(2) on the mount at `path`: the kernel sends every page it keeps written (the
    writeback cache) and the times of the inodes it writes back; no SYNCFS (Linux sends that to
    virtiofs only), so the caller commits itself. Blocking, and answered by this daemon's own
    session: call it from a worker thread while the session serves.

    syncfs can return before the WRITEs it started are answered (measured on Linux 6.18: a stop
    right after it lost the pages, 1 in 3 with read workers, whose forwarding adds a hop), so
    this then waits, up to ANSWERED_DEADLINE_S, until the connection has no request waiting for
    an answer (fusectl's `waiting`; not waited for where fusectl is not mounted)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
        waiting = Path(f"/sys/fs/fuse/connections/{os.minor(os.fstat(fd).st_dev)}/waiting")
    finally:
        os.close(fd)
    deadline = time.monotonic() + ANSWERED_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            if int(waiting.read_text()) == 0:
                return
        except (OSError, ValueError):
            return
        time.sleep(0.005)
