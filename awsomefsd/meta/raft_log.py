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
  refuses the same command the same way); it is re-raised to the proposer.

Today this runs as a one-member group: the node campaigns at start and is its own quorum. Joining
members (snapshot install into the metadata environment) comes with the cluster layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lmdb
import trio

from awsomefsd.meta import codec
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.raft import Ready
from awsomefsd.meta.raft_node import NodeSettings, RaftNode
from awsomefsd.meta.records import u64
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore

log = logging.getLogger(__name__)

GROW_HEADROOM_BYTES = 128 << 20
LEADER_WAIT_S = 30.0


class FsCommands:
    """Adapts the metadata StateMachine to the driver: bytes in, (ok, result-or-FsError) out."""

    def __init__(self, store: MetaStore, sm: StateMachine) -> None:
        self.store = store
        self.sm = sm
        self.applied_commands = 0

    def apply(self, txn: lmdb.Transaction, index: int, command: bytes) -> Any:
        cmd = codec.decode(command)
        self.applied_commands += 1
        # LocalLog's counter, so `awsomefsd status` reads one applied index whichever log runs.
        txn.put(b"applied", u64(index), db=self.store.db["meta"])
        try:
            return True, self.sm.apply(txn, cmd)
        except FsError as exc:
            return False, exc

    def install_snapshot(self, staged: Path) -> lmdb.Environment:
        raise AssertionError("a one-member metadata group never receives a snapshot")


class RaftLog:
    """ReplicatedLog over a one-member Raft group; see the module docstring."""

    def __init__(self, store: MetaStore, sm: StateMachine, *, node_id: int = 1,
                 settings: NodeSettings | None = None) -> None:
        self.store = store
        self.sm = sm
        self.commands = FsCommands(store, sm)
        settings = settings or NodeSettings(persist_in_thread=False, tick_ms=100)
        assert not settings.persist_in_thread, "the state machine's memory is owned by the trio thread"
        store.grow_if_needed(GROW_HEADROOM_BYTES)
        self.node = RaftNode(node_id, store.env, self.commands, settings=settings, bootstrap_voters=(node_id,))
        self.node.before_persist = self._before_persist
        self.node.on_applied = self._renew_reads
        self.before_commit: Any = None
        """Set by open_core: flush the device before metadata that points at new data is durable."""
        self._read: lmdb.Transaction | None = None
        self.replays = 0

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

    def read_txn(self) -> lmdb.Transaction:
        if self._read is None:
            self._read = self.store.env.begin()
        return self._read

    async def propose(self, command: object) -> Any:
        ok, result = await self.node.propose(codec.encode(command))
        if not ok:
            raise result
        return result

    async def barrier(self) -> None:
        """Nothing to wait for: `propose` returns only after the log entry is fsynced."""

    def commit(self) -> None:
        """Nothing buffered: every acknowledged command is already durable."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the group; started() once this node leads (a one-member group elects itself)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.node.run)
            self.node.campaign()
            with trio.fail_after(LEADER_WAIT_S):
                while not self.node.raw.is_leader:
                    await trio.sleep(self.node.settings.tick_ms / 1000)
            log.info("metadata log: raft, one member, leader at term %d", self.node.raw.raft.term)
            task_status.started()

    def close(self) -> None:
        self._read = None

    # --- hooks ------------------------------------------------------------------------------------
    def _before_persist(self, rd: Ready) -> None:
        if self.before_commit is not None and rd.entries:
            self.before_commit()
        if self.store.used_bytes() + GROW_HEADROOM_BYTES > self.store.map_size_bytes / 2:
            self._read = None  # no transaction may be open while the map grows
            self.store.grow_if_needed(GROW_HEADROOM_BYTES)

    def _renew_reads(self, _index: int) -> None:
        self._read = None
