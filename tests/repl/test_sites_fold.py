"""Captured later, folded in batches (issue 47, meta/sites/pending.py): a linked site that
records what its creates, attribute changes, extended attributes and writes did, and folds
that into the replicated tree, the registers and the outbox later (FoldCapture, or first thing
in any command that reads the site tables), ends with the same tables, every one of them, as a
site that captures in each command: the same stamps, the same `seen`, the same conflicts kept.

A differential over seeded random two-site workloads (tests/repl/test_sites_sm.py's `run`),
with folds at random moments; and two planted bugs it must catch: a batch of the other site's
operations applied before what waits is folded, and records folded newest first.
"""

from __future__ import annotations

import random
import stat
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.crdt.hlc import Stamp
from awsomefsd.meta import commands as c
from awsomefsd.meta import state_machine
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.sites import capture
from awsomefsd.meta.sites.capture import SiteCapture
from awsomefsd.meta.sites.pending import PENDING
from tests.repl import test_sites_sm
from tests.repl.test_sites_sm import Site, linked_pair, random_command, run, ship
from tests.support import seeds

SEEDS = seeds.params("sites-fold", 6, replay_var="AWSOMEFS_SITES_FOLD_SEED")


def make(rng: random.Random, site: Site, roll: float) -> object | None:
    """The random workload, with a fold of a few records now and then (the link's FoldCapture)."""
    if roll > 0.92:
        return c.FoldCapture(rng.randint(1, 4))
    return random_command(rng, site)


def tables(site: Site) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every row of every table of the site's store."""
    return site.read(lambda txn: {name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
                                  for name, db in sorted(site.store.db.items())})


def folded_head(site: Site) -> Stamp | None:
    """The head capture at once acknowledges with. One that leaves out what waits for a fold is
    as safe (those records saw everything acknowledged, and are stamped after it: the link's
    receiver acknowledges so), but lets the other site forget sooner, and tables differ."""
    site.apply(c.FoldCapture(1 << 20))
    return site.read(site.sm.sites.head)


def both_ways(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tables that differ between the run capturing later and the one capturing at once."""
    monkeypatch.setattr(test_sites_sm, "acknowledged_head", folded_head)
    later = run(tmp_path / "later", seed, make=make)
    with monkeypatch.context() as patched:
        patched.setattr(SiteCapture, "folds_later", lambda self, txn: False)
        at_once = run(tmp_path / "at-once", seed, make=make)
    differ = []
    for name, one, other in ((n, s1, s2) for n, s1, s2 in zip("ab", later, at_once, strict=True)):
        left, right = tables(one), tables(other)
        differ += [f"site {name}, table {table}" for table in left if left[table] != right[table]]
    return differ


@pytest.mark.parametrize("seed", SEEDS)
def test_capture_folded_later_makes_the_tables_capture_at_once_makes(tmp_path: Path, seed: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    differ = both_ways(tmp_path, seed, monkeypatch)
    assert not differ, f"seed {seed}: capture folded later differs from capture at once in {differ}"


def test_a_linked_create_waits_for_its_fold_and_a_remote_batch_folds_it_first(tmp_path: Path) -> None:
    """The create itself writes one record and nothing of the tree; the fold makes its two
    operations; an ApplyRemote from the other site folds first, so the create's `seen` is what
    it was when it was made (it did not see the batch)."""
    a, b = linked_pair(tmp_path)
    a.apply(c.Mknod(ROOT_INO, b"mine", a.new_ino(), stat.S_IFREG | 0o644, 0, 0, a.tick()))
    assert a.read(lambda txn: a.sm.sites.unfolded(txn)) == 1
    assert a.read(lambda txn: a.sm.sites.outbox(txn, None, 10)) == []
    assert a.read(lambda txn: a.sm.sites.pending_after(txn, None)) == 1, "status counts what waits"
    b.apply(c.Mknod(ROOT_INO, b"theirs", b.new_ino(), stat.S_IFREG | 0o644, 0, 0, b.tick()))
    ship(b, a)  # a applies b's batch: its own create is folded first
    assert a.read(lambda txn: a.sm.sites.unfolded(txn)) == 0
    ops = [raw for _, raw in a.outbox_after(None)]
    assert len(ops) == 2 and all(b'"seen":{}' in raw for raw in ops), ops


def any_seed_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int = 6) -> bool:
    return any(both_ways(tmp_path / str(seed), seed, monkeypatch) for seed in range(count))


def test_planted_bug_a_remote_batch_applied_before_the_fold_is_caught(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_machine, "UNFOLDED", (*capture.UNFOLDED, c.ApplyRemote))
    assert any_seed_differs(tmp_path, monkeypatch)


def test_planted_bug_folding_newest_first_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = capture.scan

    def newest_first(txn: Any, db: Any, prefix: bytes) -> Any:
        found = list(scan(txn, db, prefix))
        return reversed(found) if prefix == PENDING else iter(found)
    monkeypatch.setattr(capture, "scan", newest_first)
    assert any_seed_differs(tmp_path, monkeypatch)


@pytest.mark.parametrize("level", [c.FOLD_LEVEL - 1, c.FOLD_LEVEL])
def test_a_cluster_records_for_a_fold_only_once_every_member_does(tmp_path: Path, level: int) -> None:
    """A member on an older build captures in the command and cannot decode FoldCapture: until
    every member runs this build (the cluster's log level, FOLD_LEVEL), every replica captures
    at once, and the operations are in the outbox when the create commits."""
    a, _b = linked_pair(tmp_path)
    with a.store.env.begin(write=True) as txn:  # a is a cluster at `level`
        txn.put(b"ca_cert", b"-", db=a.store.db["meta"])
        txn.put(b"log_level", level.to_bytes(8, "big"), db=a.store.db["meta"])
    a.apply(c.Mknod(ROOT_INO, b"f", a.new_ino(), stat.S_IFREG | 0o644, 0, 0, a.tick()))
    waiting = a.read(lambda txn: a.sm.sites.unfolded(txn))
    shipped = a.read(lambda txn: a.sm.sites.outbox(txn, None, 10))
    assert (waiting, len(shipped)) == ((1, 0) if level >= c.FOLD_LEVEL else (0, 2))
