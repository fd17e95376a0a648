"""A seeded, replayable, differential random file exerciser for a mounted filesystem (in the spirit
of fsx and fsstress).

Several forked processes run seeded random operations at once on a directory of the mount:

- model workers (`m0`, `m1`, ...) each own their files, so a per-process in-memory model is exact:
  buffered and O_DIRECT reads and writes, mmap reads and writes with msync, ftruncate up and down,
  fsync/fdatasync, close and reopen, rename over an existing file, link and unlink while open,
  utime with explicit nanoseconds, chmod, user.* xattrs, posix_fadvise(DONTNEED). Every read is
  compared with the model and every stat (statx with AT_STATX_FORCE_SYNC: the daemon's answer, not
  the kernel's attribute cache) checks size, mode, nlink and the mtime rules below.
- truncate workers (`t0`, ...) are model workers whose mix is mostly the truncate-then-extend race:
  many small writes make a file fragmented (the daemon compacts such files in the background),
  then truncate down to an unaligned size, extend, and read past the truncate point: zeros, also
  after dropping the page cache and with O_DIRECT.
- writer/reader pairs (`p0w`/`p0r`, ...) share one file of self-describing 4 KiB blocks (block
  number, version): the writer rewrites a few blocks with buffered pwrite, then publishes each
  block's version in shared memory, then (usually) fdatasyncs; the reader snapshots the
  publication and then reads the file (large O_DIRECT reads, sometimes buffered ones): every block
  must carry at least the version published before its read began (cross-process
  read-after-write), be intact, and not come from the future.

mtime rules: after an explicit utime the exact time stays until the next data write to that file
(across close, fsync and later flushes); after a data write (or truncate) mtime is >= the time the
operation started (minus a small clock slack) and, until the next utime, never goes backwards.

Everything is bounded by an op count and a wall-clock budget. A failure names the seed, the
worker, the failing op, the worker's last ops and the command that replays the run. A worker's op
sequence depends only on the seed and its name (not on timing), so `FSX_ONLY=<worker>` replays it
alone, deterministically. Settings come from FSX_* environment variables (see `Settings`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import mmap
import multiprocessing
import multiprocessing.synchronize
import os
import queue
import random
import re
import shlex
import stat
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

BLOCK = 4096
REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------------
# statx(2) through ctypes: the kernel asks the filesystem (AT_STATX_FORCE_SYNC) instead of answering
# from its attribute cache.

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_STATX_FORCE_SYNC = 0x2000
STATX_TYPE, STATX_MODE, STATX_NLINK = 0x1, 0x2, 0x4
STATX_MTIME, STATX_SIZE = 0x40, 0x200
STATX_BASIC_STATS = 0x7FF


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    """struct statx from linux/stat.h (256 bytes)."""

    _fields_ = [
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("_spare0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _StatxTimestamp),
        ("stx_btime", _StatxTimestamp),
        ("stx_ctime", _StatxTimestamp),
        ("stx_mtime", _StatxTimestamp),
        ("stx_rdev_major", ctypes.c_uint32),
        ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32),
        ("stx_dev_minor", ctypes.c_uint32),
        ("stx_mnt_id", ctypes.c_uint64),
        ("stx_dio_mem_align", ctypes.c_uint32),
        ("stx_dio_offset_align", ctypes.c_uint32),
        ("_spare3", ctypes.c_uint64 * 12),
    ]


assert ctypes.sizeof(_Statx) == 256, ctypes.sizeof(_Statx)
assert _Statx.stx_size.offset == 40 and _Statx.stx_mtime.offset == 112  # type: ignore[attr-defined]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Statx)]
_libc.statx.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclasses.dataclass(frozen=True, slots=True)
class StatxResult:
    mask: int
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    ctime_ns: int
    mtime_ns: int


def _ts_ns(ts: _StatxTimestamp) -> int:
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def statx(target: int | str | os.PathLike[str], *, force_sync: bool = True,
          follow_symlinks: bool = True) -> StatxResult:
    """statx(2) of a descriptor (AT_EMPTY_PATH) or a path; with `force_sync` the filesystem is asked."""
    buf = _Statx()
    flags = AT_STATX_FORCE_SYNC if force_sync else 0
    if not follow_symlinks:
        flags |= AT_SYMLINK_NOFOLLOW
    if isinstance(target, int):
        dirfd, path = target, b""
        flags |= AT_EMPTY_PATH
    else:
        dirfd, path = AT_FDCWD, os.fsencode(target)
    if _libc.statx(dirfd, path, flags, STATX_BASIC_STATS, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), None if isinstance(target, int) else os.fspath(target))
    need = STATX_TYPE | STATX_MODE | STATX_NLINK | STATX_MTIME | STATX_SIZE
    if buf.stx_mask & need != need:
        raise OSError(errno.EIO, f"statx returned mask {buf.stx_mask:#x}, missing {need & ~buf.stx_mask:#x}")
    return StatxResult(buf.stx_mask, buf.stx_ino, buf.stx_mode, buf.stx_nlink, buf.stx_uid, buf.stx_gid,
                       buf.stx_size, buf.stx_blocks, _ts_ns(buf.stx_atime), _ts_ns(buf.stx_ctime),
                       _ts_ns(buf.stx_mtime))


# --------------------------------------------------------------------------------------------------
# Settings


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value, 0) if value.strip() else default


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


@dataclasses.dataclass(frozen=True)
class Settings:
    """One run. Each field can be overridden by an environment variable (in parentheses)."""

    seed: int = 1  # FSX_SEED
    duration_s: float = 20.0  # FSX_DURATION: wall-clock budget of the workers
    ops: int = 4000  # FSX_OPS: op budget per model/truncate worker (and versions per pair writer)
    model_workers: int = 2  # FSX_MODEL
    trunc_workers: int = 2  # FSX_TRUNC
    pairs: int = 1  # FSX_PAIRS: writer/reader pairs
    readers: int = 1  # FSX_READERS: readers per pair
    pair_blocks: int = 32  # FSX_PAIR_BLOCKS: blocks of a pair's shared file
    only: str = ""  # FSX_ONLY: comma-separated worker names to run (e.g. "m1" or "p0w,p0r")
    skip: frozenset[str] = frozenset()  # FSX_SKIP: checks to count but not fail on (see CHECKS)
    slack_ms: float = 25.0  # FSX_SLACK_MS: clock slack for "mtime >= write start" (the kernel's
    # coarse clock, which stamps times under the writeback cache, lags by a tick: 12 ms seen here)
    history: int = 30  # FSX_HISTORY: ops of history printed on failure

    ENV = {"seed": "FSX_SEED", "duration_s": "FSX_DURATION", "ops": "FSX_OPS", "model_workers": "FSX_MODEL",
           "trunc_workers": "FSX_TRUNC", "pairs": "FSX_PAIRS", "readers": "FSX_READERS",
           "pair_blocks": "FSX_PAIR_BLOCKS", "only": "FSX_ONLY", "skip": "FSX_SKIP",
           "slack_ms": "FSX_SLACK_MS", "history": "FSX_HISTORY"}

    @classmethod
    def from_env(cls, base: Settings | None = None) -> Settings:
        """`base` (the test's profile; default: the defaults above) overridden by FSX_* variables."""
        base = base or cls()
        skip = os.environ.get("FSX_SKIP")
        return dataclasses.replace(
            base,
            seed=_env_int("FSX_SEED", base.seed),
            duration_s=_env_float("FSX_DURATION", base.duration_s),
            ops=_env_int("FSX_OPS", base.ops),
            model_workers=_env_int("FSX_MODEL", base.model_workers),
            trunc_workers=_env_int("FSX_TRUNC", base.trunc_workers),
            pairs=_env_int("FSX_PAIRS", base.pairs),
            readers=_env_int("FSX_READERS", base.readers),
            pair_blocks=_env_int("FSX_PAIR_BLOCKS", base.pair_blocks),
            only=os.environ.get("FSX_ONLY", base.only),
            skip=base.skip if skip is None else frozenset(s for s in skip.split(",") if s),
            slack_ms=_env_float("FSX_SLACK_MS", base.slack_ms),
            history=_env_int("FSX_HISTORY", base.history),
        )

    def env_assignments(self, defaults: Settings | None = None) -> list[str]:
        """VAR=value for every setting that differs from `defaults`, and always the seed."""
        defaults = defaults or Settings()
        out = []
        for name, var in self.ENV.items():
            value, default = getattr(self, name), getattr(defaults, name)
            if name == "seed" or value != default:
                text = ",".join(sorted(value)) if isinstance(value, frozenset) else str(value)
                out.append(f"{var}={shlex.quote(text)}")
        return out

    def worker_names(self) -> list[str]:
        names = [f"m{i}" for i in range(self.model_workers)] + [f"t{i}" for i in range(self.trunc_workers)]
        for p in range(self.pairs):
            names.append(f"p{p}w")
            names.extend(f"p{p}r{r}" if self.readers > 1 else f"p{p}r" for r in range(self.readers))
        if self.only:
            wanted = {w.strip() for w in self.only.split(",") if w.strip()}
            names = [n for n in names if n in wanted]
        return names


CHECKS = {
    "data": "a read returned other bytes than the model (or than the pair writer published)",
    "size": "st_size differs from the model",
    "mode": "st_mode differs from the model",
    "nlink": "st_nlink differs from the model",
    "xattr": "getxattr/listxattr differs from the model",
    "mtime_utime": "an mtime set by utime did not stay until the next data write",
    "mtime_write": "after a data write the mtime is older than the write's start",
    "mtime_backwards": "the mtime went backwards without a utime",
    "errno": "an operation failed that the model says must succeed (or the other way round)",
}


class FsxFailure(AssertionError):
    """A check failed: `check` is a key of CHECKS."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"[{check}] {message}")
        self.check = check
        self.message = message


# --------------------------------------------------------------------------------------------------
# Worker base: seeded rng, history, checks


class Worker:
    """One process's seeded op loop with its history; subclasses define `run`."""

    def __init__(self, name: str, settings: Settings, directory: Path, t0: float,
                 stop: multiprocessing.synchronize.Event, current: Any) -> None:
        self.name = name
        self.settings = settings
        self.dir = directory
        self.t0 = t0
        self.stop = stop
        self.current = current  # shared char array: the op in progress (reported if we hang)
        self.rng = random.Random(f"{settings.seed}:{name}")
        self.history: deque[str] = deque(maxlen=max(settings.history, 1) * 8)
        self.n = 0
        self.op_desc = ""
        self.deadline = t0 + settings.duration_s
        self.skipped: dict[str, int] = {}
        self.first_skipped: dict[str, str] = {}
        self.stats: dict[str, int] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def op(self, desc: str) -> None:
        """Start op number n: recorded in the history (and as the op in progress)."""
        self.n += 1
        self.op_desc = f"#{self.n} {desc}"
        self.history.append(f"{self.n:6d} {self.elapsed():8.3f}s  {desc}")
        self.current.value = self.op_desc.encode()[:250]

    def note(self, desc: str) -> None:
        """A step inside the current op."""
        self.history.append(f"{'':6} {self.elapsed():8.3f}s    . {desc}")

    def count(self, key: str, by: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + by

    def fail(self, check: str, message: str) -> None:
        """A violated check: raises, unless the check is in FSX_SKIP (then counted)."""
        if check in self.settings.skip:
            self.skipped[check] = self.skipped.get(check, 0) + 1
            self.first_skipped.setdefault(check, f"{self.op_desc}: {message}")
            self.note(f"(skipped check {check}: {message})")
            return
        raise FsxFailure(check, message)

    def running(self, ops_done: int) -> bool:
        return ops_done < self.settings.ops and time.monotonic() < self.deadline and not self.stop.is_set()

    def run(self) -> None:
        raise NotImplementedError


def _dt(ns: int) -> str:
    """A time difference for humans."""
    return f"{ns / 1e6:.3f} ms" if abs(ns) < 10**10 else f"{ns / 1e9:.3f} s"


def describe_mismatch(expected: bytes, got: bytes, offset: int, old: bytes | None = None) -> str:
    """Where two byte strings that should be equal differ (file offsets), briefly."""
    parts = []
    if len(got) != len(expected):
        parts.append(f"length {len(got)}, expected {len(expected)}")
    n = min(len(got), len(expected))
    diffs = [i for i in range(n) if got[i] != expected[i]] if got[:n] != expected[:n] else []
    if diffs:
        first, last = diffs[0], diffs[-1]
        parts.append(f"{len(diffs)} bytes differ in file range [{offset + first}, {offset + last + 1})")
        parts.append(f"first at {offset + first}: expected {expected[first:first + 8].hex()} "
                     f"got {got[first:first + 8].hex()}")
        bad = got[first:last + 1]
        if old is not None and len(old) >= last + 1 and len(diffs) >= 8 and bad == old[first:last + 1]:
            parts.append("the differing bytes are the file's OLD contents (before the truncate)")
        elif not any(bad) and any(expected[first:last + 1]):
            parts.append("got zeros")
        elif not any(expected[first:last + 1]):
            parts.append("expected zeros (a hole or past a truncate point)")
    return "; ".join(parts)


def aligned_buffer(n: int) -> mmap.mmap:
    """A page-aligned anonymous buffer for O_DIRECT."""
    return mmap.mmap(-1, max(n, BLOCK))


# --------------------------------------------------------------------------------------------------
# Model workers


@dataclasses.dataclass(eq=False)
class FileModel:
    ident: int
    data: bytearray
    mode: int
    names: list[str]
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    fd: int | None = None
    dfd: int | None = None  # a second descriptor with O_DIRECT
    mtime_exact: int | None = None  # set by utime; valid until the next data write
    mtime_floor: int = 0  # start of the latest data write/truncate
    mtime_seen: int = 0  # the last mtime observed since the last utime

    def label(self) -> str:
        return f"F{self.ident}({'|'.join(self.names) or 'unlinked'})"


XATTR_NAMES = [f"user.fsx{i}" for i in range(6)]
MAX_FILE = 2 << 20
MAX_INODES = 5
MAX_NAMES = 3
FLUSH_WATCH_S = 1.5  # the daemon flushes buffered writes about a second after them


class ModelWorker(Worker):
    """Private files, exact model. `trunc_heavy` makes the truncate-then-extend race most of the mix."""

    def __init__(self, *args: Any, trunc_heavy: bool = False) -> None:
        super().__init__(*args)
        self.trunc_heavy = trunc_heavy
        self.files: list[FileModel] = []
        self.next_ident = 0
        self.next_name = 0
        self.slack_ns = int(self.settings.slack_ms * 1e6)
        self.last_watch = -400
        ops: list[tuple[Callable[[FileModel], None], float]] = [
            (self.op_write, 20), (self.op_read, 14), (self.op_dwrite, 6), (self.op_dread, 6),
            (self.op_mmap_read, 3), (self.op_mmap_write, 4), (self.op_truncate, 5), (self.op_trunc_down_up, 4),
            (self.op_fsync, 4), (self.op_reopen, 4), (self.op_rename_over, 2), (self.op_link, 2),
            (self.op_unlink, 2), (self.op_utime, 5), (self.op_chmod, 2), (self.op_setxattr, 3),
            (self.op_getxattr, 2), (self.op_removexattr, 2), (self.op_listxattr, 2), (self.op_dontneed, 4),
            (self.op_stat, 6), (self.op_verify, 2), (self.op_frag_trunc, 1), (self.op_utime_watch, 1),
            (self.op_fallocate, 2), (self.op_seek, 2), (self.op_copy_range, 3),
        ]
        if trunc_heavy:
            ops = [(self.op_frag_trunc, 10), (self.op_verify, 2), (self.op_utime, 1), (self.op_write, 2),
                   (self.op_read, 1), (self.op_reopen, 1), (self.op_dontneed, 1)]
        self.ops: list[Callable[[FileModel], None]] = [fn for fn, _ in ops]
        self.weights = [w for _, w in ops]

    # -- helpers ----------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return str(self.dir / name)

    def new_name(self) -> str:
        self.next_name += 1
        return f"{self.name}_{self.next_name}"

    def create(self) -> FileModel:
        name = self.new_name()
        self.op(f"create {name}")
        start = time.time_ns()
        fd = os.open(self.path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.next_ident += 1
        f = FileModel(self.next_ident, bytearray(), stat.S_IFREG | 0o644, [name], fd=fd, mtime_floor=start)
        self.files.append(f)
        self.check_stat(f)
        return f

    def ensure_fd(self, f: FileModel) -> int:
        if f.fd is None:
            name = self.rng.choice(f.names)
            f.fd = os.open(self.path(name), os.O_RDWR)
            self.note(f"open {name} -> fd {f.fd}")
        return f.fd

    def ensure_dfd(self, f: FileModel) -> int:
        if f.dfd is None:
            fd = self.ensure_fd(f)
            # through /proc: works for an unlinked file too
            f.dfd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_DIRECT)
            self.note(f"open O_DIRECT -> fd {f.dfd}")
        return f.dfd

    def close_fds(self, f: FileModel) -> None:
        for attr in ("dfd", "fd"):
            fd = getattr(f, attr)
            if fd is not None:
                setattr(f, attr, None)
                os.close(fd)
        if not f.names:
            self.files.remove(f)  # an unlinked file is gone with its last descriptor
            self.note(f"{f.label()} gone (last descriptor of an unlinked file closed)")

    def data_write_started(self, f: FileModel, start_ns: int) -> None:
        f.mtime_exact = None
        f.mtime_floor = start_ns

    def model_write(self, f: FileModel, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(f.data):
            f.data.extend(bytes(end - len(f.data)))
        f.data[offset:end] = data

    def model_truncate(self, f: FileModel, size: int) -> None:
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))

    def expect_data(self, f: FileModel, offset: int, got: bytes, length: int, how: str,
                    old: bytes | None = None) -> None:
        expected = bytes(f.data[offset:offset + length])
        if got != expected:
            self.fail("data", f"{how} of {f.label()} [{offset}, +{length}) (file size {len(f.data)}): "
                      + describe_mismatch(expected, got, offset, old[offset:offset + length] if old else None))

    def check_stat(self, f: FileModel, via: str = "fd") -> None:
        """statx(AT_STATX_FORCE_SYNC): size, mode and nlink always; the mtime rules."""
        if via == "path" and f.names:
            name = self.rng.choice(f.names)
            st = statx(self.path(name))
            via = f"path {name}"
        else:
            st = statx(self.ensure_fd(f))
            via = "fd"
        self.count("statx")
        what = f"statx({via}) of {f.label()}"
        if st.size != len(f.data):
            self.fail("size", f"{what}: size {st.size}, model {len(f.data)}")
        if st.mode != f.mode:
            self.fail("mode", f"{what}: mode {st.mode:o}, model {f.mode:o}")
        if st.nlink != len(f.names):
            self.fail("nlink", f"{what}: nlink {st.nlink}, model {len(f.names)}")
        m = st.mtime_ns
        if f.mtime_exact is not None:
            if m != f.mtime_exact:
                self.fail("mtime_utime", f"{what}: mtime {m} but utime set {f.mtime_exact} and no data write "
                          f"followed (off by {'+' if m > f.mtime_exact else '-'}{_dt(abs(m - f.mtime_exact))})")
        else:
            if m < f.mtime_floor - self.slack_ns:
                self.fail("mtime_write", f"{what}: mtime {m} is {_dt(f.mtime_floor - m)} older than "
                          f"the start of the last data write/truncate ({f.mtime_floor})")
            if m < f.mtime_seen:
                self.fail("mtime_backwards", f"{what}: mtime {m} went back from {f.mtime_seen} "
                          f"(by {_dt(f.mtime_seen - m)})")
        f.mtime_seen = max(f.mtime_seen, m) if f.mtime_exact is None else m
        self.note(f"statx: size {st.size} mode {st.mode:o} nlink {st.nlink} mtime {m}")

    def pick(self) -> FileModel:
        return self.rng.choice(self.files)

    def rand_len(self, cap: int = 65536) -> int:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.randint(1, 512)
        if r < 0.8:
            return self.rng.randint(1, 8192)
        return self.rng.randint(1, cap)

    # -- loop ---------------------------------------------------------------------------------------
    def run(self) -> None:
        os.umask(0o022)
        for _ in range(2):
            self.create()
        done = 0
        while self.running(done):
            if sum(1 for f in self.files if f.names) < 2 or (len(self.files) < MAX_INODES and self.rng.random() < 0.01):
                self.create()
            f = self.pick()
            fn = self.rng.choices(self.ops, self.weights)[0]
            fn(f)
            done += 1
            if f in self.files and self.rng.random() < 0.25:
                self.check_stat(f, via="path" if self.rng.random() < 0.3 else "fd")
        for f in list(self.files):  # final: close everything, verify through fresh descriptors
            self.op(f"final close {f.label()}")
            self.close_fds(f)
        for f in self.files:
            self.op(f"final verify {f.label()}")
            self.verify(f)
            self.close_fds(f)
        self.stats["ops"] = done

    # -- operations ---------------------------------------------------------------------------------
    def op_write(self, f: FileModel) -> None:
        size = len(f.data)
        length = self.rand_len()
        offset = self.rng.randint(0, min(size + 65536, MAX_FILE - length))
        data = self.rng.randbytes(length)
        self.op(f"pwrite {f.label()} off={offset} len={length} (size {size}{', hole' if offset > size else ''})")
        fd = self.ensure_fd(f)
        start = time.time_ns()
        n = os.pwrite(fd, data, offset)
        if n != length:
            self.fail("errno", f"short pwrite: {n} of {length}")
        self.model_write(f, offset, data)
        self.data_write_started(f, start)

    def op_fallocate(self, f: FileModel) -> None:
        """fallocate: the default mode or ZERO_RANGE, with or without KEEP_SIZE, or PUNCH_HOLE,
        inside the file, across its end or past it. The size and the bytes follow the model; the
        mtime moves in every mode, as on ext4 (which calls file_modified first)."""
        size = len(f.data)
        mode = self.rng.choice([0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE])
        offset = self.rng.randint(0, min(size + 8192, MAX_FILE - 1))
        length = min(self.rand_len(200_000), MAX_FILE - offset)
        end = offset + length
        self.op(f"fallocate {f.label()} mode={mode:#x} off={offset} len={length} (size {size})")
        start = time.time_ns()
        try:
            fallocate(self.ensure_fd(f), mode, offset, length)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:  # a filesystem without it (the pyfuse3 fallback): nothing changed
                self.count("fallocate_unsupported")
                return
            self.fail("errno", f"fallocate mode {mode:#x} failed: {exc}")
        if mode & (FALLOC_FL_ZERO_RANGE | FALLOC_FL_PUNCH_HOLE) and offset < size:
            f.data[offset:min(end, size)] = bytes(min(end, size) - offset)
        if not mode & FALLOC_FL_KEEP_SIZE and end > size:
            f.data.extend(bytes(end - size))
        self.data_write_started(f, start)

    def op_copy_range(self, f: FileModel) -> None:
        """copy_file_range from `f` into one of this worker's files (or `f` itself, without
        overlap), looping on short counts as callers must. Offsets often share their place within
        a block, which makes whole blocks shared copy-on-write; later writes to either file must
        not show in the other."""
        g = self.pick()
        size = len(f.data)
        off_in = self.rng.randint(0, size + 100)
        length = self.rand_len(600_000)
        if self.rng.random() < 0.6:
            off_out = off_in % 4096 + 4096 * self.rng.randint(0, (len(g.data) + 65536) // 4096)
        else:
            off_out = self.rng.randint(0, len(g.data) + 65536)
        length = max(1, min(length, MAX_FILE - off_out))
        if g is f and off_in < off_out + length and off_out < off_in + length:
            return  # the call refuses a range overlapping itself (EINVAL): nothing to model
        self.op(f"copy_file_range {f.label()} off={off_in} -> {g.label()} off={off_out} len={length} "
                f"(sizes {size}, {len(g.data)})")
        src, dst = self.ensure_fd(f), self.ensure_fd(g)
        start = time.time_ns()
        copied = 0
        while copied < length:  # each call reads the file as the previous ones left it (g may be f)
            available = max(0, min(length - copied, len(f.data) - (off_in + copied)))
            try:
                n = os.copy_file_range(src, dst, length - copied, off_in + copied, off_out + copied)
            except OSError as exc:
                self.fail("errno", f"copy_file_range after {copied} bytes: {exc}")
            if n > available or (n == 0 and available):
                self.fail("data", f"copy_file_range after {copied} bytes copied {n}, the source holds {available}")
            if n == 0:
                break
            self.model_write(g, off_out + copied, bytes(f.data[off_in + copied:off_in + copied + n]))
            copied += n
        if copied:
            self.data_write_started(g, start)

    def op_seek(self, f: FileModel) -> None:
        """SEEK_DATA and SEEK_HOLE agree with the bytes: ENXIO at or past the end, a result at or
        after the offset, no data skipped (what lies between the offset and the next data reads
        as zeros), and a hole at or before the end."""
        size = len(f.data)
        offset = self.rng.randint(0, size + 4096)
        fd = self.ensure_fd(f)
        self.op(f"lseek {f.label()} SEEK_DATA/SEEK_HOLE from {offset} (size {size})")
        found = []
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            try:
                found.append(os.lseek(fd, offset, whence))
            except OSError as exc:
                # ENXIO: past the end, or (SEEK_DATA) nothing but a hole up to the end
                if exc.errno != errno.ENXIO or (offset < size and whence == os.SEEK_HOLE):
                    self.fail("errno", f"lseek({offset}, {'SEEK_DATA' if whence == os.SEEK_DATA else 'SEEK_HOLE'}): {exc}")
                found.append(-1)
        data, hole = found
        self.note(f"SEEK_DATA {data}, SEEK_HOLE {hole}")
        if offset >= size:
            if (data, hole) != (-1, -1):
                self.fail("data", f"lseek past the end ({offset} of {size}) gave {data}, {hole}, not ENXIO")
            return
        if not offset <= hole <= size:
            self.fail("data", f"SEEK_HOLE from {offset} gave {hole} (size {size})")
        skipped_to = size if data == -1 else data
        if data != -1 and not offset <= data < size:
            self.fail("data", f"SEEK_DATA from {offset} gave {data} (size {size})")
        if any(f.data[offset:skipped_to]):
            first = next(i for i in range(offset, skipped_to) if f.data[i])
            self.fail("data", f"SEEK_DATA from {offset} gave {data} but byte {first} holds data")

    def op_read(self, f: FileModel) -> None:
        size = len(f.data)
        length = self.rand_len(200_000)
        offset = self.rng.randint(0, size + 4096)
        self.op(f"pread {f.label()} off={offset} len={length} (size {size})")
        got = os.pread(self.ensure_fd(f), length, offset)
        self.expect_data(f, offset, got, length, "pread")

    def op_dwrite(self, f: FileModel) -> None:
        size = len(f.data)
        nblocks = self.rng.randint(1, 16)
        first = self.rng.randint(0, min(-(-size // BLOCK) + 8, MAX_FILE // BLOCK - nblocks))
        offset, length = first * BLOCK, nblocks * BLOCK
        data = self.rng.randbytes(length)
        self.op(f"O_DIRECT pwrite {f.label()} off={offset} len={length} (size {size})")
        dfd = self.ensure_dfd(f)
        buf = aligned_buffer(length)
        try:
            buf[:length] = data
            start = time.time_ns()
            n = os.pwritev(dfd, [memoryview(buf)[:length]], offset)
        finally:
            buf.close()
        if n != length:
            self.fail("errno", f"short O_DIRECT write: {n} of {length}")
        self.model_write(f, offset, data)
        self.data_write_started(f, start)

    def op_dread(self, f: FileModel) -> None:
        size = len(f.data)
        nblocks = self.rng.randint(1, 64)
        first = self.rng.randint(0, -(-size // BLOCK) + 1)
        offset, length = first * BLOCK, nblocks * BLOCK
        self.op(f"O_DIRECT pread {f.label()} off={offset} len={length} (size {size})")
        got = self.direct_read(self.ensure_dfd(f), offset, length)
        self.expect_data(f, offset, got, length, "O_DIRECT pread")

    def direct_read(self, dfd: int, offset: int, length: int) -> bytes:
        buf = aligned_buffer(length)
        try:
            n = os.preadv(dfd, [memoryview(buf)[:length]], offset)
            return bytes(buf[:n])
        finally:
            buf.close()

    def extend_for_mmap(self, f: FileModel) -> None:
        if not f.data:
            size = self.rng.randint(1, 3 * BLOCK)
            self.note(f"ftruncate to {size} (mmap needs a non-empty file)")
            start = time.time_ns()
            os.ftruncate(self.ensure_fd(f), size)
            self.model_truncate(f, size)
            self.data_write_started(f, start)

    def op_mmap_read(self, f: FileModel) -> None:
        self.op(f"mmap read {f.label()} (size {len(f.data)})")
        self.extend_for_mmap(f)
        size = len(f.data)
        offset = self.rng.randrange(size)
        length = self.rng.randint(1, size - offset)
        self.note(f"read [{offset}, +{length})")
        with mmap.mmap(self.ensure_fd(f), size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            got = mm[offset:offset + length]
        self.expect_data(f, offset, got, length, "mmap read")

    def op_mmap_write(self, f: FileModel) -> None:
        self.op(f"mmap write {f.label()} (size {len(f.data)})")
        self.extend_for_mmap(f)
        size = len(f.data)
        offset = self.rng.randrange(size)
        length = self.rng.randint(1, min(size - offset, 3 * BLOCK))
        data = self.rng.randbytes(length)
        self.note(f"write [{offset}, +{length}), msync")
        start = time.time_ns()
        with mmap.mmap(self.ensure_fd(f), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[offset:offset + length] = data
            page = offset - offset % mmap.PAGESIZE
            mm.flush(page, offset + length - page)
        self.model_write(f, offset, data)
        self.data_write_started(f, start)

    def op_truncate(self, f: FileModel) -> None:
        size = len(f.data)
        r = self.rng.random()
        if r < 0.45:
            new = self.rng.randint(0, size)
        elif r < 0.9:
            new = self.rng.randint(size, min(size + 300_000, MAX_FILE))
        else:
            new = size
        self.op(f"ftruncate {f.label()} {size} -> {new}")
        start = time.time_ns()
        os.ftruncate(self.ensure_fd(f), new)
        self.model_truncate(f, new)
        self.data_write_started(f, start)

    def op_trunc_down_up(self, f: FileModel) -> None:
        """Truncate down to an unaligned size, extend again, read past the truncate point."""
        size = len(f.data)
        if size < 2:
            return self.op_write(f)
        down = self.rng.randint(1, size - 1)
        if down % BLOCK == 0:
            down -= 1
        up = self.rng.randint(down + 1, min(size + 2 * BLOCK, MAX_FILE))
        by_write = self.rng.random() < 0.5
        self.op(f"truncate-down-up {f.label()} {size} -> {down} -> {up} ({'write' if by_write else 'ftruncate'})")
        self.truncate_then_extend(f, down, up, by_write, old=bytes(f.data))

    def truncate_then_extend(self, f: FileModel, down: int, up: int, by_write: bool, old: bytes) -> None:
        fd = self.ensure_fd(f)
        start = time.time_ns()
        os.ftruncate(fd, down)
        self.model_truncate(f, down)
        self.data_write_started(f, start)
        start = time.time_ns()
        if by_write:
            data = self.rng.randbytes(self.rng.randint(1, 300))
            os.pwrite(fd, data, up - 1)
            self.model_write(f, up - 1, data)
            self.note(f"pwrite {len(data)} bytes at {up - 1}")
        else:
            os.ftruncate(fd, up)
            self.model_truncate(f, up)
        self.data_write_started(f, start)
        self.check_stat(f)
        lo = down - down % BLOCK
        end = len(f.data)
        self.expect_data(f, lo, os.pread(fd, end - lo, lo), end - lo, "pread past the truncate point", old)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.expect_data(f, lo, os.pread(fd, end - lo, lo), end - lo,
                         "pread past the truncate point after fadvise(DONTNEED)", old)
        length = -(-(end - lo) // BLOCK) * BLOCK
        self.expect_data(f, lo, self.direct_read(self.ensure_dfd(f), lo, length), length,
                         "O_DIRECT read past the truncate point", old)
        # again once flushed: the flush waits for background work holding the file (a compaction)
        self.note("fsync, read past the truncate point again (DONTNEED, then O_DIRECT)")
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.expect_data(f, lo, os.pread(fd, end - lo, lo), end - lo,
                         "pread past the truncate point after fsync and DONTNEED", old)
        self.expect_data(f, lo, self.direct_read(self.ensure_dfd(f), lo, length), length,
                         "O_DIRECT read past the truncate point after fsync", old)
        self.check_stat(f)

    def op_frag_trunc(self, f: FileModel) -> None:
        """The truncate-then-extend race with background compaction.

        The daemon compacts a file after 32 small runs were flushed (or at a release after a few):
        a batch of small writes in distinct blocks, flushed (fsync every few writes), leaves the
        file fragmented; a few more small writes stay buffered, so the truncate's own flush may be
        the one that asks for the compaction. Then truncate down to an unaligned size, extend
        (ftruncate up or a write past EOF) and read past the truncate point.
        """
        fd = self.ensure_fd(f)
        nblocks = len(f.data) // BLOCK
        if nblocks < 48 or len(f.data) > 1 << 20:
            nblocks = self.rng.randint(48, 96)
            self.op(f"frag-trunc {f.label()}: rewrite as {nblocks} blocks, fsync")
            data = self.rng.randbytes(nblocks * BLOCK)
            start = time.time_ns()
            os.ftruncate(fd, 0)
            for pos in range(0, len(data), 65536):
                os.pwrite(fd, data[pos:pos + 65536], pos)
            os.fsync(fd)
            f.data = bytearray(data)
            self.data_write_started(f, start)
        if f.names and self.rng.random() < 0.5:
            self.op(f"frag-trunc {f.label()}: close+reopen")
            self.close_fds(f)
            fd = self.ensure_fd(f)
        flushed = self.rng.randint(20, 34)
        every = self.rng.randint(1, flushed)
        buffered = self.rng.randint(0, 10)
        self.op(f"frag-trunc {f.label()}: {flushed} small writes in distinct blocks with fsync every {every} "
                f"and at the end, then {buffered} more unflushed")
        blocks = self.rng.sample(range(nblocks), flushed + buffered)
        start = time.time_ns()
        for i, block in enumerate(blocks):
            inner = self.rng.randrange(BLOCK - 1)
            data = self.rng.randbytes(self.rng.randint(1, min(2000, BLOCK - inner)))
            os.pwrite(fd, data, block * BLOCK + inner)
            self.model_write(f, block * BLOCK + inner, data)
            if i + 1 == flushed or (i + 1 < flushed and (i + 1) % every == 0):
                os.fsync(fd)
        self.data_write_started(f, start)
        how = self.rng.choice(("none", "none", "none", "fsync", "close"))
        if how == "close" and not f.names:
            how = "fsync"  # closing an unlinked file's last descriptor would end it
        if how == "fsync":
            os.fsync(fd)
        elif how == "close":
            self.close_fds(f)  # the release may ask the daemon to compact the file
            fd = self.ensure_fd(f)
        size = len(f.data)
        down = self.rng.randint(BLOCK, size - 1)
        if down % BLOCK == 0:
            down -= self.rng.randint(1, BLOCK - 1)
        up = self.rng.randint(down + 1, size + 2 * BLOCK)
        by_write = self.rng.random() < 0.5
        self.op(f"frag-trunc {f.label()}: then {how}; truncate {size} -> {down} -> {up} "
                f"({'write' if by_write else 'ftruncate'}), read past {down}")
        self.truncate_then_extend(f, down, up, by_write, old=bytes(f.data))

    def op_fsync(self, f: FileModel) -> None:
        data_only = self.rng.random() < 0.5
        self.op(f"{'fdatasync' if data_only else 'fsync'} {f.label()}")
        (os.fdatasync if data_only else os.fsync)(self.ensure_fd(f))

    def op_reopen(self, f: FileModel) -> None:
        self.op(f"close+reopen {f.label()}")
        self.close_fds(f)
        if f in self.files:
            self.ensure_fd(f)
            if self.rng.random() < 0.5:
                self.check_stat(f)

    def op_rename_over(self, f: FileModel) -> None:
        if not f.names:
            return self.op_read(f)
        others = [g for g in self.files if g.names and g is not f]
        if not others:
            return self.op_stat(f)
        target = self.rng.choice(others)
        src, dst = self.rng.choice(f.names), self.rng.choice(target.names)
        self.op(f"rename {src} over {dst} ({f.label()} over {target.label()})")
        os.rename(self.path(src), self.path(dst))
        f.names.remove(src)
        f.names.append(dst)
        target.names.remove(dst)
        if not target.names and target.fd is None:
            self.files.remove(target)
        elif target.fd is not None and not target.names:
            self.check_stat(target)  # open and unlinked: still there, nlink 0
        self.check_stat(f)

    def op_link(self, f: FileModel) -> None:
        if not f.names or len(f.names) >= MAX_NAMES:
            return self.op_stat(f)
        src, dst = self.rng.choice(f.names), self.new_name()
        self.op(f"link {src} -> {dst} ({f.label()})")
        os.link(self.path(src), self.path(dst))
        f.names.append(dst)
        self.check_stat(f)

    def op_unlink(self, f: FileModel) -> None:
        if not f.names:
            return self.op_read(f)
        orphans = sum(1 for g in self.files if not g.names)
        if len(f.names) == 1 and orphans < 2 and self.rng.random() < 0.5:
            self.ensure_fd(f)  # mostly keep it open: an unlinked open file stays readable
        name = self.rng.choice(f.names)
        self.op(f"unlink {name} ({f.label()}, {'open' if f.fd is not None else 'not open'})")
        os.unlink(self.path(name))
        f.names.remove(name)
        if not f.names and f.fd is None:
            self.files.remove(f)
            return
        self.check_stat(f)
        if not f.names:
            self.op_read(f)

    def op_utime(self, f: FileModel) -> None:
        mtime = self.rng.randint(1_000_000_000, 1_700_000_000) * 1_000_000_000 + self.rng.randrange(1_000_000_000)
        atime = mtime + self.rng.randint(0, 10**12)
        by_fd = not f.names or self.rng.random() < 0.6
        self.op(f"utime {f.label()} mtime={mtime} via {'fd' if by_fd else 'path'}")
        if by_fd:
            os.utime(self.ensure_fd(f), ns=(atime, mtime))
        else:
            os.utime(self.path(self.rng.choice(f.names)), ns=(atime, mtime))
        f.mtime_exact = mtime
        self.check_stat(f)

    def op_utime_watch(self, f: FileModel) -> None:
        """A buffered write, then utime, then watch the mtime while the daemon's timer flushes the
        write (about a second after it): the explicit time must stay. An observation window of
        FLUSH_WATCH_S, not a wait for something to happen."""
        if self.n - self.last_watch < 400:  # bounded share of the run (counted, so replays agree)
            return self.op_stat(f)
        self.last_watch = self.n
        offset = self.rng.randint(0, len(f.data))
        data = self.rng.randbytes(self.rng.randint(1, 3000))
        mtime = self.rng.randint(1_000_000_000, 1_700_000_000) * 1_000_000_000 + self.rng.randrange(1_000_000_000)
        self.op(f"utime-watch {f.label()}: pwrite off={offset} len={len(data)}, utime mtime={mtime}, "
                f"statx for {FLUSH_WATCH_S} s")
        fd = self.ensure_fd(f)
        start = time.time_ns()
        os.pwrite(fd, data, offset)
        self.model_write(f, offset, data)
        self.data_write_started(f, start)
        os.utime(fd, ns=(mtime, mtime))
        f.mtime_exact = mtime
        end = time.monotonic() + FLUSH_WATCH_S
        while time.monotonic() < end:
            self.check_stat(f)
            time.sleep(0.1)
        self.expect_data(f, offset, os.pread(fd, len(data), offset), len(data), "pread after the watch")

    def op_chmod(self, f: FileModel) -> None:
        mode = self.rng.choice((0o600, 0o640, 0o644, 0o664, 0o666, 0o700, 0o755, 0o444, 0o400))
        self.op(f"chmod {f.label()} {mode:o}")
        if f.names and self.rng.random() < 0.5:
            os.chmod(self.path(self.rng.choice(f.names)), mode)
        else:
            os.fchmod(self.ensure_fd(f), mode)
        f.mode = stat.S_IFREG | mode
        self.check_stat(f)

    def op_setxattr(self, f: FileModel) -> None:
        name = self.rng.choice(XATTR_NAMES)
        value = self.rng.randbytes(self.rng.randint(1, 200))
        self.op(f"setxattr {f.label()} {name} len={len(value)}")
        os.setxattr(self.ensure_fd(f), name, value)
        f.xattrs[name] = value

    def op_getxattr(self, f: FileModel) -> None:
        name = self.rng.choice(XATTR_NAMES)
        self.op(f"getxattr {f.label()} {name}")
        try:
            got: bytes | None = os.getxattr(self.ensure_fd(f), name)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            got = None
        if got != f.xattrs.get(name):
            self.fail("xattr", f"getxattr {name}: {None if got is None else got[:16].hex()}, model "
                      f"{None if name not in f.xattrs else f.xattrs[name][:16].hex()}")

    def op_removexattr(self, f: FileModel) -> None:
        name = self.rng.choice(XATTR_NAMES)
        self.op(f"removexattr {f.label()} {name} ({'set' if name in f.xattrs else 'absent'})")
        try:
            os.removexattr(self.ensure_fd(f), name)
            err = 0
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            err = exc.errno
        if bool(err) != (name not in f.xattrs):
            self.fail("xattr", f"removexattr {name}: errno {err}, model has it: {name in f.xattrs}")
        f.xattrs.pop(name, None)

    def op_listxattr(self, f: FileModel) -> None:
        self.op(f"listxattr {f.label()}")
        got = sorted(os.listxattr(self.ensure_fd(f)))
        if got != sorted(f.xattrs):
            self.fail("xattr", f"listxattr: {got}, model {sorted(f.xattrs)}")

    def op_dontneed(self, f: FileModel) -> None:
        self.op(f"fadvise(DONTNEED) {f.label()}")
        os.posix_fadvise(self.ensure_fd(f), 0, 0, os.POSIX_FADV_DONTNEED)

    def op_stat(self, f: FileModel) -> None:
        self.op(f"statx {f.label()}")
        self.check_stat(f, via="path" if self.rng.random() < 0.5 else "fd")

    def op_verify(self, f: FileModel) -> None:
        self.op(f"verify {f.label()} (size {len(f.data)})")
        self.verify(f)

    def verify(self, f: FileModel) -> None:
        """The whole file through the page cache, after dropping it, and with O_DIRECT; its stat."""
        fd = self.ensure_fd(f)
        self.check_stat(f)
        size = len(f.data)
        self.expect_data(f, 0, os.pread(fd, size + 1, 0), size + 1, "pread of the whole file")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.expect_data(f, 0, os.pread(fd, size + 1, 0), size + 1, "pread of the whole file after DONTNEED")
        length = -(-size // BLOCK) * BLOCK + BLOCK
        self.expect_data(f, 0, self.direct_read(self.ensure_dfd(f), 0, length), length,
                         "O_DIRECT read of the whole file")


# --------------------------------------------------------------------------------------------------
# Writer/reader pairs: cross-process read-after-write

MAGIC = b"FSXBLK01"
HEADER = struct.Struct("<8sQQ")


def block_bytes(block: int, version: int) -> bytes:
    """A self-describing block: header (magic, block number, version) and a pattern of both."""
    head = HEADER.pack(MAGIC, block, version)
    pattern = hashlib.blake2b(f"{block}:{version}".encode(), digest_size=32).digest()
    return (head + pattern * (BLOCK // 32))[:BLOCK]


def parse_block(data: bytes) -> tuple[int, int] | None:
    """(block, version) of an intact block, None when it is not one of ours or torn."""
    if len(data) != BLOCK:
        return None
    magic, block, version = HEADER.unpack_from(data)
    if magic != MAGIC or data != block_bytes(block, version):
        return None
    return block, version


@dataclasses.dataclass
class PairShared:
    """Shared memory of a pair (created before the fork)."""

    published: Any  # multiprocessing.Array('q'): per block, the last version whose write completed
    pending: Any  # multiprocessing.Array('q'): per block, the last version whose write started
    ready: multiprocessing.synchronize.Event
    done: multiprocessing.synchronize.Event


class PairWriter(Worker):
    def __init__(self, *args: Any, shared: PairShared, path: Path, nblocks: int) -> None:
        super().__init__(*args)
        self.shared, self.file, self.nblocks = shared, path, nblocks

    def run(self) -> None:
        sh = self.shared
        try:
            self.op(f"create {self.file.name}: {self.nblocks} blocks at version 1, fsync")
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            for b in range(self.nblocks):
                sh.pending[b] = 1
            os.pwrite(fd, b"".join(block_bytes(b, 1) for b in range(self.nblocks)), 0)
            os.fsync(fd)
            for b in range(self.nblocks):
                sh.published[b] = 1
            sh.ready.set()
            version = 1
            while self.running(version):
                version += 1
                self.write_version(fd, version)
            self.stats["versions"] = version
            os.close(fd)
        finally:
            sh.done.set()
            sh.ready.set()

    def write_version(self, fd: int, version: int) -> None:
        sh, rng = self.shared, self.rng
        if rng.random() < 0.3:
            first = rng.randrange(self.nblocks)
            blocks = list(range(first, min(self.nblocks, first + rng.randint(2, 8))))
        else:
            blocks = sorted(rng.sample(range(self.nblocks), rng.randint(1, 4)))
        for b in blocks:
            sh.pending[b] = version
        self.op(f"v{version}: pwrite blocks {blocks}")
        runs: list[list[int]] = []
        for b in blocks:
            if runs and runs[-1][-1] == b - 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        for run in runs:
            os.pwrite(fd, b"".join(block_bytes(b, version) for b in run), run[0] * BLOCK)
        for b in blocks:
            sh.published[b] = version
        r = rng.random()
        sync = "fdatasync" if r < 0.6 else "fsync" if r < 0.75 else "none"
        self.note(f"published; {sync}")
        if sync == "fdatasync":
            os.fdatasync(fd)
        elif sync == "fsync":
            os.fsync(fd)
        if rng.random() < 0.1:  # read-your-writes through O_DIRECT
            b = rng.choice(blocks)
            dfd = os.open(self.file, os.O_RDONLY | os.O_DIRECT)
            buf = aligned_buffer(BLOCK)
            try:
                n = os.preadv(dfd, [buf], b * BLOCK)
                raw = bytes(buf[:n])
                got = parse_block(raw)
            finally:
                buf.close()
                os.close(dfd)
            self.note(f"O_DIRECT read-back of block {b}: {got}")
            if got != (b, version):
                self.fail("data", f"the writer's own O_DIRECT read of block {b} right after writing v{version} "
                          f"returned {got or 'a damaged block (header ' + raw[:HEADER.size].hex() + ')'}")


class PairReader(Worker):
    KINDS = (("direct_full", 40), ("direct_range", 25), ("buffered", 15), ("dontneed_buffered", 20))

    def __init__(self, *args: Any, shared: PairShared, path: Path, nblocks: int) -> None:
        super().__init__(*args)
        self.shared, self.file, self.nblocks = shared, path, nblocks
        self.stale_blocks = 0
        self.stale_reads = 0
        self.examples: list[str] = []
        self.bad: list[str] = []
        self.first_bad = ""

    def run(self) -> None:
        sh = self.shared
        if not sh.ready.wait(max(1.0, self.deadline - time.monotonic())):
            raise TimeoutError("the writer never created the shared file")
        fd = os.open(self.file, os.O_RDONLY)
        dfd = os.open(self.file, os.O_RDONLY | os.O_DIRECT)
        buf = aligned_buffer(self.nblocks * BLOCK)
        kinds = [k for k, _ in self.KINDS]
        weights = [w for _, w in self.KINDS]
        reads = 0
        try:
            # until the writer is done (bounded by the deadline even if it hangs)
            while (not sh.done.is_set() and not self.stop.is_set() and self.stale_reads < 20
                   and time.monotonic() < self.deadline + 30):
                kind = self.rng.choices(kinds, weights)[0]
                if kind == "direct_full":
                    first, count = 0, self.nblocks
                else:
                    first = self.rng.randrange(self.nblocks)
                    count = self.rng.randint(1, min(16, self.nblocks - first))
                snapshot = list(sh.published[first:first + count])
                self.op(f"{kind} blocks [{first}, +{count}) published {_summary(snapshot)}")
                if kind.startswith("direct"):
                    n = os.preadv(dfd, [memoryview(buf)[:count * BLOCK]], first * BLOCK)
                    data = bytes(buf[:n])
                else:
                    if kind == "dontneed_buffered":
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    data = os.pread(fd, count * BLOCK, first * BLOCK)
                upper = list(sh.pending[first:first + count])
                reads += 1
                self.count(kind)
                self.check_read(kind, first, count, snapshot, data, upper)
        finally:
            buf.close()
            os.close(dfd)
            os.close(fd)
        self.stats["reads"] = reads
        self.stats["stale_blocks"] = self.stale_blocks
        self.stats["stale_reads"] = self.stale_reads
        if self.bad or self.examples:
            self.op_desc = self.first_bad  # the failing op: the first bad read
        if self.bad:
            self.fail("data", f"{len(self.bad)} reads returned blocks that are not intact or not yet written "
                      f"(of {reads} reads):\n      " + "\n      ".join(self.bad[:5]))
        if self.stale_blocks:
            self.fail("data", f"STALE READS: {self.stale_blocks} stale blocks in {self.stale_reads} of {reads} "
                      "reads (a block older than the version published before the read began), e.g.:\n      "
                      + "\n      ".join(self.examples[:5]))

    def check_read(self, kind: str, first: int, count: int, snapshot: list[int], data: bytes,
                   upper: list[int]) -> None:
        """Each block intact, at least its version published before the read, at most the last one
        whose write started before the read ended. A buffered read may see a block torn by a write
        in progress (the page cache copies without a lock against writers, on any filesystem): only
        counted, and only when such a write was in progress; the daemon answers whole requests."""
        if len(data) != count * BLOCK:
            self.first_bad = self.first_bad or self.op_desc
            self.bad.append(f"{self.op_desc}: short read {len(data)} of {count * BLOCK}")
            return
        stale = 0
        for i in range(count):
            b = first + i
            got = parse_block(data[i * BLOCK:(i + 1) * BLOCK])
            if got is None and not kind.startswith("direct") and upper[i] > snapshot[i]:
                self.count("torn_by_concurrent_write")
                self.note(f"block {b} torn by the write of v{upper[i]} in progress (buffered read: allowed)")
                continue
            if got is None or got[0] != b or got[1] > upper[i]:
                self.first_bad = self.first_bad or self.op_desc
                head = data[i * BLOCK:i * BLOCK + HEADER.size]
                self.bad.append(f"{self.op_desc}: block {b} is {got or 'damaged, header ' + head.hex()} "
                                f"(published v{snapshot[i]} before the read, v{upper[i]} started by its end)")
                continue
            if got[1] < snapshot[i]:
                self.first_bad = self.first_bad or self.op_desc
                stale += 1
                if len(self.examples) < 5:
                    self.examples.append(f"{self.op_desc} at {self.elapsed():.3f}s: block {b} has v{got[1]}, "
                                         f"v{snapshot[i]} was published before the read")
        if stale:
            self.stale_blocks += stale
            self.stale_reads += 1
            self.note(f"{stale} STALE blocks")


def _summary(versions: list[int]) -> str:
    if not versions:
        return "[]"
    return f"v{min(versions)}..v{max(versions)}" if min(versions) != max(versions) else f"v{versions[0]}"


# --------------------------------------------------------------------------------------------------
# Runner


@dataclasses.dataclass
class WorkerResult:
    name: str
    status: str  # ok | fail | error | hang
    message: str = ""
    check: str = ""
    op: str = ""
    history: list[str] = dataclasses.field(default_factory=list)
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0


@dataclasses.dataclass
class Report:
    settings: Settings
    results: list[WorkerResult]
    elapsed_s: float
    replay: str

    @property
    def failed(self) -> list[WorkerResult]:
        return [r for r in self.results if r.status != "ok"]

    def summary(self) -> str:
        lines = [f"fsx seed {self.settings.seed}: {len(self.results)} workers in {self.elapsed_s:.1f} s"]
        for r in self.results:
            stats = " ".join(f"{k}={v}" for k, v in sorted(r.stats.items()))
            extra = f"; skipped checks violated: {r.skipped}" if r.skipped else ""
            lines.append(f"  {r.name}: {r.status} after {r.elapsed_s:.1f} s {stats}{extra}")
            lines.extend(f"      first {k}: {v}" for k, v in r.first_skipped.items())
        return "\n".join(lines)

    def text(self) -> str:
        """The failure message: seed, failing op, last ops, how to replay."""
        if not self.failed:
            return self.summary()
        s = self.settings
        out = []
        for r in self.failed:
            out.append(f"fsx FAILED: seed {s.seed}, worker {r.name} ({r.status}"
                       f"{', check ' + r.check if r.check else ''}) after {r.elapsed_s:.1f} s")
            out.append(f"  failing op: {r.op}")
            out.append(f"  {r.message}")
            if r.history:
                out.append(f"  last {s.history} ops of {r.name} (#, seconds since the start, op; "
                           "'.' lines are steps of an op):")
                out.extend(f"    {h}" for h in _last_ops(r.history, s.history))
            partner = self._partner(r.name)
            if partner is not None and partner.history:
                out.append(f"  last 12 ops of its partner {partner.name}:")
                out.extend(f"    {h}" for h in _last_ops(partner.history, 12))
        out.append(self.summary())
        out.append(f"replay: {self.replay}")
        names = ",".join(r.name for r in self.failed)
        if s.only != names:
            out.append(f"replay only the failing worker(s) (their op sequence is the same): FSX_ONLY={names} "
                       "with the command above")
        return "\n".join(out)

    def _partner(self, name: str) -> WorkerResult | None:
        m = re.fullmatch(r"(p\d+)([wr])\d*", name)
        if m is None:
            return None
        want = f"{m[1]}r" if m[2] == "w" else f"{m[1]}w"
        return next((r for r in self.results if r.name.startswith(want)), None)


def _last_ops(history: list[str], n: int) -> list[str]:
    """The history lines of the last `n` ops (an op's line and its step lines)."""
    ops = 0
    for i in range(len(history) - 1, -1, -1):
        if _is_op_line(history[i]):
            ops += 1
            if ops == n:
                return history[i:]
    return history


def _is_op_line(line: str) -> bool:
    return line[:6].strip().isdigit()


def _child(worker: Worker, results: Any) -> None:
    start = time.monotonic()
    status, message, check = "ok", "", ""
    try:
        worker.run()
    except FsxFailure as exc:
        status, message, check = "fail", exc.message, exc.check
    except BaseException as exc:
        status, message = "error", "".join(traceback.format_exception(exc)).rstrip()
    if status != "ok":
        worker.stop.set()
    results.put(dataclasses.asdict(WorkerResult(
        worker.name, status, message, check, worker.op_desc, list(worker.history), worker.stats,
        worker.skipped, worker.first_skipped, time.monotonic() - start)))


def run(settings: Settings, directory: Path, replay: str = "", grace_s: float = 60.0) -> Report:
    """Run the workers of `settings` in forked processes on `directory` (on the mount)."""
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    results_q = ctx.Queue()
    t0 = time.monotonic()
    names = settings.worker_names()
    procs: dict[str, tuple[Any, Any]] = {}
    workers: list[Worker] = []
    pair_shared: dict[str, PairShared] = {}
    for name in names:
        current = ctx.Array("c", 256, lock=False)
        args = (name, settings, directory, t0, stop, current)
        if name.startswith("m"):
            w: Worker = ModelWorker(*args)
        elif name.startswith("t"):
            w = ModelWorker(*args, trunc_heavy=True)
        else:
            pair = re.sub(r"[wr]\d*$", "", name)
            if pair not in pair_shared:
                pair_shared[pair] = PairShared(ctx.Array("q", settings.pair_blocks, lock=False),
                                               ctx.Array("q", settings.pair_blocks, lock=False),
                                               ctx.Event(), ctx.Event())
            sh = pair_shared[pair]
            if f"{pair}w" not in names:
                sh.ready.set()  # a reader replayed alone reads whatever the file holds
            cls = PairWriter if name.endswith("w") else PairReader
            w = cls(*args, shared=sh, path=directory / f"{pair}.shared", nblocks=settings.pair_blocks)
        workers.append(w)
        procs[name] = (ctx.Process(target=_child, args=(w, results_q), name=f"fsx-{name}", daemon=True), current)
    for proc, _ in procs.values():
        proc.start()
    got: dict[str, WorkerResult] = {}
    deadline = t0 + settings.duration_s + grace_s
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            item = results_q.get(timeout=0.5)
        except queue.Empty:
            for name, (proc, _) in procs.items():
                if name not in got and not proc.is_alive() and proc.exitcode not in (None, 0):
                    got[name] = WorkerResult(name, "error", f"worker died with exit code {proc.exitcode}")
                    stop.set()
            continue
        result = WorkerResult(**item)
        got[result.name] = result
        if result.status != "ok":
            stop.set()
    for name, (proc, current) in procs.items():
        if name not in got:
            op = bytes(current.value).decode(errors="replace")
            got[name] = WorkerResult(name, "hang", f"no result within {settings.duration_s + grace_s:.0f} s "
                                     f"(stuck in a filesystem call?)", "", op, elapsed_s=time.monotonic() - t0)
            proc.kill()
        proc.join(10)
    results_q.close()
    return Report(settings, [got[n] for n in names], time.monotonic() - t0, replay)


def replay_command(settings: Settings, defaults: Settings, test_id: str) -> str:
    """The shell command that runs `test_id` again with the same settings (seed included)."""
    env = " ".join(settings.env_assignments(defaults))
    slow = " --slow" if "slow" in test_id else ""
    return f"cd {shlex.quote(str(REPO))} && {env} {shlex.quote(sys.executable)} -m pytest {shlex.quote(test_id)}{slow}"


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.support.fsx DIR`: run on an existing directory (settings from FSX_*)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tests.support.fsx DIRECTORY  (settings: FSX_* variables)", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    settings = Settings.from_env()
    env = " ".join(settings.env_assignments())
    report = run(settings, directory, f"{env} {sys.executable} -m tests.support.fsx {shlex.quote(str(directory))}")
    print(report.text())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
