"""The node-local LMDB environment that holds the metadata tables.

LMDB gives us atomic multi-table transactions and crash safety for free, but it has a fixed map
size: a write that needs more room fails with MapFullError. The store grows the map between
transactions, well before it fills, so that error never reaches a user (the log additionally
replays a batch after growing if a single batch outruns the headroom).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lmdb

log = logging.getLogger(__name__)

TABLES = (
    "meta",  # format version, cluster id, counters, applied index
    "inodes",  # ino -> Inode
    "dentries",  # (parent, name) -> (child, cookie)
    "cookies",  # (parent, cookie) -> name: stable readdir offsets
    "xattrs",  # (ino, name) -> value
    "symlinks",  # ino -> target
    "fmap",  # (ino, file block) -> Extent
    "free",  # device block -> free block count (authoritative free space)
    "dfree",  # sequence -> (not before ns, extents): superseded extents waiting out the grace period
    "refs",  # device block -> (count, extra references): extents shared by snapshots and clones
    "orphans",  # ino -> b"": unlinked inodes that may still be open
    "tmpfiles",  # ino -> b"": orphans born by O_TMPFILE that linkat may still name (meta/tmpfile.py)
    "volumes",  # volume or snapshot id -> record (kind, name, root, quota, usage)
    "volnames",  # "v:name" / "s:name" -> id
    "groups",  # allocation group -> owner node
    "members",  # node id -> member record (JSON): name, addresses, certificate serial, state, epoch
    "wleases",  # ino -> node holding the file's write lease
    "tiered",  # object id -> object of the object store (state, size, live blocks): meta/tiered.py
    "sites",  # cross-site replication: the link, the clock, the cursor (meta/sites/tables.py, SITE_TABLES)
    "soutbox", "sids", "sinos", "splace", "skids", "sentries", "sobjents", "snames", "slog", "smoves", "sregs", "sconflicts",
)
FORMAT_VERSION = 1
INITIAL_MAP_BYTES = 1 << 30
MAX_MAP_BYTES = 1 << 40
GROW_WHEN_USED_FRACTION = 0.5


class MetaStore:
    """Opens the environment and its named tables; owns map growth.

    Single-writer by construction: one process, and within it the trio thread, writes. Readers in
    other processes (fsck --dry-run, status) see the last committed transaction.
    """

    def __init__(self, path: Path, *, readonly: bool = False, map_size_bytes: int | None = None) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        existing = (path / "data.mdb").exists()
        size = map_size_bytes or max(INITIAL_MAP_BYTES, _file_size(path / "data.mdb") * 2)
        self.env = lmdb.open(
            str(path),
            map_size=size,
            max_dbs=len(TABLES) + 8,  # + the Raft log's tables (replication/lmdb_storage.py)
            readonly=readonly,
            lock=True,
            sync=True,
            metasync=True,
            readahead=False,
            max_readers=126,
            create=not readonly,
        )
        self.readonly = readonly
        self.created = not existing
        self.db = {name: self.env.open_db(name.encode(), create=not readonly) for name in TABLES}
        self._page_bytes = int(self.env.stat()["psize"])

    @property
    def map_size_bytes(self) -> int:
        return int(self.env.info()["map_size"])

    def needs_growth(self, headroom_bytes: int = 0) -> bool:
        """Is the map more than half used (plus headroom)? One `env.info()`: cheap enough to ask
        before every transaction (the Raft log does)."""
        info = self.env.info()
        used = (int(info["last_pgno"]) + 1) * self._page_bytes
        return used + headroom_bytes > int(info["map_size"]) * GROW_WHEN_USED_FRACTION

    def grow_if_needed(self, headroom_bytes: int = 0) -> bool:
        """Double the map while it is more than half used (plus headroom). Call with no txn open."""
        grew = False
        while self.needs_growth(headroom_bytes):
            new_size = min(self.map_size_bytes * 2, MAX_MAP_BYTES)
            if new_size == self.map_size_bytes:
                break
            log.info("growing metadata map from %d to %d bytes", self.map_size_bytes, new_size)
            self.env.set_mapsize(new_size)
            grew = True
        return grew

    def replace_contents(self, source: Path) -> None:
        """Make this environment a copy of the one at `source` (a received snapshot), in one write
        transaction: a crash leaves the old state or the new one, and every open table handle stays
        valid, so the state machine and the Raft storage keep working on the same environment."""
        src = lmdb.open(str(source), readonly=True, lock=False, max_dbs=64)
        try:
            self.grow_if_needed(_file_size(source / "data.mdb") * 2)
            with src.begin() as rtxn:
                names = [bytes(k) for k, _ in rtxn.cursor()]
            with src.begin() as rtxn, self.env.begin(write=True) as wtxn:
                mine = {name.encode() for name in TABLES} | set(names)
                for name in sorted(mine):
                    dst_db = self.env.open_db(name, txn=wtxn)
                    wtxn.drop(dst_db, delete=False)
                    if name not in names:
                        continue
                    src_db = src.open_db(name, txn=rtxn, create=False)
                    cursor = wtxn.cursor(dst_db)
                    cursor.putmulti(rtxn.cursor(src_db).iternext(), append=True)
        finally:
            src.close()

    def close(self) -> None:
        self.env.close()


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def seek_floor(cursor: lmdb.Cursor, key: bytes) -> bool:
    """Put the cursor on the last record at or before `key` (or the first record when none is);
    False for an empty table. Range tables keyed by start use it to find the range holding `key`."""
    if cursor.set_range(key):
        if cursor.key() != key and not cursor.prev():
            return cursor.first()
        return True
    return cursor.last()
