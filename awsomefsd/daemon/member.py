"""A cluster member: the same file system as a single node, with its metadata on a replicated
Raft group, its device writes fenced by a liveness lease, and coherence across nodes.

Start-up order (each step needs the previous one):
  1. storage (device + node-local LMDB); a joining node's store stays empty until step 4;
  2. the Raft log, the transport (mTLS listener: Raft + Member.Forward) and the control socket;
  3. founder's first start only: elect itself, `InitCluster` (CA, token verifier, the member table)
     and claim its first allocation group;
  4. wait until this node holds the cluster's state (a joiner: the leader adds it as a learner and
     sends a snapshot) and has caught up (ReadIndex);
  5. the file system (allocator over the node's own groups, FileData, Operations), the liveness
     lease (write fence), group keeper, coherence, leader duties, join listener, zeroconf;
  6. mount and serve (node.serve) until signalled; then give back the write leases (nobody waits
     for a stopped node) and log the clean stop.

Every background task here is a duty (awsomefsd/duty.py): its errors are logged once per kind,
counted and retried; only an operator's signal or an unrecoverable local fault stops the daemon.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from awsomefsd.cluster.ca import ClusterCA, Revocations, fingerprint
from awsomefsd.cluster.coherence import ClusterCoherence
from awsomefsd.cluster.discovery import Advertisement, Peer
from awsomefsd.cluster.duties import GroupKeeper, LeaderDuties, LeaseEpoch, LeaseSettings, LivenessLease
from awsomefsd.cluster.join_service import JoinService
from awsomefsd.cluster.record_keeper import keep_founding_record
from awsomefsd.cluster.rpc import (
    CONTROL_LIMITS,
    HOLDER_METHODS,
    ControlError,
    ControlService,
    MemberService,
    ask_holder,
    ask_log_level,
    ask_progress,
    ask_read_point,
)
from awsomefsd.cluster.state import (
    MemberState,
    control_socket,
    listens_everywhere,
    load_token,
    save_token,
    token_seeds,
)
from awsomefsd.cluster.tls import (
    NodeCredentials,
    RevocationGuard,
    authenticated_peer,
    channel_credentials,
    channel_options,
    join_server_credentials,
    server_credentials,
    wire_security,
)
from awsomefsd.cluster.token import JoinToken, TokenVerifier
from awsomefsd.config import Settings
from awsomefsd.config.addresses import split_host_port
from awsomefsd.daemon.member_metrics import collect_member_metrics
from awsomefsd.daemon.node import (
    Core,
    MemberSite,
    NodeError,
    Storage,
    assemble_core,
    file_data,
    node_allocator,
    open_storage,
    serve,
    tier_reads,
    tiering_over,
)
from awsomefsd.duty import DutyBook, is_fatal, one_line, retry_until_done, supervise
from awsomefsd.fs import forwarding
from awsomefsd.fs.data import FileData
from awsomefsd.fs.handles import Handles
from awsomefsd.fs.operations import Operations
from awsomefsd.fuse.invalidate import Invalidator, kernel_caches
from awsomefsd.io.fence import WriteFence
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.levels import HOLDER_WIRE_LEVEL, LOG_LEVEL, READ_POINT_WIRE_LEVEL
from awsomefsd.meta.replication.forwarding import Forwarder, accept_forwarded
from awsomefsd.meta.replication.fs_log import ReplicatedFsLog
from awsomefsd.meta.replication.settings import NodeSettings
from awsomefsd.meta.replication.transport import RaftTransport
from awsomefsd.metrics import Metrics
from awsomefsd.rpc.bridge import serve_grpc

log = logging.getLogger(__name__)

CATCH_UP_TIMEOUT_S = 120.0
FIRST_LEASE_TIMEOUT_S = 60.0
STATUS_ASK_S = 3.0
STOP_RELEASE_S = 5.0
RAFT_SETTINGS = NodeSettings(tick_ms=50, election_ticks=20, heartbeat_ticks=2, persist_in_thread=False)
"""Election timeout 1-2 s (20 ticks of 50 ms, randomised up to twice that): a loaded 2-core test
machine must not depose a leader for a slow fsync; a dead leader is replaced within ~2 s."""


@dataclass
class Founding:
    """What `init` (or a node founding with the cluster token) decided, applied once it leads."""

    ca: ClusterCA
    token: JoinToken
    voters_target: int
    on_founded: Callable[[], None] | None = None
    """Run (in a thread) once the cluster's first state commits: records FOUNDED on the device."""


@dataclass
class Member:
    settings: Settings
    state: MemberState
    creds: NodeCredentials
    storage: Storage
    raft: ReplicatedFsLog
    meta: MetaClient
    transport: RaftTransport
    revocations: Revocations
    epoch: LeaseEpoch
    invalidator: Invalidator = field(default_factory=Invalidator)
    core: Core | None = None
    lease: LivenessLease | None = None
    groups: GroupKeeper | None = None
    coherence: ClusterCoherence | None = None
    duties: LeaderDuties | None = None
    join_service: JoinService | None = None
    started_ns: int = field(default_factory=time.time_ns)
    _membership_changed: bool = False  # set inside an apply, acted on after it (after_apply)
    _verifier: bytes | None = None  # the join verifier the join service was last given

    @property
    def node_id(self) -> int:
        return self.state.node_id

    @property
    def state_dir(self) -> Path:
        return self.settings.node.state_dir

    # --- peers and revocations follow the member table ------------------------------------------
    def sync_peers(self) -> None:
        for n, record in self.meta.members().items():
            if n == self.node_id:
                continue
            if record.active:
                self.transport.add_peer(n, record.address)
            else:
                self.transport.remove_peer(n)
        self.revocations.replace(self.meta.revoked_serials())
        verifier = self.meta.join_verifier()
        if self.join_service is not None and verifier is not None and verifier != self._verifier:
            self.join_service.rotate(TokenVerifier.from_bytes(verifier))
        self._verifier = verifier

    def observe(self, command: object, result: Any, _mine: bool) -> None:
        if isinstance(command, (cc.InitCluster, cc.AddMember, cc.UpdateMemberAddress, cc.RemoveMember,
                                cc.SetJoinVerifier)):
            self.mark_membership_changed()

    def mark_membership_changed(self) -> None:
        self._membership_changed = True

    def after_apply(self, _index: int) -> None:
        if self._membership_changed:
            self._membership_changed = False
            self.sync_peers()

    # --- the join service's callbacks --------------------------------------------------------------
    async def admit(self, request: Any) -> int:
        if not request.address:
            raise ControlError("the joiner did not say where it listens")
        node: int = await self.raft.propose(cc.AddMember(
            request.name or "", request.address, _join_address(request.address), time.time_ns()))
        log.info("admitted %s at %s as node %d", request.name or "a node", request.address, node)
        return node

    async def record_issued(self, identity: Any, _peer: str) -> None:
        await self.raft.propose(cc.SetMemberCert(identity.node_id, format(identity.serial, "x")))

    def member_addresses(self) -> dict[int, str]:
        return {n: m.address for n, m in self.meta.members().items() if m.active}

    # --- the control socket ----------------------------------------------------------------------
    def control_handlers(self) -> dict[str, Any]:
        async def token(_body: dict[str, Any]) -> dict[str, Any]:
            text = load_token(self.state_dir)
            if text is None:
                raise ControlError("this node holds no join token; run `awsomefsd token rotate` to make one")
            return {"token": text}

        async def rotate(_body: dict[str, Any]) -> dict[str, Any]:
            info = self.meta.cluster_info()
            if info is None:
                raise ControlError("this node has not received the cluster's state yet")
            from cryptography import x509

            ca_cert = x509.load_pem_x509_certificate(info.ca_cert_pem)
            new = JoinToken.generate(self.state.cluster_uuid, fingerprint(ca_cert), seeds=token_seeds(self.state.listen))
            await self.raft.propose(cc.SetJoinVerifier(new.verifier().to_bytes()))
            save_token(self.state_dir, new.encode())
            log.info("join token rotated")
            return {"token": new.encode()}

        async def remove(body: dict[str, Any]) -> dict[str, Any]:
            node = int(body["node"])
            if self.meta.member(node) is None:
                raise ControlError(f"no node {node} in this cluster")
            try:
                await self.raft.propose(cc.RemoveMember(node, time.time_ns()))
            except Exception as exc:
                raise ControlError(f"removing node {node} failed: {exc}") from None
            return {"removed": node}

        async def status(body: dict[str, Any]) -> dict[str, Any]:
            # {"lag": false}: this node's view only, at once (no question to the leader)
            return await self.status_with_lag() if body.get("lag", True) else self.status()

        return {"token": token, "rotate": rotate, "remove": remove, "status": status}

    def progress(self) -> dict[str, Any]:
        """What only the leader knows: how far each member's log matches its own (Member.Progress)."""
        raft = self.raft.node.status()
        return {"leader": raft["leader"], "term": raft["term"], "last_index": raft["last_index"],
                "match_index": raft["match_index"] if raft["leader"] == self.node_id else {}}

    async def status_with_lag(self) -> dict[str, Any]:
        """`status`; on a follower the members' lag comes from the leader (only it tracks it)."""
        raft = self.raft.node.status()
        leader = raft["leader"]
        if not leader or leader == self.node_id:
            return self.status()
        try:
            with trio.fail_after(STATUS_ASK_S):
                progress = await ask_progress(self.transport.channel_to, leader)
        except Exception as exc:  # any failure: the status shows lag as unknown, and why
            if is_fatal(exc):
                raise
            return self.status(lag_error=f"the leader (node {leader}) did not say: {one_line(exc)}")
        return self.status(progress=progress)

    def status(self, *, progress: dict[str, Any] | None = None, lag_error: str | None = None) -> dict[str, Any]:
        raft = self.raft.node.status()
        members = self.meta.members()
        groups = self.meta.group_owners()
        nodes = []
        last, matches = raft["last_index"], raft["match_index"]
        if progress is not None and progress.get("match_index"):
            last, matches = int(progress["last_index"]), progress["match_index"]
        for n, record in sorted(members.items()):
            role = ("leader" if raft["leader"] == n else "voter" if n in raft["voters"]
                    else "learner" if n in raft["learners"] else "none")
            match = matches.get(str(n)) if raft["leader"] == self.node_id or progress is not None else None
            nodes.append({
                "id": n, "name": record.name, "address": record.address, "state": record.state,
                "certificate_serial": record.serial,
                "role": role, "lease_epoch": record.epoch, "expired": record.expired,
                "groups": sum(1 for owner in groups.values() if owner == n),
                "lag": None if match is None else max(0, last - match),
                "link": None if n == self.node_id else self.transport.link(n),
            })
        return {
            "cluster_id": self.state.cluster_id, "node_id": self.node_id, "listen": self.state.listen,
            "raft": raft, "nodes": nodes,
            "lease": None if self.lease is None else {
                "epoch": self.lease.epoch, "renewals": self.lease.renewals,
                "fence_open": self.storage.device.fence.is_open(),
                "remaining_s": round(self.storage.device.fence.remaining_s(), 3),
            },
            "mount": str(self.settings.mount.path) if self.settings.mount.path else None,
            "device": str(self.settings.device.path),
            "stalls": self.raft.stalls,
            "log_level": {"cluster": self.meta.log_level(), "this_build": LOG_LEVEL,
                          "rounds_asked": None if self.duties is None else self.duties.level_rounds},
            "invalidations": self.invalidator.invalidations,
            "lag_from": "this node" if raft["leader"] == self.node_id else
                        f"node {raft['leader']}" if progress is not None else None,
            "lag_error": lag_error,
            "duty_errors": None if self.core is None else self.core.duties.total(),
            "write_leases": None if self.coherence is None else {
                "held": len(self.coherence.held), "waits": self.coherence.lease_waits,
                "timeouts": self.coherence.lease_timeouts, "longest_wait_s": round(self.coherence.lease_wait_max_s, 3),
            },
            "ahead": {
                "pending": self.meta.ahead.pending, "acknowledged": self.meta.ahead.ran_ahead,
                "lost": self.meta.ahead.losses,
                "delegations": None if self.coherence is None else self.coherence.delegations_held(),
                "sent": None if self.core is None else self.core.ops.forward_counts.creates,
                "served": None if self.core is None else self.core.ops.forward_counts.served,
            },
        }


def open_member(settings: Settings, state: MemberState, creds: NodeCredentials, *, founding: bool,
                peers: dict[int, str] | None = None) -> Member:
    # Closed until the liveness lease is first renewed (LivenessLease keeps it in step).
    fence = WriteFence(margin_s=min(0.5, settings.cluster.lease_margin_s))
    storage = open_storage(settings, bootstrap=founding, grant_all_to=None, fence=fence)
    if str(storage.superblock.cluster_id) != state.cluster_id:
        storage.close()
        raise NodeError(f"the device {settings.device.path} belongs to cluster {storage.superblock.cluster_id}, "
                        f"not to this node's cluster {state.cluster_id}")
    revocations = Revocations()
    cluster_id = state.cluster_uuid
    transport = RaftTransport(
        state.node_id, {n: a for n, a in (peers or {}).items() if n != state.node_id},
        staging_dir=settings.node.state_dir / "raft-staging",
        server_credentials=server_credentials(creds),
        channel_credentials=channel_credentials(creds),
        channel_options=lambda peer: channel_options(cluster_id, peer),
        peer_identity=lambda ctx: authenticated_peer(ctx, creds.ca_cert, revocations).node_id,
        guard=lambda servicer: RevocationGuard(servicer, lambda: creds.ca_cert, revocations),
        wire_security=wire_security(creds, revocations),
    )
    epoch = LeaseEpoch(state.node_id)
    raft_settings = replace(RAFT_SETTINGS, snapshot_entries=settings.cluster.snapshot_entries)
    raft = ReplicatedFsLog(storage.store, storage.sm, node_id=state.node_id, settings=raft_settings,
                           bootstrap_voters=(state.node_id,) if founding else (), stall_s=settings.cluster.stall_s,
                           before_commit=storage.device.sync_written, fence_epoch=epoch.fencing,
                           send=transport.send, sent=transport.sent,
                           forward=Forwarder(transport.channel_to, wire=transport.forward))
    member = Member(settings, state, creds, storage, raft, MetaClient(raft, storage.sm), transport, revocations,
                    epoch)
    raft.commands.observers.append(member.observe)
    transport.read_point = raft.node.lease_read_point  # a follower's read barrier (design note 153)
    raft.node.ask_read_point = functools.partial(ask_read_point, transport,
                                                 lambda: member.meta.log_level() >= READ_POINT_WIRE_LEVEL)
    raft.applied_listeners.append(member.after_apply)
    raft.commands.on_snapshot.append(member.mark_membership_changed)
    if member.meta.cluster_info() is not None:
        level = member.meta.log_level()
        if level > LOG_LEVEL:
            storage.close()
            raise NodeError(downgrade_refused(level))
        member.sync_peers()
    return member


assert set(HOLDER_METHODS) == set(forwarding.KINDS), "every kind fs/forwarding.py sends has a Member method"


def downgrade_refused(cluster_level: int) -> str:
    """Why a member does not start on this build: its state records a cluster log level above the
    one this build decodes, so it would stop at the first command it cannot decode."""
    return (f"the cluster's metadata log is at level {cluster_level}; this build decodes up to level {LOG_LEVEL}. "
            "Run a build at least as new as the cluster's: downgrades are not supported "
            "(docs/cluster.md, \"Rolling upgrades\")")


async def run_member(member: Member, *, founding: Founding | None = None,
                     ready: Callable[[str], None] | None = None,
                     on_listening: Callable[[Member], None] | None = None) -> bool:
    """Serve as a member until stopped; True when the mount was handed over to the next daemon
    (SIGUSR2), which then continues it (the caller exits EXIT_HANDED_OVER)."""
    settings = member.settings
    async with trio.open_nursery() as nursery:
        service = MemberService(member.raft.node, progress=member.progress)
        bound = await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: member.transport.run(
                member.raft.node, member.state.listen, extra_bindings=[service.binding()],
                accept_forward=functools.partial(accept_forwarded, member.raft.node), task_status=task_status))
        log.info("node %d: cluster listener on %s", member.node_id, bound)
        control = control_socket(member.state_dir)
        handlers = member.control_handlers()  # the site link adds its own ([site] listen)
        await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: serve_grpc(
            [ControlService(handlers).binding()], f"unix://{control}", limits=CONTROL_LIMITS, task_status=task_status))
        await nursery.start(member.raft.run)
        await nursery.start(member.meta.run_pipeline)
        if founding is not None:
            await _found(member, founding)
            if founding.on_founded is not None:
                await trio.to_thread.run_sync(founding.on_founded)
        await _wait_for_state(member)
        if on_listening is not None:
            on_listening(member)
        core = _assemble(member)
        # another member's look or create (note 145), on gRPC and on the wire (note 147)
        service.serve_forwarded = member.transport.serve_holder = core.ops.serve_forwarded
        core.ops.forward = functools.partial(ask_holder, member.transport,
                                             lambda: member.meta.log_level() >= HOLDER_WIRE_LEVEL)
        assert member.lease is not None and member.groups is not None and member.coherence is not None
        assert member.duties is not None
        await nursery.start(member.lease.run)
        with trio.move_on_after(FIRST_LEASE_TIMEOUT_S):
            await member.lease.first_renewal.wait()
        if not member.lease.first_renewal.is_set():
            log.warning("no lease renewal yet: writes fail with EIO until one succeeds")
        book = core.duties
        await nursery.start(member.groups.run)
        await nursery.start(functools.partial(supervise, "write-lease hand-over", member.coherence.run, book=book))
        await nursery.start(functools.partial(supervise, "orphan release", member.coherence.run_orphans, book=book))
        member.coherence.pending_orphans()
        await nursery.start(member.duties.run)
        keep_founding_record(nursery, Path(str(settings.device.path)), member.member_addresses, member.raft.node.raw, book)
        nursery.start_soon(functools.partial(retry_until_done, "address update", functools.partial(_update_address, member),
                                             book=book))
        await nursery.start(_serve_joins, member)
        if settings.cluster.advertise:
            nursery.start_soon(_advertise, member)
        handed_over = await serve(core, settings, ready=ready, log_running=True, purge_orphans=False,
                                  successor_first=False, invalidator=member.invalidator,
                                  before_letting_go=member.coherence.names_leaving,
                                  runs_engines=lambda: member.raft.node.raw.is_leader,
                                  member_site=MemberSite(functools.partial(_link_elsewhere, member), handlers,
                                                         member.creds, functools.partial(_member_hosts, member)))
        how = "the mount handed over" if handed_over else "unmounted"
        with trio.move_on_after(STOP_RELEASE_S) as releasing:
            released = await member.coherence.release_all()
            log.info("node %d stopped cleanly: data flushed, %s, %d write leases given back", member.node_id, how,
                     released)
        if releasing.cancelled_caught:
            log.warning("node %d stopped: data flushed, %s; its write leases were not given back within %.0fs (no "
                        "leader: the other members stop too, or are cut off): they lapse with its node lease",
                        member.node_id, how, STOP_RELEASE_S)
        nursery.cancel_scope.cancel()
    return handed_over


def _link_elsewhere(member: Member) -> str | None:
    """Where the site link runs when not on this member: on the leader (repl/service.py)."""
    raw = member.raft.node.raw
    if raw.is_leader:
        return None
    leader = member.meta.member(raw.leader_id) if raw.leader_id else None
    if leader is None:
        return "no member of this site leads now (an election)"
    return f"node {leader.node} ({leader.name}, {leader.address}) leads this site"


def _member_hosts(member: Member) -> list[str]:
    """Every active member's host, by node id (the site link's default addresses: the same list
    whichever member says it, so the other site does not store it anew at each leader change)."""
    members = sorted(member.meta.members().values(), key=lambda m: m.node)
    return [split_host_port(m.address)[0] for m in members if m.active]


async def _found(member: Member, founding: Founding) -> None:
    """The founder's first start: it leads its one-member group; record the cluster in it."""
    if member.meta.cluster_info() is not None:
        return
    await member.raft.wait_for_leader(30)
    layout = member.storage.superblock.layout
    host = socket.gethostname()
    await member.raft.propose_outcome(cc.InitCluster(
        founding.ca.cert_pem, founding.ca.key_pem, founding.token.verifier().to_bytes(), founding.voters_target,
        layout.data_start_block, layout.ag_blocks, layout.ag_count, member.node_id,
        member.settings.node.name or host, member.state.listen, _join_address(member.state.listen),
        time.time_ns()), fenced=False)
    await member.raft.propose_outcome(c.SetLogLevel(LOG_LEVEL, (member.node_id,)), fenced=False)  # its only member
    member.sync_peers()


async def _wait_for_state(member: Member) -> None:
    """Until this node holds the cluster's state and has applied everything committed so far."""
    with trio.fail_after(CATCH_UP_TIMEOUT_S):
        while member.meta.member(member.node_id) is None:
            await trio.sleep(0.05)
        while True:
            try:
                await member.raft.node.read_barrier()
                return
            except Exception as exc:
                log.debug("catching up: %s", exc)
                await trio.sleep(0.1)


def _assemble(member: Member) -> Core:
    """The file system with the cluster's parts between its own, each built after what it needs:
    the lease epoch, the allocator and the group keeper (which claims space for it), the tier's
    reads (with [tier]), the file data, the handles, the coherence (which flushes files and asks
    what this node holds), the tiering engine, the POSIX operations over them, then the lease
    (which, when the cluster expired it, reloads the groups and the coherence and drops the
    buffered writes) and the leader's duties."""
    settings, meta, raft = member.settings, member.meta, member.raft
    node_id = member.node_id
    layout = member.storage.superblock.layout
    book = DutyBook(f"node {node_id}")
    metrics = Metrics()
    epoch = member.epoch
    epoch.load(meta)  # every proposal from here on is fenced
    allocator = node_allocator(meta, layout, node_id)
    groups = GroupKeeper(node_id, meta, allocator, epoch.current, low_blocks=layout.ag_blocks, book=book)
    reads = tier_reads(settings, meta, member.storage.superblock)
    data = file_data(settings, member.storage.device, meta, allocator, metrics, claim_space=groups.claim_now,
                     tiered=None if reads is None else reads.source)
    groups.keep_blocks = data.buffer.dirty_blocks  # what it keeps when it gives groups to others
    handles = Handles(meta, track_lookups=True, kernel_caches=kernel_caches)
    coherence = ClusterCoherence(node_id, meta, member.invalidator, epoch.current, flush=data.flush,
                                 lose_file=data.lose_file,
                                 holds=handles.holds, kernel_may_cache=handles.kernel_may_cache,
                                 wait_lease=epoch.wait_renewed,
                                 read_barrier=raft.node.read_barrier, lease_valid=member.storage.device.fence.is_open,
                                 strict=settings.mount.coherence == "strict",
                                 held_names_s=settings.mount.held_entry_timeout_s)
    # the one cycle: coherence flushes through data, and data asks coherence what it may do
    data.compactor.may_rewrite = coherence.holding  # compaction and recall
    data.writer.may_run_ahead = coherence.fresh
    meta.ahead.before_propose = data.writer.settle_behind  # held blocks reach the device first
    tiering = tiering_over(reads, data)
    ops = Operations(meta, data, handles, coherence=coherence, total_blocks=layout.data_blocks,
                     evict=None if tiering is None else tiering.evict)
    core = assemble_core(member.storage, raft, meta, allocator, data, ops, metrics, book, tiering)
    leases = LeaseSettings(settings.cluster.lease_s, settings.cluster.renew_s, settings.cluster.lease_margin_s)
    lease = LivenessLease(node_id, raft, meta, member.storage.device.fence, epoch, leases,
                          on_expired=functools.partial(_expired, groups, coherence, data), book=book)
    duties = LeaderDuties(node_id, raft, meta, leases, book=book,
                          ask_level=functools.partial(ask_log_level, member.transport.channel_to))
    raft.commands.observers.extend([coherence.observe, groups.observe, duties.observe])
    raft.commands.on_snapshot.append(functools.partial(_after_snapshot, groups, coherence))
    coherence.reload()
    member.core, member.lease, member.groups, member.coherence, member.duties = core, lease, groups, coherence, duties
    metrics.add_collector(lambda: collect_member_metrics(member))
    return core


def _expired(groups: GroupKeeper, coherence: ClusterCoherence, data: FileData) -> None:
    """The cluster expired our lease while we could not renew it (paused, partitioned)."""
    groups.reload()
    coherence.reload()
    data.lose_buffers("this node's liveness lease expired; other nodes may have written since")


def _after_snapshot(groups: GroupKeeper, coherence: ClusterCoherence) -> None:
    coherence.reload()
    groups.reload()


async def _update_address(member: Member) -> None:
    """This node's record says where it listens now and which certificate it holds: the
    founder's was issued before there was a cluster to record it in, and without its serial
    `node remove` could not revoke it (here, or at a linked site)."""
    record = member.meta.member(member.node_id)
    serial = format(member.creds.cert.serial_number, "x")
    if record is not None and not record.serial:
        log.info("node %d records its certificate's serial %s", member.node_id, serial)
        await member.raft.propose(cc.SetMemberCert(member.node_id, serial))
    if record is not None and record.address != member.state.listen:
        log.info("node %d now listens on %s (was %s)", member.node_id, member.state.listen, record.address)
        await member.raft.propose(cc.UpdateMemberAddress(member.node_id, member.state.listen,
                                                        _join_address(member.state.listen)))


def _join_address(listen: str) -> str:
    return Peer.from_seed(listen).join_address


async def _serve_joins(member: Member, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """The join listener (server-only TLS; see docs/cluster-security.md), with the CA from the
    replicated state: any member can admit a node."""
    info = member.meta.cluster_info()
    assert info is not None, "a member serves joins once it holds the cluster's state"
    service = JoinService(ClusterCA.from_pem(info.ca_cert_pem, info.ca_key_pem),
                          TokenVerifier.from_bytes(info.join_verifier),
                          member.admit, member.record_issued, peers=member.member_addresses,
                          log_level=member.meta.log_level)
    member.join_service = service
    await serve_grpc([service.binding()], _join_address(member.state.listen),
                     credentials=join_server_credentials(member.creds), task_status=task_status)


async def _advertise(member: Member) -> None:
    host, port = split_host_port(member.state.listen)
    addresses = None if listens_everywhere(member.state.listen) else [host]
    instance = f"awsomefs-{member.state.cluster_id[:8]}-n{member.node_id}"
    try:
        ad = Advertisement(uuid.UUID(member.state.cluster_id), instance, port, addresses=addresses)
        await trio.to_thread.run_sync(ad.__enter__)
    except OSError as exc:
        log.warning("zeroconf advertisement failed (%s); joiners need --peer", exc)
        return
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(ad.__exit__, None, None, None)
