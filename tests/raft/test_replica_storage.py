"""One contract, two storages: the LMDB one the daemon runs and the in-memory one the driver
simulation runs (memory_replica.py). What the driver relies on (storage.ReplicaStorage): a save
survives a restart whole, the applied index commits with the applies, proposal ids are recorded
once, compaction, and a shipped snapshot installs under this node's own hard state. Then what only
the memory disk does: lose unsynced commits, and end a write in flight at a crash lost, torn or
complete."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import pytest

from awsomefsd.meta.raft import (
    ConfState,
    Entry,
    HardState,
    LogCompacted,
    LogUnavailable,
    Snapshot,
    SnapshotMeta,
)
from awsomefsd.meta.replication.lmdb_storage import LmdbRaftStorage, SnapshotReceiver

from .memory_replica import MemoryDisk, MemoryReplicaStorage

MAP_BYTES = 64 << 20


def ents(lo: int, hi: int, term: int) -> list[Entry]:
    return [Entry(term, i, data=f"e{i}".encode()) for i in range(lo, hi)]


class LmdbReplica:
    """LmdbRaftStorage in an environment it shares with a `kv` table (as the daemon's does)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "env"
        self.path.mkdir(parents=True)
        self.env = lmdb.open(str(self.path), map_size=MAP_BYTES, max_dbs=8)
        self.storage: Any = LmdbRaftStorage(env=self.env)
        self.shipped = 0

    def put_state(self, txn: Any, key: bytes, value: bytes) -> None:
        txn.put(key, value, db=self.env.open_db(b"kv", txn=txn))

    def get_state(self, key: bytes) -> bytes | None:
        with self.env.begin(write=True) as txn:
            raw = txn.get(key, db=self.env.open_db(b"kv", txn=txn))
        return None if raw is None else bytes(raw)

    @contextmanager
    def txn(self) -> Iterator[Any]:
        with self.env.begin(write=True) as txn:
            yield txn

    def restart(self) -> None:
        self.env.close()
        self.env = lmdb.open(str(self.path), map_size=MAP_BYTES, max_dbs=8)
        self.storage = LmdbRaftStorage(env=self.env)

    def ship_from(self, source: LmdbReplica, meta: SnapshotMeta) -> Snapshot:
        """What the transport does: stream the source's copy, stage it here."""
        rx = SnapshotReceiver(self.root / "staging")
        for chunk in source.storage.snapshot_chunks():
            rx.write(chunk)
        self.shipped += 1
        target = rx.finish(self.root / f"snap-{self.shipped}")
        return Snapshot(meta, str(target).encode())

    def install(self, staged: Path) -> lmdb.Environment:
        """What a state machine's install_snapshot does: continue on the staged environment."""
        self.env.close()
        self.path = staged
        self.env = lmdb.open(str(staged), map_size=MAP_BYTES, max_dbs=8)
        return self.env


class MemoryReplica:
    def __init__(self, root: Path) -> None:
        self.disk = MemoryDisk()
        self.storage: Any = MemoryReplicaStorage(self.disk)

    def put_state(self, txn: Any, key: bytes, value: bytes) -> None:
        txn.put("kv", key, value)

    def get_state(self, key: bytes) -> bytes | None:
        value: bytes | None = self.disk.table("kv").get(key)
        return value

    @contextmanager
    def txn(self) -> Iterator[Any]:
        txn = self.disk.begin()
        yield txn
        txn.commit()

    def restart(self) -> None:
        assert self.disk.crash(random.Random(0)) == 0, "synced commits are never lost"
        self.storage = MemoryReplicaStorage(self.disk)

    def ship_from(self, source: MemoryReplica, meta: SnapshotMeta) -> Snapshot:
        return Snapshot(meta, b"".join(source.storage.snapshot_chunks()))

    def install(self, staged: Any) -> MemoryDisk:
        self.disk.replace(staged)
        return self.disk


@pytest.fixture(params=["lmdb", "memory"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Any]:
    kind = LmdbReplica if request.param == "lmdb" else MemoryReplica
    return lambda name: kind(tmp_path / name)


def test_a_save_survives_a_restart_whole(make: Callable[[str], Any]) -> None:
    r = make("a")
    r.storage.save(HardState(3, 2, 4), ents(1, 6, 3))
    r.restart()
    st = r.storage
    assert st.initial_state() == (HardState(3, 2, 4), ConfState())
    assert (st.first_index(), st.last_index()) == (1, 5)
    assert st.entries(2, 5, 1 << 20) == ents(2, 5, 3)
    assert st.term(5) == 3
    with pytest.raises(LogUnavailable):
        st.term(6)
    assert len(st.entries(1, 6, 1)) == 1  # size-bounded reads return at least one entry


def test_a_conflicting_append_replaces_the_suffix(make: Callable[[str], Any]) -> None:
    r = make("a")
    r.storage.save(None, ents(1, 6, 1))
    r.storage.save(HardState(2, 0, 0), ents(3, 4, 2))
    r.restart()
    assert r.storage.last_index() == 3
    assert [e.term for e in r.storage.entries(1, 4, 1 << 20)] == [1, 1, 2]


def test_applies_and_the_applied_index_commit_with_the_ready_or_not_at_all(make: Callable[[str], Any]) -> None:
    r = make("a")

    def apply(value: bytes, index: int) -> Callable[[Any], None]:
        def also(txn: Any) -> None:
            r.put_state(txn, b"k", value)
            r.storage.write_applied(txn, index)

        return also

    r.storage.save(HardState(1, 1, 3), ents(1, 4, 1), also=apply(b"v3", 3))

    def boom(txn: Any) -> None:
        apply(b"v5", 5)(txn)
        raise RuntimeError("a bug in apply")

    with pytest.raises(RuntimeError):
        r.storage.save(HardState(1, 1, 5), ents(4, 6, 1), also=boom)
    r.restart()
    assert r.storage.applied_index() == 3 and r.get_state(b"k") == b"v3"
    assert r.storage.initial_state()[0] == HardState(1, 1, 3) and r.storage.last_index() == 3


def test_a_proposal_id_is_applied_once_across_restarts(make: Callable[[str], Any]) -> None:
    r = make("a")
    with r.txn() as txn:
        assert r.storage.first_application(txn, b"id-1", 5)
        assert not r.storage.first_application(txn, b"id-1", 9)
    r.restart()
    with r.txn() as txn:
        assert not r.storage.first_application(txn, b"id-1", 12)
        assert r.storage.first_application(txn, b"id-2", 12)


def test_compaction_and_a_leaders_snapshot(make: Callable[[str], Any]) -> None:
    r = make("a")
    r.storage.save(HardState(1, 1, 8), ents(1, 9, 1))
    assert r.storage.create_snapshot(5, ConfState((1, 2, 3))) == SnapshotMeta(5, 1, ConfState((1, 2, 3)))
    assert r.storage.first_index() == 6 and r.storage.term(5) == 1
    with pytest.raises(LogCompacted):
        r.storage.entries(5, 7, 1 << 20)
    r.storage.save(HardState(2, 0, 20), [], SnapshotMeta(20, 2, ConfState((1, 2))))  # replaces the whole log
    r.restart()
    st = r.storage
    assert (st.first_index(), st.last_index(), st.term(20)) == (21, 20, 2)
    assert st.initial_state()[1] == ConfState((1, 2))


def test_a_shipped_snapshot_installs_under_our_own_hard_state(make: Callable[[str], Any]) -> None:
    leader, lagging = make("leader"), make("lagging")

    def apply_all(txn: Any) -> None:
        leader.put_state(txn, b"k", b"at 10")
        assert leader.storage.first_application(txn, b"forwarded-id", 7)
        leader.storage.write_applied(txn, 10)

    leader.storage.save(HardState(4, 1, 10), ents(1, 11, 4), also=apply_all)
    meta = leader.storage.create_snapshot(8, ConfState((1, 2, 3)))
    lagging.storage.save(HardState(5, 2, 3), ents(1, 4, 3))

    snap = lagging.ship_from(leader, meta)
    ours = HardState(5, 2, 8)
    staged = lagging.storage.stage_snapshot(snap, ours)
    lagging.storage.reopen(lagging.install(staged))
    for _ in range(2):  # as installed, and after a restart
        st = lagging.storage
        assert st.initial_state() == (ours, ConfState((1, 2, 3)))
        assert (st.first_index(), st.last_index(), st.term(8)) == (9, 8, 4)
        assert st.applied_index() == 10  # the copy is newer than its snapshot: applying skips to 10
        assert lagging.get_state(b"k") == b"at 10"
        lagging.restart()
    with lagging.txn() as txn:
        assert not lagging.storage.first_application(txn, b"forwarded-id", 11)  # the record travelled


# --- the memory disk's faults ---------------------------------------------------------------------
def test_unsynced_commits_are_lost_in_a_crash_synced_ones_are_not() -> None:
    """Without sync a crash keeps some prefix of the commits (the disk writes in order)."""
    survivors = set()
    for seed in range(20):
        disk = MemoryDisk(sync=False)
        st = MemoryReplicaStorage(disk)
        st.save(HardState(1, 1, 0), ents(1, 4, 1))
        st.save(HardState(1, 1, 2), ents(4, 6, 1))
        lost = disk.crash(random.Random(seed))
        st = MemoryReplicaStorage(disk)
        assert st.last_index() == {2: 0, 1: 3, 0: 5}[lost]
        survivors.add(st.last_index())
        disk.sync = True
        st.save(HardState(2, 0, 0), ents(st.last_index() + 1, 8, 2))
        assert disk.crash(random.Random(seed)) == 0
        assert MemoryReplicaStorage(disk).last_index() == 7
    assert survivors == {0, 3, 5}


@pytest.mark.parametrize("mode", ["lost", "torn", "complete"])
def test_a_write_in_flight_at_a_crash(mode: str) -> None:
    disk = MemoryDisk()
    st = MemoryReplicaStorage(disk)
    st.save(HardState(1, 1, 2), ents(1, 3, 1), also=lambda txn: st.write_applied(txn, 2))

    def apply(txn: Any) -> None:
        txn.put("kv", b"k", b"v")
        st.write_applied(txn, 4)

    with disk.crashing(mode, random.Random(3)):
        st.save(HardState(2, 2, 4), ents(3, 7, 2), also=apply)
    after = MemoryReplicaStorage(disk)
    if mode == "complete":
        assert (after.hard_state, after.last_index(), after.applied_index()) == (HardState(2, 2, 4), 6, 4)
        return
    # Lost or torn: no hard state and no apply of it; torn keeps a prefix of its entries.
    assert (after.hard_state, after.applied_index(), disk.table("kv")) == (HardState(1, 1, 2), 2, {})
    if mode == "lost":
        assert after.last_index() == 2
    else:
        assert 3 <= after.last_index() <= 6
        assert after.entries(3, after.last_index() + 1, 1 << 20) == ents(3, after.last_index() + 1, 2)
