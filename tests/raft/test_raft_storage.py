"""The LMDB Raft log beyond the contract both storages share (test_replica_storage.py): nothing
half-written survives a crash (an abandoned transaction, a process killed mid-write), the apply
contract makes replay idempotent, snapshots stream in bounded chunks, a RawNode restarts from it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest

from awsomefsd.meta.raft import (
    Config,
    ConfState,
    Entry,
    HardState,
    LogCompacted,
    RawNode,
    SnapshotMeta,
)
from awsomefsd.meta.replication.lmdb_storage import (
    LmdbRaftStorage,
    SnapshotReceiver,
    apply_entries,
    read_applied_index,
    snapshot_chunks,
)

MAP_BYTES = 64 << 20


def ents(lo: int, hi: int, term: int) -> list[Entry]:
    return [Entry(term, i, data=f"e{i}".encode()) for i in range(lo, hi)]


def test_snapshot_and_compaction(tmp_path: Path) -> None:
    st = LmdbRaftStorage(tmp_path, map_size_bytes=MAP_BYTES, snapshot_data=lambda meta: b"sm@%d" % meta.index)
    st.save(HardState(1, 1, 8), ents(1, 9, 1))
    meta = st.create_snapshot(5, ConfState((1, 2, 3)))
    assert meta == SnapshotMeta(5, 1, ConfState((1, 2, 3)))
    assert st.first_index() == 6 and st.term(5) == 1
    with pytest.raises(LogCompacted):
        st.entries(5, 7, 1 << 20)
    assert st.snapshot().data == b"sm@5"
    # A leader's newer snapshot replaces the whole log.
    st.save(HardState(2, 0, 20), [], SnapshotMeta(20, 2, ConfState((1, 2))))
    st.close()
    st = LmdbRaftStorage(tmp_path, map_size_bytes=MAP_BYTES)
    assert (st.first_index(), st.last_index(), st.term(20)) == (21, 20, 2)
    assert st.initial_state()[1] == ConfState((1, 2))


def test_uncommitted_write_is_lost_and_synced_one_kept(tmp_path: Path) -> None:
    """Abandon a write transaction (what a crash does to it): the previous Ready is intact."""
    st = LmdbRaftStorage(tmp_path, map_size_bytes=MAP_BYTES)
    st.save(HardState(1, 1, 2), ents(1, 4, 1))
    txn = st.env.begin(write=True)
    txn.put(b"hard_state", b"\xff" * 24, db=st._meta)
    txn.put((4).to_bytes(8, "big"), b"torn", db=st._log)
    txn.abort()
    st.env.close()
    st = LmdbRaftStorage(tmp_path, map_size_bytes=MAP_BYTES)
    assert st.initial_state()[0] == HardState(1, 1, 2)
    assert st.last_index() == 3
    assert st.entries(1, 4, 1 << 20) == ents(1, 4, 1)


def test_process_killed_mid_transaction_keeps_synced_state(tmp_path: Path) -> None:
    """A real hard exit (no cleanup, no commit) in the middle of writing the second Ready."""
    child = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from awsomefsd.meta.raft import Entry, HardState
        from awsomefsd.meta.replication.lmdb_storage import LmdbRaftStorage
        st = LmdbRaftStorage(Path({str(tmp_path)!r}), map_size_bytes={MAP_BYTES})
        st.save(HardState(1, 1, 3), [Entry(1, i, data=b"ok") for i in range(1, 4)])
        txn = st.env.begin(write=True)
        for i in range(4, 1000):
            txn.put(i.to_bytes(8, "big"), b"x" * 100, db=st._log)
        os._exit(9)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", child], env=env, timeout=60)
    assert proc.returncode == 9
    st = LmdbRaftStorage(tmp_path, map_size_bytes=MAP_BYTES)
    assert st.initial_state()[0] == HardState(1, 1, 3)
    assert st.last_index() == 3


def test_apply_records_applied_index_in_the_same_transaction(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "sm"), map_size=MAP_BYTES, max_dbs=2)
    meta, kv = env.open_db(b"meta"), env.open_db(b"kv")

    def put(txn: lmdb.Transaction, e: Entry) -> None:
        txn.put(e.data, b"%d" % e.index, db=kv)

    assert apply_entries(env, meta, ents(1, 4, 1), put) == 3
    # A crash inside apply: the transaction aborts, so neither effect nor index moves.
    with pytest.raises(RuntimeError):

        def boom(txn: lmdb.Transaction, e: Entry) -> None:
            put(txn, e)
            raise RuntimeError("crash")

        apply_entries(env, meta, ents(4, 6, 1), boom)
    with env.begin() as txn:
        assert read_applied_index(txn, meta) == 3
        assert txn.get(b"e4", db=kv) is None
    # Replay of the whole committed range after the crash: 1..3 skipped, 4..5 applied once.
    assert apply_entries(env, meta, ents(1, 6, 1), put) == 5
    with env.begin() as txn:
        assert [txn.get(b"e%d" % i, db=kv) for i in range(1, 6)] == [b"%d" % i for i in range(1, 6)]
    env.close()


def test_snapshot_streams_in_chunks(tmp_path: Path) -> None:
    src = lmdb.open(str(tmp_path / "src"), map_size=MAP_BYTES, max_dbs=2)
    db = src.open_db(b"kv")
    with src.begin(write=True) as txn:
        for i in range(2000):
            txn.put(b"k%05d" % i, os.urandom(64), db=db)
    with src.begin() as txn:
        expected = dict(txn.cursor(db=db))
    rx = SnapshotReceiver(tmp_path / "staging")
    chunks = list(snapshot_chunks(src, chunk_bytes=16 << 10))
    assert len(chunks) > 1 and all(len(c) <= 16 << 10 for c in chunks)
    for c in chunks:
        rx.write(c)
    target = rx.finish(tmp_path / "dst")
    dst = lmdb.open(str(target), map_size=MAP_BYTES, max_dbs=2)
    with dst.begin() as txn:
        assert dict(txn.cursor(db=dst.open_db(b"kv", txn=txn))) == expected
    src.close()
    dst.close()


def test_receiver_refuses_oversized_snapshots(tmp_path: Path) -> None:
    rx = SnapshotReceiver(tmp_path / "staging", max_bytes=10)
    with pytest.raises(ValueError):
        rx.write(b"x" * 11)
    assert not any((tmp_path / "staging").iterdir())


def test_rawnode_restarts_from_lmdb(tmp_path: Path) -> None:
    """A single-member cluster on LMDB: persist every Ready, restart, and find everything back."""

    def boot() -> tuple[RawNode, LmdbRaftStorage]:
        st = LmdbRaftStorage(tmp_path / "log", map_size_bytes=MAP_BYTES)
        if st.last_index() == 0:
            st.save(HardState(1, 0, 1), [], SnapshotMeta(1, 1, ConfState((1,))))
        return RawNode(Config(id=1, random_below=lambda n: 0, applied=applied[0]), st), st

    applied = [1]
    node, st = boot()
    node.campaign()  # a single voter wins at once
    assert node.is_leader
    for cmd in (b"a", b"b", b"c"):
        node.propose(cmd)
        while node.has_ready():
            rd = node.ready()
            st.save(rd.hard_state, rd.entries)
            if rd.committed_entries:
                applied[0] = rd.committed_entries[-1].index
            node.advance(rd)
    assert node.is_leader and applied[0] == 5
    st.close()
    node, st = boot()
    assert node.raft.term == 2 and node.raft.log.committed == 5 and node.raft.log.last_index() == 5
    assert not node.raft.log.has_next_committed_entries()
    assert [e.data for e in st.entries(2, 6, 1 << 20)] == [b"", b"a", b"b", b"c"]
