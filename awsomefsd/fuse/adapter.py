"""The thin pyfuse3 binding: FUSE requests in, calls on `Operations` out, FsError to FUSEError.

Nothing here decides filesystem semantics; it converts types, keeps the kernel's lookup counts
honest (every entry reply is one reference the kernel will later forget) and times each request.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import pyfuse3

from awsomefsd.fs.operations import BLOCK_SIZE, Operations
from awsomefsd.fs.posix import presented_size_blocks
from awsomefsd.fuse.callers import caller_in_group
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Inode

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
ObserveFn = Callable[[str, float, int], None]
ReportEioFn = Callable[[str, str, FsError], None]
_BY_HANDLE = frozenset({"read", "write", "flush", "release", "fsync"})


def _fuse_op(name: str) -> Callable[[F], F]:
    """Time the request and turn our errors into FUSE errors (an unexpected one becomes EIO)."""

    def decorate(fn: F) -> F:
        @wraps(fn)
        async def wrapper(self: FuseAdapter, *args: Any) -> Any:
            start = time.perf_counter()
            err = 0
            try:
                return await fn(self, *args)
            except FsError as exc:
                err = exc.errno
                if err == errno.EIO and self.report_eio is not None:
                    self.report_eio(name, self._target(name, args), exc)
                raise pyfuse3.FUSEError(exc.errno) from None
            except pyfuse3.FUSEError as exc:
                err = exc.errno
                raise
            except Exception:
                err = errno.EIO
                log.exception("FUSE %s failed", name)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                if self.observe is not None:
                    self.observe(name, time.perf_counter() - start, err)

        return wrapper  # type: ignore[return-value]

    return decorate


class FuseAdapter(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False  # single-writer safe, but the cluster needs leases first
    enable_acl = False

    def __init__(self, ops: Operations, *, entry_timeout_s: float = 60.0, attr_timeout_s: float = 60.0,
                 negative_timeout_s: float | None = None, observe: ObserveFn | None = None,
                 report_eio: ReportEioFn | None = None) -> None:
        super().__init__()
        self.ops = ops
        self.entry_timeout_s = entry_timeout_s
        self.attr_timeout_s = attr_timeout_s
        self.negative_timeout_s = entry_timeout_s if negative_timeout_s is None else negative_timeout_s
        self.observe = observe
        self.report_eio = report_eio

    def _target(self, op: str, args: tuple[Any, ...]) -> str:
        """The file a failed request was about, for the log (its first argument: an inode, or a
        file handle for I/O requests)."""
        if not args or not isinstance(args[0], int):
            return "the file system"
        if op not in _BY_HANDLE:
            return f"inode {args[0]}"
        handle = self.ops.handles.find(args[0])
        return f"inode {handle.ino}" if handle is not None else f"file handle {args[0]}"

    def entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.generation = inode.generation
        e.entry_timeout = self.entry_timeout_s
        e.attr_timeout = self.attr_timeout_s
        e.st_mode = inode.mode
        e.st_nlink = inode.nlink
        e.st_uid = inode.uid
        e.st_gid = inode.gid
        e.st_rdev = inode.rdev
        e.st_size, e.st_blocks = presented_size_blocks(inode)
        e.st_blksize = BLOCK_SIZE
        e.st_atime_ns = inode.atime_ns
        e.st_mtime_ns = inode.mtime_ns
        e.st_ctime_ns = inode.ctime_ns
        return e

    def _entry_ref(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel takes a reference it will forget later."""
        self.ops.remember(inode.ino)
        return self.entry(inode)

    @_fuse_op("lookup")
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            inode = await self.ops.lookup(parent_inode, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            negative = pyfuse3.EntryAttributes()  # cached "does not exist" for entry_timeout
            negative.st_ino = 0
            negative.entry_timeout = self.negative_timeout_s
            return negative
        return self._entry_ref(inode)

    async def forget(self, inode_list: Any) -> None:
        try:
            await self.ops.forget(list(inode_list))
        except Exception:
            log.exception("forget failed")

    @_fuse_op("getattr")
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.entry(await self.ops.getattr(inode))

    @_fuse_op("setattr")
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        result = await self.ops.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self.entry(result)

    @_fuse_op("readlink")
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.ops.readlink(inode)

    @_fuse_op("mknod")
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        mode = (mode & ~ctx.umask & 0o7777) | (mode & 0o170000)
        return self._entry_ref(await self.ops.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_fuse_op("mkdir")
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        mode = 0o040000 | (mode & ~ctx.umask & 0o7777)
        return self._entry_ref(await self.ops.mknod(parent_inode, name, mode, 0, ctx.uid, ctx.gid))

    @_fuse_op("unlink")
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.ops.unlink(parent_inode, name, is_dir=False)

    @_fuse_op("rmdir")
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.ops.unlink(parent_inode, name, is_dir=True)

    @_fuse_op("symlink")
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry_ref(await self.ops.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_fuse_op("rename")
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        await self.ops.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx.uid, ctx.gid)

    @_fuse_op("link")
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry_ref(await self.ops.link(inode, new_parent_inode, new_name))

    @_fuse_op("open")
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        # An O_TRUNC open truncates here (atomic_o_trunc), so the set-ID bits are ours to clear
        # when the caller is not root; the kernel does not (libfuse asks for no KILLPRIV).
        drop = flags & os.O_TRUNC and ctx.uid != 0
        fh = await self.ops.open(inode, flags, drop_setid=caller_in_group(ctx.uid, ctx.gid, ctx.pid) if drop else None)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.ops.keep_cache(inode), direct_io=self.ops.direct_io(flags))

    @_fuse_op("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(await self.ops.read(fh, off, size))  # pyfuse3 replies from bytes only

    @_fuse_op("write")
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.ops.write(fh, off, buf)

    @_fuse_op("flush")
    async def flush(self, fh: int) -> None:
        await self.ops.flush(fh)

    @_fuse_op("release")
    async def release(self, fh: int) -> None:
        await self.ops.release(fh)

    @_fuse_op("fsync")
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.ops.fsync(fh, datasync)

    @_fuse_op("opendir")
    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self.ops.opendir(inode)

    @_fuse_op("readdir")
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for next_id, name, inode in self.ops.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self.entry(inode), next_id):
                break
            if name not in (b".", b".."):
                self.ops.remember(inode.ino)

    @_fuse_op("releasedir")
    async def releasedir(self, fh: int) -> None:
        await self.ops.releasedir(fh)

    @_fuse_op("fsyncdir")
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.ops.sync_all()

    @_fuse_op("statfs")
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = self.ops.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.block_size
        out.f_frsize = s.block_size
        out.f_blocks = s.total_blocks
        out.f_bfree = s.free_blocks
        out.f_bavail = s.free_blocks
        out.f_files = s.total_inodes
        out.f_ffree = s.free_inodes
        out.f_favail = s.free_inodes
        out.f_namemax = s.name_max
        return out

    @_fuse_op("setxattr")
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        # pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself (through getxattr) before calling us
        await self.ops.setxattr(inode, name, value, 0)

    @_fuse_op("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.ops.getxattr(inode, name)

    @_fuse_op("listxattr")
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.ops.listxattr(inode)

    @_fuse_op("removexattr")
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.ops.removexattr(inode, name)

    @_fuse_op("create")
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        mode = mode & ~ctx.umask
        fh, inode = await self.ops.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=self.ops.direct_io(flags)), self._entry_ref(inode)
