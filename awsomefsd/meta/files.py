"""The handlers that change one file in place: its attributes (SetAttr, with the truncate a size
change is), its data (WriteData) and its extended attributes (SetXattr, RemoveXattr).

Kept apart from the state machine's dispatch, as ranges.py (holes, reservations, clones) and
rename.py are; they follow its rules (validate everything first, write second; depend only on the
state and the command) and reach free space through `sm.space_check_new` and `sm.defer_free`,
which a prediction (meta/ahead.py) replaces.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING

import lmdb

from awsomefsd.meta import commands as c
from awsomefsd.meta import filemap
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import (
    MAX_FILE_SIZE_BYTES,
    MAX_XATTR_LIST_BYTES,
    MAX_XATTR_TOTAL_BYTES,
    MAX_XATTR_VALUE_BYTES,
    Extent,
    Inode,
    blocks_for,
    check_owner,
    check_times,
    check_xattr_name,
    xattr_key,
)

if TYPE_CHECKING:
    from awsomefsd.meta.state_machine import StateMachine

XATTR_CREATE = 1
XATTR_REPLACE = 2


def apply_setattr(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.SetAttr) -> Inode:
    inode = sm.ns.require_inode(txn, cmd.ino)
    sm.volumes.check_writable(txn, inode.volume)
    check_owner(cmd.uid, cmd.gid)
    check_times(cmd.atime_ns, cmd.mtime_ns, cmd.now_ns)
    if cmd.size is not None:
        if not inode.is_reg:
            raise FsError(errno.EISDIR if inode.is_dir else errno.EINVAL)
        if not 0 <= cmd.size <= MAX_FILE_SIZE_BYTES:
            raise FsError(errno.EINVAL if cmd.size < 0 else errno.EFBIG)
    if cmd.mode is not None:
        inode.mode = stat.S_IFMT(inode.mode) | (cmd.mode & 0o7777)
    if cmd.uid is not None:
        inode.uid = cmd.uid
    if cmd.gid is not None:
        inode.gid = cmd.gid
    if cmd.atime_ns is not None:
        inode.atime_ns = cmd.atime_ns
    if cmd.mtime_ns is not None:
        inode.mtime_ns = cmd.mtime_ns
    if cmd.size is not None:
        _truncate(sm, txn, inode, cmd.size, cmd.tail, cmd.now_ns)
        if cmd.mtime_ns is None:
            inode.mtime_ns = cmd.now_ns
    inode.ctime_ns = cmd.now_ns
    sm.ns.put_inode(txn, inode)
    return inode


def _truncate(sm: StateMachine, txn: lmdb.Transaction[bytes], inode: Inode, size: int, tail: Extent | None, now_ns: int) -> None:
    if size < inode.size:
        keep_blocks = blocks_for(size)
        fmap = sm.db["fmap"]
        first_cut = keep_blocks - 1 if tail is not None else keep_blocks
        if tail is not None:
            assert tail.file_block == keep_blocks - 1 and tail.count == 1, tail
            if tail.unwritten:
                raise FsError(errno.EINVAL, "a truncated file's tail block carries checksums")
            sm.space_check_new(txn, [(tail.dev_block, tail.count)])
        superseded = filemap.unmap_range(txn, fmap, inode.ino, first_cut, 1 << 62)
        removed = sum(n for _, n in superseded)
        added = 0
        if tail is not None:
            sm.space.take(txn, tail.dev_block, tail.count)
            filemap.map_extent(txn, fmap, inode.ino, tail)
            added = tail.count
        sm.defer_free(txn, superseded, now_ns)
        sm.volumes.charge(txn, inode.volume, blocks=added - removed, inodes=0, enforce=False)
        inode.blocks += added - removed
    inode.size = size


def apply_write_data(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.WriteData) -> Inode:
    inode = sm.ns.require_inode(txn, cmd.ino)
    if not inode.is_reg:
        raise FsError(errno.EINVAL)
    if not cmd.extents:
        raise FsError(errno.EINVAL, "empty write")
    if cmd.size > MAX_FILE_SIZE_BYTES:
        raise FsError(errno.EFBIG)
    check_times(cmd.mtime_ns, cmd.now_ns)
    fmap = sm.db["fmap"]
    for prev, nxt in zip(cmd.extents, cmd.extents[1:]):
        if prev.end_block > nxt.file_block:
            raise FsError(errno.EINVAL, "WriteData extents must be in file order and disjoint")
    if any(ext.unwritten for ext in cmd.extents):
        raise FsError(errno.EINVAL, "WriteData extents carry checksums")
    found = filemap.windows(txn, fmap, inode.ino, cmd.extents)
    replaced, in_place = filemap.survey(found)
    fresh = filemap.joined(filemap.without([(ext.dev_block, ext.count) for ext in cmd.extents], in_place))
    sm.space_check_new(txn, fresh)
    delta = sum(ext.count for ext in cmd.extents) - replaced
    sm.volumes.charge(txn, inode.volume, blocks=delta, inodes=0)
    for start, count in fresh:
        sm.space.take(txn, start, count)
    superseded = filemap.rewrite(txn, fmap, inode.ino, found)
    sm.defer_free(txn, filemap.without(superseded, in_place), cmd.now_ns)
    inode.blocks += delta
    inode.size = max(inode.size, cmd.size)
    if cmd.touch:
        inode.mtime_ns = cmd.mtime_ns or cmd.now_ns
        inode.ctime_ns = max(inode.ctime_ns, inode.mtime_ns)  # a chmod since the write stays visible
    if cmd.kill_suid:
        inode.mode &= ~stat.S_ISUID
        if inode.mode & stat.S_IXGRP:
            inode.mode &= ~stat.S_ISGID
    sm.ns.put_inode(txn, inode)
    return inode


def apply_setxattr(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.SetXattr) -> None:
    inode = sm.ns.require_inode(txn, cmd.ino)
    sm.volumes.check_writable(txn, inode.volume)
    check_xattr_name(cmd.name)
    if len(cmd.value) > MAX_XATTR_VALUE_BYTES:
        raise FsError(errno.E2BIG)
    if cmd.flags & ~(XATTR_CREATE | XATTR_REPLACE):
        raise FsError(errno.EINVAL, "unknown setxattr flags")
    key = xattr_key(cmd.ino, cmd.name)
    existing = txn.get(key, db=sm.db["xattrs"])
    if cmd.flags & XATTR_CREATE and existing is not None:
        raise FsError(errno.EEXIST)
    if cmd.flags & XATTR_REPLACE and existing is None:
        raise FsError(errno.ENODATA)
    total, names = sm.ns.xattr_usage(txn, cmd.ino)
    if existing is None:
        names += len(cmd.name) + 1
    total += len(key) + len(cmd.value) - (0 if existing is None else len(key) + len(existing))
    if total > MAX_XATTR_TOTAL_BYTES or names > MAX_XATTR_LIST_BYTES:
        raise FsError(errno.ENOSPC)
    txn.put(key, cmd.value, db=sm.db["xattrs"])
    sm.ns.put_xattr_usage(txn, cmd.ino, total, names)
    inode.ctime_ns = cmd.now_ns
    sm.ns.put_inode(txn, inode)


def apply_removexattr(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.RemoveXattr) -> None:
    inode = sm.ns.require_inode(txn, cmd.ino)
    sm.volumes.check_writable(txn, inode.volume)
    check_xattr_name(cmd.name)
    key = xattr_key(cmd.ino, cmd.name)
    value = txn.get(key, db=sm.db["xattrs"])
    if value is None:
        raise FsError(errno.ENODATA)
    total, names = sm.ns.xattr_usage(txn, cmd.ino)
    txn.delete(key, db=sm.db["xattrs"])
    sm.ns.put_xattr_usage(txn, cmd.ino, total - len(key) - len(value), names - len(cmd.name) - 1)
    inode.ctime_ns = cmd.now_ns
    sm.ns.put_inode(txn, inode)
