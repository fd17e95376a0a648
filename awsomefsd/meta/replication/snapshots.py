"""Snapshots: taking them (and compacting the log), shipping them, installing a received one.

The state-machine environment *is* the snapshot: the log keeps only its metadata (index, term,
membership). `snapshot_chunks` streams a compacted copy of the environment in bounded chunks, and
`SnapshotReceiver` reassembles one on the follower (the transport drives both). The driver hands
a received copy to `Snapshots.install` and asks `Snapshots.maybe_take` after each Ready.

When to take one: every `snapshot_entries` applied entries, keeping `catch_up_entries` behind it
in the log, so that a briefly lagging follower catches up from the log instead of a whole copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import trio

from awsomefsd.meta.raft import ConfState, HardState, Snapshot
from awsomefsd.meta.replication.apply import ReplicatedStateMachine
from awsomefsd.meta.replication.settings import NodeSettings
from awsomefsd.meta.replication.storage import LmdbRaftStorage, adopt_snapshot_env

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20
MAX_SNAPSHOT_BYTES = 1 << 40


class Snapshots:
    """The driver's snapshot jobs for one member."""

    def __init__(self, storage: LmdbRaftStorage, sm: ReplicatedStateMachine, settings: NodeSettings) -> None:
        self.storage = storage
        self.sm = sm
        self.settings = settings
        self.installed = 0
        self.taken = 0

    async def install(self, snap: Snapshot, hard_state: HardState) -> int:
        """Replace the state machine by a received copy (staged by the transport at the path in
        `snap.data`) under this node's own hard state; returns the applied index after it."""
        staged = Path(snap.data.decode())
        assert staged.is_dir(), f"snapshot at {snap.meta.index} without its staged copy"
        hs = HardState(hard_state.term, hard_state.vote, max(hard_state.commit, snap.meta.index))
        await trio.to_thread.run_sync(adopt_snapshot_env, staged, snap.meta, hs)
        env = self.sm.install_snapshot(staged)
        self.storage.reopen(env)
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
            await trio.to_thread.run_sync(self.storage.create_snapshot, index, conf)
        else:
            self.storage.create_snapshot(index, conf)
        self.taken += 1


# --- snapshots as environment copies, on the wire ----------------------------------------------------
def snapshot_chunks(env: lmdb.Environment, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """A compacted, consistent copy of `env` (one read transaction) as a stream of bounded chunks."""
    assert 0 < chunk_bytes <= MAX_CHUNK_BYTES
    with tempfile.TemporaryDirectory(prefix="raft-snap-") as tmp:
        env.copy(tmp, compact=True)
        with open(os.path.join(tmp, "data.mdb"), "rb") as f:
            while chunk := f.read(chunk_bytes):
                yield chunk


class SnapshotReceiver:
    """Reassembles a streamed environment copy; only `finish()` makes it visible at the target."""

    def __init__(self, staging_dir: Path, max_bytes: int = MAX_SNAPSHOT_BYTES) -> None:
        staging_dir.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix="incoming-", dir=staging_dir))
        self._file = open(self._dir / "data.mdb", "wb")  # noqa: SIM115 - closed in finish/abort
        self._max_bytes = max_bytes
        self.received_bytes = 0

    def write(self, chunk: bytes) -> None:
        assert len(chunk) <= MAX_CHUNK_BYTES, "chunk over bound"
        self.received_bytes += len(chunk)
        if self.received_bytes > self._max_bytes:
            self.abort()
            raise ValueError(f"snapshot larger than {self._max_bytes} bytes")
        self._file.write(chunk)

    def finish(self, target_dir: Path) -> Path:
        """fsync the copy and rename it into place (atomic on one filesystem)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if target_dir.exists():
            shutil.rmtree(target_dir)
        os.replace(self._dir, target_dir)
        dir_fd = os.open(target_dir.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return target_dir

    def abort(self) -> None:
        self._file.close()
        shutil.rmtree(self._dir, ignore_errors=True)
