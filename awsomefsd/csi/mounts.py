"""Bind mounts for NodePublish: the mount(2)/umount2(2) syscalls and /proc/self/mountinfo.

Syscalls through ctypes rather than mount(8): no dependency on util-linux in the image, no
option-string parsing, and errors arrive as errno values the servicer can map. Every function here
blocks (a path lookup can wait on a FUSE server), so the node servicer calls them in worker threads
under a timeout. Linux only, and the caller needs CAP_SYS_ADMIN in the mount namespace that kubelet
shares (the DaemonSet runs privileged with Bidirectional propagation on /var/lib/kubelet).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

from awsomefsd.fuse.mount import unescape_mount_field

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

FLAG_BITS = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}
MAX_STACKED_MOUNTS = 8  # unmount at most this many mounts stacked on one target
MAX_MOUNTINFO_LINES = 100_000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    src = os.fsencode(source) if source is not None else None
    _check(_libc.mount(src, os.fsencode(target), None, flags, None), "mount", target)


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    root: str  # the path inside the source filesystem that is mounted (a bind's directory)
    options: frozenset[str]  # per-mount options (ro/rw, nosuid, ...)
    fs_type: str
    source: str
    device: str = ""  # "major:minor" of the file system: a bind mount shares its source's


def mount_table(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """The mounts of this process's namespace, in mount order."""
    entries = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f):
            if n >= MAX_MOUNTINFO_LINES:
                raise OSError(errno.E2BIG, f"more than {MAX_MOUNTINFO_LINES} mounts")
            fields = line.split()
            sep = fields.index("-")
            entries.append(
                MountEntry(
                    mount_point=unescape_mount_field(fields[4]),
                    root=unescape_mount_field(fields[3]),
                    options=frozenset(fields[5].split(",")),
                    fs_type=fields[sep + 1],
                    source=unescape_mount_field(fields[sep + 2]),
                    device=fields[2],
                )
            )
    return entries


def mount_at(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly `path`, if any."""
    found = None
    for entry in mount_table():
        if entry.mount_point == path:
            found = entry
    return found


def same_directory(a: str, b: str) -> bool:
    """True when both paths name the same directory (same device and inode)."""
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def bind_mount(source: str, target: str, flags: frozenset[str]) -> None:
    """Bind `source` onto `target`, then apply `flags` (e.g. ro) with a bind remount.

    A bind mount ignores flags on the first call, hence the remount; if the remount fails the bind
    is undone so that a read-only request never leaves a writable mount behind.
    """
    assert flags <= FLAG_BITS.keys(), flags
    _mount(source, target, MS_BIND)
    bits = 0
    for flag in flags:
        bits |= FLAG_BITS[flag]
    if bits:
        try:
            _mount(None, target, MS_BIND | MS_REMOUNT | bits)
        except OSError:
            unmount(target)
            raise


def unmount(target: str) -> None:
    """Unmount `target` (never following a symlink); a busy mount is detached lazily."""
    path = os.fsencode(target)
    if _libc.umount2(path, UMOUNT_NOFOLLOW) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY:
        _check(_libc.umount2(path, UMOUNT_NOFOLLOW | MNT_DETACH), "umount (lazy)", target)
        return
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_all(target: str) -> int:
    """Unmount every mount stacked on `target`; the number removed."""
    removed = 0
    while mount_at(target) is not None:
        if removed >= MAX_STACKED_MOUNTS:
            raise OSError(errno.ELOOP, f"more than {MAX_STACKED_MOUNTS} mounts stacked on {target}")
        unmount(target)
        removed += 1
    return removed
