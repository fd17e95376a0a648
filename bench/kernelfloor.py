"""The raw transport's floor: an in-memory filesystem behind our own /dev/fuse session.

The counterpart of bench/nullfs.py (the pyfuse3 floor) for awsomefsd's default transport: the
same handlers (awsomefsd/fuse/kernel/handlers.py) and session, the same mount options, in front of
operations that keep everything in a dict and check nothing. What it reaches is what the transport
allows request for request; AwsomeFS at this figure would mean the transport is the bottleneck.

    python bench/kernelfloor.py MOUNTPOINT   # prints "kernelfloor: mounted MOUNTPOINT", Ctrl-C unmounts
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast, get_args

import trio

from awsomefsd.fs.handles import Handle, Handles
from awsomefsd.fs.operations import FsStats
from awsomefsd.fs.ops_base import InGroup
from awsomefsd.fuse.kernel import channel
from awsomefsd.fuse.kernel.handlers import KernelHandlers
from awsomefsd.fuse.kernel.inline import INLINE_SINGLE_NODE
from awsomefsd.fuse.kernel.session import Session, UringMode
from awsomefsd.fuse.mount import tune_bdi
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, Inode

READY_PREFIX = "kernelfloor: mounted "


@dataclass
class Node:
    inode: Inode
    children: dict[bytes, int] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""


class NullOperations:
    """What KernelHandlers calls on `Operations`, in memory."""

    coherence = None

    def __init__(self) -> None:
        now = time.time_ns()
        self.nodes = {ROOT_INO: Node(Inode(ROOT_INO, stat.S_IFDIR | 0o755, 0, 0, 2, 0, now, now, now, parent=ROOT_INO))}
        self.next_ino = ROOT_INO + 1
        self.handles = Handles(None)  # type: ignore[arg-type]
        """The handlers look here for a file open for writing (under the writeback cache): the
        floor registers none, and without a crash adopted `Handles` never asks its metadata."""

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def exists(self, ino: int) -> bool:
        return ino in self.nodes

    def remember(self, ino: int) -> None:
        pass

    async def forget(self, items: list[tuple[int, int]]) -> None:
        pass

    def keep_cache(self, ino: int) -> bool:
        return True

    def keep_listing(self, ino: int) -> bool:
        return True

    def listing_current(self, ino: int) -> bool:
        return True

    def listed(self, ino: int) -> None:
        pass

    def direct_io(self, flags: int) -> bool:
        return False

    async def lookup(self, parent: int, name: bytes) -> Inode:
        p = self._node(parent)
        if name == b".":
            return p.inode
        if name == b"..":
            return self._node(p.inode.parent).inode
        ino = p.children.get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self.nodes[ino].inode

    async def getattr(self, ino: int) -> Inode:
        return self._node(ino).inode

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                      size: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                      drop_setid: InGroup | None = None) -> Inode:
        node = self._node(ino)
        i = node.inode
        if size is not None:
            del node.data[size:]
            i.size = size
        if mode is not None:
            i.mode = (i.mode & ~0o7777) | (mode & 0o7777)
        i.uid = i.uid if uid is None else uid
        i.gid = i.gid if gid is None else gid
        i.atime_ns = i.atime_ns if atime_ns is None else atime_ns
        i.mtime_ns = i.mtime_ns if mtime_ns is None else mtime_ns
        i.ctime_ns = time.time_ns()
        return i

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                    target: bytes = b"") -> Inode:
        p = self._node(parent)
        if name in p.children:
            raise FsError(errno.EEXIST)
        ino, self.next_ino = self.next_ino, self.next_ino + 1
        now = time.time_ns()
        is_dir = stat.S_ISDIR(mode)
        inode = Inode(ino, mode, uid, gid, 2 if is_dir else 1, len(target), now, now, now, rdev,
                      parent=parent if is_dir else 0)
        self.nodes[ino] = Node(inode, target=target)
        p.children[name] = ino
        p.inode.mtime_ns = p.inode.ctime_ns = now
        return inode

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        return await self.mknod(parent, name, stat.S_IFLNK | 0o777, 0, uid, gid, target)

    async def readlink(self, ino: int) -> bytes:
        return self._node(ino).target

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        self._node(new_parent).children[new_name] = ino
        node = self._node(ino)
        node.inode.nlink += 1
        return node.inode

    async def unlink(self, parent: int, name: bytes, *, is_dir: bool) -> None:
        p = self._node(parent)
        ino = p.children.get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        if is_dir and self.nodes[ino].children:
            raise FsError(errno.ENOTEMPTY)
        del p.children[name]
        node = self.nodes[ino]
        node.inode.nlink = 0 if is_dir else node.inode.nlink - 1
        if node.inode.nlink <= 0:
            del self.nodes[ino]

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int,
                     uid: int = 0, gid: int = 0) -> None:
        ino = self._node(old_parent).children.pop(old_name, None)
        if ino is None:
            raise FsError(errno.ENOENT)
        replaced = self._node(new_parent).children.get(new_name)
        self.nodes[new_parent].children[new_name] = ino
        if replaced is not None and replaced != ino:
            self.nodes.pop(replaced, None)

    async def open(self, ino: int, flags: int, *, drop_setid: InGroup | None = None) -> int:
        node = self._node(ino)
        if flags & os.O_TRUNC:
            del node.data[:]
            node.inode.size = 0
        return ino

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Inode]:
        inode = await self.mknod(parent, name, stat.S_IFREG | (mode & 0o7777), 0, uid, gid)
        return inode.ino, inode

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return bytes(self._node(fh).data[offset : offset + size])

    def start_read(self, fh: int, offset: int, size: int, send: Callable[[memoryview], None],
                   fail: Callable[[], None]) -> bool:
        """READ without a task, as the daemon starts the common one (Reader.start_read): here it
        is answered at once, from memory."""
        if fh not in self.nodes:
            return False
        send(memoryview(bytes(self._node(fh).data[offset : offset + size])))
        return True

    def write_is_immediate(self, fh: int, size: int) -> bool:
        """Every write of the floor waits for nothing (memory): the session answers it inline."""
        return True

    async def write(self, fh: int, offset: int, buf: bytes, *, drop_setid: InGroup | None = None,
                    kernel_times: bool = False) -> int:
        node = self._node(fh)
        if len(node.data) < offset:
            node.data += bytes(offset - len(node.data))
        node.data[offset : offset + len(buf)] = buf
        node.inode.size = len(node.data)
        node.inode.mtime_ns = node.inode.ctime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def sync_all(self) -> None:
        pass

    async def fsyncdir(self, ino: int) -> None:
        pass

    async def syncfs(self) -> None:
        pass

    async def opendir(self, ino: int) -> int:
        self._node(ino)
        return ino

    def readdir(self, fh: int, start_id: int) -> Iterator[tuple[int, bytes, Inode]]:
        node = self._node(fh)
        entries = [(b".", node.inode), (b"..", self._node(node.inode.parent).inode)]
        entries += [(name, self.nodes[ino].inode) for name, ino in node.children.items()]
        for index in range(start_id, len(entries)):
            yield index + 1, entries[index][0], entries[index][1]

    def readdir_names(self, fh: int, start_id: int) -> Iterator[tuple[int, bytes, int, int]]:
        for next_id, name, inode in self.readdir(fh, start_id):
            yield next_id, name, inode.ino, inode.mode

    async def releasedir(self, fh: int) -> None:
        pass

    def handle(self, fh: int) -> Handle:
        """An open directory (the floor's handle numbers are the inodes'): what a cluster member's
        listing asks of it to time its names; the floor, a single node, never does."""
        return Handle(fh, os.O_RDONLY)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        raise FsError(errno.ENODATA)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        raise FsError(errno.EOPNOTSUPP)

    async def listxattr(self, ino: int) -> list[bytes]:
        return []

    async def removexattr(self, ino: int, name: bytes) -> None:
        raise FsError(errno.ENODATA)

    def statfs(self, ino: int | None = None) -> FsStats:
        return FsStats(4096, 1 << 30, 1 << 30, 1 << 30, 1 << 30, 255)

    def flush_is_immediate(self, fh: int) -> bool:
        return True  # nothing is ever buffered here

    def setattr_is_immediate(self, ino: int, mtime_ns: int | None) -> bool:
        return True  # nothing is ever buffered here

    def open_is_immediate(self, ino: int) -> bool:
        return True  # a single node's open waits for nothing

    def change_is_immediate(self, *inodes: int, new_inode: bool = False) -> bool:
        return False  # asked only on a cluster member, which the floor never is

    def look_is_immediate(self, directory: int) -> bool:
        return False  # asked only on a cluster member, which the floor never is

    def rename_is_immediate(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                            flags: int) -> bool:
        return False  # asked only on a cluster member, which the floor never is

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """The whole file is data (the kernel's own answer without a filesystem's)."""
        size = len(self._node(fh).data)
        if offset >= size:
            raise FsError(errno.ENXIO)
        return offset if whence == os.SEEK_DATA else size

    async def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        raise FsError(errno.EOPNOTSUPP)

    async def copy_file_range(self, fh_in: int, offset_in: int, fh_out: int, offset_out: int, length: int) -> int:
        raise FsError(errno.EOPNOTSUPP)  # the kernel copies through reads and writes


def uring_mode() -> UringMode:
    """`[mount] io_uring` from the environment, as the daemon takes it (AWSOMEFS_MOUNT__IO_URING)."""
    mode = os.environ.get("AWSOMEFS_MOUNT__IO_URING", "off")
    if mode not in get_args(UringMode):
        raise SystemExit(f"kernelfloor: AWSOMEFS_MOUNT__IO_URING is one of {', '.join(get_args(UringMode))}, not {mode!r}")
    return cast(UringMode, mode)


async def serve(mount: Path) -> None:
    fd = channel.open_device()
    channel.mount(fd, mount, allow_other=True)
    try:
        handlers = KernelHandlers(NullOperations(), cache_dirs=True,  # type: ignore[arg-type]
                                  kernel_has=lambda capability: session.kernel_has(capability))
        session = Session(fd, handlers.table, inline=INLINE_SINGLE_NODE, inline_when=handlers.quick,
                          start_read=handlers.start_read,
                          uring=uring_mode())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            await trio.to_thread.run_sync(os.stat, mount)  # answered once INIT is done
            tune_bdi(mount)
            print(READY_PREFIX + str(mount), flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        channel.unmount(mount)
        os.close(fd)


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
