"""Edit against delete judged alike on both sites whatever each forgot (meta/sites/, design note
49's rule): the minimal histories the seeded two-site tests shrank to, each site forgetting at
its own time, as the shipper makes it (test_sites_sm.py's `ship`, with `forget`).

The verdict on a file that lost its last name reads every move on each path that took a name
away. A site that had forgotten one of them judged a shorter path than the other site, and the
two listed different conflicts (seeds 258013144 and 258014156 of the random test); a site that
deleted a volume judged none of the files in it, which the other site judged when the delete
arrived (seeds 507060455 and 507060536 of the random test with volumes).
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.tree import TRASH
from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.sites.tables import PATH_MOVE, scan
from awsomefsd.meta.sites.tree import Dirty, TableTree
from tests.repl.test_sites_sm import (
    Site,
    conflict_keys,
    conflicts_folder,
    kept_copies,
    linked_pair,
    ship,
    write,
)
from tests.repl.test_sites_volumes import make_volume, volume_named


def lookup(site: Site, parent: int, name: bytes) -> int:
    ino = site.read(lambda txn: site.sm.ns.lookup(txn, parent, name))
    assert ino is not None, name
    return int(ino)


def in_log(site: Site, stamp: object) -> bool:
    return site.read(lambda txn: TableTree(site.sm.sites, txn, Dirty()).entry_at(stamp) is not None)


def last_stamp(site: Site) -> object:
    stamp = site.read(site.sm.sites.head)
    assert stamp is not None
    return stamp


def assert_edit_kept_alike(a: Site, b: Site, written: bytes) -> None:
    assert a.snapshot() == b.snapshot()
    assert conflict_keys(a) == conflict_keys(b), "the sites list different conflicts"
    assert {kind for kind, _loser in conflict_keys(a)} == {"edit-delete"}
    assert kept_copies(a) == kept_copies(b) and conflicts_folder(a) == conflicts_folder(b)
    (kept,) = kept_copies(a).values()
    assert kept[3] == ((0, written),), "the edit is kept on both sites"


def test_a_link_into_a_directory_the_other_site_removed_counts_after_its_own_site_forgot_it(
        tmp_path: Path) -> None:
    """a writes /f; b, not knowing, links f into its directory /d as /d/g; a, not knowing of the
    link, removes /d. Neither meant to discard a's write through /d/g, so when f loses its last
    name (b unlinks /f, knowing everything) a's write is kept. b forgot its link (the horizon
    passed it) before that unlink, while a still held it: b judged the path without the link,
    as a removal a made knowing its own write, and kept nothing (seed 258013144)."""
    a, b = linked_pair(tmp_path)
    f = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    ship(a, b)
    written = write(a, f, 0, 1, 1)
    d = b.new_ino()
    b.apply(c.Mknod(ROOT_INO, b"d", d, stat.S_IFDIR | 0o755, 0, 0, b.tick()))
    ship(b, a)
    b.apply(c.Link(lookup(b, ROOT_INO, b"f"), d, b"g", b.tick()))
    link = last_stamp(b)
    a.apply(c.Unlink(ROOT_INO, b"d", True, a.tick()))
    removal = last_stamp(a)
    assert link < removal
    ship(b, a, forget=True)  # a applies the link and acknowledges it
    ship(a, b)  # b hears of the write and the removal
    b.apply(c.Mknod(ROOT_INO, b"e", b.new_ino(), stat.S_IFDIR | 0o755, 0, 0, b.tick()))
    ship(b, a, count=0, forget=True)  # b forgets through its link, not the removal
    assert not in_log(b, link) and in_log(b, removal) and in_log(a, link)
    b.apply(c.Unlink(ROOT_INO, b"f", False, b.tick()))
    ship(b, a)
    ship(a, b)
    assert_edit_kept_alike(a, b, written)


def test_a_removal_forgotten_while_its_directory_is_kept_still_counts_for_the_files_below(tmp_path: Path) -> None:
    """a removes /d; b, not knowing, writes /f and links it into /d as /d/g. a forgets its removal
    but keeps /d (a content below it is newer than what it forgot), then unlinks /f knowing
    everything. b's write lost the name /d/g to a removal that had not seen it: it is kept. a
    looked for the removal among the file's own deletes, not the directory's, judged the path
    as b's link alone, made knowing b's write, and kept nothing (seed 258014156)."""
    a, b = linked_pair(tmp_path)
    d = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"d", d, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    a.apply(c.Unlink(ROOT_INO, b"d", True, a.tick()))
    removal = last_stamp(a)
    b.now = a.now + 10_000  # b writes after the removal by stamp, not knowing of it
    f = b.new_ino()
    b.apply(c.Mknod(ROOT_INO, b"f", f, stat.S_IFREG | 0o644, 0, 0, b.tick()))
    written = write(b, f, 0, 1, 2)
    b.apply(c.Link(f, lookup(b, ROOT_INO, b"d"), b"g", b.tick()))
    ship(a, b)
    ship(b, a)
    a.apply(c.Mknod(ROOT_INO, b"e", a.new_ino(), stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b, count=0, forget=True)  # a forgets through its removal
    assert not in_log(a, removal) and in_log(b, removal)
    assert a.read(lambda txn: a.sm.sites.placement(txn, a.sm.sites.object_of(txn, d)).parent) == TRASH, \
        "a keeps /d, deleted, for the content below it"
    a.apply(c.Unlink(ROOT_INO, b"f", False, a.tick()))
    ship(a, b)
    ship(b, a)
    assert_edit_kept_alike(a, b, written)


def test_a_volume_deleted_here_judges_the_files_in_it_as_the_other_site_does(tmp_path: Path) -> None:
    """A file of a volume has two names; a writes it; b, not knowing, removes one name; a, knowing
    that, deletes the volume. The removal discarded a's write unknowingly: it is kept. b judged
    the file when the volume's delete arrived; a, deleting the volume itself, judged only the
    volume's root (seeds 507060455 and 507060536 of the random test with volumes)."""
    a, b = linked_pair(tmp_path)
    vol = make_volume(a, "pvc")
    f = a.new_ino()
    a.apply(c.Mknod(vol, b"f", f, stat.S_IFREG | 0o644, 0, 0, a.tick()))
    a.apply(c.Link(f, vol, b"g", a.tick()))
    ship(a, b)
    written = write(a, f, 0, 1, 3)
    b_vol = volume_named(b, "pvc")
    assert b_vol is not None
    b.apply(c.Unlink(b_vol["root"], b"g", False, b.tick()))
    ship(b, a)
    assert a.apply(c.DeleteVolume(vol, a.tick())) is True
    ship(a, b)
    ship(b, a)
    assert volume_named(a, "pvc") is None and volume_named(b, "pvc") is None, "the delete stands"
    assert_edit_kept_alike(a, b, written)


@pytest.mark.parametrize("level", [levels.SITE_PATHS_LEVEL - 1, levels.SITE_PATHS_LEVEL])
def test_a_cluster_keeps_path_moves_only_once_every_member_does(tmp_path: Path, level: int) -> None:
    """Members on an older build keep no PATH_MOVE rows and judge without them: until every
    member runs this build (the cluster's log level, SITE_PATHS_LEVEL), none keeps them, so the
    replicas of one site hold the same rows and judge alike. b forgets the placement of /d/f
    after a removed /d, which b had not forgotten yet."""
    a, b = linked_pair(tmp_path)
    assert b.read(b.sm.sites.at_site_paths_level), "a single node is held back by no one"
    b.as_cluster_at(level)  # b is a cluster at `level`
    assert b.read(b.sm.sites.at_site_paths_level) == (level >= levels.SITE_PATHS_LEVEL)
    d = b.new_ino()
    b.apply(c.Mknod(ROOT_INO, b"d", d, stat.S_IFDIR | 0o755, 0, 0, b.tick()))
    ship(b, a)
    b.apply(c.Mknod(d, b"f", b.new_ino(), stat.S_IFREG | 0o644, 0, 0, b.tick()))
    (placed,) = [stamp for stamp, raw in b.outbox_after(None)
                 if isinstance(op := o.decode(raw), o.Moved) and op.name == b"f"]
    a.now = b.now + 10_000  # a's removal is later by stamp: b forgets up to its own move only
    a.apply(c.Unlink(ROOT_INO, b"d", True, a.tick()))
    removal = last_stamp(a)
    ship(b, a, forget=True)
    ship(a, b)
    b.apply(c.Mknod(ROOT_INO, b"e", b.new_ino(), stat.S_IFDIR | 0o755, 0, 0, b.tick()))
    ship(b, a, count=0, forget=True)
    assert not in_log(b, placed) and in_log(b, removal)
    kept = b.read(lambda txn: sum(1 for _ in scan(txn, b.sm.sites.meta, PATH_MOVE)))
    assert kept == (1 if level >= levels.SITE_PATHS_LEVEL else 0)


def test_a_deleted_directory_waits_to_be_released_while_an_entry_below_it_moved_in_after(tmp_path: Path) -> None:
    """b removes /p; a, not knowing, moves /e into it, while b, not knowing of that move, makes
    /e/x. b then forgets its removal: /p, released with what is below it, took /e and /e/x
    with it, though both moves that put them there were later and not on both sites yet. a's
    next operation, older than b's /e/x by stamp, made b's log undo a move of a node gone: the
    batch failed for ever (seeds 258014451 and 507061005 of the random tests, where the move
    that came next named an object b had released)."""
    a, b = linked_pair(tmp_path)
    p, e = a.new_ino(), a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"p", p, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    a.apply(c.Mknod(ROOT_INO, b"e", e, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    b.apply(c.Unlink(ROOT_INO, b"p", True, b.tick()))
    removal_ops = len(b.outbox_after(a.applied_from_peer()))
    a.now = b.now + 10_000  # a's clock runs ahead of b's removal
    a.apply(c.Mknod(ROOT_INO, b"z", a.new_ino(), stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    b.now = a.now + 100_000  # b's /e/x is later by stamp than what a does next
    b.apply(c.Mknod(lookup(b, ROOT_INO, b"e"), b"x", b.new_ino(), stat.S_IFDIR | 0o755, 0, 0, b.tick()))
    a.apply(c.Rename(ROOT_INO, b"e", p, b"e", 0, a.tick()))
    ship(b, a, count=removal_ops, forget=True)  # a hears of the removal only, and acknowledges it
    ship(a, b)  # b hears of the move into /p
    ship(b, a, count=0, forget=True)  # b forgets through its removal
    removed = b.read(lambda txn: b.sm.sites.object_of(txn, lookup(b, ROOT_INO, b"z")))
    assert removed is not None
    a.apply(c.Mknod(ROOT_INO, b"q", a.new_ino(), stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    ship(a, b)
    ship(b, a)
    assert a.snapshot() == b.snapshot() and set(a.snapshot()) == {b"/z", b"/q"}, "the removal takes /e and /e/x"
    assert conflict_keys(a) == conflict_keys(b)
    for _ in range(3):  # quiet: both forget everything, and release what the removal took
        ship(a, b, forget=True)
        ship(b, a, forget=True)
    for site in (a, b):
        assert not site.read(lambda txn, s=site: s.sm.sites.kept_inodes(txn)), "deleted objects kept"
