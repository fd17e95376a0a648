"""What the driver needs from a replica's storage, and how it runs the calls that wait for a disk.

`ReplicaStorage` extends the core's read side (`RaftStorage`) with the writes one Ready asks for
and the apply contract. `LmdbRaftStorage` (lmdb_storage.py) is the durable implementation; the
simulator has an in-memory one that can crash (tests/raft/memory_replica.py). What an
implementation must guarantee:
- `save` is atomic and durable when it returns: after a crash the storage holds all of one `save`
  or none of it (entries, hard state, snapshot metadata, and whatever `also` wrote in its
  transaction);
- the applied index is written in the transaction that applied the entries (`write_applied`),
  so replay after a crash skips exactly what was applied;
- `first_application` records proposal ids as part of the applied state: the record commits with
  the apply and travels in snapshots.

Transactions are the storage's own (an `lmdb.Transaction`, or the simulator's); the state machine
is typed against the same kind (apply.ReplicatedStateMachine).

`DiskCalls` is how the driver runs storage calls that may block on an fsync: in a worker thread
(`in_thread`), or on the loop, blocking it (`on_loop`). Production runs them for real
(`ThreadedDiskCalls`); the simulator makes each take virtual time and lets a crash land in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import trio

from awsomefsd.meta.raft import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from awsomefsd.meta.raft.storage import RaftStorage

TxnT = TypeVar("TxnT")
T = TypeVar("T")


class ReplicaStorage(RaftStorage, Protocol[TxnT]):
    """The durable state of one member: the log, the hard state, the applied index, the proposal
    ids applied (de-duplication), snapshots. Single writer: the driver."""

    hard_state: HardState
    """The hard state as of the last `save` (what a crash would leave)."""

    def applied_index(self) -> int: ...

    def read_applied(self, txn: TxnT) -> int:
        """The applied index as of `txn` (inside the transaction that applies more)."""
        ...

    def write_applied(self, txn: TxnT, index: int) -> None:
        """Record `index` as applied, in the transaction that applied it."""
        ...

    def first_application(self, txn: TxnT, proposal_id: bytes, index: int) -> bool:
        """Record that `proposal_id` is applied at `index`; False if it already was."""
        ...

    def applied_at(self, proposal_id: bytes) -> int | None:
        """The index `proposal_id` was applied at, while its record is kept (`first_application`);
        None if it was not applied (or is too old to tell)."""
        ...

    def save(self, hard_state: HardState | None, entries: list[Entry], snapshot: SnapshotMeta | None = None,
             *, also: Callable[[TxnT], None] | None = None) -> None:
        """Persist one Ready in one durable transaction; `also` runs inside it before it commits
        (applying committed entries); if it raises, nothing is persisted."""
        ...

    def create_snapshot(self, index: int, conf_state: ConfState) -> SnapshotMeta:
        """Record that the state machine has a snapshot at `index` and compact the log up to it."""
        ...

    def snapshot_chunks(self) -> Iterator[bytes]:
        """A consistent copy of the state (it holds the state machine) in bounded chunks, for a
        peer that needs a snapshot; may run in a worker thread."""
        ...

    def stage_snapshot(self, snap: Snapshot, hard_state: HardState) -> Any:
        """Turn a received copy (`snap.data`, as the transport delivered it) into this node's: an
        empty log starting at the snapshot and `hard_state`. Returns what the state machine's
        `install_snapshot` takes; nothing live changes yet."""
        ...

    def reopen(self, env: Any) -> None:
        """Continue on `env`, what the state machine's `install_snapshot` returned."""
        ...


class DiskCalls(Protocol):
    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` off the loop: other tasks run meanwhile."""
        ...

    async def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the loop: nothing else runs until it returns."""
        ...


class ThreadedDiskCalls:
    """The real thing: a worker thread, or a plain call."""

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    async def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args)
