"""The filesystem's ReplicatedLog on the Raft node driver (`[meta] log = "raft"`).

The metadata state machine is the same as with LocalLog; commands travel as `meta/codec.py` bytes
through the Raft log, which lives in the metadata environment itself (tables `raft_log` and
`raft_meta`), so one LMDB transaction persists a Ready and applies its committed commands.

Differences from LocalLog a caller may rely on:
- durability: `propose` returns after the command is in the fsynced log and applied, so every
  acknowledged mutation is already durable and `barrier()` has nothing left to wait for. The
  price is latency: one log fsync (plus one device flush when data was written) per Ready, where
  LocalLog acknowledges from memory and syncs once per commit interval. docs/raft.md has figures.
- reads: `read_txn()` is a read-only snapshot, renewed after every apply; a caller must not hold
  one across an await of `propose` and expect to see the new state in it.
- refused commands: the state machine's FsError is part of the replicated outcome (every replica
  refuses the same command the same way); it is re-raised to the proposer. So is the EIO of a
  command whose apply met a bug (meta/isolation.py): it is undone alone, and the log goes on.

On a single node this is a one-member group that campaigns at start and is its own quorum. In a
cluster (awsomefsd/daemon/member.py) the same class runs one member of a 3- or 5-voter group:
- proposals are wrapped in `Fenced(node, epoch, ...)` so that the state machine refuses them once
  this node's liveness lease has expired (docs/cluster.md); a follower's are forwarded to the
  leader (forwarding.py);
- a proposal that meets no leader (an election in progress) waits for one and is retried, for up
  to `stall_s`: the "short stall" a mount sees when the leader dies; once a wait ran out, the next
  proposals fail at once until a leader is known again (`unavailable`). Only outcomes that prove the
  command was not appended (NotLeader, ProposalLost) are retried; a forwarded one whose fate is
  unknown is sent again under its id (forwarding.py) within the same budget;
- a lagging or new member receives a snapshot: a copy of the leader's metadata environment that
  replaces this one's contents in one transaction (`MetaStore.replace_contents`);
- `observers` see every applied command with its result, and whether this node proposed it: the
  cluster layer learns about members, leases and other nodes' changes (kernel cache invalidation)
  from them. They run inside the apply transaction and must only queue work.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import lmdb
import trio

from awsomefsd.meta import codec
from awsomefsd.meta import commands as c
from awsomefsd.meta.commands import R
from awsomefsd.meta.errors import FsError, LogAheadOfBuild, OutcomeUnknown
from awsomefsd.meta.isolation import apply_isolated
from awsomefsd.meta.levels import LEASE_READS_LEVEL
from awsomefsd.meta.raft import Message, Ready
from awsomefsd.meta.records import u64
from awsomefsd.meta.replication.driver import RaftNode
from awsomefsd.meta.replication.errors import NotLeader, ProposalLost, ProposalTimeout
from awsomefsd.meta.replication.forwarding import Forward
from awsomefsd.meta.replication.lmdb_storage import LmdbRaftStorage
from awsomefsd.meta.replication.settings import NodeSettings
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore

log = logging.getLogger(__name__)

GROW_HEADROOM_BYTES = 128 << 20
LEADER_WAIT_S = 30.0
STALL_S = 30.0
Observer = Callable[[object, Any, bool], None]
"""(command, result or FsError, proposed by this node) after each apply, inside its transaction:
each command a Batch or Fenced carried, one by one (`commands.applied`)."""
Outcome = tuple[Literal[True], R] | tuple[Literal[False], FsError]
"""A proposal's outcome: (True, its result) or (False, the FsError it was refused with)."""


class FsCommands:
    """Adapts the metadata StateMachine to the driver: bytes in, (ok, result-or-FsError) out."""

    def __init__(self, store: MetaStore, sm: StateMachine, node_id: int = 1) -> None:
        self.store = store
        self.sm = sm
        self.node_id = node_id
        self.applied_commands = 0
        self.observers: list[Observer] = []
        self.before_snapshot: list[Callable[[], None]] = []
        self.on_snapshot: list[Callable[[], None]] = []
        self.proposed: dict[bytes, c.Command[Any]] = {}
        """This node's commands in flight, by their encoding: their apply here need not decode
        what was just encoded (a batch's decoding costs as much as its apply). Commands are
        immutable values, so equal bytes are an equal command."""

    def apply(self, txn: lmdb.Transaction[bytes], index: int, command: bytes) -> Any:
        cmd = self.proposed.get(command) if self.proposed else None
        if cmd is None:
            try:
                cmd = codec.decode(command)
            except codec.UnknownCommand as exc:
                raise LogAheadOfBuild(f"log entry {index} holds a command this build cannot decode ({exc}): "
                                      "the cluster runs a newer build; run a build at least as new "
                                      "(downgrades are not supported)") from exc
        self.applied_commands += 1
        # LocalLog's counter, so `awsomefsd status` reads one applied index whichever log runs.
        txn.put(b"applied", u64(index), db=self.store.db["meta"])
        try:
            outcome: tuple[bool, Any] = True, apply_isolated(self.sm, txn, cmd)
        except FsError as exc:
            outcome = False, exc
        if self.observers:
            mine = isinstance(cmd, c.Fenced) and cmd.node == self.node_id
            for one, result in c.applied(cmd, outcome[1]):
                for observe in self.observers:
                    observe(one, result, mine)
        return outcome

    def install_snapshot(self, staged: Path) -> lmdb.Environment:
        """Copy the leader's environment into ours (one transaction), then rebuild the mirrors."""
        for hook in self.before_snapshot:
            hook()  # e.g. close read transactions: the map may have to grow
        self.store.replace_contents(staged)
        shutil.rmtree(staged, ignore_errors=True)
        with self.store.env.begin() as txn:
            if self.sm.meta_value(txn, b"format") is not None:
                self.sm.load(txn)
        for hook in self.on_snapshot:
            hook()
        return self.store.env


class ReplicatedFsLog:
    """ReplicatedLog over a one-member Raft group; see the module docstring."""

    def __init__(self, store: MetaStore, sm: StateMachine, *, node_id: int = 1,
                 settings: NodeSettings | None = None, bootstrap_voters: tuple[int, ...] | None = None,
                 stall_s: float = STALL_S, before_commit: Callable[[], None] | None = None,
                 fence_epoch: Callable[[], int | None] | None = None,
                 send: Callable[[list[Message]], None] | None = None, forward: Forward | None = None,
                 sent: Callable[[], Awaitable[None]] | None = None) -> None:
        """`before_commit` flushes the device before metadata that points at new data is durable;
        `fence_epoch` is the liveness-lease epoch every proposal is fenced with (a cluster member's;
        None from it: not fenced yet, before the member holds the cluster's state); `send`, `sent`
        and `forward` connect the group to its peers (RaftNode)."""
        self.store = store
        self.sm = sm
        self.commands = FsCommands(store, sm, node_id)
        settings = settings or NodeSettings(persist_in_thread=False, tick_ms=100)
        assert not settings.persist_in_thread, "the state machine's memory is owned by the trio thread"
        store.grow_if_needed(GROW_HEADROOM_BYTES)
        voters = (node_id,) if bootstrap_voters is None else bootstrap_voters
        self.before_commit = before_commit
        self.fence_epoch = fence_epoch
        self.applied_listeners: list[Callable[[int], None]] = []
        """Called with the applied index after each applied batch (on the trio thread)."""
        self.node = RaftNode(node_id, LmdbRaftStorage(env=store.env), self.commands, settings=settings,
                             bootstrap_voters=voters, send=send, sent=sent, forward=forward,
                             before_persist=self._before_persist, on_applied=self._on_applied,
                             lease_reads=self._every_member_keeps_the_lease)
        self.commands.before_snapshot.append(self._drop_reads)
        self.stall_s = stall_s
        self.stalls = 0
        self.unavailable = False
        """A wait for a leader ran out (`stall_s`) and no leader is known since: proposals fail at
        once until one is. The kernel repeats a lookup that failed with EIO (and applications
        retry): each repeat waiting a whole stall again kept an operation on a cut-off node blocked
        for twice the budget."""
        self._read: lmdb.Transaction[bytes] | None = None
        self.replays = 0

    def _every_member_keeps_the_lease(self) -> bool:
        """Every member's build keeps the promise lease reads rest on (LEASE_READS_LEVEL)."""
        level = self.sm.cluster.log_level(self.read_txn())
        return level is not None and level >= LEASE_READS_LEVEL

    # --- ReplicatedLog ----------------------------------------------------------------------------
    @property
    def applied_index(self) -> int:
        return self.node.applied

    @property
    def committed_index(self) -> int:
        return self.node.raw.raft.log.committed

    @property
    def batch_sizes(self) -> list[int]:
        return self.node.batch_sizes

    def read_txn(self) -> lmdb.Transaction[bytes]:
        if self._read is None:
            self._read = self.store.env.begin()
        return self._read

    async def propose(self, command: c.Command[R], *, epoch: int | None = None) -> R:
        outcome = await self.propose_outcome(command, epoch=epoch)
        if not outcome[0]:
            raise outcome[1]
        return outcome[1]

    def lease_epoch(self) -> int | None:
        return None if self.fence_epoch is None else self.fence_epoch()

    async def propose_outcome(self, command: c.Command[R], *, fenced: bool = True, epoch: int | None = None,
                              leader_only: bool = False) -> Outcome[R]:
        """(ok, result or FsError); waits out an election (up to `stall_s`) when there is no leader.
        `fenced=False` is for commands no liveness lease guards (RenewLease, ExpireNode); `epoch`
        fences with an epoch taken earlier (`lease_epoch`), else the current one.

        `leader_only`: a leader's decision from its own clock (ExpireNode): proposed here, at this
        term, once: never forwarded, never proposed again after an election. A leader that wakes
        from a pause still believes it leads and that members stopped renewing (its clock ran
        on, their renewals went to the new leader); carried out by the new leader, its expiry
        would take the groups of a member whose fence is open. If this node no longer leads, its
        entry cannot commit (a majority moved to a later term): the answer is FsError(EIO).

        Every failure reaches the caller as FsError (EIO when the metadata group could not be
        reached or the outcome is unknown): callers, background duties included, handle one
        exception type, and a proposal that timed out (ProposalTimeout: it may still be applied)
        is not mistaken for a bug."""
        sent: c.Command[Any] = command
        if fenced:
            epoch = self.lease_epoch() if epoch is None else epoch
            if epoch is not None:
                sent = c.Fenced(self.node.id, epoch, (command,))
        data = codec.encode(sent)
        self.commands.proposed[data] = sent
        try:
            return await self._propose_encoded(data, leader_only)
        finally:
            self.commands.proposed.pop(data, None)

    async def _propose_encoded(self, data: bytes, leader_only: bool) -> Outcome[Any]:
        if self.unavailable and self.node.raw.leader_id == 0:
            raise FsError(errno.EIO, f"metadata unavailable: no leader since the last wait for one ran out "
                          f"({self.stall_s:.0f}s)", cause="stall")
        self.unavailable = False
        deadline = trio.current_time() + self.stall_s
        stalled = False
        while True:
            try:
                # A forwarded proposal may be sent again (same id, de-duplicated) to every leader
                # elected meanwhile: it outlasts an election for as long as the stall budget lasts.
                budget = max(deadline - trio.current_time(), self.node.settings.proposal_timeout_s)
                result: Outcome[Any] = await self.node.propose(data, forward=not leader_only,
                                                                   forward_timeout_s=budget)
                return result
            except ProposalTimeout as exc:
                self.unavailable = self.node.raw.leader_id == 0
                raise OutcomeUnknown(f"the outcome of a metadata proposal is unknown: {exc}") from None
            except (NotLeader, ProposalLost) as exc:
                if leader_only:
                    raise FsError(errno.EIO, f"not proposed: this node no longer leads ({exc})", cause="stall") from None
                if trio.current_time() >= deadline:
                    self.unavailable = self.node.raw.leader_id == 0
                    raise FsError(errno.EIO, f"metadata unavailable: {exc}", cause="stall") from None
                if not stalled:
                    stalled = True
                    self.stalls += 1
                    log.info("metadata proposal waits for a leader (%s)", exc)
                await trio.sleep(self.node.settings.tick_ms / 1000)

    async def barrier(self) -> None:
        """Nothing to wait for: `propose` returns only after the log entry is fsynced."""

    def commit(self) -> None:
        """Nothing buffered: every acknowledged command is already durable."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the group. A single node (the only voter) campaigns and is started() once it leads;
        a cluster member is started() at once (`wait_for_leader` tells when proposals can go)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.node.run)
            if self.node.raw.status().conf_state.voters != (self.node.id,):
                task_status.started()
                return
            self.node.campaign()
            await self.wait_for_leader(LEADER_WAIT_S)
            log.info("metadata log: raft, one member, leader at term %d", self.node.raw.raft.term)
            task_status.started()

    async def wait_for_leader(self, timeout_s: float) -> int:
        with trio.fail_after(timeout_s):
            while self.node.raw.leader_id == 0:
                await trio.sleep(self.node.settings.tick_ms / 1000)
        return self.node.raw.leader_id

    def close(self) -> None:
        self._read = None

    # --- hooks ------------------------------------------------------------------------------------
    def _before_persist(self, rd: Ready) -> None:
        if self.before_commit is not None and rd.entries:
            self.before_commit()
        if self.store.needs_growth(GROW_HEADROOM_BYTES):
            self._read = None  # no transaction may be open while the map grows
            self.store.grow_if_needed(GROW_HEADROOM_BYTES)

    def _on_applied(self, index: int) -> None:
        self._read = None  # the next read sees what was applied
        for listener in self.applied_listeners:
            listener(index)

    def _drop_reads(self) -> None:
        self._read = None
