"""The replica's storage in LMDB on node-local disk (implements storage.ReplicaStorage).

Log layout (one environment, two named databases):
  raft_log   8-byte big-endian index -> codec.encode_entry(entry)
  raft_meta  b"hard_state" -> <term, vote, commit> (u64 each); b"snapshot" -> snapshot metadata;
             b"format" -> FORMAT_VERSION
Everything one Ready asks to persist goes into one write transaction (`save`), committed with fsync
before any message of that Ready is sent: group commit, one fsync per Ready. LMDB commits are
atomic, so a crash leaves either the whole Ready or none of it.

The apply contract (`apply_entries`): the state machine lives in its own environment (the metadata
tables); applying entries and recording the last applied index happen in the same write
transaction, so after a crash replaying committed entries skips exactly those already applied.

Snapshots: the state-machine environment *is* the snapshot; the log keeps only the snapshot's
metadata (index, term, membership). `snapshot_chunks` streams a compacted copy of the environment
in bounded chunks and `SnapshotReceiver` reassembles one on the follower (the transport drives
both); `stage_snapshot` turns a received copy into this node's before the state machine adopts it.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb

from awsomefsd.meta.raft.codec import decode_entry, decode_snapshot_meta, encode_entry, encode_snapshot_meta
from awsomefsd.meta.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from awsomefsd.meta.raft.storage import LogCompacted, LogUnavailable, limit_size

FORMAT_VERSION = 1
DEFAULT_MAP_BYTES = 1 << 30
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20
MAX_SNAPSHOT_BYTES = 1 << 40
SEEN_WINDOW = 65_536
"""Proposal ids remembered for de-duplication: far more than a resend can lag behind."""
APPLIED_KEY = b"raft_applied_index"

_INDEX = struct.Struct(">Q")
_HARD_STATE = struct.Struct("<QQQ")
_U64 = struct.Struct("<Q")


def _key(index: int) -> bytes:
    return _INDEX.pack(index)


class LmdbRaftStorage:
    """Implements `storage.ReplicaStorage`: the core's read side plus the write side used per Ready.

    Single writer (the node's Raft driver). Reads of indexes and terms hit small in-memory copies
    of the log bounds and snapshot metadata, kept in step with every committed write.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        env: lmdb.Environment | None = None,
        map_size_bytes: int = DEFAULT_MAP_BYTES,
        snapshot_data: Callable[[SnapshotMeta], bytes] | None = None,
    ) -> None:
        """Open the log in its own environment at `path`, or inside the caller's `env`.

        Sharing the state machine's environment lets one write transaction persist a Ready and
        apply its committed entries (one fsync per Ready instead of two); the caller then owns the
        environment and closes it.
        """
        assert (path is None) != (env is None), "give a path or an environment"
        self._owns_env = env is None
        if env is None:
            assert path is not None
            path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(str(path), map_size=map_size_bytes, max_dbs=8, sync=True, metasync=True)
        self.path = Path(env.path())
        self._snapshot_data = snapshot_data
        self._open(env)

    def _open(self, env: lmdb.Environment) -> None:
        self.env = env
        self._log = self.env.open_db(b"raft_log")
        self._meta = self.env.open_db(b"raft_meta")
        self._seen = self.env.open_db(b"raft_seen")
        self._seen_order = self.env.open_db(b"raft_seen_order")
        with self.env.begin(write=True) as txn:
            fmt = txn.get(b"format", db=self._meta)
            if fmt is None:
                txn.put(b"format", _U64.pack(FORMAT_VERSION), db=self._meta)
            elif _U64.unpack(fmt)[0] != FORMAT_VERSION:
                raise RuntimeError(f"raft log format {_U64.unpack(fmt)[0]} is not {FORMAT_VERSION}")
            raw_hs = txn.get(b"hard_state", db=self._meta)
            self.hard_state = HardState(*_HARD_STATE.unpack(raw_hs)) if raw_hs else HardState()
            raw_snap = txn.get(b"snapshot", db=self._meta)
            self.snap_meta = decode_snapshot_meta(raw_snap) if raw_snap else SnapshotMeta()
            cur = txn.cursor(db=self._log)
            self._last = _INDEX.unpack(cur.key())[0] if cur.last() else self.snap_meta.index
        assert self._last >= self.snap_meta.index, "log ends below its snapshot"

    def first_application(self, txn: lmdb.Transaction[bytes], proposal_id: bytes, index: int) -> bool:
        """Record that the proposal `proposal_id` is applied at `index`; False if it already was.

        A follower resends a forwarded entry under the same id when it cannot tell whether the
        leader appended it (the leader died mid-call); this makes the second copy a no-op on every
        replica alike. The record is part of the state (same transaction as the apply, copied in
        snapshots), bounded to the last SEEN_WINDOW proposals."""
        if txn.get(proposal_id, db=self._seen) is not None:
            return False
        key = _INDEX.pack(index)
        txn.put(proposal_id, key, db=self._seen)
        txn.put(key, proposal_id, db=self._seen_order)
        count = txn.stat(self._seen_order)["entries"]
        if count > SEEN_WINDOW:
            cur = txn.cursor(db=self._seen_order)
            cur.first()
            for _ in range(count - SEEN_WINDOW):
                txn.delete(cur.value(), db=self._seen)
                cur.delete()
        return True

    def applied_at(self, proposal_id: bytes) -> int | None:
        with self.env.begin() as txn:
            key = txn.get(proposal_id, db=self._seen)
        return None if key is None else int(_INDEX.unpack(key)[0])

    # --- Storage (read side) ----------------------------------------------------------------------
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
        with self.env.begin() as txn:
            raw = txn.get(_key(index), db=self._log)
        assert raw is not None, f"entry {index} missing inside the log bounds"
        return decode_entry(raw).term

    def entries(self, lo: int, hi: int, max_size_bytes: int) -> list[Entry]:
        if lo <= self.snap_meta.index:
            raise LogCompacted(lo)
        if hi > self._last + 1:
            raise LogUnavailable(hi)
        out: list[Entry] = []
        size = 0
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._log)
            if lo < hi and cur.set_key(_key(lo)):
                for k, v in cur:
                    i = _INDEX.unpack(k)[0]
                    if i >= hi:
                        break
                    e = decode_entry(v)
                    assert e.index == i, (e.index, i)
                    size += e.size_bytes()
                    if out and size > max_size_bytes:
                        break
                    out.append(e)
        assert len(out) == hi - lo or size > max_size_bytes, f"hole in the log between {lo} and {hi}"
        return limit_size(out, max_size_bytes)

    def snapshot(self) -> Snapshot:
        data = self._snapshot_data(self.snap_meta) if self._snapshot_data and self.snap_meta.index else b""
        return Snapshot(self.snap_meta, data)

    # --- write side -------------------------------------------------------------------------------
    def reopen(self, env: lmdb.Environment) -> None:
        """Continue on `env` (an installed snapshot replaced the shared environment)."""
        assert not self._owns_env, "only a shared environment is replaced from outside"
        self._open(env)

    @property
    def meta_db(self) -> lmdb._Database:
        """Where the applied index lives when the state machine shares this environment."""
        return self._meta

    def applied_index(self) -> int:
        with self.env.begin() as txn:
            return read_applied_index(txn, self._meta)

    def read_applied(self, txn: lmdb.Transaction[bytes]) -> int:
        """The applied index as of `txn` (inside the transaction that applies more)."""
        return read_applied_index(txn, self._meta)

    def write_applied(self, txn: lmdb.Transaction[bytes], index: int) -> None:
        """Record `index` as applied, in the transaction that applied it."""
        txn.put(APPLIED_KEY, _U64.pack(index), db=self._meta)

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: SnapshotMeta | None = None,
        *,
        also: Callable[[lmdb.Transaction[bytes]], None] | None = None,
    ) -> None:
        """Persist one Ready (snapshot metadata, entries, hard state) in one fsynced transaction.

        `also` runs inside the same transaction before it commits (applying committed entries in
        a shared environment); if it raises, nothing of the Ready is persisted.
        """
        if hard_state is None and not entries and snapshot is None and also is None:
            return
        snap_meta, last = self.snap_meta, self._last
        with self.env.begin(write=True) as txn:
            if snapshot is not None and snapshot.index > snap_meta.index:
                self._delete_from(txn, 0)  # a leader's snapshot replaces the whole log
                txn.put(b"snapshot", encode_snapshot_meta(snapshot), db=self._meta)
                snap_meta, last = snapshot, snapshot.index
            if entries:
                first = entries[0].index
                assert snap_meta.index < first <= last + 1, f"append at {first} leaves a hole after {last}"
                if first <= last:
                    self._delete_from(txn, first)  # the core decided this suffix conflicts
                for e in entries:
                    txn.put(_key(e.index), encode_entry(e), db=self._log, append=True)
                last = entries[-1].index
            if hard_state is not None:
                txn.put(
                    b"hard_state",
                    _HARD_STATE.pack(hard_state.term, hard_state.vote, hard_state.commit),
                    db=self._meta,
                )
            if also is not None:
                also(txn)
        # Only after the commit returned (durable) does memory follow.
        self.snap_meta, self._last = snap_meta, last
        if hard_state is not None:
            self.hard_state = hard_state

    def snapshot_chunks(self) -> Iterator[bytes]:
        """A compacted copy of the environment (it holds the state machine) for a lagging peer."""
        return snapshot_chunks(self.env, DEFAULT_CHUNK_BYTES)

    def stage_snapshot(self, snap: Snapshot, hard_state: HardState) -> Path:
        """The copy the transport staged at the path in `snap.data`, made this node's (see
        adopt_snapshot_env); the state machine then installs it and we `reopen` on its result."""
        staged = Path(snap.data.decode())
        assert staged.is_dir(), f"snapshot at {snap.meta.index} without its staged copy"
        adopt_snapshot_env(staged, snap.meta, hard_state)
        return staged

    def create_snapshot(self, index: int, conf_state: ConfState) -> SnapshotMeta:
        """Record that the state machine has a snapshot at `index` (it must be applied and stored)."""
        if index <= self.snap_meta.index:
            return self.snap_meta
        meta = SnapshotMeta(index, self.term(index), conf_state)
        with self.env.begin(write=True) as txn:
            txn.put(b"snapshot", encode_snapshot_meta(meta), db=self._meta)
            self._delete_range(txn, 0, index + 1)
        self.snap_meta = meta
        return meta

    def _delete_from(self, txn: lmdb.Transaction[bytes], lo: int) -> None:
        self._delete_range(txn, lo, None)

    def _delete_range(self, txn: lmdb.Transaction[bytes], lo: int, hi: int | None) -> None:
        cur = txn.cursor(db=self._log)
        if not cur.set_range(_key(lo)):
            return
        while True:
            k = cur.key()
            if not k or (hi is not None and _INDEX.unpack(k)[0] >= hi):
                return
            if not cur.delete():
                return

    def close(self) -> None:
        if self._owns_env:
            self.env.close()


def adopt_snapshot_env(path: Path, meta: SnapshotMeta, hard_state: HardState) -> None:
    """Turn a received copy of a leader's shared environment into this node's: the leader's log
    and hard state in it are replaced by an empty log starting at the snapshot and our own hard
    state (our vote must survive the install). Done before the copy is moved into place."""
    env = lmdb.open(str(path), map_size=DEFAULT_MAP_BYTES, max_dbs=32, sync=True, metasync=True)
    try:
        log_db = env.open_db(b"raft_log")
        meta_db = env.open_db(b"raft_meta")
        with env.begin(write=True) as txn:
            txn.drop(log_db, delete=False)
            txn.put(b"format", _U64.pack(FORMAT_VERSION), db=meta_db)
            txn.put(b"snapshot", encode_snapshot_meta(meta), db=meta_db)
            txn.put(b"hard_state", _HARD_STATE.pack(hard_state.term, hard_state.vote, hard_state.commit),
                    db=meta_db)
            assert read_applied_index(txn, meta_db) >= meta.index, "snapshot copy older than its metadata"
    finally:
        env.close()


# --- the apply contract ------------------------------------------------------------------------------
def read_applied_index(txn: lmdb.Transaction, db: lmdb._Database) -> int:
    raw = txn.get(APPLIED_KEY, db=db)
    return _U64.unpack(raw)[0] if raw else 0


def apply_entries(
    env: lmdb.Environment,
    db: lmdb._Database,
    entries: list[Entry],
    apply_fn: Callable[[lmdb.Transaction[bytes], Entry], None],
) -> int:
    """Apply committed entries and record the applied index in the same write transaction.

    Entries at or below the recorded index are skipped, so handing the same committed entries over
    again after a crash is harmless. Returns the applied index after the transaction.
    """
    with env.begin(write=True) as txn:
        applied = read_applied_index(txn, db)
        for e in entries:
            if e.index <= applied:
                continue
            assert e.index == applied + 1, f"apply {e.index} after {applied}: a committed entry is missing"
            apply_fn(txn, e)
            applied = e.index
        txn.put(APPLIED_KEY, _U64.pack(applied), db=db)
    return applied


# --- snapshots as environment copies ---------------------------------------------------------------
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


def describe_log(env: lmdb.Environment, txn: lmdb.Transaction) -> dict[str, object] | None:
    """The durable Raft state for `awsomefsd status` (a reader beside the running daemon), or None
    when this environment holds no Raft log."""
    try:
        meta_db = env.open_db(b"raft_meta", txn=txn, create=False)
        log_db = env.open_db(b"raft_log", txn=txn, create=False)
    except lmdb.NotFoundError:
        return None
    raw_hs = txn.get(b"hard_state", db=meta_db)
    hs = HardState(*_HARD_STATE.unpack(raw_hs)) if raw_hs else HardState()
    raw_snap = txn.get(b"snapshot", db=meta_db)
    snap = decode_snapshot_meta(raw_snap) if raw_snap else SnapshotMeta()
    cur = txn.cursor(db=log_db)
    last = _INDEX.unpack(cur.key())[0] if cur.last() else snap.index
    return {
        "term": hs.term,
        "vote": hs.vote,
        "commit_index": hs.commit,
        "applied_index": read_applied_index(txn, meta_db),
        "last_index": last,
        "snapshot_index": snap.index,
        "voters": list(snap.conf_state.voters),
        "learners": list(snap.conf_state.learners),
    }
