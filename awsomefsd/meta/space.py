"""Device space in the replicated state: free extents, delayed frees and shared-extent references.

Three tables, one owner:
- `free` is the authoritative free space (merged extents), mirrored in memory by a FreeSpaceMap so
  that allocation and validation never scan LMDB;
- `dfree` holds superseded extents until their grace period ends: a reader that looked up the old
  mapping just before a rewrite (on this node, or on another node whose cache is a lease old) must
  never find the blocks reused under it;
- `refs` counts extra references of extents shared by snapshots and clones; releasing a shared
  range drops a reference instead of freeing it.

Tiered blocks (addresses in objects of the object store, meta/tiered.py) go through `dfree` and
`refs` like device blocks; when the last reference goes, their object loses live blocks instead.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import lmdb

from awsomefsd.meta.errors import SpaceCorruption
from awsomefsd.meta.freespace import FreeSpaceMap
from awsomefsd.meta.records import U64, is_tiered, u64
from awsomefsd.meta.store import MetaStore, seek_floor
from awsomefsd.meta.tiered import TierTables

_FREE_VALUE = U64
_DFREE_HEAD = struct.Struct(">qI")
_PAIR = struct.Struct(">QQ")
_REF = struct.Struct(">QI")


class SpaceMap:
    def __init__(self, store: MetaStore) -> None:
        self.free_db = store.db["free"]
        self.dfree_db = store.db["dfree"]
        self.refs_db = store.db["refs"]
        self.tiered = TierTables(store)
        self.mirror = FreeSpaceMap()

    # -- free space -----------------------------------------------------------------------------
    def load(self, txn: lmdb.Transaction[bytes]) -> None:
        """Rebuild the in-memory mirror from the table (at start, and after an aborted batch)."""
        self.mirror = FreeSpaceMap(self.free_extents(txn))

    def free_extents(self, txn: lmdb.Transaction[bytes]) -> Iterator[tuple[int, int]]:
        for key, value in txn.cursor(self.free_db):
            yield U64.unpack(key)[0], _FREE_VALUE.unpack(value)[0]

    def take(self, txn: lmdb.Transaction[bytes], start: int, count: int) -> None:
        """Mark [start, start+count) used; it must be entirely free."""
        if not self.mirror.contains_free(start, count):
            raise SpaceCorruption(f"blocks {start}+{count} are not free")
        cursor = txn.cursor(self.free_db)
        if not seek_floor(cursor, u64(start)):
            raise SpaceCorruption("free table disagrees with its in-memory mirror")
        free_start = U64.unpack(cursor.key())[0]
        free_count = _FREE_VALUE.unpack(cursor.value())[0]
        assert free_start <= start and start + count <= free_start + free_count, (free_start, free_count, start)
        cursor.delete()
        if free_start < start:
            txn.put(u64(free_start), _FREE_VALUE.pack(start - free_start), db=self.free_db)
        if start + count < free_start + free_count:
            txn.put(u64(start + count), _FREE_VALUE.pack(free_start + free_count - start - count), db=self.free_db)
        self.mirror.remove(start, count)

    def give(self, txn: lmdb.Transaction[bytes], start: int, count: int) -> None:
        """Mark [start, start+count) free, merging with free neighbours; none of it may be free."""
        if self.mirror.overlaps_free(start, count):
            raise SpaceCorruption(f"blocks {start}+{count} are already free (double free)")
        new_start, new_end = start, start + count
        cursor = txn.cursor(self.free_db)
        if seek_floor(cursor, u64(start)):
            p_start = U64.unpack(cursor.key())[0]
            p_count = _FREE_VALUE.unpack(cursor.value())[0]
            if p_start + p_count == start:
                new_start = p_start
                cursor.delete()
        succ = txn.get(u64(new_end), db=self.free_db)
        if succ is not None:
            new_end += _FREE_VALUE.unpack(succ)[0]
            txn.delete(u64(start + count), db=self.free_db)
        txn.put(u64(new_start), _FREE_VALUE.pack(new_end - new_start), db=self.free_db)
        self.mirror.add(start, count)

    # -- delayed frees --------------------------------------------------------------------------
    def defer(self, txn: lmdb.Transaction[bytes], seq: int, extents: Iterable[tuple[int, int]], not_before_ns: int) -> None:
        pairs = [e for e in extents if e[1] > 0]
        if not pairs:
            return
        value = _DFREE_HEAD.pack(not_before_ns, len(pairs)) + b"".join(_PAIR.pack(*e) for e in pairs)
        txn.put(u64(seq), value, db=self.dfree_db)

    def deferred(self, txn: lmdb.Transaction[bytes]) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
        """(seq, not_before_ns, extents) in sequence order."""
        for key, value in txn.cursor(self.dfree_db):
            not_before, n = _DFREE_HEAD.unpack_from(value)
            pairs = [_PAIR.unpack_from(value, _DFREE_HEAD.size + i * _PAIR.size) for i in range(n)]
            yield U64.unpack(key)[0], not_before, pairs

    def pending_free_blocks(self, txn: lmdb.Transaction[bytes]) -> int:
        """Device blocks the delayed-free list will return to free space: those no snapshot or
        clone still references (a shared range only loses a reference)."""
        total = 0
        for _seq, _not_before, pairs in self.deferred(txn):
            for start, count in pairs:
                if is_tiered(start):
                    continue
                shared = sum(min(r_start + r_count, start + count) - max(r_start, start)
                             for r_start, r_count, _ in self._ref_records(txn, start, start + count))
                total += count - shared
        return total

    def reclaim(self, txn: lmdb.Transaction[bytes], now_ns: int, limit: int = 4096) -> list[tuple[int, int]]:
        """Release deferred extents that are due; returns the device blocks that became free."""
        freed: list[tuple[int, int]] = []
        due: list[tuple[int, list[tuple[int, int]]]] = []
        for seq, not_before, pairs in self.deferred(txn):
            if not_before > now_ns or len(due) >= limit:
                break
            due.append((seq, pairs))
        for seq, pairs in due:
            txn.delete(u64(seq), db=self.dfree_db)
            for start, count in pairs:
                freed.extend(self.release(txn, start, count, now_ns))
        return freed

    # -- shared extents -------------------------------------------------------------------------
    def shared(self, txn: lmdb.Transaction[bytes], start: int, count: int) -> bool:
        """Does a snapshot or a clone also reference a block of [start, start+count)?"""
        return bool(self._ref_records(txn, start, start + count))

    def _ref_records(self, txn: lmdb.Transaction[bytes], start: int, end: int) -> list[tuple[int, int, int]]:
        """(start, count, extra) of reference records overlapping [start, end)."""
        out: list[tuple[int, int, int]] = []
        cursor = txn.cursor(self.refs_db)
        if not seek_floor(cursor, u64(start)):
            return out
        for key, value in cursor.iternext():
            r_start = U64.unpack(key)[0]
            if r_start >= end:
                break
            r_count, extra = _REF.unpack(value)
            if r_start + r_count > start:
                out.append((r_start, r_count, extra))
        return out

    def _split_refs_at(self, txn: lmdb.Transaction[bytes], at: int) -> None:
        for r_start, r_count, extra in self._ref_records(txn, at, at + 1):
            if r_start < at < r_start + r_count:
                txn.put(u64(r_start), _REF.pack(at - r_start, extra), db=self.refs_db)
                txn.put(u64(at), _REF.pack(r_start + r_count - at, extra), db=self.refs_db)

    def share(self, txn: lmdb.Transaction[bytes], start: int, count: int) -> None:
        """One more reference to [start, start+count) (a snapshot or clone now points at it)."""
        end = start + count
        self._split_refs_at(txn, start)
        self._split_refs_at(txn, end)
        pos = start
        for r_start, r_count, extra in self._ref_records(txn, start, end):
            if pos < r_start:
                txn.put(u64(pos), _REF.pack(r_start - pos, 1), db=self.refs_db)
            txn.put(u64(r_start), _REF.pack(r_count, extra + 1), db=self.refs_db)
            pos = r_start + r_count
        if pos < end:
            txn.put(u64(pos), _REF.pack(end - pos, 1), db=self.refs_db)

    def release(self, txn: lmdb.Transaction[bytes], start: int, count: int, now_ns: int) -> list[tuple[int, int]]:
        """Drop one reference to [start, start+count); return the device blocks that became free
        (tiered blocks no one references go back to their object's account, as of `now_ns`)."""
        end = start + count
        self._split_refs_at(txn, start)
        self._split_refs_at(txn, end)
        freed: list[tuple[int, int]] = []
        pos = start
        for r_start, r_count, extra in self._ref_records(txn, start, end):
            if pos < r_start:
                freed.append((pos, r_start - pos))
            if extra > 1:
                txn.put(u64(r_start), _REF.pack(r_count, extra - 1), db=self.refs_db)
            else:
                txn.delete(u64(r_start), db=self.refs_db)
            pos = r_start + r_count
        if pos < end:
            freed.append((pos, end - pos))
        if is_tiered(start):
            for f_start, f_count in freed:
                self.tiered.release(txn, f_start, f_count, now_ns)
            return []
        for f_start, f_count in freed:
            self.give(txn, f_start, f_count)
        return freed
