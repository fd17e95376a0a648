"""A file's block map in LMDB: non-overlapping extents keyed by (inode, first file block).

Reads look up the extents covering a byte range; writes replace a block range copy-on-write,
handing back the device ranges they superseded so the caller can free them after the grace period.
"""

from __future__ import annotations

from collections.abc import Iterator

import lmdb

from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, U64_PAIR, Extent, fmap_key
from awsomefsd.meta.space import seek_floor


def extents_in(txn: lmdb.Transaction[bytes], db: lmdb._Database, ino: int, first_block: int, end_block: int) -> Iterator[Extent]:
    """Extents of `ino` that overlap file blocks [first_block, end_block), in order (unclipped)."""
    if first_block >= end_block:
        return
    cursor = txn.cursor(db)
    # the extent containing first_block, if any, is the last record at or before its key
    if not seek_floor(cursor, fmap_key(ino, first_block)):
        return
    while True:
        key = cursor.key()
        if not key:
            return
        rec_ino, rec_block = U64_PAIR.unpack(key)
        if rec_ino > ino or (rec_ino == ino and rec_block >= end_block):
            return
        if rec_ino == ino:
            ext = Extent.unpack(rec_block, cursor.value())
            if ext.end_block > first_block:
                yield ext
        if not cursor.next():
            return


def all_extents(txn: lmdb.Transaction[bytes], db: lmdb._Database, ino: int) -> Iterator[Extent]:
    return extents_in(txn, db, ino, 0, 1 << 62)


def unmap_range(txn: lmdb.Transaction[bytes], db: lmdb._Database, ino: int, first_block: int, end_block: int) -> list[tuple[int, int]]:
    """Remove the mapping of file blocks [first_block, end_block); return superseded (dev, count)."""
    superseded: list[tuple[int, int]] = []
    for ext in list(extents_in(txn, db, ino, first_block, end_block)):
        txn.delete(fmap_key(ino, ext.file_block), db=db)
        cut_start = max(ext.file_block, first_block)
        cut_end = min(ext.end_block, end_block)
        superseded.append((ext.dev_block + cut_start - ext.file_block, cut_end - cut_start))
        if ext.file_block < cut_start:
            head = ext.slice(ext.file_block, cut_start)
            txn.put(fmap_key(ino, head.file_block), head.pack_value(), db=db)
        if cut_end < ext.end_block:
            tail = ext.slice(cut_end, ext.end_block)
            txn.put(fmap_key(ino, tail.file_block), tail.pack_value(), db=db)
    return superseded


def map_extent(txn: lmdb.Transaction[bytes], db: lmdb._Database, ino: int, ext: Extent) -> None:
    """Insert `ext` (its range must be unmapped), merging with a device-contiguous predecessor.

    Merging keeps a file written by many small appends from fragmenting into one record per write.
    """
    assert len(ext.checksums) == 4 * ext.count and 0 < ext.count <= MAX_EXTENT_BLOCKS, ext
    if ext.file_block > 0:
        for prev in extents_in(txn, db, ino, ext.file_block - 1, ext.file_block):
            if (
                prev.end_block == ext.file_block
                and prev.dev_block + prev.count == ext.dev_block
                and prev.count + ext.count <= MAX_EXTENT_BLOCKS
            ):
                merged = Extent(prev.file_block, prev.dev_block, prev.count + ext.count, prev.checksums + ext.checksums)
                txn.put(fmap_key(ino, prev.file_block), merged.pack_value(), db=db)
                return
    txn.put(fmap_key(ino, ext.file_block), ext.pack_value(), db=db)


def mapped_blocks(txn: lmdb.Transaction[bytes], db: lmdb._Database, ino: int, first_block: int, end_block: int) -> int:
    """How many of file blocks [first_block, end_block) are mapped (not holes)."""
    total = 0
    for ext in extents_in(txn, db, ino, first_block, end_block):
        total += min(ext.end_block, end_block) - max(ext.file_block, first_block)
    return total
