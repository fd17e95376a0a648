"""Unlink, then link the same site again (meta/sites/relink.py), in the state machine: two sites on
their own stores as in test_sites_sm.py. What both sites held before the unlink is paired up
again, not duplicated; what changed on either side while unlinked converges like any concurrent
change; a link to another site is a first link; an unlink never followed by a relink keeps
nothing growing, and unlinking again drops what was kept.

Seeded like test_sites_sm.py: a failure names its seed, `AWSOMEFS_SITES_SEED=n` replays it.
"""

from __future__ import annotations

import random
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from awsomefsd.crdt import ops as o
from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, Extent
from awsomefsd.meta.sites.relink import SiteRelink
from awsomefsd.meta.sites.tables import SiteRecords
from tests.repl.test_sites_sm import (
    Site,
    apply_refusable,
    conflict_keys,
    conflicts_folder,
    kept_copies,
    linked_pair,
    random_command,
    random_step,
    run_seeds,
    ship,
    unreachable_inodes,
)
from tests.support import seeds


def settle(a: Site, b: Site) -> None:
    """Ship both ways until nothing is left, then let both forget everything."""
    while ship(a, b) + ship(b, a):
        pass
    for _ in range(3):
        ship(a, b, forget=True)
        ship(b, a, forget=True)


def relink(a: Site, b: Site) -> None:
    a.apply(c.LinkSite(b.id, a.tick()))
    b.apply(c.LinkSite(a.id, b.tick()))


def unlink(a: Site, b: Site) -> None:
    a.apply(c.UnlinkSite(a.tick()))
    b.apply(c.UnlinkSite(b.tick()))


def shown_objects(site: Site) -> set[bytes]:
    """The global ids of the inodes the users' tree shows (each object once)."""
    def read(txn: Any) -> set[bytes]:
        found: set[bytes] = set()
        pending = [ROOT_INO]
        while pending:
            for _name, child in site.sm.ns.names(txn, pending.pop()):
                if child in (2, 3, 4):
                    continue
                obj = site.sm.sites.object_of(txn, child)
                assert obj is not None, f"inode {child} is shown and has no id"
                found.add(obj)
                if site.sm.ns.require_inode(txn, child).is_dir:
                    pending.append(child)
        return found
    return site.folded(read)


def held_objects(site: Site) -> set[bytes]:
    """The global ids the site tables hold, shown or not."""
    return site.folded(lambda txn: {bytes(key) for key, _ in txn.cursor(db=site.store.db["sids"])})


def assert_converged(a: Site, b: Site, what: str) -> None:
    differ = sorted(set(a.snapshot().items()) ^ set(b.snapshot().items()))
    assert not differ, f"{what}: the sites differ at {differ[:6]}"
    assert conflict_keys(a) == conflict_keys(b), f"{what}: the sites list different conflicts"
    assert kept_copies(a) == kept_copies(b), f"{what}: the sites keep different losing contents"
    assert conflicts_folder(a) == conflicts_folder(b), f"{what}: /.conflicts differs"


def names(site: Site) -> set[bytes]:
    return set(site.snapshot())


def mkfile(site: Site, parent: int, name: bytes, data_seed: int = 0) -> int:
    ino = site.new_ino()
    site.apply(c.Mknod(parent, name, ino, stat.S_IFREG | 0o644, 1000, 1000, site.tick()))
    if data_seed:
        write(site, ino, data_seed)
    return ino


def write(site: Site, ino: int, data_seed: int) -> None:
    rng = random.Random(data_seed)
    extent = Extent(0, site.take_blocks(2), 2, rng.randbytes(8))
    site.apply(c.WriteData(ino, (extent,), 2 * 4096, site.tick()))


def linked_with_files(tmp_path: Path) -> tuple[Site, Site, dict[bytes, int]]:
    """Two linked sites holding the same few files (made on both sides), replicated."""
    a, b = linked_pair(tmp_path)
    inos = {b"notes.txt": mkfile(a, ROOT_INO, b"notes.txt", 1), b"todo": mkfile(a, ROOT_INO, b"todo", 2)}
    docs = a.new_ino()
    a.apply(c.Mknod(ROOT_INO, b"docs", docs, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    inos[b"docs"] = docs
    inos[b"docs/a"] = mkfile(a, docs, b"a", 3)
    mkfile(b, ROOT_INO, b"from-b", 4)
    settle(a, b)
    return a, b, inos


def ino_on(site: Site, path: bytes) -> int:
    def read(txn: Any) -> int:
        ino = ROOT_INO
        for part in path.split(b"/"):
            found = site.sm.ns.lookup(txn, ino, part)
            assert found is not None, path
            ino = found
        return ino
    return site.read(read)


def test_an_unlink_and_a_relink_with_nothing_changed_sends_nothing_and_shows_everything_once(tmp_path: Path) -> None:
    a, b, _ = linked_with_files(tmp_path)
    before = a.snapshot()
    unlink(a, b)
    a.apply(c.LinkSite(b.id, a.tick()))
    sent = b.apply(c.LinkSite(a.id, b.tick()))
    assert sent == 0, "nothing changed: nothing to send"
    settle(a, b)
    assert a.snapshot() == b.snapshot() == before
    assert not [n for n in names(a) if b".conflict-" in n]
    assert not a.conflicts() and not b.conflicts()


def test_changes_made_on_each_side_while_unlinked_converge_without_duplicates(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    unlink(a, b)
    write(a, inos[b"notes.txt"], 11)  # edited on both: a real conflict
    write(b, ino_on(b, b"notes.txt"), 12)
    a.apply(c.Rename(ROOT_INO, b"todo", inos[b"docs"], b"todo-moved", 0, a.tick()))  # renamed on a only
    b.apply(c.SetAttr(ino_on(b, b"todo"), b.tick(), mode=0o600))  # and chmodded on b only
    b.apply(c.Unlink(ino_on(b, b"docs"), b"a", False, b.tick()))  # deleted on b
    a.apply(c.SetXattr(ino_on(a, b"from-b"), b"user.tag", b"x", 0, a.tick()))
    mkfile(a, ROOT_INO, b"new-on-a", 5)
    mkfile(b, inos[b"docs"] and ino_on(b, b"docs"), b"new-on-b", 6)
    relink(a, b)
    settle(a, b)
    assert_converged(a, b, "after the relink")
    got = names(a)
    assert got == {b"/notes.txt", b"/docs", b"/docs/todo-moved", b"/from-b", b"/new-on-a", b"/docs/new-on-b"}, got
    snap = a.snapshot()
    assert snap[b"/docs/todo-moved"][1] == 0o600, "the rename on one side and the chmod on the other both stand"
    assert snap[b"/from-b"][6] == ((b"user.tag", b"x"),)
    kinds = sorted(r["kind"] for r in a.conflicts() if r["open"])
    assert kinds == ["content"], f"only the file edited on both sides is a conflict: {kinds}"


def test_a_relink_to_another_site_is_a_first_link(tmp_path: Path) -> None:
    a, b, _ = linked_with_files(tmp_path)
    unlink(a, b)
    c_site = Site(tmp_path / "c", str(uuid.UUID(int=0xC << 120)), 10**12 + 900)
    sent = a.apply(c.LinkSite(c_site.id, a.tick()))
    c_site.apply(c.LinkSite(a.id, c_site.tick()))
    assert sent > 0
    settle(a, c_site)
    assert_converged(a, c_site, "a first link to a third site")
    assert names(c_site) == names(a)


def test_unlinking_again_drops_what_was_kept_and_releases_deleted_files(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    unlink(a, b)
    a.apply(c.Unlink(ROOT_INO, b"todo", False, a.tick()))
    def orphans() -> set[int]:
        return a.read(lambda txn: {int.from_bytes(bytes(k), "big") for k, _ in txn.cursor(db=a.store.db["orphans"])})
    kept = a.read(lambda txn: a.sm.ns.get_inode(txn, inos[b"todo"]))
    assert kept is not None and inos[b"todo"] not in orphans(), \
        "deleted while unlinked: kept for a relink (the other site may have renamed it)"
    a.apply(c.UnlinkSite(a.tick()))  # `site unlink --forget`
    assert a.read(lambda txn: (a.sm.sites.kept_peer(txn), a.sm.sites.object_of(txn, inos[b"notes.txt"]))) \
        == (None, None)
    assert inos[b"todo"] in orphans(), "released to the orphan purge"
    with pytest.raises(FsError):
        a.apply(c.UnlinkSite(a.tick()))


def test_an_inode_number_used_again_while_unlinked_is_a_new_object(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    unlink(a, b)
    old = inos[b"docs/a"]
    a.apply(c.Unlink(inos[b"docs"], b"a", False, a.tick()))
    with a.store.env.begin(write=True) as txn:  # a repair purges it: the number may come again
        a.sm.delete_inode(txn, a.sm.ns.require_inode(txn, old), a.tick())
    a.apply(c.Mknod(ROOT_INO, b"other", old, stat.S_IFREG | 0o600, 0, 0, a.tick()))
    was = ino_on(b, b"docs/a")
    relink(a, b)
    settle(a, b)
    assert_converged(a, b, "after the relink")
    assert b"/docs/a" not in names(b)
    assert ino_on(b, b"other") != was, "the new file is a new object there, not the old one renamed"


SEEDS = seeds.params("sites-relink", 8, replay_var="AWSOMEFS_SITES_SEED")
MANY_SEEDS = seeds.fresh_range("sites-relink-many", 400)


def random_round(rng: random.Random, a: Site, b: Site, steps: int, *, linked: bool) -> None:
    for _ in range(steps):
        random_step(rng, a, b, linked=linked)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_changes_around_an_unlink_and_a_relink_converge_and_pair_up_what_both_held(tmp_path: Path,
                                                                                          seed: int) -> None:
    """Linked: random commands, shipped at random moments (some left in the outbox at the
    unlink); a unlinks, and b, sometimes not told, captures a few more before it unlinks too;
    unlinked: random commands on both, nothing captured; linked again: more; then
    everything shipped. Both converge, and no object shows twice: the objects shown right after
    the relink are those the two sites held (by id, shown or kept by the tree: a file kept
    unseen, below a directory deleted on one side and written on the other, may show again in a
    conflict's folder) before it, plus at most one per inode either made meanwhile. (Derived `.conflict-` names may appear: two objects given one name
    meanwhile, one on each side, is a real conflict.)"""
    rng = random.Random(seed)
    a, b = linked_pair(tmp_path)
    random_round(rng, a, b, 60, linked=True)
    known = shown_objects(a) | shown_objects(b) | held_objects(a) | held_objects(b)
    inodes_before = [set(shown_inodes(site)) for site in (a, b)]
    a.apply(c.UnlinkSite(a.tick()))
    if rng.random() < 0.5:  # b was not told (a partition): it captures on until unlinked there too
        for _ in range(rng.randint(1, 15)):
            apply_refusable(b, random_command(rng, b))
    b.apply(c.UnlinkSite(b.tick()))
    random_round(rng, a, b, 40, linked=False)
    new = sum(len(set(shown_inodes(site)) - before) for site, before in zip((a, b), inodes_before))
    relink(a, b)
    settle(a, b)
    assert_converged(a, b, f"seed {seed}, right after the relink")
    extra = shown_objects(a) - known
    assert len(extra) <= new, f"seed {seed}: {len(extra)} objects with new ids, {new} made while unlinked"
    random_round(rng, a, b, 30, linked=True)
    settle(a, b)
    assert_converged(a, b, f"seed {seed}")
    for site in (a, b):
        assert not site.read(lambda txn, s=site: s.sm.sites.kept_inodes(txn)), f"seed {seed}: deleted objects kept"
        assert not unreachable_inodes(site), f"seed {seed}: inodes neither reachable nor released"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_random_relinks_under_many_more_seeds(tmp_path: Path) -> None:
    run_seeds(test_random_changes_around_an_unlink_and_a_relink_converge_and_pair_up_what_both_held, tmp_path,
              MANY_SEEDS)


def shown_inodes(site: Site) -> list[int]:
    return [child for _parent, _name, child in site.entries()]


def test_planted_bug_ids_dropped_at_unlink_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping the tables at unlink (what `site unlink` did before) duplicates what both held."""
    def drop(self: Any, txn: Any, peer: bytes) -> None:
        self._forget_kept_link(txn)
    monkeypatch.setattr(SiteRelink, "keep_for_relink", drop)
    with pytest.raises(AssertionError):
        test_an_unlink_and_a_relink_with_nothing_changed_sends_nothing_and_shows_everything_once(tmp_path)


def test_planted_bug_an_id_kept_past_its_inode_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An id that outlives its inode hands the old object to the next inode of that number."""
    monkeypatch.setattr(SiteRecords, "inode_deleted", lambda self, txn, ino: None)
    monkeypatch.setattr(SiteRecords, "_fresh_object_id", lambda self, txn, ino: o.global_id(self.site(txn), ino))
    with pytest.raises(AssertionError):
        test_an_inode_number_used_again_while_unlinked_is_a_new_object(tmp_path)


def test_planted_bug_ids_dropped_at_unlink_fails_the_random_relink(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def drop(self: Any, txn: Any, peer: bytes) -> None:
        self._forget_kept_link(txn)
    monkeypatch.setattr(SiteRelink, "keep_for_relink", drop)
    failed = 0
    for seed in range(4):
        try:
            test_random_changes_around_an_unlink_and_a_relink_converge_and_pair_up_what_both_held(
                tmp_path / str(seed), seed)
        except AssertionError:
            failed += 1
    assert failed >= 3, f"only {failed} of 4 seeds caught it"


def test_volumes_changed_made_and_deleted_while_unlinked_converge_on_a_relink(tmp_path: Path) -> None:
    from tests.repl.test_sites_volumes import make_volume, volume_with_file, volumes

    a, b = linked_pair(tmp_path)
    _kept, f = volume_with_file(a, "kept")
    doomed = make_volume(a, "doomed")
    settle(a, b)
    unlink(a, b)
    write(a, f, 21)  # a file of a volume changed on a
    a.apply(c.DeleteVolume(doomed, a.tick()))  # a volume deleted on a
    fresh = make_volume(b, "fresh")  # a volume made on b, with a file
    mkfile(b, fresh, b"g", 22)
    relink(a, b)
    settle(a, b)
    assert_converged(a, b, "after the relink")
    assert volumes(a) == volumes(b)
    assert sorted(volumes(a)) == ["fresh", "kept"]


def test_nothing_kept_grows_while_unlinked(tmp_path: Path) -> None:
    """An unlink never followed by a relink: whatever the site does meanwhile, the tables kept
    for a relink hold no more rows than at the unlink (nothing is captured)."""
    from awsomefsd.meta.sites.tables import SITE_TABLES

    def rows(site: Site) -> int:
        return site.read(lambda txn: sum(txn.stat(site.store.db[name])["entries"] for name in SITE_TABLES))

    a, b, _ = linked_with_files(tmp_path)
    unlink(a, b)
    before = rows(a)
    rng = random.Random(5)
    for _ in range(300):
        apply_refusable(a, random_command(rng, a))
    assert rows(a) <= before


@pytest.mark.parametrize("level", [levels.RELINK_LEVEL - 1, levels.RELINK_LEVEL])
def test_a_cluster_keeps_its_tables_at_an_unlink_only_once_every_member_does(tmp_path: Path, level: int) -> None:
    """Members on an older build drop the site tables at an unlink and keep every purged inode's
    id: until every member runs this build (the cluster's log level, RELINK_LEVEL), none keeps
    them, so the replicas of one site hold the same rows. Below the level an unlink is the old
    one: nothing is kept, and a link again is a first link."""
    a, b = linked_pair(tmp_path)
    b.as_cluster_at(level)  # b is a cluster at `level`
    b.apply(c.Mknod(ROOT_INO, b"f", b.new_ino(), stat.S_IFREG | 0o644, 0, 0, b.tick()))
    settle(a, b)
    b.apply(c.UnlinkSite(b.tick()))
    kept = b.read(b.sm.sites.kept_peer)
    assert kept == (a.id if level >= levels.RELINK_LEVEL else None)
    ids = b.read(lambda txn: txn.stat(b.store.db["sids"])["entries"])
    assert (ids > 0) == (level >= levels.RELINK_LEVEL)


def test_a_name_a_relink_shows_again_is_told_to_the_kernel(tmp_path: Path) -> None:
    """A name conflict shows one of two files as `x.conflict-…`; the other is deleted while unlinked,
    and the relink shows the survivor as `x` again: the mount's kernel may cache both names, so
    the relink tells them as a capture does (`local_side_effects`, the daemon's invalidator)."""
    a, b = linked_pair(tmp_path)
    mkfile(a, ROOT_INO, b"x", 1)
    mkfile(b, ROOT_INO, b"x", 2)
    settle(a, b)
    shown = sorted(n for n in names(a) if n.startswith(b"/x"))
    assert len(shown) == 2 and shown[0] == b"/x" and b".conflict-" in shown[1], shown
    unlink(a, b)
    a.apply(c.Unlink(ROOT_INO, b"x", False, a.tick()))
    heard: list[Any] = []
    a.sm.sites.local_side_effects = heard.append
    a.apply(c.LinkSite(b.id, a.tick()))
    assert sorted(n for n in names(a) if n.startswith(b"/x")) == [b"/x"]
    told = {entry for applied in heard for entry in applied.entries}
    assert (ROOT_INO, b"x") in told and (ROOT_INO, shown[1][1:]) in told, told
