"""POSIX operations on the metadata client and the file data, independent of any FUSE binding.

The binding (awsomefsd/fuse/adapter.py) translates pyfuse3's requests into calls here; a raw
/dev/fuse transport can replace it without touching this module. Everything runs on the trio thread; a method keeps no
LMDB transaction across an await (the log may commit and start a new one meanwhile).

Permissions are enforced by the kernel (`default_permissions`: it holds the caller's full
credentials, including supplementary groups); what the kernel cannot know — setgid inheritance,
quotas, read-only snapshots, name limits — is enforced by the state machine.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from awsomefsd.fs.clock import file_time_ns
from awsomefsd.fs.coherence import Coherence
from awsomefsd.fs.data import FileData
from awsomefsd.fs.handles import CRASH_UNREPORTED, Handle, Handles
from awsomefsd.fs.posix import check_xattr
from awsomefsd.fs.tmpfile import link_tmpfile
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.commands import RENAME_WHITEOUT, R
from awsomefsd.meta.errors import Delegated, FsError
from awsomefsd.meta.records import (
    CONFLICTS_INO,
    MAX_FILE_SIZE_BYTES,
    MAX_NAME_BYTES,
    MAX_RANGE_BLOCKS,
    MAX_SYMLINK_BYTES,
    ROOT_INO,
    Inode,
    check_name,
    check_new_inode,
    check_owner,
    clamp_time_ns,
    is_tiered,
)

INODE_RESERVATION = 1024
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


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
UPGRADING = "not every member's build decodes it yet (a rolling upgrade is under way; meta/commands.py LOG_LEVEL)"
ZEROS_PER_WRITE = 1 << 20

POSIX_ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
TIER_XATTR = b"trusted.awsomefs.tier"
"""A file's tiering, read and changed through the mount (the kernel lets only CAP_SYS_ADMIN use
`trusted.` names): reading it gives JSON with the file's bytes on the device and in the object
store; writing `evict` moves its data to the store now, `recall` brings it back (`awsomefsd tier
evict|recall PATH`). It is never stored, and listxattr does not show it (cp -a does not copy it)."""
FILES_ADVERTISED = 1 << 32


@dataclass(frozen=True, slots=True)
class FsStats:
    block_size: int
    total_blocks: int
    free_blocks: int
    total_inodes: int
    free_inodes: int
    name_max: int


class Operations:
    """The POSIX operations of one node. `coherence` is a cluster member's (None on a single
    node); `handles` is shared with it (its `holds` decides when an unlinked inode can go)."""

    def __init__(self, meta: MetaClient, data: FileData, handles: Handles, *, total_blocks: int,
                 coherence: Coherence | None = None) -> None:
        self.meta = meta
        self.data = data
        self.handles = handles
        self.total_blocks = total_blocks
        self.coherence = coherence
        self._ino_next = 0
        self._ino_end = 0
        self.evict: Callable[[int], Awaitable[int]] | None = None
        """Tier a file's data now (the tiering engine's; None: no object store configured)."""
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
        if self._ino_next >= self._ino_end:
            # Nothing between the assignment and the increment awaits, so concurrent callers that
            # both reserved still hand out distinct numbers (the loser's range is simply unused).
            self._ino_next, self._ino_end = await self.meta.propose(c.ReserveInodes(INODE_RESERVATION))
            self.handles.crash.made(self._ino_next)
        ino = self._ino_next
        self._ino_next += 1
        return ino

    def remember(self, ino: int) -> None:
        """The kernel now holds one more reference (an entry reply was sent for `ino`)."""
        self.handles.remember(ino)

    async def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, count in items:
            if self.handles.forget(ino, count):
                await self._purge_if_orphan(ino)

    async def _purge_if_orphan(self, ino: int) -> None:
        """Delete an unlinked inode once nothing can reach its data any more.

        An open handle keeps a file (POSIX: an unlinked open file stays readable). A kernel lookup
        reference alone does not: with no name and no open file nothing can read it, so unlink
        frees space at once, as a local filesystem does, instead of waiting for FORGET. A removed
        directory may still be some process's working directory: it waits for FORGET.
        """
        if not self.handles.may_purge:
            return  # a crash before this process: unknown handles may still reach it
        if self.handles.is_open(ino):
            return
        inode = self.meta.inode(ino)
        if inode is not None and inode.is_dir and ino in self.handles.lookups:
            return
        # Only an orphan: an unnamed inode another site's move may still bring back is kept
        # (meta/sites/forget.py) and is no orphan.
        if inode is not None and inode.nlink == 0 and self.meta.orphan(ino) is not None:
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

    # -- namespace ------------------------------------------------------------------------------
    async def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > MAX_NAME_BYTES:
            raise FsError(errno.ENAMETOOLONG)
        strict = self.coherence is not None and self.coherence.strict
        if strict:
            await self.coherence.catch_up(drain=False)  # type: ignore[union-attr]
        if name == b".":
            child = parent
        elif name == b"..":
            child = self.meta.require_inode(parent).parent or ROOT_INO
        else:
            if strict:
                await self.coherence.looking(parent)  # type: ignore[union-attr]
            found = self.meta.lookup(parent, name)
            if self.coherence is not None and not strict:
                if found is None:
                    found = await self._look_again(parent, name)
                elif await self.coherence.looking(parent):
                    # Ours now: another node's acknowledged changes to it (an unlink, a rename
                    # away) are committed, and nobody else changes it while we answer.
                    found = self.meta.lookup(parent, name)
            if found is None:
                raise FsError(errno.ENOENT)
            child = found
        return self.inode(child)

    async def _look_again(self, parent: int, name: bytes) -> int | None:
        """A name not found here may have been created elsewhere a moment ago."""
        await self._look_at_directory(parent)
        return self.meta.lookup(parent, name)

    async def _look_at_directory(self, directory: int) -> None:
        """Before a look that must see every change acknowledged before it began (a lookup that
        found nothing, a readdir): unless this node holds the directory's delegation (nobody else
        changes it), catch up with the log; if another node holds the delegation (known now, or
        from the caught-up log), let it commit what it acknowledged first."""
        assert self.coherence is not None
        if await self.coherence.looking(directory):
            return
        await self.coherence.catch_up(drain=False)
        await self.coherence.looking(directory)

    def _changing(self, *dirs: int) -> AbstractAsyncContextManager[bool]:
        """The delegations a namespace change needs (a cluster member's); True: it may run ahead."""
        return nullcontext(False) if self.coherence is None else self.coherence.changing(dirs)

    def _holding(self, ino: int) -> AbstractAsyncContextManager[bool]:
        """True while this node holds the inode's lease: a change to its attributes may run ahead."""
        return nullcontext(False) if self.coherence is None else self.coherence.holding(ino)

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

    def direct_io(self, flags: int) -> bool:
        """For the adapter's open reply: a cluster member's O_APPEND descriptors bypass the page
        cache, because their writes land where the daemon, not the kernel, says the file ends."""
        return self.coherence is not None and bool(flags & os.O_APPEND)

    def keep_cache(self, ino: int) -> bool:
        """For the adapter's open reply: keep the page cache unless the cluster says it is stale."""
        return self.coherence is None or self.coherence.keep_cache(ino)

    def keep_listing(self, ino: int) -> bool:
        """May the kernel keep this directory's listing (where the transport lets it)? Not that of
        /.conflicts: cross-site replication drops a copy kept there as a side effect of a write to
        another file (its own site overwriting it), which no request about /.conflicts tells."""
        return ino != CONFLICTS_INO

    async def getattr(self, ino: int) -> Inode:
        if self.coherence is not None and self.coherence.strict:
            await self.coherence.catch_up()
        return self.inode(ino)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                    target: bytes = b"") -> Inode:
        check_name(name)
        check_new_inode(mode, uid, gid, rdev)
        async with self._changing(parent) as ahead:
            ino = await self.new_ino()
            leased = ahead and (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
            lease_to = self.coherence.node_id if leased and self.coherence is not None else 0
            cmd = c.Mknod(parent, name, ino, mode, uid, gid, self._now(), rdev, target,
                          cookie=c.delegated_cookie(ino) if ahead else 0, lease_to=lease_to)
            inode: Inode = await self._propose(cmd, ahead)
            if lease_to and self.coherence is not None:
                self.coherence.created_ahead(ino, parent, is_dir=stat.S_ISDIR(mode))
        return inode

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        if len(target) > MAX_SYMLINK_BYTES:
            raise FsError(errno.ENAMETOOLONG)
        if not target:
            raise FsError(errno.ENOENT)
        return await self.mknod(parent, name, stat.S_IFLNK | 0o777, 0, uid, gid, target)

    async def readlink(self, ino: int) -> bytes:
        return self.meta.symlink_target(ino)

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        if self.meta.linkable_tmpfile(ino):  # an O_TMPFILE file's first name
            return await link_tmpfile(self, ino, new_parent, new_name)
        async with self._changing(new_parent) as ahead:
            cookie = c.delegated_cookie(await self.new_ino()) if ahead else 0
            inode: Inode = await self._propose(c.Link(ino, new_parent, new_name, self._now(), cookie), ahead)
        if self.coherence is not None:
            self.coherence.published(ino)
        return self.data.with_buffered(inode)

    async def unlink(self, parent: int, name: bytes, *, is_dir: bool) -> None:
        """rmdir also needs the removed directory's delegation: whether it is empty is decided by
        the changes its holder acknowledged, not only by what the log has."""
        for _ in range(MAX_DELEGATION_TRIES):
            child = self.meta.lookup(parent, name) if is_dir else None
            async with self._changing(parent, *([child] if child else [])) as ahead:
                if is_dir and self.meta.lookup(parent, name) != child:
                    continue  # renamed or replaced meanwhile: the delegations to hold changed
                removed = await self._propose(c.Unlink(parent, name, is_dir, self._now()), ahead)
                break
        else:
            removed = await self._propose(c.Unlink(parent, name, is_dir, self._now()), False)
        await self._purge_if_orphan(removed)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int,
                     uid: int = 0, gid: int = 0) -> None:
        """Runs ahead only when no directory changes parent (the loop check reads the parents of
        directories that other nodes may be moving) and every directory whose entries it reads or
        changes is held: both parents and a directory it replaces."""
        for _ in range(MAX_DELEGATION_TRIES):
            replaced_dir = self._directory_at(new_parent, new_name)
            async with self._changing(old_parent, new_parent, *([replaced_dir] if replaced_dir else [])) as ahead:
                if self._directory_at(new_parent, new_name) != replaced_dir:
                    continue  # the target changed meanwhile: the delegations to hold changed
                ahead = ahead and not flags & RENAME_WHITEOUT and not (
                    old_parent != new_parent and (self._directory_at(old_parent, old_name) or replaced_dir))
                whiteout_ino = await self.new_ino() if flags & RENAME_WHITEOUT else 0
                cookie = c.delegated_cookie(await self.new_ino()) if ahead else 0
                if self.coherence is not None and old_parent != new_parent:
                    for moved in (self.meta.lookup(old_parent, old_name), self.meta.lookup(new_parent, new_name)):
                        if moved is not None:  # an exchange moves both
                            self.coherence.published(moved)
                replaced = await self._propose(c.Rename(old_parent, old_name, new_parent, new_name, flags, self._now(),
                                                        whiteout_ino, uid, gid, cookie), ahead)
                break
        else:
            whiteout_ino = await self.new_ino() if flags & RENAME_WHITEOUT else 0
            replaced = await self._propose(c.Rename(old_parent, old_name, new_parent, new_name, flags,
                                                    self._now(), whiteout_ino, uid, gid), False)
        if replaced:
            await self._purge_if_orphan(replaced)

    def _directory_at(self, parent: int, name: bytes) -> int:
        """The directory `name` names in `parent` (0: none, or not a directory)."""
        ino = self.meta.lookup(parent, name)
        inode = None if ino is None else self.meta.inode(ino)
        return inode.ino if inode is not None and inode.is_dir else 0

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
        if size is None and mtime_ns is not None:
            # futimens after writes (tar, cp -p, rsync): the buffered data is committed first, so
            # its flush cannot stamp its own write time over the one the application sets now.
            # A kernel caching written pages sends their mtime after them this way at every close:
            # when only the mtime changes, the flush carries it, and no second command is needed.
            only_mtime = mode is None and uid is None and gid is None and atime_ns is None
            stamped = only_mtime and self.data.stamp_buffered(ino, mtime_ns)
            await self.data.flush(ino)
            if stamped:
                inode = self.inode(ino)
                if inode.mtime_ns == mtime_ns:
                    return self.data.with_buffered(inode)
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

    # -- files ----------------------------------------------------------------------------------
    def _open_handle(self, ino: int, flags: int) -> int:
        return self.handles.add(ino, flags, self.data.losses)

    async def open(self, ino: int, flags: int, *, drop_setid: InGroup | None = None) -> int:
        """`drop_setid`: an O_TRUNC open by a caller without CAP_FSETID, under HANDLE_KILLPRIV_V2."""
        if self.coherence is not None:
            await self.coherence.catch_up()  # close-to-open: see what was closed elsewhere before
        inode = self.inode(ino)
        if inode.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR)
        if flags & os.O_TRUNC and inode.is_reg:  # O_RDONLY too, as Linux (the kernel checked write access)
            if inode.size:
                await self.setattr(ino, size=0, drop_setid=drop_setid)
            elif drop_setid is not None:
                await self._drop_setid(inode, drop_setid)
        return self._open_handle(ino, flags)

    async def _drop_setid(self, inode: Inode, in_group: InGroup) -> None:
        """Clear set-user-ID and set-group-ID before a change by a caller without CAP_FSETID
        (what the VFS does itself unless we take it over with HANDLE_KILLPRIV_V2): one metadata
        command when the bits are set, nothing otherwise."""
        if inode.mode & SETID_BITS and not inode.is_dir:
            mode = without_setid(inode.mode, inode.gid, in_group)
            if mode is not None:
                await self.setattr(inode.ino, mode=mode)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Inode]:
        """open(O_CREAT) of a name the kernel just looked up and did not find. Another node may
        have created it since: without O_EXCL that is no error (POSIX opens the existing file).
        ESTALE makes the kernel walk the path again with LOOKUP_REVAL, find the file and open it
        itself, with the permission checks and O_TRUNC an open of an existing file gets."""
        try:
            inode = await self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), 0, uid, gid)
        except FsError as exc:
            if exc.errno == errno.EEXIST and not flags & os.O_EXCL:
                raise FsError(errno.ESTALE, "created elsewhere since the lookup: look it up again") from None
            raise
        return self._open_handle(inode.ino, flags), inode

    def handle(self, fh: int) -> Handle:
        return self.handles.require(fh)

    async def read(self, fh: int, offset: int, size: int) -> bytes | bytearray:
        h = self.handle(fh)
        inode = self.meta.require_inode(h.ino)
        return await self.data.read(inode, offset, size)

    async def write(self, fh: int, offset: int, buf: bytes | memoryview, *, drop_setid: InGroup | None = None,
                    kernel_times: bool = False) -> int:
        """`drop_setid`: the writer lacks CAP_FSETID and the kernel left clearing set-user-ID and
        set-group-ID to us (HANDLE_KILLPRIV_V2). `kernel_times`: the kernel writing back pages it
        cached under the writeback cache; it keeps the file's mtime itself and sends it in a
        SETATTR, before or after these bytes (their commit must not stamp the time they arrived
        over it). Without the writeback cache the kernel sends no times, and mmap's written pages
        arrive flagged the same way: those are stamped."""
        h = self.handle(fh)
        async with self._writing(h.ino):
            inode = self.meta.require_inode(h.ino)
            if drop_setid is not None and inode.mode & SETID_BITS:  # rare: no second read otherwise
                await self._drop_setid(inode, drop_setid)
                inode = self.meta.require_inode(h.ino)
            append = self.appends_at_own_end(h, kernel_times=kernel_times)
            if append:
                offset = self.data.effective_size(inode.ino, inode.size)
            if inode.volume:
                self.meta.check_writable(inode.volume)
            written = await self.data.write(inode, offset, buf, stamp=not kernel_times)
        if append and self.coherence is not None:
            self.coherence.appended(h.ino)
        return written

    def appends_at_own_end(self, h: Handle, *, kernel_times: bool = False) -> bool:
        """Does a write through `h` go to the end of the file as this daemon knows it, whatever
        offset the kernel sent? For O_APPEND, the kernel sends its cached size as the offset, and
        that can be wrong here. On a cluster member, other nodes' appends made it stale (with the
        lease held, the end of file here is the real one). On a descriptor opened before the
        daemon crashed, it counts the writes the crash lost: at that offset the file would get a
        run of zeros where they were. Not for pages the kernel writes back under the writeback
        cache (`kernel_times`): those are the file's bytes where the kernel put them. The kernel
        caches the appended bytes at its own offset meanwhile; it drops those pages when it next
        fetches the file's attributes (it marks them stale after every write) and finds a size
        other than its own."""
        if not h.flags & os.O_APPEND:
            return False
        return self.coherence is not None or (h.rebuilt and not kernel_times)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE (the kernel answers the other kinds itself), block by block
        as ext4 does: ENXIO at or past the end; the end of the file is a hole."""
        h = self.handle(fh)
        inode = self.inode(h.ino)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FsError(errno.EINVAL)
        if offset < 0 or offset >= inode.size:
            raise FsError(errno.ENXIO)
        ranges = self.data.data_ranges(inode, offset)
        if whence == os.SEEK_DATA:
            for start, end in ranges:
                if end > offset:
                    return max(start, offset)
            raise FsError(errno.ENXIO)
        position = offset
        for start, end in ranges:
            if start > position:
                break
            position = max(position, end)
        return min(position, inode.size)

    def _writing(self, ino: int) -> AbstractAsyncContextManager[None]:
        return nullcontext() if self.coherence is None else self.coherence.writing(ino)

    def flush_is_immediate(self, fh: int) -> bool:
        """Would `flush(fh)` return without waiting: a known handle of a file with nothing
        buffered, on a single node (a transport may answer it without a task of its own)."""
        h = self.handles.find(fh)
        return self.coherence is None and h is not None and not self.data.has_buffered(h.ino)

    async def flush(self, fh: int) -> None:
        """close(2): the file's data reaches the device and its mapping the metadata (close-to-open)."""
        h = self.handle(fh)
        await self._flush_reporting(h)

    async def _flush_reporting(self, h: Handle) -> None:
        """Flush the file; a write error or a loss is reported to this descriptor once."""
        try:
            await self.data.flush(h.ino)
        except FsError:
            h.seen_loss = self.data.losses  # this error is the report of the loss it recorded
            raise
        self._report_loss(h)

    def _report_loss(self, h: Handle) -> None:
        """Writes this descriptor may have made were dropped (the node's lease expired, a flush
        failed, or the daemon crashed and this one rebuilt the handle): EIO, or the failed
        flush's own error (ENOSPC on a full device), once."""
        if h.seen_loss == CRASH_UNREPORTED:
            h.seen_loss = self.data.losses
            raise FsError(errno.EIO, "writes through this descriptor that were not yet synced may be lost: "
                          "the daemon serving the mount crashed", cause="lost-writes")
        if self.data.unreported_loss(h.ino, h.seen_loss):
            h.seen_loss = self.data.losses
            raise FsError(self.data.loss_errno(h.ino),
                          "buffered writes were lost (a flush of them failed, or this node's lease "
                          "expired before they were flushed)", cause="lost-writes")

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        if h is not None:
            self.data.closed(h.ino)
            await self._purge_if_orphan(h.ino)

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        """fallocate(2): the default mode and KEEP_SIZE reserve the range's holes (unwritten
        extents: a later write there needs no free space; they read as zeros and count in
        st_blocks) and, without KEEP_SIZE, extend the file over it. ZERO_RANGE also makes the
        bytes in it read as zeros first, and PUNCH_HOLE (with KEEP_SIZE, as Linux requires)
        deallocates them (`_zero`). The other modes: EOPNOTSUPP. During a rolling upgrade that
        has not reached Preallocate, the space is checked, not reserved."""
        h = self.handle(fh)
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        end = offset + length
        if end > MAX_FILE_SIZE_BYTES:
            raise FsError(errno.EFBIG)
        inode = self.inode(h.ino)
        if not inode.is_reg:
            raise FsError(errno.ENODEV)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                raise FsError(errno.EOPNOTSUPP, "PUNCH_HOLE goes with KEEP_SIZE only")
            if not self.meta.may_propose(c.PunchHole):
                raise FsError(errno.EOPNOTSUPP, UPGRADING)
            async with self._writing(h.ino):
                await self._zero(h.ino, offset, end)
        elif mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE):
            raise FsError(errno.EOPNOTSUPP, "only the default mode, KEEP_SIZE, ZERO_RANGE and PUNCH_HOLE")
        else:
            await self._allocate(h.ino, offset, end, mode)
        # Every mode changes mtime and ctime, even where it changed nothing else, as on ext4.
        await self.setattr(h.ino, mtime_ns=self._now())

    async def _allocate(self, ino: int, offset: int, end: int, mode: int) -> None:
        """fallocate's default mode, KEEP_SIZE and ZERO_RANGE (see `fallocate`)."""
        volume = self.inode(ino).volume
        if volume:
            self.meta.check_writable(volume)
        first, last = offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)
        reserve = self.meta.may_propose(c.Preallocate)
        async with self._writing(ino):
            if mode & FALLOC_FL_ZERO_RANGE:
                await self.data.preallocate(ino, first, last, reserve=False)  # fits, or nothing changes
                await self._zero(ino, offset, end)
            await self.data.preallocate(ino, first, last, reserve=reserve)
        if not mode & FALLOC_FL_KEEP_SIZE and end > self.inode(ino).size:
            await self.setattr(ino, size=end)

    async def _zero(self, ino: int, start: int, end: int) -> None:
        """Make bytes [start, end) of the file read as zeros, up to its end (past it there is
        nothing to zero: an extended file reads zeros there). Whole blocks are unmapped, one
        PunchHole per MAX_RANGE_BLOCKS; the partial blocks at the edges are written with zeros
        (at most a block each, copy-on-write like any write). The caller holds the write lease."""
        inode = self.meta.require_inode(ino)
        if inode.volume:
            self.meta.check_writable(inode.volume)
        end = min(end, self.data.effective_size(ino, inode.size))
        if start >= end:
            return
        first_whole, end_whole = -(-start // BLOCK_SIZE), end // BLOCK_SIZE
        if not self.meta.may_propose(c.PunchHole):  # ZERO_RANGE during a rolling upgrade: write the zeros
            first_whole = end_whole = end // BLOCK_SIZE
        if first_whole >= end_whole:
            edges = [(start, end)]
        else:
            edges = [(start, first_whole * BLOCK_SIZE), (end_whole * BLOCK_SIZE, end)]
        for a, b in edges:
            for chunk in range(a, b, ZEROS_PER_WRITE):
                await self.data.write(self.meta.require_inode(ino), chunk, bytes(min(b, chunk + ZEROS_PER_WRITE) - chunk))
        for block in range(first_whole, end_whole, MAX_RANGE_BLOCKS):
            await self.data.punch_hole(ino, block, min(end_whole, block + MAX_RANGE_BLOCKS))

    async def copy_file_range(self, fh_in: int, offset_in: int, fh_out: int, offset_out: int, length: int) -> int:
        """copy_file_range(2) within this filesystem: how many bytes were copied, which may be
        fewer than asked (callers loop, as the call allows). Whole blocks are cloned
        (CloneRange: shared copy-on-write, one metadata command for up to MAX_RANGE_BLOCKS, no
        byte read or written); a partial block at either edge is copied through this daemon in
        a call of its own. Offsets at different places within a block cannot share blocks:
        EOPNOTSUPP makes the kernel copy those through reads and writes itself."""
        src_h, dst_h = self.handle(fh_in), self.handle(fh_out)
        if offset_in < 0 or offset_out < 0 or length < 0:
            raise FsError(errno.EINVAL)
        src, dst = self.inode(src_h.ino), self.inode(dst_h.ino)
        if not src.is_reg or not dst.is_reg:
            raise FsError(errno.EINVAL)
        if dst.volume:
            self.meta.check_writable(dst.volume)
        length = min(length, self.data.effective_size(src.ino, src.size) - offset_in)
        if length <= 0:
            return 0
        if offset_out + length > MAX_FILE_SIZE_BYTES:
            raise FsError(errno.EFBIG)
        if (offset_in - offset_out) % BLOCK_SIZE:
            raise FsError(errno.EOPNOTSUPP, "the offsets are at different places within a block")
        if not self.meta.may_propose(c.CloneRange):
            raise FsError(errno.EOPNOTSUPP, UPGRADING)
        head = -offset_in % BLOCK_SIZE
        blocks = 0 if head else min(length // BLOCK_SIZE, MAX_RANGE_BLOCKS)
        async with self._writing(dst_h.ino):
            if not blocks:
                data = await self.data.read(self.meta.require_inode(src.ino), offset_in, min(length, head or length))
                if data:
                    await self.data.write(self.meta.require_inode(dst_h.ino), offset_out, bytes(data))
                return len(data)
            await self.data.clone(src.ino, offset_in // BLOCK_SIZE, dst_h.ino, offset_out // BLOCK_SIZE, blocks,
                                  offset_out + blocks * BLOCK_SIZE)
        return blocks * BLOCK_SIZE

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handle(fh)
        await self._flush_reporting(h)
        await self.meta.barrier(h.ino)

    async def sync_all(self) -> None:
        await self.data.flush_all()
        await self.meta.barrier()

    async def fsyncdir(self, ino: int) -> None:
        """fsync of a directory: everything is made durable (the log commits the whole namespace).
        The first one of each directory after a crash of the daemon before reports EIO: the crash
        may have taken changes to its entries acknowledged before (`CrashReports`)."""
        await self.sync_all()
        self.handles.crash.report_directory(ino)

    async def syncfs(self) -> None:
        """syncfs(2), where the kernel sends it (not to a /dev/fuse server: docs/fuse-transport.md):
        `sync_all`; the first one after a crash of the daemon before reports it (EIO)."""
        await self.sync_all()
        self.handles.crash.report_whole()

    # -- directories ----------------------------------------------------------------------------
    async def opendir(self, ino: int) -> int:
        if not self.inode(ino).is_dir:
            raise FsError(errno.ENOTDIR)
        if self.coherence is not None:
            await self._look_at_directory(ino)
        return self._open_handle(ino, os.O_RDONLY)

    def readdir(self, fh: int, start_id: int) -> Iterator[tuple[int, bytes, Inode]]:
        """(next id, name, attributes) from `start_id` on; ids 1 and 2 are `.` and `..`."""
        ino = self.handle(fh).ino
        this = self.meta.require_inode(ino)
        if start_id < 1:
            yield 1, b".", this
        if start_id < 2:
            parent = self.meta.inode(this.parent or ROOT_INO) or this
            yield 2, b"..", parent
        for cookie, name, inode in self.meta.entries(ino, max(start_id, 2)):
            yield cookie, name, self.data.with_buffered(inode)

    def readdir_names(self, fh: int, start_id: int) -> Iterator[tuple[int, bytes, int, int]]:
        """(next id, name, inode number, mode) from `start_id` on: `readdir` without attributes,
        for a listing that asks only names and types."""
        ino = self.handle(fh).ino
        this = self.meta.require_inode(ino)
        if start_id < 1:
            yield 1, b".", ino, this.mode
        if start_id < 2:
            yield 2, b"..", this.parent or ROOT_INO, stat.S_IFDIR
        yield from self.meta.listing(ino, max(start_id, 2))

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh)

    # -- extended attributes --------------------------------------------------------------------
    async def getxattr(self, ino: int, name: bytes) -> bytes:
        check_xattr(name)
        if name == TIER_XATTR:
            return self._tier_state(ino)
        value = self.meta.xattr(ino, name)
        if value is None:
            self.meta.require_inode(ino)
            raise FsError(errno.ENODATA)
        return value

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        check_xattr(name)
        if name in POSIX_ACL_XATTRS:
            # Stored as a plain attribute it would not change the mode, and cp -p, tar and rsync
            # set modes through it when it is accepted; refused, they fall back to chmod.
            raise FsError(errno.EOPNOTSUPP, "POSIX ACLs are not supported")
        if name == TIER_XATTR:
            await self._tier_move(ino, value)
            return
        async with self._holding(ino) as ahead:
            await self._propose(c.SetXattr(ino, name, value, flags, self._now()), ahead)

    def _tier_state(self, ino: int) -> bytes:
        inode = self.meta.require_inode(ino)
        device = tiered = 0
        for ext in self.meta.all_extents(ino) if inode.is_reg else []:
            if is_tiered(ext.dev_block):
                tiered += ext.count * BLOCK_SIZE
            elif not ext.unwritten:
                device += ext.count * BLOCK_SIZE
        state: dict[str, object] = {"device_bytes": device, "tiered_bytes": tiered,
                                    "buffered": self.data.has_buffered(ino)}
        if ino in self._tier_failed:
            state["error"] = self._tier_failed[ino]
        return json.dumps(state).encode()

    async def _tier_move(self, ino: int, value: bytes) -> None:
        self._tier_failed.pop(ino, None)
        try:
            await self._tier_move_now(ino, value)
        except FsError as exc:
            while len(self._tier_failed) >= 1024:
                del self._tier_failed[next(iter(self._tier_failed))]
            self._tier_failed[ino] = str(exc.args[1])
            raise

    async def _tier_move_now(self, ino: int, value: bytes) -> None:
        inode = self.meta.require_inode(ino)
        if not inode.is_reg:
            raise FsError(errno.EINVAL, "only regular files have data to tier")
        if value == b"evict":
            if self.evict is None:
                raise FsError(errno.EOPNOTSUPP, "no object store is configured ([tier] endpoint)")
            await self.data.flush(ino)
            await self.evict(ino)
        elif value == b"recall":
            self.meta.check_writable(inode.volume)  # EROFS: a snapshot's data stays shared with its origin
            await self.data.flush(ino)
            await self.data.recall(ino)
        else:
            raise FsError(errno.EINVAL, f"{TIER_XATTR.decode()} takes 'evict' or 'recall'")

    async def listxattr(self, ino: int) -> list[bytes]:
        self.meta.require_inode(ino)
        return self.meta.xattr_names(ino)

    async def removexattr(self, ino: int, name: bytes) -> None:
        check_xattr(name)
        async with self._holding(ino) as ahead:
            await self._propose(c.RemoveXattr(ino, name, self._now()), ahead)

    # -- filesystem -----------------------------------------------------------------------------
    def statfs(self, ino: int | None = None) -> FsStats:
        """The filesystem's space and inodes; inside a volume with a quota (`ino` in its tree), the
        volume's: `df` in a pod shows its claim's size, not the shared device's."""
        pending = self.meta.pending_free_blocks()
        free = min(self.total_blocks, max(0, self.meta.free_blocks() + pending - self.data.dirty_blocks()))
        whole = FsStats(BLOCK_SIZE, self.total_blocks, free, FILES_ADVERTISED,
                        FILES_ADVERTISED - self.meta.inode_count(), MAX_NAME_BYTES)
        inode = None if ino is None else self.meta.inode(ino)
        volume = None if inode is None or not inode.volume else self.meta.volume(inode.volume)
        if volume is None or not volume.capacity_bytes:
            return whole
        total = volume.capacity_bytes // BLOCK_SIZE
        files = volume.inode_limit or whole.total_inodes
        free_files = max(0, files - volume.used_inodes) if volume.inode_limit else whole.free_inodes
        return FsStats(BLOCK_SIZE, total, min(free, max(0, total - volume.used_blocks)), files, free_files,
                       MAX_NAME_BYTES)
