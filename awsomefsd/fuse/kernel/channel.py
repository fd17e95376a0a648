"""/dev/fuse: opening it, mounting it with mount(2), reading requests and writing answers.

Mounted by the daemon itself (it runs as root: the DaemonSet is privileged, the systemd unit runs
as root), with no fusermount3 in between, so the options are ours: `default_permissions` (the
kernel checks permissions with the caller's full credentials), `allow_other` when configured,
noatime, nosuid, nodev. A caller that is not root gets a one-line error naming the fallback
transport, which mounts through fusermount3.

The descriptor is non-blocking: the session waits for it with trio (epoll) and reads until EAGAIN,
so one thread serves every request without a reader thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from pathlib import Path

from awsomefsd.fuse.mount import FSTYPE, FUSE_DEVICE, MountError

DEVICE = FUSE_DEVICE
MS_NOSUID = 2
MS_NODEV = 4
MS_NOATIME = 1024
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class MountFailed(OSError, MountError):
    """A mount(2) or /dev/fuse failure; its message is the one line the user reads."""

    def __str__(self) -> str:
        return str(self.strerror)


def open_device() -> int:
    try:
        return os.open(DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            hint = " (load the fuse module: modprobe fuse)"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            hint = " (the kernel transport needs root)"
        else:
            hint = ""
        raise MountFailed(exc.errno, f"cannot open {DEVICE}: {exc.strerror}{hint}") from None


def mount(fd: int, mountpoint: Path, *, allow_other: bool, source: str = "awsomefs") -> None:
    """Mount the session on `fd` at `mountpoint`; the kernel then queues INIT on `fd`."""
    mode = os.stat(mountpoint).st_mode
    options = [f"fd={fd}", f"rootmode={stat.S_IFMT(mode):o}", f"user_id={os.getuid()}",
               f"group_id={os.getgid()}", "default_permissions"]
    if allow_other:
        options.append("allow_other")
    fstype = FSTYPE  # "fuse.awsomefs": fuse with a subtype, as /proc/mounts shows it
    rc = _libc.mount(source.encode(), os.fsencode(mountpoint), fstype.encode(),
                     MS_NOSUID | MS_NODEV | MS_NOATIME, ",".join(options).encode())
    if rc != 0:
        err = ctypes.get_errno()
        hint = " (mounting needs root; [mount] transport = \"pyfuse3\" mounts through fusermount3)" \
            if err == errno.EPERM else ""
        raise MountFailed(err, f"cannot mount {mountpoint}: {os.strerror(err)}{hint}")


def unmount(mountpoint: Path) -> None:
    """Detach the mount (lazily: files still open keep it alive until closed, as libfuse does)."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise MountFailed(err, f"cannot unmount {mountpoint}: {os.strerror(err)}")
