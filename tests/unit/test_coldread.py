"""A read worker's map cache (fs/coldread.py): what it answers from, and its bound. Its coherence
with the files' changes is the mounted exerciser's (tests/mounted/test_read_workers.py)."""

from __future__ import annotations

import pytest

from awsomefsd.fs import coldread
from awsomefsd.fs.coldread import MapCache
from awsomefsd.meta.records import Extent


def extent(first: int, count: int) -> Extent:
    return Extent(first, 1000 + first, count, b"\0\0\0\0" * count)


def test_an_entry_answers_only_ranges_one_extent_holds_under_the_generations_it_was_read_under() -> None:
    cache = MapCache()
    cache.remember(7, (1, 1), 5 << 20, [extent(0, 256)])
    cache.remember(7, (1, 1), 5 << 20, [extent(512, 256)])
    entry = cache.get(7)
    assert entry is not None and entry.seen == (1, 1) and entry.size == 5 << 20
    assert entry.covering(10, 20) == extent(0, 256)
    assert entry.covering(600, 768) == extent(512, 256)
    assert entry.covering(300, 301) is None, "a block no cached extent holds"
    assert entry.covering(200, 300) is None, "a range past the extent's end"
    cache.remember(7, (2, 1), 1 << 20, [extent(0, 16)])  # the slot moved on: a new entry
    entry = cache.get(7)
    assert entry is not None and entry.seen == (2, 1) and entry.covering(600, 601) is None
    assert cache.extents == 1


def test_the_cache_is_emptied_when_it_reaches_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coldread, "CACHED_EXTENTS", 4)
    cache = MapCache()
    cache.remember(1, (1, 1), 1 << 30, [extent(0, 256), extent(256, 256), extent(512, 256)])
    cache.remember(2, (1, 1), 1 << 30, [extent(0, 256)])
    assert cache.extents == 4 and cache.get(1) is not None
    cache.remember(3, (1, 1), 1 << 30, [extent(0, 256)])
    assert cache.get(1) is None and cache.get(2) is None and cache.extents == 1
