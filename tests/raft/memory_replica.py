"""A replica's storage in memory, on a disk that can crash: what the driver simulation runs on.

`MemoryReplicaStorage` implements the same interface as `LmdbRaftStorage`
(awsomefsd.meta.replication.storage.ReplicaStorage); tests/raft/test_replica_storage.py runs one
contract against both. It keeps its tables on a `MemoryDisk`, which the simulator's state machine
shares (as LMDB's environment is shared), so one transaction persists a Ready and applies it.

The disk: named tables of key -> value, written only by committed transactions. A commit is
atomic. With `sync` (the default, what LMDB does) it is durable when it returns; without it (a
planted bug, or a disk that lies about flushes) it reaches only the page cache, and `crash()`
keeps a random prefix of the unsynced commits.

A write in flight when its node crashes (`SimDiskCalls`: every storage call takes virtual time)
ends one of three ways, drawn from the simulation's seed:
- "lost": nothing of it reaches the disk;
- "torn": only a prefix of the log entries it appends (and the conflicting suffix it cut off);
  no hard state, no applies — the unacknowledged tail of a log, as a disk that writes pages in
  order would leave it;
- "complete": all of it, although the driver never learned that it returned.
"""

from __future__ import annotations

import contextlib
import pickle
import random
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import trio

from awsomefsd.meta.raft import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from awsomefsd.meta.raft.storage import LogCompacted, LogUnavailable, limit_size
from awsomefsd.meta.replication.lmdb_storage import SEEN_WINDOW

T = TypeVar("T")
Tables = dict[str, dict[Any, Any]]
_DELETE = object()
CRASH_MODES = ("lost", "torn", "complete")
CHUNK_BYTES = 64 << 10


class MemoryDisk:
    """Tables that survive a crash as far as they were synced; see the module docstring."""

    def __init__(self, *, sync: bool = True) -> None:
        self.sync = sync
        self.tables: Tables = {}
        self._durable: Tables | None = None  # None: everything visible is durable
        self._unsynced: list[list[tuple[str, Any, Any]]] = []
        self.crash_mode: str | None = None
        """Set while a write that was in flight at a crash is being finished (CRASH_MODES)."""
        self.tear_rng = random.Random(0)
        """Where a torn write is cut (set with the crash mode)."""
        self.commits = 0

    def table(self, name: str) -> dict[Any, Any]:
        return self.tables.setdefault(name, {})

    def begin(self) -> MemoryTxn:
        return MemoryTxn(self)

    def commit(self, ops: list[tuple[str, Any, Any]]) -> None:
        if not self.sync and self._durable is None:
            self._durable = _copy(self.tables)
        _apply(self.tables, ops)
        self.commits += 1
        if self.sync:
            self._durable = None
            self._unsynced.clear()
        else:
            self._unsynced.append(ops)

    def replace(self, tables: Tables) -> None:
        """All tables at once, durably (a snapshot install)."""
        self.tables = _copy(tables)
        self._durable = None
        self._unsynced.clear()
        self.commits += 1

    @contextlib.contextmanager
    def crashing(self, mode: str, rng: random.Random) -> Iterator[None]:
        assert mode in CRASH_MODES
        self.crash_mode, self.tear_rng = mode, rng
        try:
            yield
        finally:
            self.crash_mode = None

    def crash(self, rng: random.Random) -> int:
        """Lose the page cache: keep a random prefix of the unsynced commits. Returns how many
        commits were lost."""
        if self._durable is None:
            return 0
        keep = rng.randrange(len(self._unsynced) + 1)
        tables = self._durable
        for ops in self._unsynced[:keep]:
            _apply(tables, ops)
        lost = len(self._unsynced) - keep
        self.tables, self._durable = tables, None
        self._unsynced.clear()
        return lost


class MemoryTxn:
    """A write transaction: reads see its own writes; nothing is visible before `commit`."""

    def __init__(self, disk: MemoryDisk) -> None:
        self.disk = disk
        self.ops: list[tuple[str, Any, Any]] = []
        self._pending: dict[tuple[str, Any], Any] = {}

    def get(self, table: str, key: Any, default: Any = None) -> Any:
        value = self._pending.get((table, key), self.disk.table(table).get(key, _DELETE))
        return default if value is _DELETE else value

    def put(self, table: str, key: Any, value: Any) -> None:
        self.ops.append((table, key, value))
        self._pending[(table, key)] = value

    def delete(self, table: str, key: Any) -> None:
        self.ops.append((table, key, _DELETE))
        self._pending[(table, key)] = _DELETE

    def commit(self) -> None:
        self.disk.commit(self.ops)


def _apply(tables: Tables, ops: list[tuple[str, Any, Any]]) -> None:
    for table, key, value in ops:
        t = tables.setdefault(table, {})
        if value is _DELETE:
            t.pop(key, None)
        else:
            t[key] = value


def _copy(tables: Tables) -> Tables:
    return {name: dict(t) for name, t in tables.items()}  # the values are immutable


class StorageObserver(Protocol):
    """What the simulator's invariant checks hear about durable state, after each commit."""

    def on_hard_state(self, old: HardState, new: HardState) -> None: ...

    def on_persist(self, entries: list[Entry]) -> None: ...

    def on_applied(self, entries: list[Entry]) -> None: ...

    def on_install(self, meta: SnapshotMeta, applied: int) -> None: ...


class MemoryReplicaStorage:
    """ReplicaStorage over a MemoryDisk (tables `log`, `meta`, `seen`, `seen_order`)."""

    def __init__(self, disk: MemoryDisk, observer: StorageObserver | None = None) -> None:
        self.observer = observer
        self.duplicates = 0  # proposal ids found applied already
        self._open(disk)

    def _open(self, disk: MemoryDisk) -> None:
        self.disk = disk
        meta = disk.table("meta")
        self.hard_state: HardState = meta.get("hard_state", HardState())
        self.snap_meta: SnapshotMeta = meta.get("snapshot", SnapshotMeta())
        log = disk.table("log")
        self._last = max(log) if log else self.snap_meta.index
        assert self._last >= self.snap_meta.index, "log ends below its snapshot"
        assert all(i in log for i in range(self.snap_meta.index + 1, self._last + 1)), "hole in the log"

    # --- RaftStorage (read side) -----------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self.snap_meta.conf_state

    def first_index(self) -> int:
        return self.snap_meta.index + 1

    def last_index(self) -> int:
        return self._last

    def term(self, index: int) -> int:
        if index < self.snap_meta.index:
            raise LogCompacted(index)
        if index == self.snap_meta.index:
            return self.snap_meta.term
        if index > self._last:
            raise LogUnavailable(index)
        e: Entry = self.disk.table("log")[index]
        return e.term

    def entries(self, lo: int, hi: int, max_size_bytes: int) -> list[Entry]:
        if lo <= self.snap_meta.index:
            raise LogCompacted(lo)
        if hi > self._last + 1:
            raise LogUnavailable(hi)
        log = self.disk.table("log")
        return limit_size([log[i] for i in range(lo, hi)], max_size_bytes)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.snap_meta, b"")

    # --- the apply contract ------------------------------------------------------------------------
    def applied_index(self) -> int:
        applied: int = self.disk.table("meta").get("applied", 0)
        return applied

    def read_applied(self, txn: MemoryTxn) -> int:
        applied: int = txn.get("meta", "applied", 0)
        return applied

    def write_applied(self, txn: MemoryTxn, index: int) -> None:
        txn.put("meta", "applied", index)

    def first_application(self, txn: MemoryTxn, proposal_id: bytes, index: int) -> bool:
        if txn.get("seen", proposal_id) is not None:
            self.duplicates += 1
            return False
        txn.put("seen", proposal_id, index)
        txn.put("seen_order", index, proposal_id)
        order = self.disk.table("seen_order")
        if len(order) + 1 > SEEN_WINDOW:  # bounded like the LMDB record
            oldest = min(order)
            txn.delete("seen", order[oldest])
            txn.delete("seen_order", oldest)
        return True

    def applied_at(self, proposal_id: bytes) -> int | None:
        index: int | None = self.disk.table("seen").get(proposal_id)
        return index

    # --- write side --------------------------------------------------------------------------------
    def save(self, hard_state: HardState | None, entries: list[Entry], snapshot: SnapshotMeta | None = None,
             *, also: Callable[[MemoryTxn], None] | None = None) -> None:
        if hard_state is None and not entries and snapshot is None and also is None:
            return
        mode = self.disk.crash_mode
        if mode == "lost":
            return
        snap_meta, last = self.snap_meta, self._last
        txn = self.disk.begin()
        if mode == "torn":
            if not entries:
                return
            entries = entries[: self.disk.tear_rng.randrange(1, len(entries) + 1)]
            hard_state, snapshot, also = None, None, None
        if snapshot is not None and snapshot.index > snap_meta.index:
            for i in range(snap_meta.index + 1, last + 1):
                txn.delete("log", i)  # a leader's snapshot replaces the whole log
            txn.put("meta", "snapshot", snapshot)
            snap_meta, last = snapshot, snapshot.index
        if entries:
            first = entries[0].index
            assert snap_meta.index < first <= last + 1, f"append at {first} leaves a hole after {last}"
            for i in range(first, last + 1):
                txn.delete("log", i)  # the core decided this suffix conflicts
            for e in entries:
                txn.put("log", e.index, e)
            last = entries[-1].index
        if hard_state is not None:
            txn.put("meta", "hard_state", hard_state)
        applied_before = self.read_applied(txn)
        if also is not None:
            also(txn)
        applied_after = self.read_applied(txn)
        txn.commit()
        old = self.hard_state
        self.snap_meta, self._last = snap_meta, last
        if hard_state is not None:
            self.hard_state = hard_state
        if self.observer is not None:
            if hard_state is not None:
                self.observer.on_hard_state(old, hard_state)
            if entries:
                self.observer.on_persist(entries)
            if snapshot is not None:  # a group's founding snapshot: applied whole
                self.observer.on_install(snap_meta, applied_after)
            elif applied_after > applied_before:
                log = self.disk.table("log")
                self.observer.on_applied([log[i] for i in range(applied_before + 1, applied_after + 1)])

    def create_snapshot(self, index: int, conf_state: ConfState) -> SnapshotMeta:
        if index <= self.snap_meta.index or self.disk.crash_mode in ("lost", "torn"):
            return self.snap_meta
        meta = SnapshotMeta(index, self.term(index), conf_state)
        txn = self.disk.begin()
        txn.put("meta", "snapshot", meta)
        for i in range(self.snap_meta.index + 1, index + 1):
            txn.delete("log", i)
        txn.commit()
        self.snap_meta = meta
        return meta

    def snapshot_chunks(self) -> Iterator[bytes]:
        """The whole disk as it is now (newer than the snapshot, as an LMDB copy may be)."""
        blob = pickle.dumps(self.disk.tables)
        for i in range(0, len(blob), CHUNK_BYTES):
            yield blob[i : i + CHUNK_BYTES]

    def stage_snapshot(self, snap: Snapshot, hard_state: HardState) -> Tables:
        """The received tables with our own log (empty, at the snapshot) and hard state."""
        tables: Tables = pickle.loads(snap.data)
        tables["log"] = {}
        meta = tables.setdefault("meta", {})
        meta["snapshot"], meta["hard_state"] = snap.meta, hard_state
        assert meta.get("applied", 0) >= snap.meta.index, "snapshot copy older than its metadata"
        return tables

    def reopen(self, env: MemoryDisk) -> None:
        self._open(env)
        if self.observer is not None:
            self.observer.on_install(self.snap_meta, self.applied_index())


class SimDiskCalls:
    """DiskCalls in virtual time: each storage call takes a latency drawn from `rng`, in which
    other tasks run (in_thread and on_loop alike) and a crash may land; a crash there finishes
    the call in a drawn crash mode (lost, torn, complete) and re-raises."""

    def __init__(self, disk: MemoryDisk, rng: random.Random, latency_s: tuple[float, float]) -> None:
        self.disk = disk
        self.rng = rng
        self.latency_s = latency_s
        self.crash_outcomes: dict[str, int] = dict.fromkeys(CRASH_MODES, 0)
        self.crash_next: Callable[[], None] | None = None
        """Set by the simulator: called as the next call starts, to crash the node during it."""
        self.stall_next: tuple[float, Callable[[], None]] | None = None
        """Set by the simulator: the next call takes this long (a stuck fsync: the node's loop
        waits), and what to call as it starts."""

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._call(fn, *args)

    async def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._call(fn, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        crash, self.crash_next = self.crash_next, None
        try:
            if crash is not None:
                crash()
            stall, self.stall_next = self.stall_next, None
            if stall is not None:
                stall[1]()
            await trio.sleep(stall[0] if stall is not None else self.rng.uniform(*self.latency_s))
        except trio.Cancelled:
            mode = self.rng.choice(CRASH_MODES)
            self.crash_outcomes[mode] += 1
            with self.disk.crashing(mode, self.rng):
                fn(*args)
            raise
        return fn(*args)
