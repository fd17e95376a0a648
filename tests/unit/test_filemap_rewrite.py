"""A write's one look at the block map (`windows`, `survey`, `rewrite` in meta/filemap.py) against
what it replaced: `unmap_range` of every range of the write, then `map_extent` of every new
extent, and a survey that looked each range up again. Every replica must end with the same
records whichever of the two it runs (a cluster upgrades one node at a time), so the records
are compared byte for byte, with the superseded device ranges and the survey's answer.

Random maps, seeded (the seed is in the failure message): holes, unwritten extents and a write
landing exactly on them, extents up to the record limit that span several of a write's ranges,
new extents device-adjacent to what precedes them (the merges), neighbouring inodes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.meta import filemap
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, Extent
from awsomefsd.meta.store import MetaStore
from tests.support.seeds import fresh_one

INO = 42
FILE_BLOCKS = 2000


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[MetaStore, MetaStore]]:
    pair = (MetaStore(tmp_path / "old"), MetaStore(tmp_path / "new"))
    yield pair
    for store in pair:
        store.env.close()


def random_map(rng: random.Random) -> list[tuple[int, Extent]]:
    """Records of three inodes: runs of written and unwritten extents with holes between; the
    written file's start at its beginning, or later (a write may end before its first record),
    or nowhere (a new file: `windows` takes one seek for either)."""
    records = []
    for ino in (INO - 1, INO, INO + 1):
        block = rng.randrange(0, 3) if ino != INO else rng.choice([0, 1, 2, 2, 40, 300, FILE_BLOCKS])
        while block < FILE_BLOCKS:
            count = rng.choice([1, 1, 2, rng.randrange(1, 40), MAX_EXTENT_BLOCKS])
            dev = rng.randrange(1, 1 << 20) * 1024
            sums = b"" if rng.random() < 0.2 else rng.randbytes(4 * count)
            records.append((ino, Extent(block, dev, count, sums)))
            block += count + rng.choice([0, 0, 0, rng.randrange(1, 20)])
    return records


def random_write(rng: random.Random, old: list[Extent]) -> tuple[Extent, ...]:
    """New extents in file order, disjoint, in runs of adjacent ones; some device-adjacent to the
    extent before them, some exactly on an unwritten extent (written in place)."""
    by_end = {ext.end_block: ext for ext in old}
    extents: list[Extent] = []
    block = rng.randrange(0, 50)
    dev = rng.randrange(1, 1 << 20) * 1024 + 7
    most = rng.choice([1, 2, 3, 64])  # a short write may end just before, at or after a file's first record
    while block < FILE_BLOCKS + 50 and len(extents) < most:
        count = rng.choice([1, 1, 1, 2, rng.randrange(1, 30), rng.randrange(1, MAX_EXTENT_BLOCKS + 1)])
        holder = next((e for e in old if e.file_block <= block < e.end_block), None)
        if holder is not None and holder.unwritten and rng.random() < 0.5:  # in place
            start = holder.dev_block + block - holder.file_block
            count = min(count, holder.end_block - block)
        elif block in by_end and rng.random() < 0.4:  # merges with the record ending here
            prev = by_end[block]
            start = prev.dev_block + prev.count
        elif extents and extents[-1].end_block == block and rng.random() < 0.5:
            start = extents[-1].dev_block + extents[-1].count
        else:
            start = dev
            dev += count + rng.randrange(0, 3)
        extents.append(Extent(block, start, count, rng.randbytes(4 * count)))
        block += count + rng.choice([0, 0, 1, rng.randrange(1, 300)])
    return tuple(extents)


def old_way(txn: object, db: object, extents: tuple[Extent, ...]) -> tuple[list[tuple[int, int]], int, list[tuple[int, int]]]:
    """The superseded ranges, the replaced count and the in-place ranges, as before the one look."""
    ranges: list[tuple[int, int]] = []
    for ext in extents:
        if ranges and ranges[-1][1] == ext.file_block:
            ranges[-1] = (ranges[-1][0], ext.end_block)
        else:
            ranges.append((ext.file_block, ext.end_block))
    replaced, in_place = 0, []
    for first, end in ranges:
        for cur in filemap.extents_in(txn, db, INO, first, end):  # type: ignore[arg-type]
            replaced += min(cur.end_block, end) - max(cur.file_block, first)
            for ext in extents if cur.unwritten else ():
                lo, hi = max(cur.file_block, ext.file_block), min(cur.end_block, ext.end_block)
                if lo < hi and cur.dev_block - cur.file_block == ext.dev_block - ext.file_block:
                    in_place.append((cur.dev_block + lo - cur.file_block, hi - lo))
    superseded = [piece for first, end in ranges for piece in filemap.unmap_range(txn, db, INO, first, end)]  # type: ignore[arg-type]
    for ext in extents:
        filemap.map_extent(txn, db, INO, ext)  # type: ignore[arg-type]
    return superseded, replaced, in_place


def test_one_look_writes_what_unmap_and_map_wrote(stores: tuple[MetaStore, MetaStore]) -> None:
    seed = fresh_one("filemap-rewrite")
    rng = random.Random(seed)
    old_store, new_store = stores
    for round_ in range(150):
        if round_ % 10 == 0:  # a fresh map now and then, else writes pile up on the last ones
            records = random_map(rng)
            for store in stores:
                with store.env.begin(write=True) as txn:
                    txn.drop(store.db["fmap"], delete=False)
                    for ino, ext in records:
                        txn.put(filemap.fmap_key(ino, ext.file_block), ext.pack_value(), db=store.db["fmap"])
        with old_store.env.begin() as txn:
            current = list(filemap.all_extents(txn, old_store.db["fmap"], INO))
        extents = random_write(rng, current)
        with old_store.env.begin(write=True) as txn:
            superseded, replaced, in_place = old_way(txn, old_store.db["fmap"], extents)
        with new_store.env.begin(write=True) as txn:
            db = new_store.db["fmap"]
            found = filemap.windows(txn, db, INO, extents)
            got_replaced, got_in_place = filemap.survey(found)
            assert (got_replaced, sorted(set(got_in_place))) == (replaced, sorted(set(in_place))), f"seed {seed} round {round_}"
            assert filemap.rewrite(txn, db, INO, found) == superseded, f"seed {seed} round {round_}"
        with old_store.env.begin() as old_txn, new_store.env.begin() as new_txn:
            assert list(new_txn.cursor(new_store.db["fmap"])) == list(old_txn.cursor(old_store.db["fmap"])), \
                f"seed {seed} round {round_}: the records differ after writing {len(extents)} extents"
