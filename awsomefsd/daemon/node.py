"""Service composition: open the device and the metadata, then serve FUSE, metrics and CSI.

`open_core` wires the storage parts (device, superblock, LMDB state, log, allocator, file data,
operations) and is shared by the daemon, fsck and the tests; `serve` runs the long-lived services
in one trio nursery and shuts them down in order: unmount, flush buffered data, commit metadata.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from awsomefsd.config import Settings
from awsomefsd.daemon.ownership import check_member, initialise_founder_store, settle_single_node
from awsomefsd.duty import DutyBook, run_duty, supervise
from awsomefsd.fs.allocator import NodeAllocator
from awsomefsd.fs.data import FileData
from awsomefsd.fs.handles import Handles
from awsomefsd.fs.operations import Operations
from awsomefsd.fs.space import ClaimSpace
from awsomefsd.fs.tiered import TieredBlocks
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.errors import DeviceError
from awsomefsd.io.fence import WriteFence
from awsomefsd.io.founding import read_founding
from awsomefsd.io.layout import DeviceLayout
from awsomefsd.io.superblock import Superblock, read_superblock
from awsomefsd.meta import commands as c
from awsomefsd.meta.bootstrap import load_metadata, open_metadata, stored_identity
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.log import LocalLog
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore
from awsomefsd.metrics import Metrics, counter, gauge

if TYPE_CHECKING:  # imported where used: a restart waits for every module the daemon loads
    from prometheus_client.metrics_core import Metric

    from awsomefsd.cluster.tls import NodeCredentials
    from awsomefsd.daemon.tiering import Tiering, TierReads
    from awsomefsd.fuse.invalidate import Invalidator
    from awsomefsd.fuse.transport import Transport
    from awsomefsd.meta.replication.fs_log import ReplicatedFsLog

log = logging.getLogger(__name__)
NODE_ID = 1  # a single-node cluster; the cluster layer assigns ids to joining nodes
RECLAIM_TICK_S = 0.5
MOUNT_RECORD = "mounted-at"
"""In the state directory while the daemon has its file system mounted: where (for `status`)."""


class NodeError(Exception):
    """A start-up problem the operator must fix; the message says how."""


@dataclass
class Core:
    device: BlockDevice
    superblock: Superblock
    store: MetaStore
    sm: StateMachine
    log: LocalLog | ReplicatedFsLog
    meta: MetaClient
    allocator: NodeAllocator
    data: FileData
    ops: Operations
    metrics: Metrics
    duties: DutyBook = field(default_factory=DutyBook)
    """Errors of this node's background duties (awsomefsd/duty.py): logged once per kind, counted."""
    tiering: Tiering | None = None
    """Tiering to the object store, when [tier] configures it (`serve` runs its engine)."""

    def close(self) -> None:
        self.log.close()
        self.store.close()
        self.device.close()


@dataclass
class Storage:
    """The device and the node-local metadata, open; what every way of running a node starts from."""

    device: BlockDevice
    superblock: Superblock
    store: MetaStore
    sm: StateMachine

    def close(self) -> None:
        self.store.close()
        self.device.close()


def open_storage(settings: Settings, *, bootstrap: bool = True, grant_all_to: int | None = NODE_ID,
                 fence: WriteFence | None = None) -> Storage:
    """Open the device and the metadata store; initialise the metadata of a freshly formatted
    device when `bootstrap` (a joining cluster member instead waits for a snapshot: its store stays
    empty until then). `grant_all_to` owns every allocation group of a new single-node filesystem;
    a cluster grants groups through Raft instead (None). `fence` guards device writes (a cluster
    member's follows its liveness lease; a single node's is always open)."""
    if settings.device.path is None:
        raise NodeError("no device configured: set [device] path, AWSOMEFS_DEVICE__PATH or --device")
    try:
        device = BlockDevice.open(settings.device.path, shared=settings.device.shared,
                                  direct=settings.device.direct_io, fence=fence)
    except FileNotFoundError:
        raise NodeError(f"device {settings.device.path} does not exist") from None
    try:
        sb = read_superblock(device).superblock
        store, sm = open_metadata(settings.node.state_dir / "meta",
                                  delayed_free_ns=settings.data.delayed_free_ms * 1_000_000)
    except BaseException:
        device.close()
        raise
    try:
        _init_or_check_meta(store, sm, device, sb, settings, init=bootstrap, grant_all_to=grant_all_to)
    except BaseException:
        store.close()
        device.close()
        raise
    return Storage(device, sb, store, sm)


def open_core(settings: Settings, *, metrics: Metrics | None = None, log_kind: str | None = None,
              initialise: bool = True, tiering: bool = True) -> Core:
    """A single node: storage, its metadata log, and the file system on top.

    `log_kind` overrides `[meta] log` (fsck works offline on the state as committed: "local").
    `initialise`: make the metadata when the state directory has none and the device may be
    founded (fsck never does: it checks what exists). `tiering`: with the object store when
    [tier] configures it (fsck checks the store on its own).
    """
    storage = open_storage(settings, bootstrap=initialise)
    meta_log: LocalLog | ReplicatedFsLog
    if (log_kind or settings.meta.log) == "raft":
        from awsomefsd.meta.replication.fs_log import ReplicatedFsLog

        meta_log = ReplicatedFsLog(storage.store, storage.sm, node_id=NODE_ID, before_commit=storage.device.sync_written)
    else:
        meta_log = LocalLog(storage.store, storage.sm, commit_interval_ms=settings.data.commit_interval_ms,
                            commit_idle_ms=settings.data.commit_idle_ms, before_commit=storage.device.sync_written)
    try:
        return build_core(settings, storage, meta_log, node_id=NODE_ID, metrics=metrics, tiering=tiering)
    except BaseException:
        meta_log.close()
        storage.close()
        raise


def build_core(settings: Settings, storage: Storage, meta_log: LocalLog | ReplicatedFsLog, *, node_id: int,
               metrics: Metrics | None = None, tiering: bool = True) -> Core:
    """A single node's file system over open storage whose metadata is initialised. (A cluster
    member builds the same parts with its cluster's between them: daemon/member.py.)"""
    metrics = metrics or Metrics()
    meta = MetaClient(meta_log, storage.sm)
    allocator = node_allocator(meta, storage.superblock.layout, node_id)
    reads = tier_reads(settings, meta, storage.superblock) if tiering else None
    data = file_data(settings, storage.device, meta, allocator, metrics, single_node=True,
                     tiered=None if reads is None else reads.source)
    tier = tiering_over(reads, data)
    ops = Operations(meta, data, Handles(meta), total_blocks=storage.superblock.layout.data_blocks,
                     evict=None if tier is None else tier.evict)
    if settings.data.batch_closed_files:  # the local log's commits write closed files first
        data.batch.attach(meta_log if isinstance(meta_log, LocalLog) else None)
    return assemble_core(storage, meta_log, meta, allocator, data, ops, metrics, DutyBook(f"node {node_id}"), tier)


def node_allocator(meta: MetaClient, layout: DeviceLayout, node_id: int) -> NodeAllocator:
    """This node's allocator over the groups granted to it, told of every free as it applies."""
    allocator = NodeAllocator(layout, meta.groups_of(node_id), meta.free_space())
    meta.on_freed(allocator.on_freed)
    return allocator


def file_data(settings: Settings, device: BlockDevice, meta: MetaClient, allocator: NodeAllocator,
              metrics: Metrics, *, claim_space: ClaimSpace | None = None, single_node: bool = False,
              tiered: TieredBlocks | None = None) -> FileData:
    return FileData(
        device, allocator, meta,
        file_buffer_bytes=settings.data.file_buffer_bytes,
        write_buffer_bytes=settings.data.write_buffer_bytes,
        flush_interval_ms=settings.data.flush_interval_ms,
        on_checksum_error=lambda _block: metrics.checksum_failures.inc(),
        claim_space=claim_space,
        single_node=single_node,
        tiered=tiered,
        recall_reads=settings.tier.recall_reads,
    )


def tier_reads(settings: Settings, meta: MetaClient, superblock: Superblock) -> TierReads | None:
    """The tier's store, caches and reads, when [tier] configures it (a bad configuration:
    NodeError): built before the file data, which reads tiered blocks through its `source`
    (fs/tiered.py)."""
    if not settings.tier.enabled:
        return None
    from awsomefsd.daemon.tiering import TierConfigError, TierReads

    try:
        return TierReads(settings, meta, cluster_id=str(superblock.cluster_id),
                         total_blocks=superblock.layout.data_blocks)
    except TierConfigError as exc:
        raise NodeError(str(exc)) from None


def tiering_over(reads: TierReads | None, data: FileData) -> Tiering | None:
    """The tiering engine over the file data (None without [tier]): built before the operations,
    which are given its eviction."""
    if reads is None:
        return None
    from awsomefsd.daemon.tiering import Tiering

    return Tiering(reads, data)


def assemble_core(storage: Storage, meta_log: LocalLog | ReplicatedFsLog, meta: MetaClient, allocator: NodeAllocator,
                  data: FileData, ops: Operations, metrics: Metrics, duties: DutyBook,
                  tiering: Tiering | None = None) -> Core:
    """The Core of built parts, its metrics registered."""
    core = Core(storage.device, storage.superblock, storage.store, storage.sm, meta_log, meta, allocator, data, ops,
                metrics, duties, tiering)
    metrics.add_collector(lambda: _collect(core))
    metrics.add_collector(core.duties.collect)
    if tiering is not None:
        metrics.add_collector(tiering.collect)
    return core


def _init_or_check_meta(store: MetaStore, sm: StateMachine, device: BlockDevice, sb: Superblock, settings: Settings, *,
                        init: bool, grant_all_to: int | None) -> None:
    """Check the metadata against the device and its founding record; make it when this node may
    (awsomefsd/daemon/ownership.py). A single node makes it only under a claim of the device's founding,
    and never where the record says it exists; a cluster founder (`init`) has its own."""
    state_dir = settings.node.state_dir
    identity = stored_identity(store)
    if identity is None:
        if grant_all_to is not None:
            if not init:
                record = read_founding(device)
                whose = f": it is with {record.describe()}" if record is not None and record.founded else ""
                raise NodeError(f"{state_dir} holds no metadata of {device.path}{whose}; give the state directory "
                                "of the node that serves it (--state)")
            settle_single_node(device, sb, store, sm, state_dir=state_dir, shared=settings.device.shared,
                               grant_all_to=grant_all_to)
            return
        if init:
            initialise_founder_store(store, sm, sb)
            log.info("initialised metadata for cluster %s", sb.cluster_id)
        return
    cluster, device_id = identity
    if cluster != str(sb.cluster_id):
        raise NodeError(
            f"metadata in {store.path} belongs to cluster {cluster}, but the device holds "
            f"cluster {sb.cluster_id}; point --state at this device's metadata or reformat"
        )
    load_metadata(store, sm)
    if device_id is not None and device_id != str(sb.device_id):
        raise NodeError(f"metadata in {store.path} was made for another device of cluster {sb.cluster_id}")
    if grant_all_to is None:
        check_member(device, state_dir)
    elif init:  # a single node's daemon (fsck, which may check any member's metadata, records nothing)
        settle_single_node(device, sb, store, sm, state_dir=state_dir, shared=settings.device.shared,
                           grant_all_to=grant_all_to)


def _transport_metrics(transport: Transport) -> Iterator[Metric]:
    """Which path serves the mount's requests: 1 for it, 0 for the other (none before INIT); what
    each read worker served and gave back; how often the reader's busy polls found a request."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    per_worker = transport.read_workers_served()
    if per_worker:
        served = CounterMetricFamily("awsomefs_read_worker_reads_served", "READs a read worker answered itself "
                                     "(docs/multicore.md)", labels=["worker"])
        forwarded = CounterMetricFamily("awsomefs_read_worker_requests_forwarded", "READs the daemon handed a "
                                        "read worker and it gave back for the daemon to serve", labels=["worker"])
        for index, reads, given_back in per_worker:
            served.add_metric([str(index)], reads)
            forwarded.add_metric([str(index)], given_back)
        yield served
        yield forwarded

    path = transport.serving_path()
    if path is None:
        return
    polls, polled = transport.busy_polls()
    looked = CounterMetricFamily("awsomefs_fuse_busy_polls", "times the reader looked for the next request before "
                                 "sleeping ([mount] busy_poll_us), by whether one came", labels=["result"])
    looked.add_metric(["found"], polled)
    looked.add_metric(["slept"], polls - polled)
    yield looked
    family = GaugeMetricFamily("awsomefs_fuse_path", "how FUSE requests reach this daemon: io_uring (FUSE over "
                               "io_uring) or read (/dev/fuse by read(), the fallback)", labels=["path"])
    for name in ("io_uring", "read"):
        family.add_metric([name], 1.0 if path == name else 0.0)
    yield family


def _collect(core: Core) -> Iterator[Metric]:
    dev = core.device
    yield counter("awsomefs_device_read_bytes", "bytes read from the device", dev.bytes_read)
    yield counter("awsomefs_device_written_bytes", "bytes written to the device", dev.bytes_written)
    yield counter("awsomefs_device_reads", "device read requests", dev.reads)
    yield counter("awsomefs_device_writes", "device write requests", dev.writes)
    yield gauge("awsomefs_free_blocks", "free data blocks (authoritative)", core.meta.free_blocks())
    yield gauge("awsomefs_data_blocks", "data blocks of the device (4 KiB each)", core.ops.total_blocks)
    yield counter("awsomefs_withheld_blocks", "blocks reserved for changes whose outcome stayed unknown, kept from "
                  "reuse until the allocator is rebuilt", core.allocator.withheld_blocks)
    yield gauge("awsomefs_dirty_bytes", "buffered bytes not yet written", core.data.total_dirty_bytes)
    yield counter("awsomefs_closed_batch_files", "closed files written in batches", core.data.batch.batched_files)
    behind = core.data.writer.io.behind
    yield counter("awsomefs_write_behind_runs", "flushed block runs a cluster member held for its next proposal "
                  "instead of writing them on the request's path (io/write_behind.py)", behind.held)
    yield counter("awsomefs_write_behind_dropped", "held block runs dropped unwritten: the lease they were "
                  "allocated under ended", behind.dropped)
    yield gauge("awsomefs_write_behind_bytes", "bytes held for the next proposal now", behind.bytes)
    yield gauge("awsomefs_meta_applied_index", "last applied metadata command", core.log.applied_index)
    yield gauge("awsomefs_meta_committed_index", "last durable metadata command", core.log.committed_index)
    sizes, core.log.batch_sizes[:] = list(core.log.batch_sizes), []
    for size in sizes:
        core.metrics.commit_batch.observe(size)


async def _reclaim_step(core: Core) -> None:
    """Return superseded extents to the allocator once their grace period has passed. A duty
    (awsomefsd/duty.py): a refusal (this node's lease epoch expired while it was paused, no
    leader) is logged and retried, never the end of the daemon."""
    now_ns = time.time_ns()
    first = core.meta.next_deferred_free()
    if first is not None and first.not_before_ns <= now_ns:
        await core.meta.propose(c.ReclaimFrees(now_ns))


def _notify(message: str) -> None:
    try:
        from awsomefsd import sdnotify
    except ImportError:
        return
    sdnotify.notify(message)


@dataclass(frozen=True)
class MemberSite:
    """What a cluster member lends the site link (repl/service.py): where the link runs when not
    here (the leader), the member's control socket handlers (the `site` commands join them), its
    credentials (the cluster's CA, which the other site pins) and every member's address."""

    elsewhere: Callable[[], str | None]
    control: dict[str, Callable[[dict[str, object]], Awaitable[dict[str, object]]]]
    credentials: NodeCredentials
    member_hosts: Callable[[], list[str]]
    """Every active member's host (its cluster address's), by node id."""


async def serve(core: Core, settings: Settings, *, ready: Callable[[str], None] | None = None,
                log_running: bool = False, purge_orphans: bool = True,
                runs_engines: Callable[[], bool] = lambda: True, member_site: MemberSite | None = None,
                successor_first: bool = True, invalidator: Invalidator | None = None,
                before_letting_go: Callable[[], None] = lambda: None) -> bool:
    """Mount (or continue a kept mount) and serve until unmounted or signalled; then flush,
    commit and unmount, or, on SIGUSR2, hand the mount over to the next daemon: True then.

    `log_running`: the metadata log is already driven by the caller (a cluster member starts it
    before the file system exists, to receive its state). `purge_orphans`: delete the inodes an
    unclean stop left unlinked but unfreed; only a node that knows no other node may hold them open
    does that (a cluster member does not). `runs_engines`: does this node run the cluster-wide
    engines (tiering) now: a single node always, a member while it leads. `successor_first`: under
    systemd SIGUSR2 starts the next daemon before handing over (daemon/handover.py; a cluster
    member's start cannot take over). `invalidator`: a cluster member's (its coherence fills it
    from the start): run here while the kernel is served, and what it has not sent goes to the
    next daemon at a hand-over, as a site link's does. `before_letting_go`: called at a hand-over
    once serving has stopped, while this process can still notify the kernel (a member has it
    look up again the names it cached for long in directories it is about to give back)."""
    from awsomefsd.daemon.handover import SuccessorFirst, watch_signals
    from awsomefsd.daemon.site_link import start_site
    from awsomefsd.fs.clock import use_kernel_clock
    from awsomefsd.fuse.eio import EioReporter
    from awsomefsd.fuse.invalidate import Invalidator, decode_targets, encode_targets
    from awsomefsd.fuse.kernel import takeover
    from awsomefsd.fuse.kernel.keeper import SystemdStore, descriptor_store
    from awsomefsd.fuse.kernel.workers import worker_config
    from awsomefsd.fuse.mount import bdi_of, prepare_mount_point, tune_bdi
    from awsomefsd.fuse.transport import make_transport

    mount = settings.mount.path
    if mount is None:
        raise NodeError("no mount point configured: set [mount] path or --mount")
    tiering = core.tiering
    store = descriptor_store(settings.mount.fd_keeper) if settings.mount.transport == "kernel" else None
    transport = make_transport(settings.mount.transport, core.ops, mount, allow_other=settings.mount.allow_other,
                               entry_timeout_s=settings.mount.entry_timeout_s,
                               attr_timeout_s=settings.mount.attr_timeout_s,
                               negative_timeout_s=settings.mount.negative_timeout_s,
                               writeback_cache=settings.mount.writeback_cache,
                               observe=core.metrics.observe_fuse,
                               report_eio=EioReporter(core.duties.node, core.metrics.count_eio),
                               state_dir=settings.node.state_dir, store=store, io_uring=settings.mount.io_uring,
                               read_workers=worker_config(settings), busy_poll_s=settings.mount.busy_poll_us / 1e6)
    core.metrics.add_collector(lambda: _transport_metrics(transport))
    # Only the parent is resolved: a stat of the mount point itself waits for a daemon to answer
    # it (the kernel's INIT, or a mount this daemon is about to continue).
    resolved = mount.parent.resolve() / mount.name
    adopted = transport.adopt()
    if not adopted:
        prepare_mount_point(mount)
        transport.mount()
    mounted = True
    handing_over = False
    record = settings.node.state_dir / MOUNT_RECORD
    record.write_text(f"{resolved}\n")

    def refuse(reason: str) -> None:
        log.warning("%s: not handing it over", reason)
        takeover.refuse(settings.node.state_dir, reason)

    async def hand_over() -> bool:
        """Stop serving and leave the mount to the next daemon; False when none could take it:
        no descriptor store, or a keeper that does not hold this mount now (restarted, gone)."""
        nonlocal handing_over
        if handing_over:
            return True
        if not transport.can_hand_over():
            refuse("no descriptor store keeps this mount ([mount] fd_keeper, or systemd's FileDescriptorStoreMax)")
            return False
        refused = await transport.confirm_kept()
        if refused is not None:
            refuse(refused)
            return False
        handing_over = True
        # Not STOPPING=1: during a reload systemd would take that as the service stopping for
        # good and send SIGTERM once the reload ends. The exit status (75) says what happened.
        _notify("STATUS=handing the mount over to the next daemon")
        transport.stop_serving()
        return True

    # under systemd a reload starts the next daemon first (daemon/handover.py)
    successor = (SuccessorFirst(transport.kept_descriptor, hand_over, refuse)
                 if successor_first and isinstance(store, SystemdStore) else None)
    try:
        async with trio.open_nursery() as nursery:
            if not log_running:
                await nursery.start(core.log.run)
            # the flusher (FileData.run: timer, background flushes, compactor) restarts after an error
            await nursery.start(functools.partial(supervise, "flusher", core.data.run, book=core.duties))
            # Before the transport serves no request is served, so this still precedes any access;
            # it needs the log running (a Raft log orders commands only once it leads).
            purged = await core.ops.purge_orphans() if purge_orphans and not adopted else 0
            if purged:
                log.info("removed %d orphaned inodes left by an unclean stop", purged)
            nursery.start_soon(functools.partial(run_duty, "delayed-free reclaimer", functools.partial(_reclaim_step, core),
                                                 book=core.duties, period_s=RECLAIM_TICK_S))
            if tiering is not None:
                await nursery.start(functools.partial(tiering.run, book=core.duties, runs_engine=runs_engines))
            carried = decode_targets(transport.carried_invalidations())
            if invalidator is None and (settings.site.listen or carried):
                invalidator = Invalidator()  # the kernel's caches of what the other site changes
            if invalidator is not None:
                nursery.start_soon(invalidator.run)
                invalidator.submit(carried)  # sent once the kernel is served (below)
                if carried:
                    log.info("sending %d kernel cache invalidations the daemon before handed over", len(carried))
            if settings.site.listen:
                assert invalidator is not None
                await start_site(nursery, core, settings, member_site, invalidator)
            async def stopping() -> None:
                _notify("STOPPING=1")
                if transport.writeback_negotiated():
                    await _write_back_kernel_pages(mount)

            nursery.start_soon(watch_signals, nursery.cancel_scope, stopping, hand_over, successor)
            if successor is not None:
                nursery.start_soon(successor.run)
            if settings.metrics.enabled:
                port = core.metrics.serve(settings.metrics.host, settings.metrics.port)
                log.info("metrics on http://%s:%d/metrics", settings.metrics.host, port)
            if settings.csi.socket is not None:
                from awsomefsd.daemon.volumes import start_csi

                await start_csi(nursery, core, settings)
            nursery.start_soon(_watchdog)

            async def fuse_main() -> None:
                nonlocal handing_over
                while True:
                    await transport.serve()
                    if not handing_over:
                        break  # unmounted from outside (umount, fusermount -u)
                    # The requests are drained; the keeper may have gone meanwhile. Asked once more
                    # right before this daemon lets go of its descriptor, or the mount would end.
                    refused = await transport.confirm_kept()
                    if refused is None:
                        break
                    refuse(refused)
                    handing_over = False
                    transport.resume_serving()
                nursery.cancel_scope.cancel()  # handed over, or unmounted

            nursery.start_soon(fuse_main)
            # a stat of the root is answered only once the kernel's INIT is done: then we serve
            await trio.to_thread.run_sync(os.stat, mount)
            # after INIT, which clamps read-ahead to what libfuse asked for
            tune_bdi(mount, writeback_cache=transport.writeback_negotiated())
            use_kernel_clock(transport.writeback_negotiated())
            if transport.writeback_negotiated():  # a snapshot must see what the kernel still holds
                core.data.kernel_writeback = functools.partial(_write_back_kernel_pages, mount)
                bdi = bdi_of(mount)  # the kernel holds no more written pages than the device takes
                if bdi is not None:
                    transport.bound_cached_writes(bdi)
            _notify("READY=1")
            if ready is not None:
                ready(str(mount))
    finally:
        with trio.CancelScope(shield=True):
            if handing_over:
                # Every request read is answered; what this daemon acknowledged becomes durable
                # before the next one serves the mount (docs/fuse-transport.md, Restarts).
                await core.ops.sync_all()
                log.info("hand-over: what this daemon acknowledged is durable")
                before_letting_go()
                transport.hand_over(core.ops.handles.export(),
                                    encode_targets(invalidator.left()) if invalidator is not None else None)
                log.info("handed the mount at %s over to the next daemon", mount)
                if successor is not None:
                    successor.make_main()
            elif mounted:
                transport.close()
                record.unlink(missing_ok=True)
            if not handing_over:
                try:
                    await core.ops.sync_all()
                except Exception:
                    log.exception("flushing buffered data at shutdown failed")
    return handing_over


KERNEL_WRITEBACK_DEADLINE_S = 60.0


async def _write_back_kernel_pages(mount: Path) -> None:
    """Have the kernel send the written pages it keeps for the mount (the writeback cache) while
    the session still serves: before a stop (nothing would receive them after) and before a
    snapshot (it must hold them). Bounded, and logged when it fails: a stop goes on regardless."""
    from awsomefsd.fuse.mount import sync_mount

    with trio.move_on_after(KERNEL_WRITEBACK_DEADLINE_S) as scope:
        try:
            await trio.to_thread.run_sync(sync_mount, mount, abandon_on_cancel=True)
        except OSError as exc:
            log.error("writing back the kernel's cached pages of %s failed: %s", mount, exc)
    if scope.cancelled_caught:
        log.error("the kernel's cached pages of %s were not written back within %.0f s", mount,
                  KERNEL_WRITEBACK_DEADLINE_S)


async def _watchdog() -> None:
    try:
        from awsomefsd import sdnotify
    except ImportError:
        return
    interval = sdnotify.watchdog_interval_s()
    if not interval:
        return
    while True:
        sdnotify.notify("WATCHDOG=1")
        await trio.sleep(interval / 2)


def print_ready(mount: str) -> None:
    print(f"awsomefsd: mounted {mount}", flush=True)
    sys.stdout.flush()


__all__ = ["Core", "DeviceError", "NodeError", "Storage", "build_core", "open_core", "open_storage", "print_ready",
           "serve"]
