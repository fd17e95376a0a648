"""The pyfuse3 floor: an in-memory filesystem that does as little as a pyfuse3 filesystem can.

Run as a separate process by the `fusefloor` benchmark target, mounted with the options awsomefsd
uses (default_permissions, noatime, keep_cache, the same entry/attribute timeouts and read-ahead),
it shows what the binding itself costs per request: every figure AwsomeFS reaches is bounded by
this one, and the gap between the two is ours to close. Nothing is persisted, nothing is
checksummed, there are no permission checks beyond the kernel's; data lives in a dict of
fixed-size chunks so that sparse files and large sequential files cost what they hold.

    python bench/nullfs.py MOUNTPOINT      # prints "nullfs: mounted MOUNTPOINT", Ctrl-C unmounts
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from awsomefsd.fuse.mount import tune_bdi  # the same read-ahead as awsomefsd

READY_PREFIX = "nullfs: mounted "
CHUNK_BYTES = 128 << 10
TIMEOUT_S = 60.0  # awsomefsd's default entry and attribute timeouts
FSTYPE_OPTIONS = {"fsname=nullfs", "subtype=awsomefs", "default_permissions", "noatime"}


@dataclass
class Node:
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    size: int = 0
    rdev: int = 0
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)
    children: dict[bytes, int] = field(default_factory=dict)
    chunks: dict[int, bytearray] = field(default_factory=dict)
    target: bytes = b""


class NullFs(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(stat.S_IFDIR | 0o755, 0, 0, nlink=2)}
        self.parents: dict[int, int] = {pyfuse3.ROOT_INODE: pyfuse3.ROOT_INODE}
        self.next_ino = pyfuse3.ROOT_INODE + 1

    # -- helpers ------------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        n = self.nodes[ino]
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.entry_timeout = TIMEOUT_S
        e.attr_timeout = TIMEOUT_S
        e.st_mode = n.mode
        e.st_nlink = n.nlink
        e.st_uid = n.uid
        e.st_gid = n.gid
        e.st_rdev = n.rdev
        e.st_size = n.size
        e.st_blksize = 4096
        e.st_blocks = (n.size + 511) // 512
        e.st_atime_ns = n.atime_ns
        e.st_mtime_ns = n.mtime_ns
        e.st_ctime_ns = n.ctime_ns
        return e

    def _add(self, parent: int, name: bytes, mode: int, ctx: Any, **kw: Any) -> pyfuse3.EntryAttributes:
        p = self._node(parent)
        if name in p.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        ino = self.next_ino
        self.next_ino += 1
        self.nodes[ino] = Node(mode, ctx.uid, ctx.gid, nlink=2 if stat.S_ISDIR(mode) else 1, **kw)
        self.parents[ino] = parent
        p.children[name] = ino
        if stat.S_ISDIR(mode):
            p.nlink += 1
        p.mtime_ns = p.ctime_ns = time.time_ns()
        return self._entry(ino)

    def _drop(self, ino: int) -> None:
        n = self.nodes[ino]
        n.nlink -= 1 if not stat.S_ISDIR(n.mode) else n.nlink
        if n.nlink <= 0:
            del self.nodes[ino]
            self.parents.pop(ino, None)

    # -- namespace ----------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._entry(parent_inode)
        if name == b"..":
            return self._entry(self.parents[parent_inode])
        ino = self._node(parent_inode).children.get(name)
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT_S
            return negative
        return self._entry(ino)

    async def forget(self, inode_list: Any) -> None:
        pass

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self._node(inode)
        return self._entry(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        n = self._node(inode)
        if fields.update_size:
            self._truncate(n, attr.st_size)
        if fields.update_mode:
            n.mode = (n.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime_ns = attr.st_mtime_ns
        n.ctime_ns = time.time_ns()
        return self._entry(inode)

    def _truncate(self, n: Node, size: int) -> None:
        if size < n.size:
            last = size // CHUNK_BYTES
            for index in [i for i in n.chunks if i > last]:
                del n.chunks[index]
            if last in n.chunks:
                del n.chunks[last][size % CHUNK_BYTES:]
        n.size = size

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._add(parent_inode, name, mode & ~ctx.umask, ctx, rdev=rdev)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._add(parent_inode, name, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._add(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target, size=len(target))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self._node(inode).target

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        p = self._node(new_parent_inode)
        if new_name in p.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        p.children[new_name] = inode
        self._node(inode).nlink += 1
        return self._entry(inode)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        ino = self._node(parent_inode).children.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._drop(ino)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        p = self._node(parent_inode)
        ino = p.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.nodes[ino].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del p.children[name]
        p.nlink -= 1
        self._drop(ino)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        old, new = self._node(parent_inode_old), self._node(parent_inode_new)
        ino = old.children.pop(name_old, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        replaced = new.children.get(name_new)
        new.children[name_new] = ino
        self.parents[ino] = parent_inode_new
        if replaced is not None and replaced != ino:
            self._drop(replaced)

    # -- files and directories ----------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        n = self._node(inode)
        if flags & os.O_TRUNC:
            self._truncate(n, 0)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        entry = self._add(parent_inode, name, mode & ~ctx.umask, ctx)
        return pyfuse3.FileInfo(fh=entry.st_ino, keep_cache=True), entry

    async def read(self, fh: int, off: int, size: int) -> bytes:
        n = self._node(fh)
        end = min(off + size, n.size)
        out = bytearray()
        while off < end:
            index, start = divmod(off, CHUNK_BYTES)
            take = min(CHUNK_BYTES - start, end - off)
            chunk = n.chunks.get(index)
            piece = chunk[start:start + take] if chunk is not None else b""
            out += piece
            out += bytes(take - len(piece))
            off += take
        return bytes(out)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        n = self._node(fh)
        done = 0
        while done < len(buf):
            index, start = divmod(off + done, CHUNK_BYTES)
            take = min(CHUNK_BYTES - start, len(buf) - done)
            chunk = n.chunks.setdefault(index, bytearray())
            if len(chunk) < start:
                chunk += bytes(start - len(chunk))
            chunk[start:start + take] = buf[done:done + take]
            done += take
        n.size = max(n.size, off + len(buf))
        n.mtime_ns = n.ctime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def opendir(self, inode: int, ctx: Any) -> int:
        self._node(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = list(self._node(fh).children.items())
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._entry(ino), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_bfree = out.f_bavail = 1 << 30
        out.f_files = out.f_ffree = out.f_favail = 1 << 30
        out.f_namemax = 255
        return out

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []


async def serve(mount: Path) -> None:
    pyfuse3.init(NullFs(), str(mount), FSTYPE_OPTIONS)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            await trio.to_thread.run_sync(os.stat, mount)  # answered once INIT is done
            tune_bdi(mount)
            print(READY_PREFIX + str(mount), flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        pyfuse3.close(unmount=True)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    mount = Path(sys.argv[1]).absolute()
    mount.mkdir(parents=True, exist_ok=True)
    trio.run(serve, mount)
    return 0


if __name__ == "__main__":
    sys.exit(main())
