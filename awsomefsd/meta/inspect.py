"""Reading a metadata store from outside the daemon: `awsomefsd status`, `tier status` and the
self-test.

LMDB allows readers beside the running daemon: these open the environment read-only, read the last
committed transaction and close it. They never write.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from awsomefsd.meta.records import TierObject, Volume
from awsomefsd.meta.replication.lmdb_storage import describe_log
from awsomefsd.meta.store import TABLES
from awsomefsd.meta.tiered import unpack_object
from awsomefsd.meta.volumes_sm import volume_from_record


@dataclass(frozen=True)
class StoreSummary:
    """What `status` shows of a node's metadata. `raft` is the durable Raft state when the
    metadata runs on Raft (raft_storage.describe_log), else None."""

    applied_index: int
    inodes: int
    free_blocks: int
    orphans: int
    pending_free_records: int
    map_size_bytes: int
    volumes: list[Volume] = field(default_factory=list)
    raft: dict[str, object] | None = None


def read_summary(path: Path) -> StoreSummary:
    """The summary of the store at `path` (it must exist: `path / "data.mdb"`)."""
    env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=len(TABLES) + 16)
    try:
        with env.begin() as txn:
            def db(name: str) -> Any:
                return env.open_db(name.encode(), txn=txn, create=False)

            volumes = []
            for key, value in txn.cursor(db("volumes")):
                volumes.append(volume_from_record(int.from_bytes(key, "big"), json.loads(value)))
            applied = txn.get(b"applied", db=db("meta"))
            return StoreSummary(
                applied_index=int.from_bytes(applied, "big") if applied else 0,
                inodes=int(txn.stat(db("inodes"))["entries"]),
                free_blocks=sum(int.from_bytes(v, "big") for _, v in txn.cursor(db("free"))),
                orphans=int(txn.stat(db("orphans"))["entries"]),
                pending_free_records=int(txn.stat(db("dfree"))["entries"]),
                map_size_bytes=int(env.info()["map_size"]),
                volumes=volumes,
                raft=describe_log(env, txn),
            )
    finally:
        env.close()


def read_tier_objects(path: Path) -> list[TierObject]:
    """The objects table of the store at `path` (empty for a store that never tiered)."""
    env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=len(TABLES) + 16)
    try:
        with env.begin() as txn:
            try:
                db = env.open_db(b"tiered", txn=txn, create=False)
            except lmdb.NotFoundError:
                return []
            return [unpack_object(int.from_bytes(key, "big"), value) for key, value in txn.cursor(db)]
    finally:
        env.close()


def store_round_trip() -> str:
    """Open an environment, write and read back in two transactions: the C extension and liblmdb
    work (the self-test of a built binary)."""
    with tempfile.TemporaryDirectory(prefix="awsomefsd-selftest-") as tmp:
        env = lmdb.open(tmp, map_size=1 << 20, max_dbs=2, subdir=True)
        try:
            db = env.open_db(b"selftest")
            with env.begin(write=True, db=db) as txn:
                txn.put(b"key", b"value")
            with env.begin(db=db) as txn:
                got = txn.get(b"key")
        finally:
            env.close()
    assert got == b"value", f"LMDB round trip returned {got!r}"
    return f"lmdb {lmdb.version()}, round trip ok"
