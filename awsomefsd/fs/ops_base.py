"""What every POSIX operation of a node shares (fs/operations.py builds the operations on it,
with fs/file_ops.py and fs/xattr_ops.py): the metadata client, the file data and the handles;
inode numbers; the kernel's references and the orphans they leave; how a change reaches the
metadata (ahead of the log under a delegation or write lease, or through it); and attribute
changes (`setattr`), which a truncate, fallocate and an O_TRUNC open go through.

Everything runs on the trio thread; a method keeps no LMDB transaction across an await (the log
may commit and start a new one meanwhile).
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

from awsomefsd.fs.clock import file_time_ns
from awsomefsd.fs.coherence import Coherence
from awsomefsd.fs.data import FileData
from awsomefsd.fs.forwarding import Forward, ForwardCounts
from awsomefsd.fs.handles import Handle, Handles
from awsomefsd.fs.inode_numbers import RESERVATION, InodeNumbers
from awsomefsd.fs.tiered import EvictFile
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.commands import R
from awsomefsd.meta.errors import Delegated, FsError
from awsomefsd.meta.records import Inode, check_owner, clamp_time_ns

MAX_DELEGATION_TRIES = 8
"""A change whose target moved while its delegations were being acquired tries again, then goes
through the log without running ahead."""

SETID_BITS = stat.S_ISUID | stat.S_ISGID
InGroup = Callable[[int], bool]
"""Whether the caller of a request is in group `gid`, or may act as if it were (root)."""


def without_setid(mode: int, gid: int, in_group: InGroup) -> int | None:
    """The mode a write, a truncate or a chown leaves, by the VFS's rules: set-user-ID goes;
    set-group-ID goes with group execute, and without it (where it marks mandatory locking) when
    the caller is not in the file's group `gid`. None when nothing changes."""
    cleared = mode & ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not in_group(gid)):
        cleared &= ~stat.S_ISGID
    return None if cleared == mode else cleared


class OperationsBase:
    """The state and helpers the POSIX operations share. `coherence` is a cluster member's (None on
    a single node); `handles` is shared with it (its `holds` decides when an unlinked inode can go);
    `evict` tiers a file's data now (the tiering engine's, fs/tiered.py; None: no object store
    configured)."""

    def __init__(self, meta: MetaClient, data: FileData, handles: Handles, *, total_blocks: int,
                 coherence: Coherence | None = None, evict: EvictFile | None = None) -> None:
        self.meta = meta
        self.data = data
        self.handles = handles
        self.total_blocks = total_blocks
        self.coherence = coherence
        self.numbers = InodeNumbers(self._reserve_inodes, self.handles.crash.made)
        self.evict = evict
        self.forward: Forward | None = None
        """How a cluster member sends a look or a create to a directory's holder (fs/forwarding.py;
        set by the daemon's wiring); None: never sent."""
        self.forward_counts = ForwardCounts()
        self._tier_failed: dict[int, str] = {}
        """Why the last `tier evict|recall` of a file failed: its errno reaches the command, the
        reason comes back in the attribute the command reads next (`error`)."""

    # -- helpers --------------------------------------------------------------------------------
    def _now(self) -> int:
        return file_time_ns()

    def exists(self, ino: int) -> bool:
        """Is there an inode `ino` (deleted ones are not)?"""
        return self.meta.inode(ino) is not None

    def inode(self, ino: int) -> Inode:
        """An inode the kernel named. If it is gone (its last name was removed or replaced, here or
        on another node, and nothing here held it open) that is ESTALE, not ENOENT: the VFS then
        looks the path up again (LOOKUP_REVAL) and finds what the name means now."""
        inode = self.meta.inode(ino)
        if inode is None:
            raise FsError(errno.ESTALE)
        return self.data.with_buffered(inode)

    async def new_ino(self) -> int:
        return await self.numbers.take()

    async def _reserve_inodes(self, hurry: bool) -> tuple[int, int]:
        """A range of inode numbers for `numbers` (fs/inode_numbers.py)."""
        return await self.meta.propose(c.ReserveInodes(RESERVATION), hurry=hurry)

    def remember(self, ino: int) -> None:
        """The kernel now holds one more reference (an entry reply was sent for `ino`)."""
        self.handles.remember(ino)

    async def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, count in items:
            if self.handles.forget(ino, count):
                await self._purge_if_orphan(ino, evicted=True)

    async def _purge_if_orphan(self, ino: int, *, evicted: bool = False) -> None:
        """Delete an unlinked inode once nothing can reach its data any more.

        An open handle keeps a file (POSIX: an unlinked open file stays readable). A kernel lookup
        reference alone does not: with no name and no open file nothing can read it, so unlink
        frees space at once, as a local filesystem does, instead of waiting for FORGET. A removed
        directory may still be some process's working directory: it waits for FORGET.
        `evicted`: the kernel forgot the inode, so it holds no handle of it either — the only
        way to know that after a crash, when the handles the kernel holds were the dead daemon's.
        """
        if not self.handles.may_purge and not evicted:
            return  # a crash before this process: unknown handles may still reach it
        if self.meta.orphan(ino) is None:  # the common case (a close, a file with other names): one read
            return
        if self.handles.is_open(ino):
            return
        inode = self.meta.inode(ino)
        if inode is not None and inode.is_dir and ino in self.handles.lookups:
            return
        # Only an orphan: an unnamed inode another site's move may still bring back is kept
        # (meta/sites/forget.py) and is no orphan.
        if inode is not None and inode.nlink == 0:
            self.data.forget(ino)
            if self.coherence is not None:
                self.coherence.release_orphan(ino)  # other nodes may still hold it open
            else:
                await self.meta.propose(c.Purge(ino, self._now()))

    async def purge_orphans(self) -> int:
        """At start no kernel holds any inode: every orphan left by a crash can go."""
        orphans = [orphan.ino for orphan in self.meta.orphans()]
        for ino in orphans:
            await self.meta.propose(c.Purge(ino, self._now()))
        return len(orphans)

    # -- how a change reaches the metadata -------------------------------------------------------
    def _changing(self, *dirs: int) -> AbstractAsyncContextManager[bool]:
        """The delegations a namespace change needs (a cluster member's); True: it may run ahead."""
        return nullcontext(False) if self.coherence is None else self.coherence.changing(dirs)

    def _holding(self, ino: int) -> AbstractAsyncContextManager[bool]:
        """True while this node holds the inode's lease: a change to its attributes may run ahead."""
        return nullcontext(False) if self.coherence is None else self.coherence.holding(ino)

    def _writing(self, ino: int) -> AbstractAsyncContextManager[None]:
        return nullcontext() if self.coherence is None else self.coherence.writing(ino)

    async def _propose(self, command: c.Command[R], ahead: bool) -> R:
        """Run a namespace change ahead, or propose it through the log (`propose_holding`)."""
        if ahead:
            return await self.meta.run_ahead(command)
        return await self.propose_holding(command)

    async def propose_holding(self, command: c.Command[R], *, tries: int = MAX_DELEGATION_TRIES,
                              inside: Callable[[], AbstractAsyncContextManager[Any]] = nullcontext) -> R:
        """Propose `command` through the log. One the state machine refused because another node
        holds a delegation or write lease it needs (`Delegated`: strict mode delegates nothing of
        its own, a change whose delegations kept moving goes without, another site's batch is
        no FUSE request) is proposed again holding that too: its hand-over first commits what the
        holder acknowledged, so the change applies as every node will see it. `tries`: how many
        it may take, one per refusal. `inside()`: locks held around each proposal, taken after
        the delegations (a hand-over of this node's own write lease flushes the file under its
        buffer lock)."""
        if self.coherence is None and inside is nullcontext:  # one node: nothing is delegated
            return await self.meta.propose(command)
        taken: set[int] = set()
        while True:
            held = nullcontext() if self.coherence is None or not taken else self.coherence.taking(taken)
            async with held, inside():
                try:
                    return await self.meta.propose(command)
                except Delegated as exc:
                    if self.coherence is None or exc.directory in taken or len(taken) >= tries:
                        raise
                    taken.add(exc.directory)  # held from the next try on

    # -- attributes and handles ------------------------------------------------------------------
    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                      size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                      drop_setid: InGroup | None = None) -> Inode:
        """`drop_setid`: the kernel leaves clearing set-user-ID and set-group-ID to us (a truncate
        or chown under HANDLE_KILLPRIV_V2); ignored when the request sets the mode itself.
        Times outside what an inode holds are stored as the nearest it holds, as ext4 does."""
        check_owner(uid, gid)
        if size is not None and size < 0:
            raise FsError(errno.EINVAL)
        atime_ns = None if atime_ns is None else clamp_time_ns(atime_ns)
        mtime_ns = None if mtime_ns is None else clamp_time_ns(mtime_ns)
        if drop_setid is not None and mode is None:
            inode = self.inode(ino)
            mode = None if inode.is_dir else without_setid(inode.mode, inode.gid, drop_setid)
        if size is None and mtime_ns is not None and self.data.has_buffered(ino):
            if self.coherence is None and 0 < mtime_ns <= self._now():
                return await self._set_times_over_buffered(ino, c.SetAttr(
                    ino, self._now(), mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns))
            only_mtime = mode is None and uid is None and gid is None and atime_ns is None
            # futimens after writes (tar, cp -p, rsync): the buffered data is committed first, so
            # its flush cannot stamp its own write time over the one the application sets now.
            # A kernel caching written pages sends their mtime after them this way at every close:
            # when only the mtime changes, the flush carries it, and no second command is needed.
            stamped = only_mtime and self.data.stamp_buffered(ino, mtime_ns)
            await self.data.flush(ino)
            if stamped:
                inode = self.inode(ino)  # (with what is buffered: not added twice)
                if inode.mtime_ns == mtime_ns:
                    return inode
        cmd = c.SetAttr(ino, self._now(), mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns)
        if size is not None:
            async with self._writing(ino):
                inode = self.inode(ino)
                if inode.is_dir:
                    raise FsError(errno.EISDIR)
                if not inode.is_reg:
                    raise FsError(errno.EINVAL)
                if size > inode.size and inode.volume:
                    self.data.check_quota(inode, 0)
                result = await self.data.truncate(ino, size, cmd)
        else:
            async with self._holding(ino) as ahead:
                result = await self._propose(cmd, ahead)
        return self.data.with_buffered(result)

    def change_is_immediate(self, *inodes: int, new_inode: bool = False) -> bool:
        """Would a change in these directories (a create: `new_inode`), or of these files'
        attributes or data, return without waiting on a cluster member (a transport may then
        serve it without a task)? Only when this node holds their delegations or write leases,
        none is being handed over (the change runs ahead of the log: `Coherence.holds_now`), the
        pipeline has room for it, and a create has an inode number left in this node's
        reservation. A look in such a directory never waits either."""
        return (self.coherence is not None and self.coherence.holds_now(inodes) and self.meta.runs_ahead_at_once()
                and (not new_inode or self.numbers.at_once()))

    def look_is_immediate(self, directory: int) -> bool:
        """Would a lookup in `directory` answer without waiting on a cluster member? When this node
        holds its delegation and no hand-over of it has begun (`Coherence.holds_now`): a look only
        reads, so room in the pipeline and inode numbers do not matter to it."""
        return self.coherence is not None and self.coherence.holds_now((directory,))

    def open_is_immediate(self, ino: int) -> bool:
        """Would an open of `ino` that truncates nothing answer without waiting? Always on a single
        node; on a cluster member when no read barrier is needed (`Coherence.opens_at_once`)."""
        return self.coherence is None or self.coherence.opens_at_once(ino)

    def setattr_is_immediate(self, ino: int, mtime_ns: int | None) -> bool:
        """Would `setattr` of `ino` that changes no size (setting `mtime_ns`, or None) return
        without waiting (a transport may then serve it without a task)? Not when it flushes the
        file's buffered writes first (a time over them in the future, or at or before 1970; on a
        cluster member any time over them, unless the flush holds its blocks behind and runs its
        mapping ahead at once: `FileData.flushes_at_once`), nor while a flush of the file holds
        its lock (`_set_times_over_buffered` waits for it); any other change is one command the
        local log applies at once, or on a member one that runs ahead under the file's lease."""
        if mtime_ns is None or not self.data.has_buffered(ino):
            return self.coherence is None or self.change_is_immediate(ino)
        if self.coherence is not None:  # the flush first: at once when its blocks are held behind
            return self.change_is_immediate(ino) and self.data.flushes_at_once(ino)
        return 0 < mtime_ns <= self._now() and not self.data.buffer_busy(ino)

    async def _set_times_over_buffered(self, ino: int, cmd: c.SetAttr) -> Inode:
        """futimens of a file with buffered writes (tar, cp -p, rsync), on a single node: the
        times commit now and the data stays buffered, to be written at the close with other
        files (fs/batch.py); its flush keeps the times just set, not the time of its writes, so
        the explicit time wins (docs/consistency.md, clause 10), and still names when its writes
        came (a linked site stamps the content with that, not with the time set). Under the
        file's lock: a flush that took its runs before this would stamp their write time after
        it, so it ends first. A write after this stamps its own time, as it should. Only for a
        time set in the past (`setattr` checks): a flush stamps ctime no earlier than mtime,
        which a future mtime would move."""
        async with self.data.buffer.locked(ino):
            result = await self.meta.propose(cmd)
            self.data.times_committed(ino)
        return self.data.with_buffered(result)

    async def _drop_setid(self, inode: Inode, in_group: InGroup) -> None:
        """Clear set-user-ID and set-group-ID before a change by a caller without CAP_FSETID
        (what the VFS does itself unless we take it over with HANDLE_KILLPRIV_V2): one metadata
        command when the bits are set, nothing otherwise."""
        if inode.mode & SETID_BITS and not inode.is_dir:
            mode = without_setid(inode.mode, inode.gid, in_group)
            if mode is not None:
                await self.setattr(inode.ino, mode=mode)

    def handle(self, fh: int) -> Handle:
        return self.handles.require(fh)

    def _open_handle(self, ino: int, flags: int) -> int:
        return self.handles.add(ino, flags, self.data.losses)
