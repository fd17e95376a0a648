"""How a node serves its mount: our own /dev/fuse session (`kernel`, the default) or pyfuse3 on
libfuse (`pyfuse3`, the fallback that mounts through fusermount3 when the daemon is not root).

Both mount, serve until unmounted from outside or cancelled, attach their notifications to
`MOUNTED` (the invalidator's and the volume service's way to the kernel) and unmount in `close`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import trio

from awsomefsd.fs.operations import Operations
from awsomefsd.fuse.invalidate import MOUNTED
from awsomefsd.fuse.kernel.abi import Init
from awsomefsd.fuse.kernel.busypoll import DEFAULT_POLL_S
from awsomefsd.fuse.kernel.keeper import DescriptorStore, KeeperStore, descriptor_name, watch_keeper
from awsomefsd.fuse.mount import mount_device
from awsomefsd.meta.errors import FsError

if TYPE_CHECKING:
    from awsomefsd.fs.hotmap import HotMap
    from awsomefsd.fuse.kernel.abi import Header
    from awsomefsd.fuse.kernel.session import Negotiated, Session, UringMode
    from awsomefsd.fuse.kernel.takeover import SessionRecord
    from awsomefsd.fuse.kernel.workers import WorkerConfig, WorkerPool

log = logging.getLogger(__name__)
TransportName = Literal["kernel", "pyfuse3"]
ObserveFn = Callable[[str, float, int], None]
"""(request name, seconds, errno or 0) after each answered request: the latency metrics."""
ReportEioFn = Callable[[str, str, FsError], None]
"""(request name, what it was about, the error): EIO answers a fault explains (fuse/eio.py)."""


class Transport(Protocol):
    def adopt(self) -> bool:
        """Continue a mount a daemon before this one left (its descriptor kept for us); False:
        there is none, mount afresh."""

    def mount(self) -> None:
        """Mount; requests queue in the kernel until `serve` runs."""

    async def serve(self) -> None:
        """Serve requests; returns when the filesystem was unmounted from outside, or when
        `stop_serving` was called and the requests in flight are answered."""

    def stop_serving(self) -> None:
        """Read no more requests (a hand-over: the next daemon answers them)."""

    def resume_serving(self) -> None:
        """After `stop_serving`: the next `serve` reads requests again (a hand-over called off)."""

    def hand_over(self, handles: dict[str, Any], invalidations: list[list[Any]] | None = None) -> None:
        """Leave the mount to the next daemon: record the session with `handles` and the kernel
        invalidations not yet sent (`encode_targets`), let go of the descriptor without unmounting."""

    def carried_invalidations(self) -> list[list[Any]]:
        """The invalidations the daemon before handed over unsent, for this one to send once it
        serves (empty after a crash or a fresh mount)."""

    def can_hand_over(self) -> bool:
        """Is there a descriptor store the next daemon can take the mount from?"""

    def kept_descriptor(self) -> tuple[str, int] | None:
        """The name and /dev/fuse descriptor of a mount a hand-over can leave (None: none), for a
        successor this daemon starts (daemon/handover.py)."""

    async def confirm_kept(self) -> str | None:
        """Make sure the descriptor store holds this very mount now, right before a hand-over lets
        go of it: None when it does, else why not (the hand-over is refused)."""

    def writeback_negotiated(self) -> bool:
        """Does the kernel keep written pages of this mount in its page cache?"""

    def bound_cached_writes(self, bdi: Path) -> None:
        """Under the writeback cache, keep the kernel's written pages of the mount within the room
        on the device (`bdi`: the mount's /sys/class/bdi directory; fuse/dirty_bound.py)."""

    def serving_path(self) -> str | None:
        """How requests reach this daemon: "io_uring" or "read" on the kernel transport (None
        before INIT, and on pyfuse3)."""

    def read_workers_served(self) -> list[tuple[int, int, int]]:
        """Per read worker (`[mount] read_workers`): (index, reads served, READs given back)."""

    def busy_polls(self) -> tuple[int, int]:
        """(times the reader looked for a request before sleeping, requests it found so)."""

    def close(self) -> None:
        """Unmount (if still mounted) and let go of the kernel."""


class KernelTransport:
    """Our own session on /dev/fuse (awsomefsd/fuse/kernel/). With a descriptor `store` the mount
    outlives this process (keeper.py): the descriptor is kept there once mounted, and `adopt`
    takes it back."""

    def __init__(self, ops: Operations, mountpoint: Path, *, allow_other: bool, entry_timeout_s: float,
                 attr_timeout_s: float, negative_timeout_s: float | None, observe: ObserveFn, report_eio: ReportEioFn,
                 writeback_cache: bool = False, state_dir: Path | None = None,
                 store: DescriptorStore | None = None, io_uring: UringMode = "off",
                 read_workers: WorkerConfig | None = None, busy_poll_s: float = DEFAULT_POLL_S) -> None:
        """`read_workers`: worker processes serve the READs of cold files (fuse/kernel/workers.py), a single node's only.
        `busy_poll_s`: how long the reader looks for the next request before it sleeps (session.py)."""
        from awsomefsd.fuse.kernel.handlers import KernelHandlers
        from awsomefsd.fuse.kernel.workers import for_mount

        self.ops = ops
        self.mountpoint = mountpoint
        self.allow_other = allow_other
        self.writeback_cache = writeback_cache and ops.coherence is None
        """Ask for FUSE_WRITEBACK_CACHE (a single node only). What a continued mount has is what
        its first daemon negotiated (`writeback_negotiated`)."""
        self.handlers = KernelHandlers(ops, entry_timeout_s=entry_timeout_s, attr_timeout_s=attr_timeout_s,
                                       negative_timeout_s=negative_timeout_s, cache_dirs=ops.coherence is None,
                                       kernel_has=self.kernel_has)
        self.observe = observe
        self.report_eio = report_eio
        self.io_uring = io_uring
        """FUSE over io_uring (session.UringMode)."""
        self.busy_poll_s = busy_poll_s
        self.state_dir = state_dir
        self.store = store if state_dir is not None else None
        self.name = descriptor_name(mountpoint)
        self.fd = -1
        self.mounted = False
        self.adopted: str | None = None
        """How this process came to serve the mount: None (it mounted), "handed over", "crash"."""
        self.session: Session | None = None
        self.record: SessionRecord | None = None
        """The session record this daemon keeps (written at INIT or when it continued a mount)."""
        self.carried: list[list[Any]] = []
        self.read_workers = for_mount(read_workers, single_node=ops.coherence is None)
        self.hot: HotMap | None = None
        self.pool: WorkerPool | None = None
        if self.read_workers is not None:
            try:
                self.hot = _attach_hot_map(ops)
            except OSError as exc:  # no shared memory for the workers (a sandbox refusing memfd_create)
                log.warning("read workers off: %s", exc)
                self.read_workers = None

    def _session(self, negotiated: Negotiated | None) -> Session:
        from awsomefsd.fuse.kernel.fuse_ring import kick_queues
        from awsomefsd.fuse.kernel.inline import INLINE_MEMBER, INLINE_MEMBER_CACHING, INLINE_SINGLE_NODE
        from awsomefsd.fuse.kernel.session import (
            WANTED,
            WANTED_SINGLE_NODE,
            Session,
        )

        def report(op: str, header: Header, exc: FsError) -> None:
            self.report_eio(op, f"inode {header.nodeid}" if header.nodeid else "the file system", exc)

        coherence = self.ops.coherence
        single = coherence is None
        inline = (INLINE_SINGLE_NODE if coherence is None
                  else INLINE_MEMBER if coherence.strict else INLINE_MEMBER_CACHING)
        session = Session(self.fd, self.handlers.table, observe=self.observe, report_eio=report,
                          negotiated=negotiated, inline=inline,
                          inline_when=self.handlers.quick if single else self.handlers.member_quick,
                          wanted=(WANTED_SINGLE_NODE | (Init.WRITEBACK_CACHE if self.writeback_cache else 0)
                                  if single else WANTED), uring=self.io_uring,
                          start_read=self.handlers.start_read if single else None, busy_poll_s=self.busy_poll_s)
        # entries registered on a ring another session used: each CPU's queue may hold a request
        session.on_ring_started = lambda ring: kick_queues(str(self.mountpoint), ring.queues)
        if self.read_workers is not None and self.hot is not None:
            from awsomefsd.fuse.kernel.workers import WorkerPool

            try:
                self.pool = session.workers = WorkerPool(self.read_workers, self.fd, self.hot,
                                                         state_dir=self.state_dir, busy_poll_s=session.poll.seconds)
            except OSError as exc:  # as for the hot map: the mount is served without workers
                log.warning("read workers off: %s", exc)
            else:
                self.ops.data.space.reads_drained = _reads_drained(self.ops, self.pool)
        MOUNTED.attach(session)
        return session

    def serving_path(self) -> str | None:
        """How requests reach this daemon: "io_uring", "read" (/dev/fuse), None before INIT."""
        if self.session is None or self.session.negotiated is None:
            return None
        return self.session.path

    def read_workers_served(self) -> list[tuple[int, int, int]]:
        pool = self.pool
        return [] if pool is None else pool.per_worker()

    def busy_polls(self) -> tuple[int, int]:
        session = self.session
        return (0, 0) if session is None else (session.poll.polls, session.poll.polled)

    def writeback_negotiated(self) -> bool:
        return self.kernel_has(Init.WRITEBACK_CACHE)

    def kernel_has(self, capability: int) -> bool:
        """Did INIT settle `capability` (abi.Init) with the kernel? (Asked per WRITE, SETATTR and
        OPEN: no import here.)"""
        return self.session is not None and self.session.kernel_has(capability)

    def bound_cached_writes(self, bdi: Path) -> None:
        from awsomefsd.fs.operations import BLOCK_SIZE
        from awsomefsd.fuse.dirty_bound import DirtyBound, kernel_dirty_limit_bytes

        refusals = self.handlers.refusals

        def full(near: bool) -> None:
            refusals.set_full(near, self.ops.handles.writing())
            log.info("cached writes: the device is %s", "near full (writers hear ENOSPC)" if near else "no longer near full")

        bound = DirtyBound(bdi, lambda: self.ops.data.space.room_blocks() * BLOCK_SIZE, full,
                           lambda: self.ops.meta.pending_free_blocks() * BLOCK_SIZE, kernel_dirty_limit_bytes())
        if bound.start():
            self.handlers.cached_write_taken = bound.look
            refusals.full_now = bound.near_full_now
            refusals.reserved = self.ops.data.writer.holds_reservations

    def adopt(self) -> bool:
        from awsomefsd.fuse.kernel import takeover
        from awsomefsd.fuse.kernel.session import Negotiated

        if self.store is None or self.state_dir is None:
            return False
        try:
            fd = self.store.take(self.name)
        except OSError as exc:
            log.warning("no kept FUSE descriptor to continue the mount with: %s", exc)
            return False
        if fd is None:
            return False
        record = takeover.load(self.state_dir)
        device = mount_device(self.mountpoint)
        if record is None or record.mountpoint != str(self.mountpoint) or device is None or device != record.device:
            log.warning("a kept FUSE descriptor does not match the mount at %s (record %s, mounted %s): mounting afresh",
                        self.mountpoint, record and record.device, device)
            os.close(fd)
            self._drop_kept()
            return False
        os.set_blocking(fd, False)
        self.fd = fd
        self.mounted = True
        self.adopted = "handed over" if record.handles is not None else "crash"
        self.ops.handles.take_over(record.handles)
        self.carried = record.invalidations or []
        self.record = dataclasses.replace(record, handles=None, invalidations=None)
        takeover.save(self.state_dir, self.record)  # a crash from now on is a crash of this daemon
        self.session = self._session(Negotiated(record.minor, record.flags, record.max_write))
        if record.handles is None:
            from awsomefsd.fuse.kernel.workers import end_orphans

            self.session.forget_names()  # names the crash took (a rename, a create) must not be shown
            self.handlers.relist_directories()  # nor listings that show them
            self.session.resend()  # what the crashed daemon (and its read workers) had read and not answered
            end_orphans(self.state_dir)  # any worker of it still running
        log.info("continuing the mount at %s (%s; protocol 7.%d)", self.mountpoint, self.adopted, record.minor)
        return True

    def mount(self) -> None:
        from awsomefsd.fuse.kernel import channel, fuse_ring

        if self.io_uring == "on":
            why = fuse_ring.unavailable()
            if why is not None:
                raise channel.MountFailed(0, f"cannot mount {self.mountpoint} with [mount] io_uring = \"on\": {why}; "
                                             f"\"auto\" falls back to /dev/fuse")
        self.fd = channel.open_device()
        try:
            channel.mount(self.fd, self.mountpoint, allow_other=self.allow_other)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self.mounted = True
        self.session = self._session(None)
        if isinstance(self.store, KeeperStore):
            try:
                self.store.hold(self.name, self.fd, mount_device(self.mountpoint) or "")
            except OSError as exc:  # given once it is there (`watch_keeper`, from `serve`)
                log.warning("the mount survives a restart of this daemon only once the keeper holds it: %s", exc)
        elif self.store is not None:
            try:
                self.store.put(self.name, self.fd)
            except OSError as exc:
                log.warning("the mount will not survive a restart of this daemon: %s", exc)
                self.store = None

    async def serve(self) -> None:
        from awsomefsd.fuse.kernel import takeover

        session = self.session
        assert session is not None

        async def serve_session(*, task_status: trio.TaskStatus[Negotiated] = trio.TASK_STATUS_IGNORED) -> None:
            await session.serve(task_status=task_status)
            nursery.cancel_scope.cancel()  # and the keeper's watch

        async with trio.open_nursery() as nursery:
            if self.hot is not None:
                nursery.start_soon(_settle_hot_map, self.hot)
            negotiated = await nursery.start(serve_session)
            if self.state_dir is not None and self.record is None:
                device = mount_device(self.mountpoint) or ""
                self.record = takeover.SessionRecord(str(self.mountpoint), device, negotiated.minor,
                                                     negotiated.flags, negotiated.max_write)
                takeover.save(self.state_dir, self.record)
            if isinstance(self.store, KeeperStore) and self.record is not None:
                nursery.start_soon(watch_keeper, self.store, self.name, self.fd, self.record.device)

    def stop_serving(self) -> None:
        if self.session is not None:
            self.session.stop_reading()

    def resume_serving(self) -> None:
        if self.session is not None:
            self.session.resume_reading()

    def hand_over(self, handles: dict[str, Any], invalidations: list[list[Any]] | None = None) -> None:
        from awsomefsd.fuse.kernel import takeover

        assert self.state_dir is not None and self.record is not None, "a hand-over needs a descriptor store"
        takeover.save(self.state_dir, dataclasses.replace(self.record, handles=handles,
                                                          invalidations=invalidations or None))
        MOUNTED.attach(None)
        self.mounted = False
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def carried_invalidations(self) -> list[list[Any]]:
        return self.carried

    def can_hand_over(self) -> bool:
        return self.store is not None and self.mounted and self.record is not None

    def kept_descriptor(self) -> tuple[str, int] | None:
        return (self.name, self.fd) if self.can_hand_over() and self.fd >= 0 else None

    async def confirm_kept(self) -> str | None:
        """The keeper is given the descriptor once more and must answer that it holds it: it may
        have been restarted since it last did (`watch_keeper` gives it again, but not before the
        keeper listens). systemd's store keeps what it was given for as long as the unit lives."""
        if not isinstance(self.store, KeeperStore) or self.record is None:
            return None
        try:
            await trio.to_thread.run_sync(self.store.hold, self.name, self.fd, self.record.device)
        except OSError as exc:
            return str(exc)
        return None

    def _drop_kept(self) -> None:
        if self.store is not None:
            try:
                self.store.drop(self.name)
            except OSError as exc:
                log.warning("could not drop the kept FUSE descriptor: %s", exc)

    def close(self) -> None:
        from awsomefsd.fuse.kernel import channel, takeover

        MOUNTED.attach(None)
        if self.mounted:
            self.mounted = False
            channel.unmount(self.mountpoint)
            self._drop_kept()
            if self.state_dir is not None:
                takeover.forget(self.state_dir)
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _attach_hot_map(ops: Operations) -> HotMap:
    """The hot map read workers consult (fs/hotmap.py), marked by open handles and by every command
    proposed."""
    from awsomefsd.fs.hotmap import HotMap

    meta, buffer = ops.meta, ops.data.buffer
    hot = HotMap(lambda: meta.applied_index, lambda: meta.committed_index, lambda ino: ino in buffer.files)
    ops.handles.attach_hot(hot)
    meta.on_proposed(hot.changed)
    return hot


def _reads_drained(ops: Operations, pool: WorkerPool) -> Callable[[], Awaitable[None]]:
    """What a write short of space waits for before it takes superseded blocks back early (fs/space.py):
    the reads this process runs, then those it handed to its read workers."""
    own = ops.data.reader.drained

    async def drained() -> None:
        await own()
        await pool.drained()

    return drained


async def _settle_hot_map(hot: HotMap) -> None:
    """Clear what the log has committed since (fs/hotmap.py, R2)."""
    from awsomefsd.fs.hotmap import SETTLE_S

    while True:
        await trio.sleep(SETTLE_S)
        hot.settle()


class Pyfuse3Transport:
    """pyfuse3 on libfuse 3 (awsomefsd/fuse/adapter.py)."""

    def __init__(self, ops: Operations, mountpoint: Path, *, allow_other: bool, entry_timeout_s: float,
                 attr_timeout_s: float, negative_timeout_s: float | None, observe: ObserveFn, report_eio: ReportEioFn,
                 writeback_cache: bool = False) -> None:
        """`writeback_cache` is not offered here (docs/fuse-transport.md: the fallback keeps pyfuse3's
        defaults)."""
        from awsomefsd.fuse.adapter import FuseAdapter

        self.mountpoint = mountpoint
        self.adapter = FuseAdapter(ops, entry_timeout_s=entry_timeout_s, attr_timeout_s=attr_timeout_s,
                                   negative_timeout_s=negative_timeout_s, observe=observe,
                                   report_eio=report_eio)
        self.options = {"fsname=awsomefs", "subtype=awsomefs", "default_permissions", "noatime"}
        if allow_other:
            self.options.add("allow_other")
        self.mounted = False

    def adopt(self) -> bool:
        return False

    def stop_serving(self) -> None:
        raise AssertionError("pyfuse3 cannot hand a mount over")

    def resume_serving(self) -> None:
        raise AssertionError("pyfuse3 cannot hand a mount over")

    def hand_over(self, handles: dict[str, Any], invalidations: list[list[Any]] | None = None) -> None:
        raise AssertionError("pyfuse3 cannot hand a mount over")

    def carried_invalidations(self) -> list[list[Any]]:
        return []

    def writeback_negotiated(self) -> bool:
        return False

    def bound_cached_writes(self, bdi: Path) -> None:
        pass  # the kernel caches no writes here

    def serving_path(self) -> str | None:
        return None

    def read_workers_served(self) -> list[tuple[int, int, int]]:
        return []

    def busy_polls(self) -> tuple[int, int]:
        return (0, 0)

    def can_hand_over(self) -> bool:
        return False

    def kept_descriptor(self) -> tuple[str, int] | None:
        return None

    async def confirm_kept(self) -> str | None:
        return "pyfuse3 cannot hand a mount over"

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


def make_transport(name: TransportName, ops: Operations, mountpoint: Path, *, state_dir: Path | None = None,
                   store: DescriptorStore | None = None, **kwargs: Any) -> Transport:
    io_uring = kwargs.pop("io_uring", "off")
    read_workers = kwargs.pop("read_workers", None)
    busy_poll_s = kwargs.pop("busy_poll_s", DEFAULT_POLL_S)
    if name == "kernel":
        return KernelTransport(ops, mountpoint, state_dir=state_dir, store=store, io_uring=io_uring,
                               read_workers=read_workers, busy_poll_s=busy_poll_s, **kwargs)
    return Pyfuse3Transport(ops, mountpoint, **kwargs)
