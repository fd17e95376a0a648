"""Last-writer-wins between sites judged by when a write was made, not when it committed
(meta/sites/capture.py `content_time`, log level 20, CONTENT_TIME_LEVEL).

A single node answers a small file's close before its data is written (fs/batch.py): the
WriteData commits up to a batch later, carrying the time of its writes (`mtime_ns`). Two linked
sites' state machines on real stores (tests/repl/test_sites_sm.py's harness): site a writes
first and commits after site b's later write; b's must win on both sites, as it would have had
a's close written its data at once.
"""

from __future__ import annotations

import random
import stat
from pathlib import Path

import pytest

from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.records import ROOT_INO, Extent
from tests.repl.test_sites_sm import Site, blocks_of, linked_pair, ship, write

LONG_AGO_NS = 10**9
"""An mtime the application set (tar's): far before any commit of the test's clocks (10**12 on)."""


def at_level(site: Site, level: int) -> None:
    """Make `site` a cluster whose members all reach `level` (and no further)."""
    with site.store.env.begin(write=True) as txn:
        txn.put(b"ca_cert", b"-", db=site.store.db["meta"])
        txn.put(b"log_level", level.to_bytes(8, "big"), db=site.store.db["meta"])


@pytest.mark.parametrize(("level", "mtime", "winner"), [
    (levels.CONTENT_TIME_LEVEL, "written", "b"),
    (levels.CONTENT_TIME_LEVEL - 1, "written", "a"),  # a cluster with a member on an older build: as before
    (levels.CONTENT_TIME_LEVEL, "set long ago", "a"),  # a time the application set is no write's
], ids=["stamped-when-written", "below-the-level", "a-set-time"])
def test_a_write_committed_after_a_later_write_on_the_other_site_loses_to_it(
        tmp_path: Path, level: int, mtime: str, winner: str) -> None:
    a, b = linked_pair(tmp_path)
    at_level(a, level)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    bf = b.read(lambda txn: b.sm.ns.lookup(txn, ROOT_INO, b"f"))
    written = a.tick()  # a's write(2) and close, its data left to a batch
    b.now = written
    by_b = write(b, bf, 0, 1, 2)  # b's write, 1 µs later, committed at once
    a.now = written + 500_000_000  # a's batch commits half a second after its write
    by_a = random.Random(1).randbytes(4)
    a.apply(c.WriteData(f, (Extent(0, a.take_blocks(1), 1, by_a),), 4096, a.tick(),
                        mtime_ns=written if mtime == "written" else LONG_AGO_NS))
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot()
    shown = a.read(lambda txn: blocks_of(a, txn, f))
    assert shown == ((0, by_b if winner == "b" else by_a),), f"{winner}'s write should show on both sites"
