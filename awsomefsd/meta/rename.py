"""rename(2) with RENAME_NOREPLACE, RENAME_EXCHANGE and RENAME_WHITEOUT: the hardest namespace command.

Kept apart from the other handlers because of its many cases: replace or not, file or directory,
same or different parent, exchange, moving a directory under itself, crossing a volume boundary.
A whiteout (overlayfs' mark of a deleted lower file, used when the mount is an upper layer) is a
character device 0:0 created at the old name in the same command.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING

import lmdb

from awsomefsd.meta import commands as c
from awsomefsd.meta.commands import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, Inode

if TYPE_CHECKING:
    from awsomefsd.meta.state_machine import StateMachine

MAX_TREE_DEPTH = 4096


def _is_ancestor(sm: StateMachine, txn: lmdb.Transaction[bytes], ancestor: int, ino: int) -> bool:
    """True when `ancestor` is `ino` or one of its parents (walks `..` up to the root)."""
    for _ in range(MAX_TREE_DEPTH):
        if ino == ancestor:
            return True
        if ino == ROOT_INO:
            return False
        node = sm.ns.require_inode(txn, ino)
        ino = node.parent
    raise FsError(errno.ELOOP, "directory tree deeper than the limit")


def apply_rename(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.Rename) -> int:
    ns = sm.ns
    if cmd.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
            cmd.flags & RENAME_EXCHANGE and cmd.flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
        raise FsError(errno.EINVAL)
    if cmd.flags & RENAME_WHITEOUT and not cmd.whiteout_ino:
        raise FsError(errno.EINVAL, "a whiteout needs an inode number")
    sm.check_delegated(txn, cmd.old_parent, cmd.new_parent)
    old_parent = ns.dir_for_entry(txn, cmd.old_parent, cmd.old_name)
    new_parent = old_parent if cmd.new_parent == cmd.old_parent else ns.dir_for_entry(txn, cmd.new_parent, cmd.new_name)
    src_ino = ns.lookup(txn, cmd.old_parent, cmd.old_name)
    if src_ino is None:
        raise FsError(errno.ENOENT)
    src = ns.require_inode(txn, src_ino)
    sm.volumes.check_writable(txn, src.volume)
    dst_ino = ns.lookup(txn, cmd.new_parent, cmd.new_name)
    if src.volume != new_parent.volume or (sm.volumes.is_volume_root(txn, src)):
        raise FsError(errno.EXDEV)
    if cmd.flags & RENAME_EXCHANGE:
        if dst_ino is None:
            raise FsError(errno.ENOENT)
        return _exchange(sm, txn, cmd, old_parent, new_parent, src, ns.require_inode(txn, dst_ino))
    if dst_ino is not None and cmd.flags & RENAME_NOREPLACE:
        raise FsError(errno.EEXIST)
    if dst_ino == src_ino:
        return 0  # two links to one file: POSIX says do nothing
    dst = ns.require_inode(txn, dst_ino) if dst_ino is not None else None
    if dst is not None:
        if dst.is_dir:
            sm.check_delegated(txn, dst.ino)  # its emptiness is its holder's to know
        if src.is_dir and not dst.is_dir:
            raise FsError(errno.ENOTDIR)
        if not src.is_dir and dst.is_dir:
            raise FsError(errno.EISDIR)
        if dst.is_dir and ns.has_entries(txn, dst.ino):
            raise FsError(errno.ENOTEMPTY)
        if sm.volumes.is_volume_root(txn, dst):
            raise FsError(errno.EBUSY)
    if src.is_dir and cmd.new_parent != cmd.old_parent and _is_ancestor(sm, txn, src.ino, cmd.new_parent):
        raise FsError(errno.EINVAL, "cannot move a directory into itself")
    if dst is None:
        sm.check_cookie(txn, cmd.new_parent, cmd.cookie)

    # all checks done: write
    ns.remove_entry(txn, cmd.old_parent, cmd.old_name)
    if dst is not None:
        ns.replace_entry(txn, cmd.new_parent, cmd.new_name, src.ino)
        if dst.is_dir:
            new_parent.nlink -= 1
        sm._drop_link(txn, dst, cmd.now_ns)
    else:
        ns.add_entry(txn, cmd.new_parent, cmd.new_name, src.ino, sm.new_cookie(txn, cmd.cookie))
    if src.is_dir and cmd.new_parent != cmd.old_parent:
        old_parent.nlink -= 1
        new_parent.nlink += 1
        src.parent = cmd.new_parent
    src.ctime_ns = cmd.now_ns
    ns.put_inode(txn, src)
    for parent in {id(old_parent): old_parent, id(new_parent): new_parent}.values():
        parent.mtime_ns = parent.ctime_ns = cmd.now_ns
        ns.put_inode(txn, parent)
    if cmd.flags & RENAME_WHITEOUT:
        sm._mknod(txn, c.Mknod(cmd.old_parent, cmd.old_name, cmd.whiteout_ino, stat.S_IFCHR, cmd.uid, cmd.gid,
                               cmd.now_ns, 0, b""))
    return dst.ino if dst is not None else 0


def _exchange(
    sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.Rename, old_parent: Inode, new_parent: Inode, a: Inode, b: Inode
) -> int:
    ns = sm.ns
    if a.volume != b.volume or sm.volumes.is_volume_root(txn, b):
        raise FsError(errno.EXDEV)
    if a.ino == b.ino:
        return 0
    if cmd.old_parent != cmd.new_parent:
        if a.is_dir and _is_ancestor(sm, txn, a.ino, cmd.new_parent):
            raise FsError(errno.EINVAL)
        if b.is_dir and _is_ancestor(sm, txn, b.ino, cmd.old_parent):
            raise FsError(errno.EINVAL)
    ns.replace_entry(txn, cmd.old_parent, cmd.old_name, b.ino)
    ns.replace_entry(txn, cmd.new_parent, cmd.new_name, a.ino)
    if cmd.old_parent != cmd.new_parent:
        if a.is_dir != b.is_dir:
            moved_dir_to_new = 1 if a.is_dir else -1
            new_parent.nlink += moved_dir_to_new
            old_parent.nlink -= moved_dir_to_new
        if a.is_dir:
            a.parent = cmd.new_parent
        if b.is_dir:
            b.parent = cmd.old_parent
    a.ctime_ns = b.ctime_ns = cmd.now_ns
    ns.put_inode(txn, a)
    ns.put_inode(txn, b)
    for parent in {id(old_parent): old_parent, id(new_parent): new_parent}.values():
        parent.mtime_ns = parent.ctime_ns = cmd.now_ns
        ns.put_inode(txn, parent)
    return 0
