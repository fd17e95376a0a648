"""Metadata calls with extreme values, run side by side on our mount and on ext4, and a plain
workload to run beside them; both as separate processes (tests/mounted/test_extreme_values.py).

`python -m tests.support.extremes extreme SEED OURS EXT4 OPS`: OPS seeded random calls (setattr's
times, sizes, modes and owners; xattr names, values and flags; rename flags; open flags and modes;
mknod types and device numbers; symlink targets; name lengths for every call that makes a name),
each in a fresh directory prepared alike on both file systems. It prints one JSON line: the
calls whose outcome on our mount differs from what ext4 gives (after the differences we chose,
`expected_ours`), and each call's errno.

`python -m tests.support.extremes plain SEED DIR STOP`: creates, writes, mkdirs and renames in DIR
until the file STOP exists; prints the files it was told it made, with their contents.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from awsomefsd.meta.records import MAX_FILE_SIZE_BYTES, MAX_XATTR_VALUE_BYTES, clamp_time_ns

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100

SECONDS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**34 - 1, 10**10, 9_223_372_036, 9_223_372_037, 10**11, 2**62,
           -(2**31), -(9_223_372_037), -(10**11), -(2**62), 2**63 - 1, -(2**63)]
NANOS = [0, 1, 999_999_999]
SIZES = [0, 1, 4095, 4096, 2**31, 2**32 + 1, 2**44 - 4096, 2**44, 2**44 + 1, MAX_FILE_SIZE_BYTES,
         MAX_FILE_SIZE_BYTES + 1, 2**62, 2**63 - 1]
MODES = [0, 0o7777, 0o4755, 0o2755, 0o1777, 0o777, 0xFFFF, 0o170777, 2**31 - 1, 2**32 - 1]
IDS = [0, 1, 65534, 65535, 2**31 - 1, 2**31, 2**32 - 2, -1]
NAME_LENGTHS = [1, 2, 254, 255, 256, 1023, 1024, 1025, 4095, 4096]
TARGET_LENGTHS = [1, 255, 4094, 4095, 4096, 5000]
XATTR_NAME_LENGTHS = [6, 7, 254, 255, 256, 1000]  # "user." and the rest
XATTR_VALUE_LENGTHS = [0, 1, 4000, 65536, 65537, 200_000]
XATTR_FLAGS = [0, os.XATTR_CREATE, os.XATTR_REPLACE, 3, 4, 0xFF]
RENAME_FLAGS = [0, 1, 2, 4, 3, 5, 6, 7, 8, 1 << 31]  # NOREPLACE, EXCHANGE, WHITEOUT and what is invalid
OPEN_FLAGS = [os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_WRONLY, os.O_RDWR, os.O_APPEND, os.O_DIRECTORY,
              os.O_NOFOLLOW, os.O_NOATIME, os.O_SYNC, os.O_NONBLOCK]
FILE_TYPES = [0, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFDIR, stat.S_IFLNK,
              0o170000, 0o030000]
RDEVS = [0, os.makedev(1, 3), os.makedev(4095, (1 << 20) - 1), 2**32 - 1]
ENTRIES = ["f", "g", "d", "l", "missing"]


def _name(rng: random.Random) -> str:
    n = rng.choice(NAME_LENGTHS)
    return ("n" + "x" * n)[:n]


def _entry(rng: random.Random) -> str:
    return rng.choice(ENTRIES)


def _times(rng: random.Random) -> tuple[int, int]:
    def one() -> int:
        return rng.choice(SECONDS) * 1_000_000_000 + rng.choice(NANOS)

    return one(), one()


def _with_fd(path: Path, use: Callable[[int], object]) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        use(fd)
        os.fsync(fd)  # a write refused only when its data is flushed would show here
    finally:
        os.close(fd)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class Call:
    """One call: what it does, relative to a prepared directory, and its description."""

    what: str
    run: Callable[[Path], object]
    times: tuple[str, int, int] | None = None  # (entry, atime_ns, mtime_ns) a utimensat sets


def draw(rng: random.Random) -> Call:
    """A random call with extreme values (its arguments are drawn here, so both runs match)."""
    kind = rng.choice(["utime", "truncate", "chmod", "chown", "setxattr", "getxattr", "removexattr", "rename",
                       "open", "mknod", "mkdir", "symlink", "link", "pwrite", "fallocate"])
    if kind in ("pwrite", "fallocate"):
        offset, length = rng.choice(SIZES), rng.choice([1, 4096, 1 << 20])
        if kind == "pwrite":
            return Call(f"pwrite(f, {length}, {offset})", lambda d: _with_fd(d / "f", lambda fd: os.pwrite(
                fd, b"w" * length, offset)))
        return Call(f"fallocate(f, {offset}, {length})", lambda d: _with_fd(d / "f", lambda fd: os.posix_fallocate(
            fd, offset, length)))
    if kind == "utime":
        entry, (a, m) = rng.choice(["f", "d", "l"]), _times(rng)
        follow = entry != "l" or rng.random() < 0.5
        return Call(f"utime({entry}, ns=({a}, {m}), follow={follow})",
                    lambda d: os.utime(d / entry, ns=(a, m), follow_symlinks=follow),
                    (entry if follow else entry + "!", a, m))
    if kind == "truncate":
        entry, size = rng.choice(["f", "d"]), rng.choice(SIZES) * rng.choice([1, 1, -1])
        return Call(f"truncate({entry}, {size})", lambda d: os.truncate(d / entry, size))
    if kind == "chmod":
        entry, mode = rng.choice(["f", "d"]), rng.choice(MODES)
        return Call(f"chmod({entry}, {mode:#o})", lambda d: os.chmod(d / entry, mode))
    if kind == "chown":
        entry, uid, gid = rng.choice(["f", "d", "l"]), rng.choice(IDS), rng.choice(IDS)
        return Call(f"lchown({entry}, {uid}, {gid})", lambda d: os.lchown(d / entry, uid, gid))
    if kind in ("setxattr", "getxattr", "removexattr"):
        entry = rng.choice(["f", "d"])
        name = ("user." + "x" * 1000)[: rng.choice(XATTR_NAME_LENGTHS)]
        if rng.random() < 0.3:
            name = "user.kept"
        if kind == "getxattr":
            return Call(f"getxattr({entry}, {len(name)}-byte name)", lambda d: os.getxattr(d / entry, name))
        if kind == "removexattr":
            return Call(f"removexattr({entry}, {len(name)}-byte name)", lambda d: os.removexattr(d / entry, name))
        value, flags = b"v" * rng.choice(XATTR_VALUE_LENGTHS), rng.choice(XATTR_FLAGS)
        return Call(f"setxattr({entry}, {len(name)}-byte name, {len(value)}-byte value, flags={flags})",
                    lambda d: os.setxattr(d / entry, name, value, flags))
    if kind == "rename":
        src, flags = _entry(rng), rng.choice(RENAME_FLAGS)
        dst = _entry(rng) if rng.random() < 0.6 else _name(rng)
        return Call(f"renameat2({src}, {dst[:8]}[{len(dst)}], {flags:#x})",
                    lambda d: renameat2(d / src, d / dst, flags))
    if kind == "open":
        target = _entry(rng) if rng.random() < 0.5 else _name(rng)
        flags = 0
        for flag in rng.sample(OPEN_FLAGS, rng.randint(1, 4)):
            flags |= flag
        mode = rng.choice(MODES)
        return Call(f"open({target[:8]}[{len(target)}], {flags:#o}, {mode:#o})",
                    lambda d: os.close(os.open(d / target, flags, mode & 0xFFFFFFFF)))
    if kind == "mknod":
        name, mode = _name(rng), rng.choice(FILE_TYPES) | rng.choice(MODES) & 0o7777
        rdev = rng.choice(RDEVS)
        return Call(f"mknod({name[:8]}[{len(name)}], {mode:#o}, {rdev:#x})",
                    lambda d: os.mknod(d / name, mode, rdev))
    if kind == "mkdir":
        name, mode = _name(rng), rng.choice(MODES) & 0xFFFFFFFF
        return Call(f"mkdir({name[:8]}[{len(name)}], {mode:#o})", lambda d: os.mkdir(d / name, mode))
    if kind == "symlink":
        name, target = _name(rng), ("t" * 5000)[: rng.choice(TARGET_LENGTHS)]
        return Call(f"symlink({len(target)}-byte target, {name[:8]}[{len(name)}])",
                    lambda d: os.symlink(target, d / name))
    src, name = rng.choice(["f", "d", "l", "missing"]), _name(rng)
    return Call(f"link({src}, {name[:8]}[{len(name)}])", lambda d: os.link(d / src, d / name, follow_symlinks=False))


def prepare(d: Path) -> None:
    """What every call finds: a file with data and an xattr, another file, a directory, a symlink."""
    d.mkdir()
    (d / "f").write_bytes(b"data")
    os.setxattr(d / "f", "user.kept", b"1")
    (d / "g").write_bytes(b"")
    (d / "d").mkdir()
    os.symlink("f", d / "l")


def outcome(call: Call, d: Path) -> int:
    """The call's errno (0: it succeeded; -1: Python refused the arguments before any syscall)."""
    try:
        call.run(d)
    except OSError as exc:
        return exc.errno or -1
    except (OverflowError, ValueError):
        return -1
    return 0


def snapshot(d: Path, *, with_times: bool) -> dict[str, list[object]]:
    """Each entry of `d` (and of `d/d`): type and mode, owner, size (not a directory's), device
    number, xattrs (names and value lengths), symlink target length; times when asked."""
    out: dict[str, list[object]] = {}
    for parent in (d, d / "d"):
        try:
            names = sorted(os.listdir(parent))
        except OSError:
            continue
        for name in names:
            path = parent / name
            st = os.lstat(path)
            try:
                xattrs = sorted((x, len(os.getxattr(path, x, follow_symlinks=False)))
                                for x in os.listxattr(path, follow_symlinks=False))
            except OSError as exc:
                xattrs = [("error", exc.errno or 0)]
            row: list[object] = [st.st_mode, st.st_uid, st.st_gid, 0 if stat.S_ISDIR(st.st_mode) else st.st_size,
                                 st.st_rdev, xattrs, len(os.readlink(path)) if stat.S_ISLNK(st.st_mode) else 0]
            if with_times:
                row += [st.st_atime_ns, st.st_mtime_ns]
            out[str(path.relative_to(d))] = row
    return out


def expected_ours(call: Call, ext4: int) -> set[int]:
    """The errnos our mount may give where ext4 gave `ext4`: the same, except where we chose
    otherwise. Our files may be larger (2^60 bytes; ext4's 4 KiB-block files end at 16 TiB),
    and our xattr values up to 64 KiB (ext4 without ea_inode holds one block's worth)."""
    if call.what.startswith("truncate(f") and ext4 == errno.EFBIG:
        size = int(call.what.split(", ")[1].rstrip(")"))
        return {errno.EFBIG} if size > MAX_FILE_SIZE_BYTES else {0}
    if call.what.startswith(("pwrite", "fallocate")) and ext4 == errno.EFBIG:
        length, offset = (int(x) for x in call.what.rstrip(")").split(", ")[1:])
        if call.what.startswith("fallocate"):
            length, offset = offset, length
        return {errno.EFBIG} if offset + length > MAX_FILE_SIZE_BYTES else {0}
    if call.what.startswith("setxattr") and ext4 in (errno.ENOSPC, errno.E2BIG):
        length = int(call.what.split(", ")[2].split("-")[0])
        return {ext4} if length > MAX_XATTR_VALUE_BYTES else {0}
    return {ext4}


def run_extreme(seed: int, ours: Path, ext4: Path, ops: int) -> dict[str, object]:
    rng = random.Random(seed)
    mismatches: list[str] = []
    errnos: dict[str, int] = {}
    for i in range(ops):
        call = draw(rng)
        a, b = ext4 / f"c{i}", ours / f"c{i}"
        prepare(a)
        try:
            prepare(b)
        except OSError as exc:  # what an earlier call made is gone
            mismatches.append(f"c{i}: preparing failed: {exc} (after {call.what})")
            break
        theirs, mine = outcome(call, a), outcome(call, b)
        errnos[errno.errorcode.get(mine, str(mine))] = errnos.get(errno.errorcode.get(mine, str(mine)), 0) + 1
        label = f"c{i}: {call.what}"
        if mine not in expected_ours(call, theirs):
            mismatches.append(f"{label}: ext4 {errno.errorcode.get(theirs, theirs)}, "
                              f"ours {errno.errorcode.get(mine, mine)}")
            continue
        if mine == theirs:
            sa, sb = snapshot(a, with_times=False), snapshot(b, with_times=False)
            if sa != sb:
                diff = {k: (sa.get(k), sb.get(k)) for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k)}
                mismatches.append(f"{label}: entries differ (ext4, ours): {diff}")
        if call.times is not None and mine == 0 and not call.times[0].endswith("!"):
            st = os.stat(b / call.times[0])
            want = (clamp_time_ns(call.times[1]), clamp_time_ns(call.times[2]))
            if (st.st_atime_ns, st.st_mtime_ns) != want:
                mismatches.append(f"{label}: times {(st.st_atime_ns, st.st_mtime_ns)}, want {want}")
    return {"mismatches": mismatches, "errnos": errnos}


def run_plain(seed: int, top: Path, stop: Path) -> dict[str, object]:
    """Ordinary work until `stop` exists: {"files": {path under top: content} of what it was told
    succeeded, "error": the first call that failed (none may: an earlier change was lost)}."""
    rng = random.Random(seed)
    files: dict[str, str] = {}
    dirs = [""]
    n = 0
    try:
        while not stop.exists():
            n += 1
            action = rng.random()
            if action < 0.1:
                name = f"{rng.choice(dirs)}/d{n}".lstrip("/")
                (top / name).mkdir()
                dirs.append(name)
            elif action < 0.2 and files:
                old = rng.choice(sorted(files))
                new = f"{rng.choice(dirs)}/r{n}".lstrip("/")
                os.rename(top / old, top / new)
                files[new] = files.pop(old)
            else:
                name = f"{rng.choice(dirs)}/f{n}".lstrip("/")
                text = f"{seed}:{n}:" + "z" * rng.choice([0, 10, 5000, 70_000])
                (top / name).write_text(text)
                files[name] = text
    except OSError as exc:
        return {"files": files, "error": f"operation {n}: {exc}"}
    return {"files": files, "error": ""}


def main() -> None:
    mode, seed = sys.argv[1], int(sys.argv[2])
    if mode == "extreme":
        result: object = run_extreme(seed, Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
    else:
        result = run_plain(seed, Path(sys.argv[3]), Path(sys.argv[4]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
