"""The shared block device (or an image file standing in for one), read and written with O_DIRECT.

Why O_DIRECT: every node reads the same device; a node that served a block from its own page cache
could return data another node has since replaced (measured here with two loop devices over one
file). So a device opened `shared=True` must bypass the page cache, and opening fails when the
backing store refuses O_DIRECT. A private device (one node, development images) may fall back to
buffered I/O plus fdatasync, with one WARNING saying why.

O_DIRECT needs page-aligned memory: Python `bytes` fail with EINVAL, so I/O goes through anonymous
mmap buffers (`aligned_buffer`, reused through a `BufferPool`) and os.preadv/os.pwritev. Offsets and
lengths are whole blocks. The methods are blocking system calls; async callers run big ones in a
worker thread. Counters are updated under a lock, so a device may be shared by worker threads.

Small reads from trio tasks go through `read_into_async`: while `serve_async_reads` runs (and the
device uses O_DIRECT) they are submitted with Linux native AIO (`awsomefsd.io.aio`) and other tasks
run while the device works; otherwise they are the same inline `read_into`.

Writes are fenced (`awsomefsd.io.fence`): `write_from` asks `fence` right before each write system
call, on the thread that makes it, so the only gap between the check and the write is that thread
being paused; the fence module explains how the margins bound that gap and what they cannot.
The default fence is always open (single node, formatting). Reads and `sync` are never fenced:
they move no new bytes to the device (a shared device writes through O_DIRECT, so a cache flush
only makes durable what was written while the lease held).

Every open takes a shared advisory lock (flock) on the device, and formatting takes it exclusively
while it writes (`claim_exclusive`): so `format` refuses a device a daemon on this machine is using, and names the
process, instead of destroying a live file system under it. Nodes on other machines are not seen
this way (a SAN has no lock to share); their superblock check is what protects them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from awsomefsd.io.aio import AioReader
from awsomefsd.io.errors import (
    CorruptSuperblockError,
    DeviceError,
    DeviceSizeMismatchError,
    DeviceTooSmallError,
    ForeignClusterError,
    NotFormattedError,
)
from awsomefsd.io.fence import WriteFence
from awsomefsd.io.layout import BLOCK_SIZE

log = logging.getLogger(__name__)

__all__ = [
    "BlockDevice",
    "BufferPool",
    "CorruptSuperblockError",
    "DeviceError",
    "DeviceSizeMismatchError",
    "DeviceTooSmallError",
    "ForeignClusterError",
    "NotFormattedError",
    "aligned_buffer",
    "create_image",
    "lock_holders",
]

BLKGETSIZE64 = 0x80081272
# One I/O call moves at most this much; larger requests are a caller bug (and pin a lot of memory).
MAX_IO_BYTES = 64 << 20
SMALL_READ_BYTES = 64 << 10
"""Up to this, `read_into_async` may read inline when reads arrive one at a time (AioReader.worth_submitting)."""
# Short reads/writes are retried; this bounds the loop (each round moves at least one byte or fails).
MAX_IO_ROUNDS = 1024

_warned_paths: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def aligned_buffer(size_bytes: int) -> mmap.mmap:
    """An anonymous, page-aligned, zero-filled buffer of `size_bytes` (whole blocks), fit for O_DIRECT."""
    if not 0 < size_bytes <= MAX_IO_BYTES or size_bytes % BLOCK_SIZE:
        raise ValueError(f"aligned buffer of {size_bytes} bytes: need whole blocks up to {MAX_IO_BYTES}")
    buf = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    assert len(buf) == size_bytes
    return buf


class BufferPool:
    """Reusable aligned buffers of `buffer_bytes` each; at most `max_buffers` are kept idle.

    Creating an mmap costs two system calls (and page faults on first touch), so hot paths borrow
    from a pool. `acquire` never blocks: when every pooled buffer is out it maps a fresh one (it may
    run on the trio thread, where waiting for another task's release would deadlock); `release`
    keeps it only while fewer than `max_buffers` are idle. Safe to use from several threads.
    A released buffer is dropped rather than unmapped, because a memoryview of it may still exist.
    """

    def __init__(self, buffer_bytes: int, max_buffers: int) -> None:
        if not 0 < buffer_bytes <= MAX_IO_BYTES or buffer_bytes % BLOCK_SIZE:
            raise ValueError(f"pool buffers of {buffer_bytes} bytes: need whole blocks up to {MAX_IO_BYTES}")
        if not 0 < max_buffers <= 4096:
            raise ValueError(f"pool of {max_buffers} buffers outside [1, 4096]")
        self.buffer_bytes = buffer_bytes
        self.max_buffers = max_buffers
        self._idle: list[mmap.mmap] = []
        self._out: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.created = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def outstanding_count(self) -> int:
        return len(self._out)

    def acquire(self) -> mmap.mmap:
        """A buffer of `buffer_bytes`; its content is whatever the previous user left."""
        with self._lock:
            buf = self._idle.pop() if self._idle else None
            if buf is None:
                self.created += 1
        if buf is None:
            buf = aligned_buffer(self.buffer_bytes)
        with self._lock:
            assert id(buf) not in self._out
            self._out.add(id(buf))
        return buf

    def release(self, buf: mmap.mmap) -> None:
        """Return a buffer obtained from `acquire` (exactly once)."""
        with self._lock:
            if id(buf) not in self._out:
                raise ValueError("buffer was not acquired from this pool, or was already released")
            self._out.discard(id(buf))
            assert len(buf) == self.buffer_bytes
            if not self._closed and len(self._idle) < self.max_buffers:
                self._idle.append(buf)

    @contextmanager
    def borrow(self) -> Iterator[mmap.mmap]:
        """`with pool.borrow() as buf:` acquire and always release."""
        buf = self.acquire()
        try:
            yield buf
        finally:
            self.release(buf)

    def close(self) -> None:
        """Drop the idle buffers (outstanding ones are dropped when released)."""
        with self._lock:
            self._closed = True
            self._idle.clear()


class BlockDevice:
    """An open device or image file. Use `BlockDevice.open`; close with `close()` or `with`."""

    def __init__(self, path: Path, fd: int, *, size_bytes: int, direct: bool, shared: bool, is_block_device: bool,
                 fence: WriteFence | None = None):
        assert size_bytes >= 0 and size_bytes % BLOCK_SIZE == 0
        self.path = path
        self.size_bytes = size_bytes
        self.direct = direct
        self.shared = shared
        self.is_block_device = is_block_device
        self.bytes_read = 0
        self.bytes_written = 0
        self.reads = 0
        self.writes = 0
        self._fd = fd
        self._lock = threading.Lock()
        self._aio: AioReader | None = None
        self._written_since_sync = False
        self.fence = fence if fence is not None else WriteFence.always_open()
        """Asked before every write: a cluster member's follows its liveness lease."""

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, shared: bool = False, direct: bool = True,
             fence: WriteFence | None = None, readonly: bool = False) -> BlockDevice:
        """Open `path` read-write (`readonly`: for reads only, a read worker's). `size_bytes` is its size rounded down to whole blocks. Writes
        pass `fence` (a cluster member's follows its liveness lease; default: always open).

        A `shared` device (other nodes write it too) must use O_DIRECT: DeviceError if direct is off
        or the backing store refuses it. A private one falls back to buffered I/O with a WARNING.
        """
        path = Path(path)
        if shared and not direct:
            raise DeviceError(
                f"{path}: a shared device must be opened with direct I/O (other nodes write it and a "
                "page cache would serve stale blocks); enable direct I/O in the device settings"
            )
        base_flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(path, base_flags)
        try:
            st = os.fstat(fd)
            is_block_device = stat.S_ISBLK(st.st_mode)
            if not (is_block_device or stat.S_ISREG(st.st_mode)):
                raise DeviceError(f"{path} is neither a block device nor a regular image file")
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DeviceError(f"{path} is being formatted by another process (pid "
                                  f"{', '.join(map(str, lock_holders(fd))) or '?'}): try again when it is done") from None
            raw_size_bytes = _block_device_size(fd) if is_block_device else st.st_size
            using_direct = False
            if direct:
                reason = _try_direct(fd, raw_size_bytes)
                using_direct = reason is None
                if reason is not None:
                    if shared:
                        raise DeviceError(
                            f"{path} refuses direct I/O ({reason}); a shared device must never be "
                            "page-cached (other nodes would read stale blocks): put the image on a "
                            "filesystem that supports O_DIRECT (ext4, xfs) or use a block device"
                        )
                    _warn_once(path, f"{path}: direct I/O unavailable ({reason}); falling back to "
                                     "buffered I/O with fdatasync. Do not share this device with other nodes.")
        except BaseException:
            os.close(fd)
            raise
        size_bytes = raw_size_bytes - raw_size_bytes % BLOCK_SIZE
        return cls(path, fd, size_bytes=size_bytes, direct=using_direct, shared=shared,
                   is_block_device=is_block_device, fence=fence)

    # -- I/O -------------------------------------------------------------------------------------
    def read_into(self, buf: mmap.mmap | memoryview | bytearray, offset_bytes: int) -> None:
        """Fill all of `buf` from the device at `offset_bytes`; EIO past the end or on a short read."""
        fd = self._fd_or_raise()
        with memoryview(buf) as view:
            length = view.nbytes
            self._check_read(offset_bytes, length)
            done = 0
            for _ in range(MAX_IO_ROUNDS):
                if done == length:
                    break
                with view[done:] as rest:
                    n = self._io(os.preadv, fd, rest, offset_bytes + done)
                if n == 0:
                    raise OSError(errno.EIO, f"{self.path}: short read at {offset_bytes + done}: "
                                             f"device ended {length - done} bytes early")
                done += n
            assert done == length, f"read of {length} bytes stalled at {done}"
        self._count_read(length)

    async def read_into_async(self, buf: mmap.mmap | memoryview, offset_bytes: int) -> None:
        """`read_into` for trio tasks: with AIO serving (see `serve_async_reads`) other tasks run
        while the device works; otherwise exactly the inline `read_into`. `buf` must be aligned
        memory. A short read or a failed one is OSError(EIO), logged.

        A read of more than SMALL_READ_BYTES is always submitted: AIO's fixed cost (~30 µs) is small
        next to it, and reading it inline would hold up every other request for the transfer."""
        aio = self._aio
        if aio is None or not aio.accepting or (len(buf) <= SMALL_READ_BYTES and not aio.worth_submitting()):
            self.read_into(buf, offset_bytes)
            return
        fd = self._fd_or_raise()
        with memoryview(buf) as view:
            length = view.nbytes
            self._check_read(offset_bytes, length)
            try:
                got = await aio.read_into(fd, view, offset_bytes)
            except trio.ClosedResourceError:
                got = -1  # the reader is shutting down: read inline below
            except OSError as exc:
                raise OSError(errno.EIO, f"{self.path}: {exc.strerror}") from exc
            if got < 0:
                self.read_into(view, offset_bytes)
                return
            if got != length:
                log.error("%s: short read at %d: %d of %d bytes", self.path, offset_bytes, got, length)
                raise OSError(errno.EIO, f"{self.path}: short read at {offset_bytes}: device returned "
                                         f"{got} of {length} bytes")
        self._count_read(length)

    def submit_read(self, view: memoryview, offset_bytes: int, done: Callable[[int], None]) -> bool:
        """`read_into_async` without a task (AioReader.submit): True when submitted, and then
        `done(byte count or -errno)` is called later on the trio thread; False, with nothing
        submitted, when AIO is not serving or has no free slot."""
        aio = self._aio
        if aio is None or not aio.accepting:
            return False
        self._check_read(offset_bytes, view.nbytes)
        if not aio.submit(self._fd_or_raise(), view, offset_bytes, done):
            return False
        self._count_read(view.nbytes)
        return True

    async def serve_async_reads(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve `read_into_async` with native AIO until cancelled, then drain and stop.

        Without O_DIRECT (the buffered fallback) or when the kernel refuses an AIO context, reads
        stay inline; that is logged once per device and this returns at once.
        """
        if not self.direct:
            _warn_once(self.path, f"{self.path}: no direct I/O, so device reads stay synchronous (no AIO)",
                       topic="aio", level=logging.INFO)
            task_status.started()
            return
        try:
            reader = AioReader()
        except OSError as exc:
            _warn_once(self.path, f"{self.path}: native AIO unavailable ({exc.strerror}); device reads "
                                  "stay synchronous and serialise small random reads", topic="aio")
            task_status.started()
            return
        assert self._aio is None, "serve_async_reads is already running for this device"
        self._aio = reader
        try:
            await reader.run(task_status=task_status)
        finally:
            self._aio = None

    @property
    def reads_asynchronously(self) -> bool:
        """True while `read_into_async` submits reads to AIO (so a large one does not block)."""
        return self._aio is not None and self._aio.accepting

    def write_from(self, buf: mmap.mmap | memoryview | bytearray | bytes, offset_bytes: int) -> None:
        """Write all of `buf` at `offset_bytes`. Durable only after `sync()`. WriteFencedError (an
        OSError EIO) when the node's lease no longer allows writes; bytes of earlier rounds of a
        short write may then be on the device, as with any failed write."""
        fd = self._fd_or_raise()
        with memoryview(buf) as view:
            length = view.nbytes
            self._check_range(offset_bytes, length)
            if offset_bytes + length > self.size_bytes:
                raise OSError(errno.EIO, f"{self.path}: write of {length} bytes at {offset_bytes} "
                                         f"past the end of the device ({self.size_bytes} bytes)")
            done = 0
            for _ in range(MAX_IO_ROUNDS):
                if done == length:
                    break
                with view[done:] as rest:
                    self.fence.check(rest.nbytes)  # last thing before the system call: see fence.py
                    n = self._io(os.pwritev, fd, rest, offset_bytes + done)
                if n == 0:
                    raise OSError(errno.EIO, f"{self.path}: device accepted no bytes at {offset_bytes + done}")
                done += n
            assert done == length, f"write of {length} bytes stalled at {done}"
        with self._lock:
            self.writes += 1
            self.bytes_written += length
            self._written_since_sync = True

    def read(self, offset_bytes: int, length_bytes: int) -> bytes:
        """Read into a fresh aligned buffer and copy out (cold paths: superblock, fsck, tests)."""
        buf = aligned_buffer(length_bytes)
        try:
            self.read_into(buf, offset_bytes)
            return bytes(buf)
        finally:
            buf.close()

    def write(self, offset_bytes: int, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` into an aligned buffer and write it (cold paths: superblock, tests)."""
        buf = aligned_buffer(len(data))
        try:
            buf[:] = data
            self.write_from(buf, offset_bytes)
        finally:
            buf.close()

    def sync(self) -> None:
        """fdatasync: written data (and a sparse image's new allocations) reach stable storage."""
        os.fdatasync(self._fd_or_raise())

    def sync_written(self) -> None:
        """`sync` if anything was written since the last `sync_written`: the metadata log's
        before-commit hook, so data reaches stable storage before the metadata that points at it
        (and a commit that follows no write costs no device flush)."""
        with self._lock:
            if not self._written_since_sync:
                return
            self._written_since_sync = False
        try:
            self.sync()
        except BaseException:
            with self._lock:
                self._written_since_sync = True  # the next commit must try again
            raise

    def claim_exclusive(self) -> list[int]:
        """Take the device's lock exclusively (for formatting): [] when done, else the other
        processes on this machine that have the device open (their shared lock), which keep it."""
        fd = self._fd_or_raise()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = lock_holders(fd)
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as before the attempt
            return holders or [0]
        return []

    def release_exclusive(self) -> None:
        """Back to the shared lock every open holds (formatting is done)."""
        fcntl.flock(self._fd_or_raise(), fcntl.LOCK_SH | fcntl.LOCK_NB)

    def close(self) -> None:
        """Close the descriptor; idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BlockDevice({str(self.path)!r}, size_bytes={self.size_bytes}, direct={self.direct})"

    @property
    def fd(self) -> int:
        """The open descriptor: for a reader that keeps its own buffer and calls preadv itself
        (fs/coldread.py), where `read_into`'s checks and counters cost more than the read."""
        return self._fd_or_raise()

    # -- internals -------------------------------------------------------------------------------
    def _fd_or_raise(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.path}: device is closed")
        return self._fd

    def _check_read(self, offset_bytes: int, length: int) -> None:
        self._check_range(offset_bytes, length)
        if offset_bytes + length > self.size_bytes:
            raise OSError(errno.EIO, f"{self.path}: read of {length} bytes at {offset_bytes} "
                                     f"past the end of the device ({self.size_bytes} bytes)")

    def _count_read(self, length: int) -> None:
        with self._lock:
            self.reads += 1
            self.bytes_read += length

    @staticmethod
    def _check_range(offset_bytes: int, length_bytes: int) -> None:
        assert offset_bytes >= 0 and offset_bytes % BLOCK_SIZE == 0, f"unaligned offset {offset_bytes}"
        assert length_bytes % BLOCK_SIZE == 0, f"unaligned length {length_bytes}"
        assert 0 < length_bytes <= MAX_IO_BYTES, f"I/O of {length_bytes} bytes outside (0, {MAX_IO_BYTES}]"

    def _io(self, call: Callable[[int, list[memoryview], int], int], fd: int, view: memoryview,
            offset_bytes: int) -> int:
        try:
            return call(fd, [view], offset_bytes)
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.direct:
                raise OSError(errno.EINVAL, f"{self.path}: direct I/O refused the buffer at {offset_bytes}: "
                                            "buffers must be page aligned (use aligned_buffer/BufferPool)") from exc
            raise


def _block_device_size(fd: int) -> int:
    """Size of a block device: BLKGETSIZE64, or seeking to the end when the ioctl is unavailable."""
    try:
        raw = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", raw)[0])
    except OSError:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        return size


def _try_direct(fd: int, size_bytes: int) -> str | None:
    """Switch `fd` to O_DIRECT; None on success, else why not.

    Some filesystems accept O_DIRECT in open/fcntl but fail the first I/O with EINVAL, so a block
    is read back as a probe when the device has one.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError as exc:
        return f"fcntl O_DIRECT: {exc.strerror}"
    if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
        return "the filesystem does not support O_DIRECT"
    if size_bytes >= BLOCK_SIZE:
        probe = aligned_buffer(BLOCK_SIZE)
        try:
            os.preadv(fd, [probe], 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            return f"O_DIRECT read: {exc.strerror}"
        finally:
            probe.close()
    return None


def _warn_once(path: Path, message: str, *, topic: str = "direct", level: int = logging.WARNING) -> None:
    """Log `message` the first time `topic` comes up for `path` in this process."""
    key = (str(path.resolve()), topic)
    with _warned_lock:
        if key in _warned_paths:
            return
        _warned_paths.add(key)
    log.log(level, "%s", message)


def lock_holders(fd: int) -> list[int]:
    """The other processes holding a flock on the file `fd` refers to (from /proc/locks)."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: set[int] = set()
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                # "1: FLOCK  ADVISORY  READ  1234 fd:01:5678 0 EOF" ("->" marks a blocked waiter)
                if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK" or fields[5] != wanted:
                    continue
                if fields[4].isdigit() and int(fields[4]) != os.getpid():
                    pids.add(int(fields[4]))
    except OSError:
        pass
    return sorted(pids)


def create_image(path: str | os.PathLike[str], size_bytes: int) -> None:
    """Create (or grow) a sparse image file of `size_bytes`; refuses to shrink an existing one."""
    path = Path(path)
    if size_bytes <= 0 or size_bytes % BLOCK_SIZE:
        raise ValueError(f"image size {size_bytes} must be a positive multiple of {BLOCK_SIZE} bytes")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeviceError(f"{path} exists and is not a regular file; refusing to treat it as an image")
        if st.st_size > size_bytes:
            raise DeviceError(
                f"{path} is already {st.st_size} bytes; refusing to shrink it to {size_bytes} "
                "(that would destroy data): give a larger size or remove the file"
            )
        if st.st_size < size_bytes:
            os.ftruncate(fd, size_bytes)
            os.fsync(fd)
    finally:
        os.close(fd)
