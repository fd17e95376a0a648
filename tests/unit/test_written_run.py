"""`written_run` (meta/filemap.py), the common read's lookup, against the lookup it replaced: the
extents overlapping the range decoded, exactly one written extent on the device holding all of
it, sliced. Random maps (holes, unwritten and tiered extents, extents of neighbouring inodes),
seeded: the seed is in the failure message."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.meta.filemap import extents_in, map_extent, written_run
from awsomefsd.meta.records import TIER_BASE_BLOCK, Extent
from awsomefsd.meta.store import MetaStore
from tests.support.seeds import fresh_one

INO = 42


def expected(txn: object, db: object, ino: int, first: int, end: int) -> tuple[int, bytes] | None:
    found = list(extents_in(txn, db, ino, first, end))  # type: ignore[arg-type]
    if len(found) != 1:
        return None
    ext = found[0]
    if not ext.checksums or ext.dev_block >= TIER_BASE_BLOCK or ext.file_block > first or ext.end_block < end:
        return None
    piece = ext.slice(first, end)
    return piece.dev_block, piece.checksums


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    s = MetaStore(tmp_path)
    yield s
    s.env.close()


def test_written_run_answers_what_the_decoded_extents_answer(store: MetaStore) -> None:
    seed = fresh_one("written-run")
    rng = random.Random(seed)
    db = store.db["fmap"]
    with store.env.begin(write=True) as txn:
        for ino in (INO - 1, INO, INO + 1):
            block = rng.randrange(0, 4)
            while block < 600:
                count = rng.randrange(1, 40)
                kind = rng.choice(["written", "written", "written", "unwritten", "tiered"])
                dev = (TIER_BASE_BLOCK if kind == "tiered" else 0) + rng.randrange(1, 1 << 30)
                sums = b"" if kind == "unwritten" else rng.randbytes(4 * count)
                map_extent(txn, db, ino, Extent(block, dev, count, sums))
                block += count + rng.choice([0, 0, 0, rng.randrange(1, 20)])  # a hole now and then
        for _ in range(5000):
            first = rng.randrange(0, 700)
            end = first + rng.randrange(0, 50)
            ino = rng.choice([INO, INO, INO, INO - 1, INO + 1, INO + 7])
            assert written_run(txn, db, ino, first, end) == expected(txn, db, ino, first, end), \
                f"seed {seed}: inode {ino} blocks [{first}, {end})"
