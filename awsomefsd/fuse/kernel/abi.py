"""The FUSE kernel protocol's messages (include/uapi/linux/fuse.h), decoded and encoded with checked
lengths.

Only what the transport uses is here. Every request body is read through `Body`, which raises
`Malformed` when the kernel (or a test) sends fewer bytes than a structure needs; the session then
answers EINVAL and logs the request instead of failing. Structures the kernel has grown over the
protocol's life (`fuse_write_in`, `fuse_setattr_in`, ...) are decoded at the size this module knows:
we negotiate at least `MIN_MINOR`, where they all have it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

MAJOR = 7
MINOR = 38
"""The protocol we speak: the kernel answers with min(its minor, ours)."""
MIN_MINOR = 31
"""Older kernels lack fields the decoders below rely on (max_pages, killpriv v2's flags)."""

ROOT_ID = 1
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
MIN_READ_BUFFER = 8192


class Op:
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SYNCFS = 50
    TMPFILE = 51


OP_NAMES = {v: k.lower() for k, v in vars(Op).items() if not k.startswith("_")}


class Init:
    """INIT capability bits (flags | flags2 << 32)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    FLOCK_LOCKS = 1 << 10
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    EXPLICIT_INVAL_DATA = 1 << 25
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    DIRECT_IO_ALLOW_MMAP = 1 << 36  # flags2 bit 4 (7.39): a FOPEN_DIRECT_IO file may still be mapped shared
    OVER_IO_URING = 1 << 41  # flags2 bit 9 (7.42): requests over io_uring (fuse_ring.py)


class Fattr:
    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class Fopen:
    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    CACHE_DIR = 1 << 3
    NOFLUSH = 1 << 5  # protocol 7.31: no FLUSH at close (ignored under the writeback cache)
    PARALLEL_DIRECT_WRITES = 1 << 6  # protocol 7.36: direct writes within the file under a shared inode lock


class Notify:
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8  # Linux 6.16 (7.44): every cached name is looked up again before it is used


FSYNC_FDATASYNC = 1
WRITE_CACHE = 1 << 0  # the kernel writing back pages it cached (WRITEBACK_CACHE)
WRITE_KILL_SUIDGID = 1 << 2
"""fuse_write_in.write_flags: the writer lacks CAP_FSETID (HANDLE_KILLPRIV_V2)."""
OPEN_KILL_SUIDGID = 1 << 0
"""fuse_open_in/fuse_create_in.open_flags: an O_TRUNC open by a caller without CAP_FSETID."""
RELEASE_FLUSH = 1

ATTR = struct.Struct("<QQQqqqIIIIIIIIII")  # fuse_attr: 88 bytes (times signed: before 1970)
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, *_nsec; then fuse_attr
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy; then fuse_attr
OPEN_OUT = struct.Struct("<QII")
WRITE_OUT = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type; then the name, padded to 8
LSEEK_OUT = struct.Struct("<Q")
INVAL_INODE_OUT = struct.Struct("<Qqq")
INVAL_ENTRY_OUT = struct.Struct("<QII")

assert ATTR.size == 88 and STATFS_OUT.size == 80 and INIT_OUT.size == 64


class Malformed(ValueError):
    """A request shorter than its structures, or with a name that is not NUL-terminated."""


class Header(NamedTuple):
    """fuse_in_header. A tuple: one is made per request, and a tuple is the cheapest record."""

    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int
    padding: int


def parse_header(buf: bytes | memoryview) -> Header:
    """The request header; `Malformed` if `buf` is shorter than it or than the length it states."""
    if len(buf) < IN_HEADER.size:
        raise Malformed(f"request of {len(buf)} bytes, shorter than its header")
    header = Header._make(IN_HEADER.unpack_from(buf))
    if header.length != len(buf):
        raise Malformed(f"request says {header.length} bytes, {len(buf)} arrived")
    return header


class Body:
    """A cursor over a request's body: structures and NUL-terminated names, each checked."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = IN_HEADER.size) -> None:
        self.buf = buf
        self.pos = pos

    def take(self, fmt: struct.Struct) -> tuple[int, ...]:
        end = self.pos + fmt.size
        if end > len(self.buf):
            raise Malformed(f"body of {len(self.buf) - IN_HEADER.size} bytes, {end - IN_HEADER.size} needed")
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos = end
        return values

    def name(self) -> bytes:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise Malformed("a name without its terminating NUL")
        value = self.buf[self.pos : end]
        self.pos = end + 1
        return value

    def data(self, size: int) -> memoryview:
        """The next `size` bytes as a view, not a copy: a WRITE's payload (up to 1 MiB) is
        copied once, into the write buffer, not first into a bytes of its own."""
        end = self.pos + size
        if size < 0 or end > len(self.buf):
            raise Malformed(f"{size} bytes of data stated, {len(self.buf) - self.pos} present")
        value = memoryview(self.buf)[self.pos : end]
        self.pos = end
        return value

    def rest(self, size: int | None = None) -> bytes:
        if size is None:
            size = len(self.buf) - self.pos
        end = self.pos + size
        if size < 0 or end > len(self.buf):
            raise Malformed(f"{size} bytes of data stated, {len(self.buf) - self.pos} present")
        value = self.buf[self.pos : end]
        self.pos = end
        return value


# Request bodies (fixed parts).
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags; flags2 follows from 7.36
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")  # times signed: before 1970
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME2_IN = struct.Struct("<QII")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN_COMPAT = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
BATCH_FORGET_IN = struct.Struct("<II")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in, off_in, nodeid_out, fh_out, off_out, len, flags


def reply(unique: int, payload: bytes = b"") -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique) + payload


def error_reply(unique: int, errno_: int) -> bytes:
    assert errno_ > 0, errno_
    return OUT_HEADER.pack(OUT_HEADER.size, -errno_, unique)


def notification(code: int, payload: bytes) -> bytes:
    """An unsolicited message: unique 0, the notify code in the error field."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(payload), code, 0) + payload


def split_seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def dirents(entries: Iterable[tuple[int, bytes, int, int]], size: int) -> bytearray:
    """A READDIR reply: a fuse_dirent for each (next offset, name, inode, mode), as many as fit in
    `size` bytes. One buffer and no call per entry: a listing's daemon time is spent here."""
    out = bytearray()
    pack, header = DIRENT.pack, DIRENT.size
    for offset, name, ino, mode in entries:
        length = len(name)
        padding = -(header + length) % 8
        if len(out) + header + length + padding > size:
            break
        out += pack(ino, offset, length, (mode & 0o170000) >> 12)
        out += name
        out += _PADDING[:padding]
    return out


_PADDING = bytes(8)


def dirent(ino: int, offset: int, kind: int, name: bytes) -> bytes:
    """One fuse_dirent (padded to 8 bytes)."""
    record = DIRENT.pack(ino, offset, len(name), kind) + name
    return record + b"\0" * (-len(record) % 8)
