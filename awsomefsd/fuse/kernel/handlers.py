"""The raw transport's binding: FUSE requests decoded, calls on `Operations`, answers encoded.

The counterpart of the pyfuse3 adapter (awsomefsd/fuse/adapter.py), with nothing in between:
each handler takes the request header and its body, calls the filesystem layer and returns the
answer's payload. Like the adapter it decides no filesystem semantics; it keeps the kernel's
lookup counts honest (every entry it sends, readdirplus entries included, is one reference the
kernel forgets later) and converts types.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import trio

from awsomefsd.fs.clock import file_time_ns
from awsomefsd.fs.operations import BLOCK_SIZE, Operations
from awsomefsd.fs.posix import presented_size_blocks
from awsomefsd.fs.tmpfile import tmpfile
from awsomefsd.fs.xattr_ops import TIER_XATTR
from awsomefsd.fuse.callers import caller_in_group
from awsomefsd.fuse.invalidate import MOUNTED
from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.abi import Body, Fattr, Fopen, Header, Init, Op
from awsomefsd.fuse.kernel.refusals import RefusedWriteBacks
from awsomefsd.fuse.kernel.session import NO_REPLY, Handler, Payload
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Inode

XATTR_SIZE_MAX = 65536


KERNEL_TIMES = Fattr.MTIME | Fattr.CTIME | Fattr.FH | Fattr.LOCKOWNER
"""What a kernel caching writes sends when it writes an inode's times back (fuse_flush_times)."""


class KernelHandlers:
    """Handlers for every opcode we serve, by opcode (`table`)."""

    def __init__(self, ops: Operations, *, entry_timeout_s: float = 60.0, attr_timeout_s: float = 60.0,
                 negative_timeout_s: float | None = None, cache_dirs: bool = False,
                 kernel_has: Callable[[int], bool] = lambda _capability: False) -> None:
        self.ops = ops
        self.kernel_has = kernel_has
        """Did INIT settle this capability (abi.Init) with the kernel? (Nothing is, before INIT.)"""
        self.refusals = RefusedWriteBacks(ops.handles, lambda ino: MOUNTED.invalidate_inode(ino, attr_only=True))
        """Cached pages we refused to write, reported at their writer's next write() (refusals.py)."""
        self.cached_write_taken: Callable[[], None] = lambda: None
        """After each cached WRITE taken: the bound on the kernel's dirty pages looks again
        (fuse/dirty_bound.py)."""
        self.entry_valid = abi.split_seconds(entry_timeout_s)
        self.attr_valid = abi.split_seconds(attr_timeout_s)
        self.negative_valid = abi.split_seconds(entry_timeout_s if negative_timeout_s is None else negative_timeout_s)
        self._attr_out_head = abi.ATTR_OUT.pack(self.attr_valid[0], self.attr_valid[1], 0)
        self._negative_entry = abi.ENTRY_OUT.pack(0, 0, self.negative_valid[0], 0, self.negative_valid[1], 0) + bytes(abi.ATTR.size)
        """'No such name', cached for the negative timeout (nodeid 0): every create begins with one."""
        coherence = ops.coherence
        self.name_timeout = None if coherence is None else coherence.name_timeout_s
        self.absent_timeout = None if coherence is None else coherence.absent_timeout_s
        """A cluster member's word on how long the kernel may cache a name in a given directory
        (None from it: `entry_timeout_s`, and negative answers as `negative_timeout_s` says)."""
        self.cache_dirs = cache_dirs
        """A single node: no other node changes directories behind the kernel's back (a crash's
        relisting, `relist_directories`, is needed only here; a member's kept listings are checked
        at each OPENDIR, `_keeps_listing`)."""
        self.listed_since_crash: set[int] | None = None
        """After a crash of the daemon before (`relist_directories`): the directories whose listing
        the kernel has read from this daemon; None: every listing the kernel keeps is ours."""

    def writeback_cache(self) -> bool:
        """Does the kernel cache written pages (FUSE_WRITEBACK_CACHE, as negotiated)?"""
        return self.kernel_has(Init.WRITEBACK_CACHE)

    @property
    def table(self) -> dict[int, Handler]:
        return {
            Op.LOOKUP: self.lookup, Op.FORGET: self.forget, Op.BATCH_FORGET: self.batch_forget,
            Op.GETATTR: self.getattr, Op.SETATTR: self.setattr, Op.READLINK: self.readlink,
            Op.SYMLINK: self.symlink, Op.MKNOD: self.mknod, Op.MKDIR: self.mkdir, Op.UNLINK: self.unlink,
            Op.RMDIR: self.rmdir, Op.RENAME: self.rename, Op.RENAME2: self.rename2, Op.LINK: self.link,
            Op.OPEN: self.open, Op.READ: self.read, Op.WRITE: self.write, Op.STATFS: self.statfs,
            Op.RELEASE: self.release, Op.FSYNC: self.fsync, Op.SETXATTR: self.setxattr,
            Op.GETXATTR: self.getxattr, Op.LISTXATTR: self.listxattr, Op.REMOVEXATTR: self.removexattr,
            Op.FLUSH: self.flush, Op.OPENDIR: self.opendir, Op.READDIR: self.readdir,
            Op.READDIRPLUS: self.readdirplus, Op.RELEASEDIR: self.releasedir, Op.FSYNCDIR: self.fsyncdir,
            Op.CREATE: self.create, Op.DESTROY: self.destroy, Op.SYNCFS: self.syncfs, Op.LSEEK: self.lseek,
            Op.FALLOCATE: self.fallocate, Op.COPY_FILE_RANGE: self.copy_file_range, Op.TMPFILE: self.tmpfile,
        }

    @property
    def quick(self) -> dict[int, Callable[[bytes], bool]]:
        """Requests that wait for nothing in some cases, and how to tell from their bytes (the
        session answers those inline on a single node)."""
        return {Op.FLUSH: self._flush_is_quick, Op.SETXATTR: self._setxattr_is_quick, Op.WRITE: self._write_is_quick,
                Op.SETATTR: self._setattr_is_quick, Op.OPEN: self._open_is_quick}

    @property
    def member_quick(self) -> dict[int, Callable[[bytes], bool]]:
        """`quick` on a cluster member: a flush with nothing buffered; a look in a directory whose
        delegation this node holds (no hand-over begun), and an OPENDIR of such a directory; a
        create or an unlink in such a directory, a write or an attribute change of a file whose
        write lease it holds, when the change runs ahead at once (elsewhere they wait for a
        delegation, a lease or the log); an OPEN of such a file that truncates nothing, with no
        kernel invalidation pending (design note 150); a rename between held directories that
        moves no directory to another parent."""
        return {Op.FLUSH: self._flush_is_quick, Op.WRITE: self._write_is_quick, Op.SETATTR: self._setattr_is_quick,
                Op.OPEN: self._open_is_quick, Op.OPENDIR: self._looks_in_held_directory,
                Op.LOOKUP: self._looks_in_held_directory, Op.UNLINK: self._unlinks_in_held_directory,
                Op.CREATE: self._creates_in_held_directory, Op.MKNOD: self._creates_in_held_directory,
                Op.MKDIR: self._creates_in_held_directory, Op.SYMLINK: self._creates_in_held_directory,
                Op.RENAME: self._rename_is_quick, Op.RENAME2: self._rename_is_quick}

    def _looks_in_held_directory(self, data: bytes) -> bool:
        return self.ops.look_is_immediate(abi.IN_HEADER.unpack_from(data)[3])

    def _unlinks_in_held_directory(self, data: bytes) -> bool:
        return self.ops.change_is_immediate(abi.IN_HEADER.unpack_from(data)[3])

    def _creates_in_held_directory(self, data: bytes) -> bool:
        return self.ops.change_is_immediate(abi.IN_HEADER.unpack_from(data)[3], new_inode=True)

    def _rename_is_quick(self, data: bytes) -> bool:
        """RENAME and RENAME2 (a member's: `Operations.rename_is_immediate`)."""
        try:
            body = Body(data)
            opcode, old_parent = (abi.IN_HEADER.unpack_from(data)[i] for i in (1, 3))
            if opcode == Op.RENAME2:
                new_parent, flags, _ = body.take(abi.RENAME2_IN)
            else:
                (new_parent,), flags = body.take(abi.U64), 0
            old_name, new_name = body.name(), body.name()
        except abi.Malformed:
            return False
        return self.ops.rename_is_immediate(old_parent, old_name, new_parent, new_name, flags)

    def _flush_is_quick(self, data: bytes) -> bool:
        try:
            (fh, *_) = Body(data).take(abi.FLUSH_IN)
        except abi.Malformed:
            return False
        return self.ops.flush_is_immediate(fh)

    def _write_is_quick(self, data: bytes) -> bool:
        """A write the buffer takes at once: a task and its scheduling cost more than such a write
        (docs/fuse-transport.md, "Reading")."""
        try:
            (fh, _offset, size, *_) = Body(data).take(abi.WRITE_IN)
        except abi.Malformed:
            return False
        return self.ops.write_is_immediate(fh, size)

    def _open_is_quick(self, data: bytes) -> bool:
        """An open that truncates nothing: a new handle, nothing to wait for (cat, grep, git and
        rsync open every file they read) on a single node, and on a member when it needs no read
        barrier (`Operations.open_is_immediate`). O_TRUNC truncates: a task."""
        if len(data) < abi.IN_HEADER.size + abi.OPEN_IN.size:
            return False
        flags, _ = abi.OPEN_IN.unpack_from(data, abi.IN_HEADER.size)
        return not flags & os.O_TRUNC and self.ops.open_is_immediate(abi.IN_HEADER.unpack_from(data)[3])

    def _setattr_is_quick(self, data: bytes) -> bool:
        """A chmod, chown or utimensat (no truncate), or the times a kernel caching writes sends
        at a close or after a rename: tar, cp -p and rsync cause one to three per file, and a
        task cost more than the change (an untar's SETATTRs took 180 µs each in a task against
        130 µs for an inline CREATE; under the writeback cache rsync ran 2.6x slower with them in
        tasks). Not when it must flush the file first or wait for a flush of it
        (`Operations.setattr_is_immediate`)."""
        if len(data) < abi.IN_HEADER.size + abi.SETATTR_IN.size:
            return False
        nodeid = abi.IN_HEADER.unpack_from(data)[3]
        valid, _, _, _, _, _, mtime, _, _, mtimensec, *_ = abi.SETATTR_IN.unpack_from(data, abi.IN_HEADER.size)
        if valid & Fattr.SIZE:
            return False
        return self.ops.setattr_is_immediate(nodeid, _time_set(valid, Fattr.MTIME_NOW, Fattr.MTIME, mtime, mtimensec,
                                                               file_time_ns()))

    @staticmethod
    def _setxattr_is_quick(data: bytes) -> bool:
        """Any attribute but the tiering one (`tier evict|recall`): that one moves a file's data to
        or from the object store, which may take minutes, and must not hold up the reader."""
        try:
            body = Body(data)
            body.take(abi.SETXATTR_IN_COMPAT)
            return body.name() != TIER_XATTR
        except abi.Malformed:
            return False

    # -- encoding --------------------------------------------------------------------------------
    def attr(self, inode: Inode) -> bytes:
        a_s, a_ns = divmod(inode.atime_ns, 1_000_000_000)
        m_s, m_ns = divmod(inode.mtime_ns, 1_000_000_000)
        c_s, c_ns = divmod(inode.ctime_ns, 1_000_000_000)
        size, sectors = presented_size_blocks(inode)
        return abi.ATTR.pack(inode.ino, size, sectors, a_s, m_s, c_s, a_ns, m_ns, c_ns,
                             inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev, BLOCK_SIZE, 0)

    def names_valid(self, parent: int) -> tuple[int, int] | None:
        """How long a name answered now in `parent` may be cached, when the cluster says (None:
        the mount's timeouts)."""
        seconds = None if self.name_timeout is None or not parent else self.name_timeout(parent)
        return None if seconds is None else abi.split_seconds(seconds)

    def entry(self, inode: Inode, valid: tuple[int, int] | None = None) -> bytes:
        entry_valid = valid or self.entry_valid
        return abi.ENTRY_OUT.pack(inode.ino, inode.generation, entry_valid[0], self.attr_valid[0],
                                  entry_valid[1], self.attr_valid[1]) + self.attr(inode)

    def entry_ref(self, inode: Inode, parent: int = 0) -> bytes:
        """An entry answer for a name in `parent`: the kernel takes a reference it will forget later."""
        self.ops.remember(inode.ino)
        return self.entry(inode, self.names_valid(parent))

    def attr_out(self, inode: Inode) -> bytes:
        return self._attr_out_head + self.attr(inode)

    # -- namespace -------------------------------------------------------------------------------
    async def lookup(self, h: Header, body: Body) -> Payload:
        name = body.name()
        try:
            inode = await self.ops.lookup(h.nodeid, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            seconds = None if self.absent_timeout is None else self.absent_timeout(h.nodeid, name)
            if seconds is not None:
                valid = abi.split_seconds(seconds)
                return abi.ENTRY_OUT.pack(0, 0, valid[0], 0, valid[1], 0) + bytes(abi.ATTR.size)
            if not self.negative_valid[0] and not self.negative_valid[1]:
                raise
            return self._negative_entry
        return self.entry_ref(inode, h.nodeid)

    async def forget(self, h: Header, body: Body) -> Payload:
        (count,) = body.take(abi.U64)
        await self.ops.forget([(h.nodeid, count)])
        return NO_REPLY

    async def batch_forget(self, h: Header, body: Body) -> Payload:
        count, _ = body.take(abi.BATCH_FORGET_IN)
        items = body.rest(count * abi.FORGET_ONE.size)  # up to ~1,000 (inode, count) pairs: one unpack
        await self.ops.forget(list(abi.FORGET_ONE.iter_unpack(items)))
        return NO_REPLY

    async def getattr(self, h: Header, body: Body) -> Payload:
        if self.refusals.asking():
            refused = self.refusals.answer(h.nodeid, body)
            if refused:
                raise FsError(refused, "the kernel's cached writes of this file were refused")
        return self.attr_out(await self.ops.getattr(h.nodeid))

    async def setattr(self, h: Header, body: Body) -> Payload:
        (valid, _, _fh, size, _owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
         _u4, uid, gid, _u5) = body.take(abi.SETATTR_IN)
        now = file_time_ns()
        atime_ns = _time_set(valid, Fattr.ATIME_NOW, Fattr.ATIME, atime, atimensec, now)
        mtime_ns = _time_set(valid, Fattr.MTIME_NOW, Fattr.MTIME, mtime, mtimensec, now)
        # HANDLE_KILLPRIV_V2: a truncate says so (KILL_SUIDGID); a chown always clears them (the
        # kernel no longer adds the cleared mode to the request, as it does without the flag).
        # A request that sets nothing (but the ctime, which a kernel caching writes sends) is the
        # kernel's only word for the rest: chown(f, -1, -1), and file_remove_privs before a
        # fallocate or copy_file_range by a caller without CAP_FSETID.
        sets_nothing = valid & ~(Fattr.FH | Fattr.LOCKOWNER | Fattr.CTIME) == 0
        drop = bool(valid & (Fattr.KILL_SUIDGID | Fattr.UID | Fattr.GID)) or sets_nothing
        kernel_times = self.writeback_cache() and valid & ~KERNEL_TIMES == 0 and mtime_ns is not None
        if kernel_times and mtime_ns is not None and not self.ops.exists(h.nodeid):
            return self._times_of_deleted(h.nodeid, valid, mtime_ns, ctime, ctimensec)
        try:
            inode = await self.ops.setattr(
                h.nodeid,
                mode=mode if valid & Fattr.MODE else None,
                uid=uid if valid & Fattr.UID else None,
                gid=gid if valid & Fattr.GID else None,
                size=size if valid & Fattr.SIZE else None,
                atime_ns=atime_ns,
                mtime_ns=mtime_ns,
                drop_setid=caller_in_group(h.uid, h.gid, h.pid) if drop else None,
            )
        except FsError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE) or not kernel_times or mtime_ns is None:
                raise
            return self._times_of_deleted(h.nodeid, valid, mtime_ns, ctime, ctimensec)  # deleted meanwhile
        return self.attr_out(inode)

    def _times_of_deleted(self, ino: int, valid: int, mtime_ns: int, ctime: int, ctimensec: int) -> Payload:
        """A kernel caching writes sends the times it keeps when it writes an inode back, also for
        a file deleted since (an unlink or a rename over it dirties its ctime there; a file a user
        can still reach is never deleted). Nothing is left to stamp: done. An error would only
        fail the next syncfs."""
        ctime_ns = ctime * 1_000_000_000 + ctimensec if valid & Fattr.CTIME else mtime_ns
        return self.attr_out(Inode(ino, stat.S_IFREG, 0, 0, 0, 0, mtime_ns, mtime_ns, ctime_ns))

    async def readlink(self, h: Header, body: Body) -> Payload:
        return await self.ops.readlink(h.nodeid)

    async def mknod(self, h: Header, body: Body) -> Payload:
        mode, rdev, umask, _ = body.take(abi.MKNOD_IN)
        name = body.name()
        mode = (mode & ~umask & 0o7777) | (mode & 0o170000)
        return self.entry_ref(await self.ops.mknod(h.nodeid, name, mode, rdev, h.uid, h.gid), h.nodeid)

    async def mkdir(self, h: Header, body: Body) -> Payload:
        mode, umask = body.take(abi.MKDIR_IN)
        name = body.name()
        mode = stat.S_IFDIR | (mode & ~umask & 0o7777)
        return self.entry_ref(await self.ops.mknod(h.nodeid, name, mode, 0, h.uid, h.gid), h.nodeid)

    async def unlink(self, h: Header, body: Body) -> Payload:
        await self.ops.unlink(h.nodeid, body.name(), is_dir=False)
        return None

    async def rmdir(self, h: Header, body: Body) -> Payload:
        await self.ops.unlink(h.nodeid, body.name(), is_dir=True)
        return None

    async def symlink(self, h: Header, body: Body) -> Payload:
        name = body.name()
        target = body.name()
        return self.entry_ref(await self.ops.symlink(h.nodeid, name, target, h.uid, h.gid), h.nodeid)

    async def rename(self, h: Header, body: Body) -> Payload:
        (new_parent,) = body.take(abi.U64)
        return await self._rename(h, new_parent, 0, body)

    async def rename2(self, h: Header, body: Body) -> Payload:
        new_parent, flags, _ = body.take(abi.RENAME2_IN)
        return await self._rename(h, new_parent, flags, body)

    async def _rename(self, h: Header, new_parent: int, flags: int, body: Body) -> Payload:
        old_name = body.name()
        new_name = body.name()
        await self.ops.rename(h.nodeid, old_name, new_parent, new_name, flags, h.uid, h.gid)
        return None

    async def link(self, h: Header, body: Body) -> Payload:
        (old,) = body.take(abi.U64)
        return self.entry_ref(await self.ops.link(old, h.nodeid, body.name()), h.nodeid)

    # -- files -----------------------------------------------------------------------------------
    def _open_out(self, fh: int, flags: int, *, keep_cache: bool) -> bytes:
        """The OPEN (CREATE) answer for a handle opened with `flags`.

        A read-only handle: nothing can be written through it, so its close has nothing to
        flush and no lost write to report (`FileOperations.flush`): FOPEN_NOFLUSH spares that
        request (rsync opens each file it copied once more to chmod it; `cat`, `grep`, git read
        each file they open). A flush through a reader would only push other descriptors'
        buffered writes early, which their own close or fsync does, on a cluster member as on a
        single node: close-to-open is the writer's close (it commits the data before another
        node's open can find it), and a loss is reported to descriptors that can write. A member
        answered every reader's close: 20,000 FLUSHes of 12 us each when 4,000 files were read
        five times, 12% of the time (design note 149).

        An O_DIRECT handle (where the kernel lets such a file still be mapped shared) bypasses
        the page cache as FOPEN_DIRECT_IO, with FOPEN_PARALLEL_DIRECT_WRITES: otherwise the
        kernel serializes every write to a file on its inode lock, direct ones included, so 16
        threads writing one file (a database, fio) had one WRITE in flight at a time. Writes
        that extend the file, or while another handle caches the file's pages, still take the
        lock alone (the kernel's rule); the daemon applies WRITEs to one file in any order, as
        concurrent direct writes allow. Not under the writeback cache: there the kernel keeps a
        file's mtime itself and its direct path never stamps one (an O_DIRECT write left the
        mtime where it was: fsx under the cache)."""
        direct = self.ops.direct_io(flags)
        parallel = (bool(flags & os.O_DIRECT) and self.kernel_has(Init.DIRECT_IO_ALLOW_MMAP)
                    and not self.writeback_cache())
        out = ((Fopen.KEEP_CACHE if keep_cache else 0) | (Fopen.DIRECT_IO if direct or parallel else 0)
               | (Fopen.PARALLEL_DIRECT_WRITES if parallel else 0))
        if flags & os.O_ACCMODE == os.O_RDONLY:
            out |= Fopen.NOFLUSH
        return abi.OPEN_OUT.pack(fh, out, 0)

    async def open(self, h: Header, body: Body) -> Payload:
        flags, open_flags = body.take(abi.OPEN_IN)
        drop = open_flags & abi.OPEN_KILL_SUIDGID
        fh = await self.ops.open(h.nodeid, flags, drop_setid=caller_in_group(h.uid, h.gid, h.pid) if drop else None)
        return self._open_out(fh, flags, keep_cache=self.ops.keep_cache(h.nodeid))

    async def create(self, h: Header, body: Body) -> Payload:
        flags, mode, umask, _ = body.take(abi.CREATE_IN)
        name = body.name()
        fh, inode = await self.ops.create(h.nodeid, name, mode & ~umask, flags, h.uid, h.gid)
        return [self.entry_ref(inode, h.nodeid), self._open_out(fh, flags, keep_cache=True)]

    async def tmpfile(self, h: Header, body: Body) -> Payload:
        """open(O_TMPFILE): CREATE's body and answer; the name the kernel sends ("/") names nothing.
        The entry says nlink 0: the kernel keeps the count we give, and linkat (the VFS lets only
        a file opened without O_EXCL through) is a LINK of this inode."""
        flags, mode, umask, _ = body.take(abi.CREATE_IN)
        fh, inode = await tmpfile(self.ops, h.nodeid, mode & ~umask, flags, h.uid, h.gid)
        return [self.entry_ref(inode), self._open_out(fh, flags, keep_cache=True)]

    async def read(self, h: Header, body: Body) -> Payload:
        fh, offset, size, *_ = body.take(abi.READ_IN)
        return await self.ops.read(fh, offset, size)

    def start_read(self, data: bytes, send: Callable[[memoryview], None], fail: Callable[[], None]) -> bool:
        """READ served without a task where it is the common read of a cold file
        (FileOperations.start_read); False: serve it with `read`."""
        if len(data) < abi.IN_HEADER.size + abi.READ_IN.size:
            return False
        fh, offset, size, *_ = abi.READ_IN.unpack_from(data, abi.IN_HEADER.size)
        return self.ops.start_read(fh, offset, size, send, fail)

    async def write(self, h: Header, body: Body) -> Payload:
        fh, offset, size, write_flags, *_ = body.take(abi.WRITE_IN)
        drop = write_flags & abi.WRITE_KILL_SUIDGID
        cached = bool(write_flags & abi.WRITE_CACHE) and self.writeback_cache()
        try:
            written = await self.ops.write(fh, offset, body.data(size),
                                           drop_setid=caller_in_group(h.uid, h.gid, h.pid) if drop else None,
                                           kernel_times=cached)
        except FsError as exc:
            if cached:  # the kernel drops these pages: tell their writer at its next write()
                self.refusals.refuse(h.nodeid, exc.errno)
            raise
        if cached:
            self.cached_write_taken()
            if self.refusals.full:
                self.refusals.written(h.nodeid)
        return abi.WRITE_OUT.pack(written, 0)

    async def fallocate(self, h: Header, body: Body) -> Payload:
        fh, offset, length, mode, _ = body.take(abi.FALLOCATE_IN)
        await self.ops.fallocate(fh, offset, length, mode)
        return None

    async def copy_file_range(self, h: Header, body: Body) -> Payload:
        fh_in, offset_in, _nodeid_out, fh_out, offset_out, length, flags = body.take(abi.COPY_FILE_RANGE_IN)
        if flags:
            raise FsError(errno.EINVAL, "copy_file_range flags")
        return abi.WRITE_OUT.pack(await self.ops.copy_file_range(fh_in, offset_in, fh_out, offset_out, length), 0)

    async def lseek(self, h: Header, body: Body) -> Payload:
        fh, offset, whence, _ = body.take(abi.LSEEK_IN)
        if self.writeback_cache() and self.ops.handles.open_for_writing(h.nodeid):
            await _write_back(h.nodeid)
        return abi.LSEEK_OUT.pack(await self.ops.lseek(fh, offset, whence))

    async def flush(self, h: Header, body: Body) -> Payload:
        fh, *_ = body.take(abi.FLUSH_IN)
        await self.ops.flush(fh)
        return None

    async def release(self, h: Header, body: Body) -> Payload:
        fh, *_ = body.take(abi.RELEASE_IN)
        await self.ops.release(fh)
        return None

    async def fsync(self, h: Header, body: Body) -> Payload:
        fh, flags, _ = body.take(abi.FSYNC_IN)
        await self.ops.fsync(fh, bool(flags & abi.FSYNC_FDATASYNC))
        return None

    # -- directories -----------------------------------------------------------------------------
    def relist_directories(self) -> None:
        """The daemon before crashed: a listing the kernel keeps may show a change the crash took
        (a rename), and the kernel checks a kept listing only against the directory's mtime,
        which can come back equal (two changes within one tick of the coarse clock that stamps
        times under the writeback cache). Until this daemon has listed a directory, its OPENDIR
        asks the kernel to drop what it kept (no FOPEN_KEEP_CACHE). Where no listing is kept (a
        cluster member) there is nothing to drop."""
        if self.cache_dirs:
            self.listed_since_crash = set()

    def _keeps_listing(self, ino: int) -> int:
        """The FOPEN flags of an OPENDIR of `ino`: the kernel keeps the listing it reads, and the
        one it has unless it may be stale (after a crash, or on a cluster member a change made
        elsewhere since: `Operations.listing_current`); without FOPEN_KEEP_CACHE it drops it."""
        if not self.ops.keep_listing(ino):
            return 0
        listed = self.listed_since_crash
        if (listed is not None and ino not in listed) or not self.ops.listing_current(ino):
            return Fopen.CACHE_DIR
        return Fopen.CACHE_DIR | Fopen.KEEP_CACHE

    def _listing_from_start(self, fh: int, offset: int) -> None:
        """A READDIR(PLUS) from the start: what the kernel keeps of this directory from now on is
        this daemon's current view (`relist_directories`, `Operations.listed`)."""
        if offset == 0:
            ino = self.ops.handle(fh).ino
            if self.listed_since_crash is not None:
                self.listed_since_crash.add(ino)
            self.ops.listed(ino)

    async def opendir(self, h: Header, body: Body) -> Payload:
        fh = await self.ops.opendir(h.nodeid)
        return abi.OPEN_OUT.pack(fh, self._keeps_listing(h.nodeid), 0)

    async def readdir(self, h: Header, body: Body) -> Payload:
        fh, offset, size, *_ = body.take(abi.READ_IN)
        self._listing_from_start(fh, offset)
        return abi.dirents(self.ops.readdir_names(fh, offset), size)

    async def readdirplus(self, h: Header, body: Body) -> Payload:
        fh, offset, size, *_ = body.take(abi.READ_IN)
        self._listing_from_start(fh, offset)
        out = bytearray()
        entry, dirent, remember = self.entry, abi.dirent, self.ops.remember
        valid = self.names_valid(self.ops.handle(fh).ino) if self.name_timeout is not None else None
        for next_id, name, inode in self.ops.readdir(fh, offset):
            record = entry(inode, valid) + dirent(inode.ino, next_id, (inode.mode & 0o170000) >> 12, name)
            if len(out) + len(record) > size:
                break
            out += record
            if name != b"." and name != b"..":  # the kernel takes no reference for these
                remember(inode.ino)
        return out

    async def releasedir(self, h: Header, body: Body) -> Payload:
        fh, *_ = body.take(abi.RELEASE_IN)
        await self.ops.releasedir(fh)
        return None

    async def fsyncdir(self, h: Header, body: Body) -> Payload:
        await self.ops.fsyncdir(h.nodeid)
        return None

    async def syncfs(self, h: Header, body: Body) -> Payload:
        await self.ops.syncfs()
        return None

    # -- extended attributes -----------------------------------------------------------------------
    async def setxattr(self, h: Header, body: Body) -> Payload:
        size, flags = body.take(abi.SETXATTR_IN_COMPAT)  # we do not ask for SETXATTR_EXT
        name = body.name()
        await self.ops.setxattr(h.nodeid, name, body.rest(size), flags)
        return None

    async def getxattr(self, h: Header, body: Body) -> Payload:
        size, _ = body.take(abi.GETXATTR_IN)
        return self._sized(await self.ops.getxattr(h.nodeid, body.name()), size)

    async def listxattr(self, h: Header, body: Body) -> Payload:
        size, _ = body.take(abi.GETXATTR_IN)
        names = await self.ops.listxattr(h.nodeid)
        return self._sized(b"".join(n + b"\0" for n in names), size)

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        """getxattr/listxattr: size 0 asks for the length; a smaller buffer is ERANGE."""
        if size == 0:
            return abi.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise FsError(errno.ERANGE)
        return value

    async def removexattr(self, h: Header, body: Body) -> Payload:
        await self.ops.removexattr(h.nodeid, body.name())
        return None

    # -- the filesystem ----------------------------------------------------------------------------
    async def statfs(self, h: Header, body: Body) -> Payload:
        s = self.ops.statfs(h.nodeid)
        return abi.STATFS_OUT.pack(s.total_blocks, s.free_blocks, s.free_blocks, s.total_inodes, s.free_inodes,
                                   s.block_size, s.name_max, s.block_size, 0)

    async def destroy(self, h: Header, body: Body) -> Payload:
        await self.ops.sync_all()
        return None



def _time_set(valid: int, now_bit: int, set_bit: int, seconds: int, nanoseconds: int, now: int) -> int | None:
    """The time a SETATTR sets (atime or mtime: its two `valid` bits), in ns; None: left as it is."""
    if valid & now_bit:
        return now
    return seconds * 1_000_000_000 + nanoseconds if valid & set_bit else None


async def _write_back(ino: int) -> None:
    """Make the kernel send the written pages of `ino` it still holds (FUSE_WRITEBACK_CACHE). The
    kernel does not before a SEEK_DATA or SEEK_HOLE, whose answer must count them (ext4's does),
    nor does it send the size they reach. Invalidating the file's page cache writes its dirty pages
    back first (the kernel's launder: WRITE requests, served meanwhile on the trio thread), so the
    notification goes from a worker thread, as the invalidator's do. Clean pages go too: a seek
    for data or holes is rare next to the reads that refill them."""
    try:
        await trio.to_thread.run_sync(MOUNTED.invalidate_inode, ino, False)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise FsError(errno.EIO, f"writing back the kernel's cached pages failed: {exc}") from exc
