"""Opening a node's metadata store, and the first state of a new filesystem.

The composition roots (awsomefsd/daemon/node.py, awsomefsd/daemon/member.py) start here: they open the
store and its state machine, check that it belongs to the device they opened, and build a log on
them (meta/log.py or the Raft log). Everything after that reads and changes metadata through the
metadata client (meta/client.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from awsomefsd.meta import commands as c
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore


def open_metadata(path: Path, *, delayed_free_ns: int) -> tuple[MetaStore, StateMachine]:
    """The store at `path` (created when missing) and the state machine over it (not loaded)."""
    store = MetaStore(path)
    return store, StateMachine(store, delayed_free_ns=delayed_free_ns)


def stored_identity(store: MetaStore) -> tuple[str, str | None] | None:
    """(cluster id, device id) the store was initialised for; None for an empty store."""
    with store.env.begin() as txn:
        cluster = txn.get(b"cluster_id", db=store.db["meta"])
        device = txn.get(b"device_id", db=store.db["meta"])
    if cluster is None:
        return None
    return bytes(cluster).decode(), None if device is None else bytes(device).decode()


def metadata_id(store: MetaStore) -> uuid.UUID | None:
    """The id this store's metadata was made with (the device's founding record names it), None
    for an empty store or one made before stores had ids (`adopt_metadata_id` gives it one)."""
    with store.env.begin() as txn:
        raw = txn.get(b"metadata_id", db=store.db["meta"])
    return None if raw is None else uuid.UUID(bytes=bytes(raw))


def adopt_metadata_id(store: MetaStore) -> uuid.UUID:
    """This store's metadata id, made now if it has none yet."""
    existing = metadata_id(store)
    if existing is not None:
        return existing
    made = uuid.uuid4()
    with store.env.begin(write=True) as txn:
        txn.put(b"metadata_id", made.bytes, db=store.db["meta"])
    return made


def initialise_metadata(store: MetaStore, sm: StateMachine, *, cluster_id: str, device_id: str, data_extent: tuple[int, int],
               now_ns: int, groups_to: int | None, group_count: int) -> None:
    """The state of a new filesystem, committed: the root directory, every data block free and,
    with `groups_to`, every allocation group granted to that node (a single node)."""
    with store.env.begin(write=True) as txn:
        sm.bootstrap(txn, cluster_id=cluster_id, device_id=device_id, data_extent=data_extent, now_ns=now_ns)
        if groups_to is not None:
            sm.apply(txn, c.GrantGroups(groups_to, tuple(range(group_count))))


def discard_metadata(store: MetaStore) -> None:
    """Empty every table: metadata made under a founding claim that was then lost (nothing was
    served from it); the store is as new again."""
    with store.env.begin(write=True) as txn:
        for db in store.db.values():
            txn.drop(db, delete=False)


def load_metadata(store: MetaStore, sm: StateMachine) -> None:
    """Rebuild the state machine's memory (free-space mirror, counters) from the committed state."""
    with store.env.begin() as txn:
        sm.load(txn)
