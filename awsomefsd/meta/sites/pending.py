"""Captured, not yet folded: the facts of a local command kept for capture later (issue 47).

A linked site records what a create, an attribute change, an extended attribute or a content
write did as one small row (`Facts`) in the command's own transaction, and folds it into the
replicated tree, the registers and the outbox later, in a batch (`FoldCapture`, capture.py). A
row carries every fact that capture reads of the namespace, as the command left it: folded
later, when the namespace has moved on, it captures what capture at once would have.

Apart because the rows are a format of their own: they live in the `sites` table, under
`PENDING`, and are replicated with it (a Raft snapshot, a member on another build): each row
begins with its format, and a build reads every format it ever wrote.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from awsomefsd.meta.records import Inode

PENDING = b"\xffpending:"
"""Key prefix in the `sites` table: sequence number (8 bytes, big-endian) -> packed `Facts`.
0xff sorts after every other key of the table, so the last key tells the next number."""
FORMAT = 1
NEW, ATTRS, CONTENT, XATTR = b"n", b"a", b"c", b"x"
_HEAD = struct.Struct(">Bc")
_NEW = struct.Struct(">QQIIIQQQH")  # parent, ino, mode, uid, gid, rdev, mtime, now; name length
_ATTRS = struct.Struct(">QIIIQQQ")  # ino, mode, uid, gid, atime, mtime, now
_CONTENT = struct.Struct(">QQQIIIQ")  # ino, size, mtime, mode, uid, gid, now
_XATTR = struct.Struct(">QQHB")  # ino, now, name length, has a value


@dataclass(frozen=True, slots=True)
class Facts:
    """What one local command did that capture needs: `kind` says which fields count.

    NEW (a create): parent, ino, mode, uid, gid, rdev, mtime_ns, name, value (a symlink's
    target). ATTRS: ino, mode, uid, gid, atime_ns, mtime_ns. CONTENT: ino, size, mtime_ns, mode,
    uid, gid. XATTR: ino, name, value (None: removed). `now_ns` is the command's, which stamps it."""

    kind: bytes
    ino: int
    now_ns: int
    parent: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    name: bytes = b""
    value: bytes | None = b""


_NEW_HEAD, _ATTRS_HEAD = _HEAD.pack(FORMAT, NEW), _HEAD.pack(FORMAT, ATTRS)
_CONTENT_HEAD, _XATTR_HEAD = _HEAD.pack(FORMAT, CONTENT), _HEAD.pack(FORMAT, XATTR)


def pack_new(parent: int, inode: Inode, name: bytes, target: bytes, now_ns: int) -> bytes:
    """A create (on the write path: packed from the command's own values, no `Facts` built).
    `target`: a symlink's, else b""."""
    return b"".join((_NEW_HEAD, _NEW.pack(parent, inode.ino, inode.mode, inode.uid, inode.gid, inode.rdev,
                                          inode.mtime_ns, now_ns, len(name)), name, target))


def pack_attrs(inode: Inode, now_ns: int) -> bytes:
    return _ATTRS_HEAD + _ATTRS.pack(inode.ino, inode.mode, inode.uid, inode.gid, inode.atime_ns, inode.mtime_ns, now_ns)


def pack_content(inode: Inode, now_ns: int) -> bytes:
    return _CONTENT_HEAD + _CONTENT.pack(inode.ino, inode.size, inode.mtime_ns, inode.mode, inode.uid, inode.gid, now_ns)


def pack_xattr(ino: int, name: bytes, value: bytes | None, now_ns: int) -> bytes:
    return _XATTR_HEAD + _XATTR.pack(ino, now_ns, len(name), value is not None) + name + (value or b"")


def unpack(raw: bytes) -> Facts:
    """A row as the `pack_*` functions wrote it (rows are this site's own, written by its state machine: a row
    that does not unpack is a bug, and raises)."""
    version, kind = _HEAD.unpack_from(raw)
    if version != FORMAT:
        raise ValueError(f"a pending capture row of format {version} (this build reads {FORMAT})")
    at = _HEAD.size
    if kind == NEW:
        parent, ino, mode, uid, gid, rdev, mtime, now, name_len = _NEW.unpack_from(raw, at)
        at += _NEW.size
        return Facts(NEW, ino, now, parent=parent, mode=mode, uid=uid, gid=gid, rdev=rdev, mtime_ns=mtime,
                     name=raw[at:at + name_len], value=raw[at + name_len:])
    if kind == ATTRS:
        ino, mode, uid, gid, atime, mtime, now = _ATTRS.unpack_from(raw, at)
        return Facts(ATTRS, ino, now, mode=mode, uid=uid, gid=gid, atime_ns=atime, mtime_ns=mtime)
    if kind == CONTENT:
        ino, size, mtime, mode, uid, gid, now = _CONTENT.unpack_from(raw, at)
        return Facts(CONTENT, ino, now, size=size, mtime_ns=mtime, mode=mode, uid=uid, gid=gid)
    if kind == XATTR:
        ino, now, name_len, has_value = _XATTR.unpack_from(raw, at)
        at += _XATTR.size
        return Facts(XATTR, ino, now, name=raw[at:at + name_len], value=raw[at + name_len:] if has_value else None)
    raise ValueError(f"a pending capture row of unknown kind {kind!r}")
