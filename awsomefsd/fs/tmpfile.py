"""open(O_TMPFILE) and the linkat(2) that names such a file, on the operations of one node.

The file is an orphan from birth (meta/tmpfile.py): the handle opened here keeps it, and its
release deletes it by the path an unlinked open file takes (`Operations._purge_if_orphan`). Both
go through the log, never ahead of it: the file is in no directory a delegation covers, and its
link is rare next to the creates that run ahead (a link into a directory another node holds
takes the delegation first: `propose_holding`; one this node holds keeps the order of what it
acknowledged ahead, which the proposal queues behind).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from awsomefsd.fs.clock import file_time_ns
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Inode, check_name, check_new_inode

if TYPE_CHECKING:
    from awsomefsd.fs.operations import Operations

UPGRADING = "O_TMPFILE waits for every member's build (a rolling upgrade is under way; meta/levels.py LOG_LEVEL 13)"


async def tmpfile(ops: Operations, parent: int, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Inode]:
    """A new nameless regular file in `parent`'s volume, opened with `flags`: (handle, inode).
    EOPNOTSUPP while a rolling upgrade has not reached the commands (callers fall back to a
    named temporary file, as they do on filesystems without O_TMPFILE)."""
    if not ops.meta.may_propose(c.MakeTmpfile):
        raise FsError(errno.EOPNOTSUPP, UPGRADING)
    mode = stat.S_IFREG | (mode & 0o7777)
    check_new_inode(mode, uid, gid, 0)
    ino = await ops.new_ino()
    node = ops.coherence.node_id if ops.coherence is not None else 0
    cmd = c.MakeTmpfile(parent, ino, mode, uid, gid, file_time_ns(), not flags & os.O_EXCL, node)
    inode: Inode = await ops.propose_holding(cmd)
    # No await between the proposal and the handle: nothing can purge the orphan before it is held.
    return ops.handles.add(ino, flags, ops.data.losses), inode


async def link_tmpfile(ops: Operations, ino: int, new_parent: int, new_name: bytes) -> Inode:
    """linkat(2) of an O_TMPFILE file with no name yet (the kernel let it through: opened
    without O_EXCL). The state machine checks the mark again: the answer is the log's."""
    check_name(new_name)
    inode: Inode = await ops.propose_holding(c.LinkTmpfile(ino, new_parent, new_name, file_time_ns()))
    if ops.coherence is not None:
        ops.coherence.published(ino)
    return ops.data.with_buffered(inode)
