"""open(O_TMPFILE) in the state machine: a file born an orphan, and the link that names it.

An O_TMPFILE file has no directory entry and a link count of 0 from its first moment. It is an
orphan like a file unlinked while open (state_machine.py `orphan`): the same record keeps it
while some node holds it open, the same release deletes it at its last close, and the same
start-up purge deletes it after a crash (node.py `purge_orphans`; a cluster member's
`pending_orphans`). What only it has is the mark in the `tmpfiles` table: opened without O_EXCL,
it may take a name (linkat(2), `LinkTmpfile`), which takes it off the orphan list for good.
An inode unlinked while open never gets the mark: linking it stays ENOENT, as on ext4.

Both commands are new (log level 13, meta/levels.py LOG_LEVEL): a member on an older build
cannot decode them, so no member proposes them before every member's build can.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING

import lmdb

from awsomefsd.meta import commands as c
from awsomefsd.meta.cluster_sm import LINK_MAX
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Inode, check_new_inode, check_times, pack_holders, u64

if TYPE_CHECKING:
    from awsomefsd.meta.state_machine import StateMachine

TMPFILES = "tmpfiles"
"""The table of linkable O_TMPFILE orphans (ino -> b"")."""


def is_linkable(txn: lmdb.Transaction[bytes], db: dict[str, lmdb._Database], ino: int) -> bool:
    """Is `ino` an O_TMPFILE file, opened without O_EXCL, that no link has named yet?"""
    return txn.get(u64(ino), db=db[TMPFILES]) is not None


def make_tmpfile(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.MakeTmpfile) -> Inode:
    """A regular file with no name, held open by `cmd.node` (everyone's on a single node: no
    holders). Validated as Mknod validates a new file, minus the name."""
    ns = sm.ns
    parent = ns.require_inode(txn, cmd.parent)
    if not parent.is_dir:
        raise FsError(errno.ENOTDIR)
    if parent.nlink == 0:
        raise FsError(errno.ENOENT, "directory was removed")
    if not stat.S_ISREG(cmd.mode):
        raise FsError(errno.EINVAL, "O_TMPFILE makes regular files only")
    check_new_inode(cmd.mode, cmd.uid, cmd.gid, 0)
    check_times(cmd.now_ns)
    if ns.get_inode(txn, cmd.ino) is not None:
        raise FsError(errno.EIO, f"inode {cmd.ino} proposed twice")
    sm.volumes.charge(txn, parent.volume, blocks=0, inodes=1)
    gid = parent.gid if parent.mode & stat.S_ISGID else cmd.gid
    inode = Inode(cmd.ino, cmd.mode, cmd.uid, gid, 0, 0, cmd.now_ns, cmd.now_ns, cmd.now_ns, volume=parent.volume)
    ns.put_inode(txn, inode)
    txn.put(u64(cmd.ino), pack_holders((cmd.node,) if cmd.node else ()), db=sm.db["orphans"])
    if cmd.linkable:
        txn.put(u64(cmd.ino), b"", db=sm.db[TMPFILES])
    return inode


def link_tmpfile(sm: StateMachine, txn: lmdb.Transaction[bytes], cmd: c.LinkTmpfile) -> Inode:
    """Give a linkable O_TMPFILE orphan its first name: it is an ordinary file from now on."""
    ns = sm.ns
    sm.check_delegated(txn, cmd.new_parent)
    inode = ns.require_inode(txn, cmd.ino)
    if inode.nlink != 0 or not is_linkable(txn, sm.db, cmd.ino):
        raise FsError(errno.ENOENT, "not an O_TMPFILE file that may be linked")
    check_times(cmd.now_ns)
    sm.volumes.check_writable(txn, inode.volume)
    parent = ns.dir_for_entry(txn, cmd.new_parent, cmd.new_name)
    if ns.lookup(txn, cmd.new_parent, cmd.new_name) is not None:
        raise FsError(errno.EEXIST)
    if parent.volume != inode.volume:
        raise FsError(errno.EXDEV)
    assert inode.nlink < LINK_MAX
    ns.add_entry(txn, cmd.new_parent, cmd.new_name, cmd.ino, sm.new_cookie(txn, 0))
    inode.nlink = 1
    inode.ctime_ns = cmd.now_ns
    ns.put_inode(txn, inode)
    txn.delete(u64(cmd.ino), db=sm.db["orphans"])
    txn.delete(u64(cmd.ino), db=sm.db[TMPFILES])
    parent.mtime_ns = parent.ctime_ns = cmd.now_ns
    ns.put_inode(txn, parent)
    return inode


def forget_mark(txn: lmdb.Transaction[bytes], db: dict[str, lmdb._Database], ino: int) -> None:
    """The inode is deleted: its mark goes with it."""
    txn.delete(u64(ino), db=db[TMPFILES])
