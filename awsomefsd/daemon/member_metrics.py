"""A cluster member's Prometheus series: what an operator alerts on in a cluster (leadership, the
liveness lease, stalls, fencing, write leases and delegations). Kept apart from the member's
assembly (daemon/member.py) so that file stays about putting a member together."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import CounterMetricFamily, Metric

from awsomefsd.metrics import counter, gauge

if TYPE_CHECKING:
    from awsomefsd.daemon.member import Member


def collect_member_metrics(member: Member) -> Iterator[Metric]:
    """What an operator alerts on in a cluster: leadership, lease, stalls, fencing, hand-overs."""
    node = member.raft.node
    raw = node.raw
    yield gauge("awsomefs_raft_term", "current Raft term", raw.raft.term)
    yield gauge("awsomefs_raft_is_leader", "1 while this node leads the metadata group", float(raw.is_leader))
    yield gauge("awsomefs_raft_leader_id", "the leader this node knows of (0: none)", raw.leader_id)
    yield counter("awsomefs_raft_forward_retries", "forwarded proposals sent again", node.forward_retries)
    yield counter("awsomefs_raft_lease_reads", "read barriers this leader answered from its lease, without a "
                  "heartbeat round", node.lease_reads)
    transport = member.transport
    yield counter("awsomefs_raft_read_points_asked", "read barriers this follower asked the leader's lease for on the "
                  "wire (design note 153)", transport.calls.read_points_asked)
    yield counter("awsomefs_raft_read_points_answered", "read points this leader gave followers from its lease on "
                  "the wire", transport.read_points_answered)
    yield counter("awsomefs_meta_stalls", "metadata operations that waited for a leader", member.raft.stalls)
    ahead = member.meta.ahead
    yield counter("awsomefs_meta_ran_ahead", "metadata changes acknowledged ahead of the log (directory delegations)",
                  ahead.ran_ahead)
    yield counter("awsomefs_meta_ahead_lost", "changes acknowledged ahead that the log then refused (each reported "
                  "by the next fsync)", ahead.losses)
    yield counter("awsomefs_meta_unpredictable", "metadata changes that could not run ahead after all (what a site "
                  "link captures of them needed the log) and were proposed and waited for", ahead.unpredictable)
    yield counter("awsomefs_meta_pipeline_proposals", "proposals carrying changes acknowledged ahead", ahead.proposals)
    yield gauge("awsomefs_meta_pipeline_pending", "changes acknowledged ahead and not decided yet", ahead.pending)
    fence = member.storage.device.fence
    yield gauge("awsomefs_lease_remaining_seconds", "time left on this node's liveness lease", fence.remaining_s())
    yield gauge("awsomefs_lease_fenced", "1 while device writes are fenced", float(not fence.is_open()))
    yield counter("awsomefs_fenced_writes", "device writes refused by the fence", fence.fenced_writes)
    if member.lease is not None:
        yield counter("awsomefs_lease_renewals", "liveness lease renewals", member.lease.renewals)
        yield counter("awsomefs_lease_expiries", "times this node found its lease expired", member.lease.refusals)
    if member.coherence is not None:
        co = member.coherence
        yield counter("awsomefs_write_leases_acquired", "file write leases acquired", co.leases_acquired)
        yield counter("awsomefs_write_leases_released", "file write leases handed to another node",
                      co.leases_released)
        yield counter("awsomefs_delegations_returned", "idle directory delegations given back", co.delegations_returned)
        yield counter("awsomefs_kernel_names_dropped", "times the kernel was told to look up again every name it "
                      "caches (a directory delegation left, or another node took one whose names it cached for long)",
                      co.names_forgotten)
        yield counter("awsomefs_delegation_refusals", "changes proposed through the log that the state machine "
                      "refused because another node held the directory's delegation (then proposed again, holding it)",
                      co.delegation_refusals)
        yield counter("awsomefs_write_lease_waits", "writes that waited for another node's lease", co.lease_waits)
        yield counter("awsomefs_write_lease_timeouts", "writes that gave up waiting for a write lease (EIO; "
                      "the log says why)", co.lease_timeouts)
        yield counter("awsomefs_write_lease_wait_seconds", "time writes spent waiting for write leases",
                      co.lease_wait_s)
        yield gauge("awsomefs_write_lease_wait_max_seconds", "the longest wait of a write for a write lease",
                    co.lease_wait_max_s)
        yield counter("awsomefs_write_lease_handover_failures", "hand-overs that failed (flush or proposal) "
                      "and were tried again", co.handover_failures)
        yield counter("awsomefs_orphan_releases", "ReleaseOrphans commands this node proposed (each releases, "
                      "in one log entry, the unlinked inodes nothing here holds)", co.orphan_releases)
        yield counter("awsomefs_catch_ups", "ReadIndex catch-ups (open, lookup)", co.catch_ups)
        yield counter("awsomefs_opens_held", "opens of files whose write lease this node held: no catch-up",
                      co.opens_held)
        yield counter("awsomefs_stale_reads", "catch-ups that found no leader and served local state",
                      co.stale_reads)
    if member.core is not None:
        sent = member.core.ops.forward_counts
        forwarded = CounterMetricFamily("awsomefs_forwarded", "looks and creates in directories other members hold, "
                                        "sent to those members (design note 145): answered no such name (look), made "
                                        "there (create), unanswered (failed: the usual way followed), made here for "
                                        "others (served)", labels=["kind"])
        for kind, value in (("look", sent.looks), ("create", sent.creates), ("failed", sent.failed),
                            ("served", sent.served)):
            forwarded.add_metric([kind], value)
        yield forwarded
        yield counter("awsomefs_holder_calls_on_wire", "looks and creates sent to a directory's holder on the Raft "
                      "wire (design note 147; the others went over gRPC: a member on an older build, or no wire "
                      "connection open)", member.transport.calls.holder_calls)
    yield counter("awsomefs_kernel_invalidations", "kernel cache invalidations", member.invalidator.invalidations)
    if member.duties is not None:
        yield counter("awsomefs_nodes_expired", "nodes this node expired as leader", member.duties.expired)
        yield counter("awsomefs_leader_changes", "changes of leader this node saw", member.duties.leader_changes)
