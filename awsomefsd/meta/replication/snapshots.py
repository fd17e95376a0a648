"""Snapshots: when to take one (and compact the log), and installing one a leader sent.

The state is the snapshot: the log keeps only its metadata (index, term, membership), and a
lagging peer receives a copy of the whole state (`ReplicaStorage.snapshot_chunks`, shipped by the
transport), which may be newer than the snapshot's index (applying is idempotent by index).

When to take one: every `snapshot_entries` applied entries, keeping `catch_up_entries` behind it
in the log, so that a briefly lagging follower catches up from the log instead of a whole copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic

from awsomefsd.meta.raft import ConfState, HardState, Snapshot
from awsomefsd.meta.replication.apply import ReplicatedStateMachine
from awsomefsd.meta.replication.settings import NodeSettings
from awsomefsd.meta.replication.storage import DiskCalls, ReplicaStorage, TxnT

log = logging.getLogger(__name__)


class Snapshots(Generic[TxnT]):
    """The driver's snapshot jobs for one member."""

    def __init__(self, storage: ReplicaStorage[TxnT], sm: ReplicatedStateMachine[TxnT], settings: NodeSettings,
                 disk: DiskCalls) -> None:
        self.storage = storage
        self.sm = sm
        self.settings = settings
        self.disk = disk
        self.installed = 0
        self.taken = 0

    async def install(self, snap: Snapshot, hard_state: HardState) -> int:
        """Replace the state by a received copy, under this node's own hard state (its vote must
        survive); returns the applied index after it."""
        hs = HardState(hard_state.term, hard_state.vote, max(hard_state.commit, snap.meta.index))
        staged = await self.disk.in_thread(self.storage.stage_snapshot, snap, hs)
        self.storage.reopen(self.sm.install_snapshot(staged))
        applied = self.storage.applied_index()
        self.installed += 1
        log.info("installed snapshot at %d (state machine at %d)", snap.meta.index, applied)
        return applied

    async def maybe_take(self, applied: int, conf_state_at: Callable[[int], ConfState]) -> None:
        """Take a snapshot and compact the log when enough was applied since the last one."""
        s = self.settings
        snap_index = self.storage.first_index() - 1
        if applied - snap_index < s.snapshot_entries + s.catch_up_entries:
            return
        # An installed snapshot's environment may have applied past the snapshot's index, hence
        # past this log's end: a snapshot needs its index's entry (its term) in the log.
        index = min(applied - s.catch_up_entries, self.storage.last_index())
        if index <= snap_index:
            return
        conf = conf_state_at(index)
        if s.persist_in_thread:
            await self.disk.in_thread(self.storage.create_snapshot, index, conf)
        else:
            await self.disk.on_loop(self.storage.create_snapshot, index, conf)
        self.taken += 1
