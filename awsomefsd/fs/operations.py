"""POSIX operations on the metadata client and the file data, independent of any FUSE binding.

The binding (awsomefsd/fuse/adapter.py) translates pyfuse3's requests into calls here; a raw
/dev/fuse transport can replace it without touching this module. Everything runs on the trio thread; a method keeps no
LMDB transaction across an await (the log may commit and start a new one meanwhile).

The operations are one class built in parts, one module per job: fs/ops_base.py (the state and
helpers they share, attribute changes), fs/file_ops.py (open files' data), fs/xattr_ops.py
(extended attributes and the tier attribute), and here the namespace, opening, directories and
statfs.

Permissions are enforced by the kernel (`default_permissions`: it holds the caller's full
credentials, including supplementary groups); what the kernel cannot know — setgid inheritance,
quotas, read-only snapshots, name limits — is enforced by the state machine.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from awsomefsd.fs.file_ops import FileOperations
from awsomefsd.fs.forwarded_ops import ForwardedOperations
from awsomefsd.fs.ops_base import MAX_DELEGATION_TRIES, InGroup
from awsomefsd.fs.tmpfile import link_tmpfile
from awsomefsd.fs.xattr_ops import XattrOperations
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta import commands as c
from awsomefsd.meta.commands import RENAME_WHITEOUT
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import (
    CONFLICTS_INO,
    MAX_NAME_BYTES,
    MAX_SYMLINK_BYTES,
    ROOT_INO,
    Inode,
    check_name,
    check_new_inode,
)

FILES_ADVERTISED = 1 << 32


@dataclass(frozen=True, slots=True)
class FsStats:
    block_size: int
    total_blocks: int
    free_blocks: int
    total_inodes: int
    free_inodes: int
    name_max: int


class Operations(FileOperations, XattrOperations, ForwardedOperations):
    """The POSIX operations of one node (the constructor is OperationsBase's: fs/ops_base.py)."""

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
                elif (told := await self._look_at_holder(parent, name)) is not None:
                    found = told[1] or None  # another node holds the directory and answered: it stays there
                elif await self.coherence.looking(parent, found=found):
                    # Ours now: another node's acknowledged changes to it (an unlink, a rename
                    # away) are committed, and nobody else changes it while we answer. A path
                    # walk passing through (the name is a directory) gives it back at once; the
                    # last name of an unlink or a rename keeps it for the change that follows.
                    found = self.meta.lookup(parent, name)
            if found is None:
                raise FsError(errno.ENOENT)
            child = found
        return self.inode(child)

    async def _look_again(self, parent: int, name: bytes) -> int | None:
        """A name not found here may have been created elsewhere a moment ago. The kernel's
        create (and mkdir, mknod, symlink, link, rename onto a new name) looks the name up first:
        a delegation taken for this look is kept for the change that follows. Another node that
        holds the directory answers instead (`_look_at_holder`), and the delegation stays there."""
        told = await self._look_at_holder(parent, name)
        if told is not None:
            return told[1] or None
        await self._look_at_directory(parent, change_next=True)
        return self.meta.lookup(parent, name)

    async def _look_at_directory(self, directory: int, *, change_next: bool = False) -> None:
        """Before a look that must see every change acknowledged before it began (a lookup that
        found nothing, a readdir): unless this node holds the directory's delegation (nobody else
        changes it), catch up with the log; if another node holds the delegation (known now, or
        from the caught-up log), let it commit what it acknowledged first."""
        assert self.coherence is not None
        if await self.coherence.looking(directory, change_next=change_next):
            return
        await self.coherence.catch_up(drain=False)
        await self.coherence.looking(directory, change_next=change_next)

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

    def listing_current(self, ino: int) -> bool:
        """Is the listing of this directory the kernel keeps (if any) current, at an OPENDIR after
        its look? On a single node always (its kernel sees every change); on a cluster member,
        unless a change made elsewhere was applied since the kernel read it (coherence)."""
        return self.coherence is None or self.coherence.keep_listing(ino)

    def listed(self, ino: int) -> None:
        """The kernel read this directory's listing from the start (a READDIR at offset 0)."""
        if self.coherence is not None:
            self.coherence.listed(ino)

    async def getattr(self, ino: int) -> Inode:
        if self.coherence is not None and self.coherence.strict:
            await self.coherence.catch_up()
        return self.inode(ino)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                    target: bytes = b"") -> Inode:
        return await self._make_node(parent, name, mode, rdev, uid, gid, target)

    async def _make_node(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                         target: bytes = b"", *, ino: int = 0) -> Inode:
        """`mknod`; `ino`: the number a create sent to the directory's holder came back unanswered or
        refused with (fs/forwarded_ops.py): taking the delegation commits what the holder
        acknowledged, so a file the holder did make with that number is there now, and is this
        create's own."""
        check_name(name)
        check_new_inode(mode, uid, gid, rdev)
        async with self._changing(parent) as ahead:
            if ino and self.meta.inode(ino) is not None:
                if self.meta.lookup(parent, name) == ino:
                    return self.inode(ino)
                raise FsError(errno.ESTALE, "made by the directory's holder and moved meanwhile")
            ino = ino or await self.new_ino()
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
        if not is_dir and await self._unlink_closed(parent, name):
            return
        command: c.Unlink | None = None
        for _ in range(MAX_DELEGATION_TRIES):
            child = self.meta.lookup(parent, name) if is_dir else None
            async with self._changing(parent, *([child] if child else [])) as ahead:
                if is_dir and self.meta.lookup(parent, name) != child:
                    continue  # renamed or replaced meanwhile: the delegations to hold changed
                alone = None if is_dir or not ahead else self._alone_here(parent, name)
                command = c.Unlink(parent, name, is_dir, self._now()) if alone is None else alone
                removed = await self._propose(command, ahead)
                break
        else:
            removed = await self._propose(c.Unlink(parent, name, is_dir, self._now()), False)
        if isinstance(command, c.UnlinkAlone):
            await self._after_unlink_closed(command.ino, removed)
        else:
            await self._purge_if_orphan(removed)

    def _alone_here(self, parent: int, name: bytes) -> c.UnlinkAlone | None:
        """A member's unlink, run ahead: of a file only this node can reach (fresh: created ahead
        here, never reachable elsewhere since) and nothing here holds open, it deletes the file at
        once (UnlinkAlone) instead of leaving an orphan each member releases (three commands each
        member applies, on three nodes; a follower's unlink cost twice a single node's CPU)."""
        assert self.coherence is not None
        ino = self.meta.lookup(parent, name)
        if (ino is None or not self.handles.may_purge or not self.coherence.fresh(ino)
                or self.handles.is_open(ino) or not self.meta.may_propose(c.UnlinkAlone)):
            return None
        return c.UnlinkAlone(parent, name, False, self._now(), ino=ino)

    async def _unlink_closed(self, parent: int, name: bytes) -> bool:
        """A single node's unlink of a file nothing holds open: one command unlinks it and, if
        that was its last name, deletes it (UnlinkClosed), instead of an Unlink and a Purge.
        False: not this case (a cluster member, whose orphans other members may hold open; an
        open file; a start after a crash, when unknown handles may still reach it)."""
        if self.coherence is not None or not self.handles.may_purge:
            return False
        ino = self.meta.lookup(parent, name)
        if ino is None or self.handles.is_open(ino):
            return False
        removed = await self._propose(c.UnlinkClosed(parent, name, False, self._now(), ino=ino), False)
        await self._after_unlink_closed(ino, removed)
        return True

    async def _after_unlink_closed(self, ino: int, removed: int) -> None:
        """After an UnlinkClosed (or UnlinkAlone) of `ino` that took the link of `removed`: the
        file went with its last name (its buffered state goes too), or it is an orphan as after an
        Unlink (another name left, another inode at the name, the log kept it)."""
        if removed == ino and self.meta.inode(ino) is None:
            self.data.forget(ino)
        else:
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
                ahead = ahead and self._rename_runs_ahead(old_parent, old_name, new_parent, flags, replaced_dir)
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

    def _rename_runs_ahead(self, old_parent: int, old_name: bytes, new_parent: int, flags: int,
                           replaced_dir: int) -> bool:
        """May a rename whose delegations are held run ahead: no whiteout (its inode number is the
        log's to check) and no directory changing parent (`rename`)."""
        return not flags & RENAME_WHITEOUT and not (
            old_parent != new_parent and (self._directory_at(old_parent, old_name) or replaced_dir))

    def rename_is_immediate(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                            flags: int) -> bool:
        """Would `rename` return without waiting on a cluster member (`change_is_immediate`): it
        runs ahead, and this node holds both parents and a directory it replaces."""
        replaced_dir = self._directory_at(new_parent, new_name)
        return (self._rename_runs_ahead(old_parent, old_name, new_parent, flags, replaced_dir)
                and self.change_is_immediate(old_parent, new_parent, *([replaced_dir] if replaced_dir else []),
                                             new_inode=True))

    def _directory_at(self, parent: int, name: bytes) -> int:
        """The directory `name` names in `parent` (0: none, or not a directory)."""
        ino = self.meta.lookup(parent, name)
        inode = None if ino is None else self.meta.inode(ino)
        return inode.ino if inode is not None and inode.is_dir else 0

    # -- opening --------------------------------------------------------------------------------
    async def open(self, ino: int, flags: int, *, drop_setid: InGroup | None = None) -> int:
        """`drop_setid`: an O_TRUNC open by a caller without CAP_FSETID, under HANDLE_KILLPRIV_V2."""
        if self.coherence is not None:
            await self.coherence.opening(ino)  # close-to-open: see what was closed elsewhere before
        inode = self.inode(ino)
        if inode.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise FsError(errno.EISDIR)
        if flags & os.O_TRUNC and inode.is_reg:  # O_RDONLY too, as Linux (the kernel checked write access)
            if inode.size:
                await self.setattr(ino, size=0, drop_setid=drop_setid)
            elif drop_setid is not None:
                await self._drop_setid(inode, drop_setid)
        return self._open_handle(ino, flags)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Inode]:
        """open(O_CREAT) of a name the kernel just looked up and did not find. Another node may
        have created it since: without O_EXCL that is no error (POSIX opens the existing file).
        ESTALE makes the kernel walk the path again with LOOKUP_REVAL, find the file and open it
        itself, with the permission checks and O_TRUNC an open of an existing file gets."""
        mode = stat.S_IFREG | (mode & 0o7777)
        try:
            inode, ino = await self._create_at_holder(parent, name, mode, uid, gid)
            if inode is None:
                inode = await self._make_node(parent, name, mode, 0, uid, gid, ino=ino)
        except FsError as exc:
            if exc.errno == errno.EEXIST and not flags & os.O_EXCL:
                raise FsError(errno.ESTALE, "created elsewhere since the lookup: look it up again") from None
            raise
        return self._open_handle(inode.ino, flags), inode

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

    # -- filesystem -----------------------------------------------------------------------------
    def statfs(self, ino: int | None = None) -> FsStats:
        """The filesystem's space and inodes; inside a volume with a quota (`ino` in its tree), the
        volume's: `df` in a pod shows its claim's size, not the shared device's."""
        pending = self.meta.pending_free_blocks()
        free = min(self.total_blocks, max(0, self.meta.free_blocks() + pending - self.data.delayed_blocks()))
        whole = FsStats(BLOCK_SIZE, self.total_blocks, free, FILES_ADVERTISED,
                        FILES_ADVERTISED - self.meta.inode_count(), MAX_NAME_BYTES)
        inode = None if ino is None else self.meta.inode(ino)
        volume = None if inode is None or not inode.volume else self.meta.volume(inode.volume)
        if volume is None or not volume.capacity_bytes:
            return whole
        total = volume.capacity_bytes // BLOCK_SIZE
        files = volume.inode_limit or whole.total_inodes
        free_files = max(0, files - volume.used_inodes) if volume.inode_limit else whole.free_inodes
        used = volume.used_blocks + self.data.delayed_blocks(volume.id)
        return FsStats(BLOCK_SIZE, total, min(free, max(0, total - used)), files, free_files, MAX_NAME_BYTES)
