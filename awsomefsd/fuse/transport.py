"""How a node serves its mount: our own /dev/fuse session (`kernel`, the default) or pyfuse3 on
libfuse (`pyfuse3`, the fallback that mounts through fusermount3 when the daemon is not root).

Both mount, serve until unmounted from outside or cancelled, attach their notifications to
`MOUNTED` (the invalidator's and the volume service's way to the kernel) and unmount in `close`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from awsomefsd.fs.operations import Operations
from awsomefsd.fuse.invalidate import MOUNTED
from awsomefsd.meta.errors import FsError

log = logging.getLogger(__name__)
TransportName = Literal["kernel", "pyfuse3"]
ObserveFn = Callable[[str, float, int], None]
"""(request name, seconds, errno or 0) after each answered request: the latency metrics."""
ReportEioFn = Callable[[str, str, FsError], None]
"""(request name, what it was about, the error): EIO answers a fault explains (fuse/eio.py)."""


class Transport(Protocol):
    def mount(self) -> None:
        """Mount; requests queue in the kernel until `serve` runs."""

    async def serve(self) -> None:
        """Serve requests; returns when the filesystem was unmounted from outside."""

    def close(self) -> None:
        """Unmount (if still mounted) and let go of the kernel."""


class KernelTransport:
    """Our own session on /dev/fuse (awsomefsd/fuse/kernel/)."""

    def __init__(self, ops: Operations, mountpoint: Path, *, allow_other: bool, entry_timeout_s: float,
                 attr_timeout_s: float, negative_timeout_s: float | None, observe: ObserveFn, report_eio: ReportEioFn) -> None:
        from awsomefsd.fuse.kernel.handlers import KernelHandlers

        self.mountpoint = mountpoint
        self.allow_other = allow_other
        self.handlers = KernelHandlers(ops, entry_timeout_s=entry_timeout_s, attr_timeout_s=attr_timeout_s,
                                       negative_timeout_s=negative_timeout_s, cache_dirs=ops.coherence is None)
        self.observe = observe
        self.report_eio = report_eio
        self.fd = -1
        self.mounted = False

    def mount(self) -> None:
        from awsomefsd.fuse.kernel import channel
        from awsomefsd.fuse.kernel.abi import Header
        from awsomefsd.fuse.kernel.session import Session

        self.fd = channel.open_device()
        try:
            channel.mount(self.fd, self.mountpoint, allow_other=self.allow_other)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.mounted = True

        def report(op: str, header: Header, exc: FsError) -> None:
            self.report_eio(op, f"inode {header.nodeid}" if header.nodeid else "the file system", exc)

        self.session = Session(self.fd, self.handlers.table, observe=self.observe, report_eio=report)
        MOUNTED.attach(self.session)

    async def serve(self) -> None:
        await self.session.serve()

    def close(self) -> None:
        from awsomefsd.fuse.kernel import channel

        MOUNTED.attach(None)
        if self.mounted:
            self.mounted = False
            channel.unmount(self.mountpoint)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Pyfuse3Transport:
    """pyfuse3 on libfuse 3 (awsomefsd/fuse/adapter.py)."""

    def __init__(self, ops: Operations, mountpoint: Path, *, allow_other: bool, entry_timeout_s: float,
                 attr_timeout_s: float, negative_timeout_s: float | None, observe: ObserveFn, report_eio: ReportEioFn) -> None:
        from awsomefsd.fuse.adapter import FuseAdapter

        self.mountpoint = mountpoint
        self.adapter = FuseAdapter(ops, entry_timeout_s=entry_timeout_s, attr_timeout_s=attr_timeout_s,
                                   negative_timeout_s=negative_timeout_s, observe=observe,
                                   report_eio=report_eio)
        self.options = {"fsname=awsomefs", "subtype=awsomefs", "default_permissions", "noatime"}
        if allow_other:
            self.options.add("allow_other")
        self.mounted = False

    def mount(self) -> None:
        import pyfuse3

        pyfuse3.init(self.adapter, str(self.mountpoint), self.options)
        self.mounted = True
        MOUNTED.attach(Pyfuse3Kernel())

    async def serve(self) -> None:
        import pyfuse3

        await pyfuse3.main()

    def close(self) -> None:
        import pyfuse3

        MOUNTED.attach(None)
        if self.mounted:
            self.mounted = False
            pyfuse3.close(unmount=True)


class Pyfuse3Kernel:
    """pyfuse3's notifications (its session must be initialised)."""

    def invalidate_inode(self, ino: int, attr_only: bool) -> None:
        import pyfuse3

        pyfuse3.invalidate_inode(ino, attr_only)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        import pyfuse3

        pyfuse3.invalidate_entry(parent, name)


def make_transport(name: TransportName, ops: Operations, mountpoint: Path, **kwargs: Any) -> Transport:
    if name == "kernel":
        return KernelTransport(ops, mountpoint, **kwargs)
    return Pyfuse3Transport(ops, mountpoint, **kwargs)
