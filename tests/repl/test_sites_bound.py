"""A bounded outbox (meta/sites/bound.py), in the state machine: two sites on their own stores as
in test_sites_relink.py. The peer away for many commands, the outbox stops at its bound (past
it, `PauseCapture`); the peer's operations still apply meanwhile; once the peer acknowledged the
outbox, `ResumeCapture` sends what changed here as one operation per change, and the sites
converge with no conflict that the users did not make.
"""

from __future__ import annotations

import random
import stat
from pathlib import Path

import pytest

from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.sites.bound import SiteBound
from tests.repl.test_sites_relink import (
    assert_converged,
    ino_on,
    linked_with_files,
    mkfile,
    names,
    settle,
    write,
)
from tests.repl.test_sites_sm import Site, conflicts_folder, linked_pair, random_step, ship
from tests.support import seeds

BOUND = 20


def outbox(site: Site) -> int:
    return int(site.read(site.sm.sites.outbox_operations))


def paused(site: Site) -> bool:
    return bool(site.read(site.sm.sites.capture_paused))


def bounded(site: Site, cmd: object) -> int:
    """Apply a local command as a daemon does with the bound: past it, the node running the link
    proposes PauseCapture (repl/bound.py). Returns the outbox's size after the command."""
    site.apply(cmd)
    size = outbox(site)
    if size > BOUND and not paused(site):
        site.apply(c.PauseCapture(site.tick()))
    return size


def away_for_200_commands(a: Site) -> tuple[int, int]:
    """200 commands on `a` while its peer is away: files made, written, chmodded and renamed in a
    directory of their own. Returns the largest outbox seen and the most operations one command
    put in it."""
    work = a.new_ino()
    largest = bounded(a, c.Mknod(ROOT_INO, b"work", work, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
    most, files = largest, []
    for step in range(199):
        before = outbox(a)
        if step % 4 == 0 or not files:
            ino = a.new_ino()
            cmd: object = c.Mknod(work, b"f%d" % step, ino, stat.S_IFREG | 0o644, 1000, 1000, a.tick())
            files.append((ino, b"f%d" % step))
        elif step % 4 == 1:
            ino, _ = files[step % len(files)]
            size = bounded(a, c.SetAttr(ino, a.tick(), mode=0o600 + step % 8))
            largest, most = max(largest, size), max(most, size - before)
            continue
        elif step % 4 == 2:
            ino, name = files.pop(step % len(files))
            cmd = c.Rename(work, name, work, name + b"-r", 0, a.tick())
            files.append((ino, name + b"-r"))
        else:
            write(a, files[step % len(files)][0], 100 + step)
            size = outbox(a)
            if size > BOUND and not paused(a):
                a.apply(c.PauseCapture(a.tick()))
            largest, most = max(largest, size), max(most, size - before)
            continue
        size = bounded(a, cmd)
        largest, most = max(largest, size), max(most, size - before)
    return largest, most


def peer_away_then_back(tmp_path: Path) -> tuple[Site, Site]:
    """`a` works 200 commands with the peer away and pauses; `b` meanwhile edits what both hold;
    the link heals: `b`'s operations apply at `a` (paused), then `b` edits the same files again,
    `a` chmods one of `b`'s files; `a`'s outbox drains and `a` resumes."""
    a, b, inos = linked_with_files(tmp_path)
    largest, most = away_for_200_commands(a)
    assert paused(a)
    assert largest <= BOUND + most, f"the outbox grew to {largest} past its bound {BOUND} (+{most}: one command)"
    write(b, ino_on(b, b"docs/a"), 31)
    b.apply(c.SetAttr(ino_on(b, b"from-b"), b.tick(), mode=0o640))
    b.apply(c.SetXattr(ino_on(b, b"todo"), b"user.by", b"b", 0, b.tick()))
    while ship(b, a):  # the peer back: its operations apply here, capture still paused (no move among them)
        pass
    assert paused(a)
    a.apply(c.SetAttr(ino_on(a, b"docs/a"), a.tick(), mode=0o604))  # after the peer's write: captured
    write(b, ino_on(b, b"docs/a"), 33)  # the peer goes on editing what it edited
    b.apply(c.SetAttr(ino_on(b, b"from-b"), b.tick(), mode=0o644))
    while ship(a, b):  # the outbox drains: the peer acknowledged it all
        pass
    assert outbox(a) <= BOUND + most
    sent = a.apply(c.ResumeCapture(a.tick()))
    assert not paused(a)
    assert 0 < sent < 200, f"the resume sends one operation per change, not per command: {sent}"
    del inos
    return a, b


def test_an_outbox_past_its_bound_pauses_and_the_resume_converges_with_no_conflict(tmp_path: Path) -> None:
    a, b = peer_away_then_back(tmp_path)
    settle(a, b)
    assert_converged(a, b, "after the resume")
    assert not a.conflicts() and not b.conflicts(), \
        f"no change met a concurrent one: {[r['kind'] for r in a.conflicts()]}"
    got = names(b)
    assert {b"/work", b"/docs/a"} <= got and len([n for n in got if n.startswith(b"/work/")]) == 50
    snap = b.snapshot()
    assert snap[b"/docs/a"][1] == 0o604, "a local change made after the peer's applied is captured"
    assert snap[b"/from-b"][1] == 0o644 and snap[b"/todo"][6] == ((b"user.by", b"b"),)
    assert a.apply(c.ResumeCapture(a.tick())) == 0, "resumed already: nothing"


def test_planted_bug_no_note_refresh_on_apply_sends_the_peers_changes_back_as_conflicts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SiteBound, "_refresh_note", lambda self, txn, obj: None)
    a, b = peer_away_then_back(tmp_path)
    settle(a, b)
    assert a.conflicts(), "the resume sent the peer's own changes back, and they met its later ones"


def test_a_move_of_the_peers_ends_the_pause_and_meets_what_changed_here(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    a.apply(c.PauseCapture(a.tick()))
    a.apply(c.SetAttr(inos[b"todo"], a.tick(), mode=0o600))  # not captured: paused
    mkfile(a, ROOT_INO, b"new-on-a", 61)
    mkfile(b, ROOT_INO, b"new-on-b", 62)  # a create: a move into the tree
    ship(b, a)
    assert not paused(a), "names re-shown against tables the namespace no longer matches: resumed first"
    settle(a, b)
    assert_converged(a, b, "resumed by the peer's move")
    assert {b"/new-on-a", b"/new-on-b"} <= names(b) and b.snapshot()[b"/todo"][1] == 0o600
    assert not a.conflicts()


def test_a_local_change_the_peer_then_overwrites_while_paused_is_a_conflict_kept(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    a.apply(c.PauseCapture(a.tick()))
    a.apply(c.SetAttr(inos[b"notes.txt"], a.tick(), mode=0o600))  # not captured: paused
    b.apply(c.SetAttr(ino_on(b, b"notes.txt"), b.tick(), mode=0o640))  # the later change
    ship(b, a)
    a.apply(c.ResumeCapture(a.tick()))
    settle(a, b)
    assert_converged(a, b, "a change on each side")
    kinds = [r["kind"] for r in a.conflicts()]
    assert kinds == ["attributes"], f"the local change met the peer's: listed, not lost unseen: {kinds}"


def test_pausing_needs_a_link_and_an_unlink_while_paused_keeps_what_was_not_captured(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    a.apply(c.PauseCapture(a.tick()))
    a.apply(c.PauseCapture(a.tick()))  # again: nothing
    a.apply(c.SetAttr(inos[b"todo"], a.tick(), mode=0o600))
    a.apply(c.UnlinkSite(a.tick()))
    b.apply(c.UnlinkSite(b.tick()))
    with pytest.raises(FsError):
        a.apply(c.PauseCapture(a.tick()))
    a.apply(c.LinkSite(b.id, a.tick()))
    b.apply(c.LinkSite(a.id, b.tick()))
    settle(a, b)
    assert_converged(a, b, "relinked")
    assert b.snapshot()[b"/todo"][1] == 0o600, "the change made while paused reached the peer after the relink"


def test_a_rename_here_while_paused_meets_the_peers_rename_and_the_name_taken_again_stays(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    a.apply(c.PauseCapture(a.tick()))
    a.apply(c.Rename(ROOT_INO, b"notes.txt", ROOT_INO, b"notes.old", 0, a.tick()))  # not captured: paused
    made = mkfile(a, ROOT_INO, b"notes.txt", 41)  # a new file under the old name
    b.apply(c.Rename(ROOT_INO, b"notes.txt", ROOT_INO, b"moved-by-b", 0, b.tick()))
    ship(b, a)
    assert ino_on(a, b"notes.txt") == made, "the peer's move took away the file made here under that name"
    while ship(a, b):
        pass
    a.apply(c.ResumeCapture(a.tick()))
    settle(a, b)
    assert_converged(a, b, "a rename here and one there")
    got = names(a)
    assert b"/notes.txt" in got and b"/notes.old" in got and b"/moved-by-b" not in got, \
        f"the rename here, sent when the peer's met it, is the later: it wins {got}"
    assert [r["kind"] for r in a.conflicts()] == ["move"], "the peer's rename lost, listed"
    del inos


def test_an_edit_and_a_file_made_here_while_paused_in_a_directory_the_peer_removes_are_kept(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    a.apply(c.PauseCapture(a.tick()))
    write(a, inos[b"docs/a"], 51)  # not captured: paused
    mkfile(a, inos[b"docs"], b"made-while-paused", 52)
    docs_b = ino_on(b, b"docs")
    b.apply(c.Unlink(docs_b, b"a", False, b.tick()))
    b.apply(c.Unlink(ROOT_INO, b"docs", True, b.tick()))
    while ship(b, a):
        pass
    while ship(a, b):
        pass
    a.apply(c.ResumeCapture(a.tick()))
    settle(a, b)
    assert_converged(a, b, "a directory removed there, written in here")
    assert b"/docs" not in names(a), "the delete stands"
    kept = conflicts_folder(a)
    assert len(kept) == 2, f"the edit and the new file are kept in /.conflicts: {sorted(kept)}"


def run_bounded(tmp_path: Path, seed: int, steps: int = 200, bound: int = 12) -> tuple[Site, Site]:
    """test_sites_sm.py's random run with a bound on both sites: past it a site pauses, and
    resumes once the other applied its whole outbox, as repl/bound.py does."""
    rng = random.Random(seed)
    a, b = linked_pair(tmp_path)

    def look(site: Site, peer: Site) -> None:
        if not paused(site) and len(site.outbox_after(peer.applied_from_peer())) > bound:
            site.apply(c.PauseCapture(site.tick()))
        elif paused(site) and not site.outbox_after(peer.applied_from_peer()):
            site.apply(c.ResumeCapture(site.tick()))

    for _ in range(steps):
        random_step(rng, a, b)
        look(a, b)
        look(b, a)
    while paused(a) or paused(b) or ship(a, b) + ship(b, a):
        ship(a, b)
        ship(b, a)
        look(a, b)
        look(b, a)
    return a, b


BOUND_SEEDS = seeds.params("sites-bound", 4, replay_var="AWSOMEFS_SITES_SEED", fixed=(8, 10, 16, 19))
"""Fresh each run, and seeds that found bugs: 8 and 10, a content version shipped from a file
written since, capture paused (link.py's `shipping`); 16 and 19, a peer's move re-showing a
directory renamed here while paused under a second name (bound.py, `_apply_one`). 0..149 passed."""


@pytest.mark.parametrize("seed", BOUND_SEEDS)
def test_two_sites_with_a_small_bound_converge_under_random_changes(tmp_path: Path, seed: int) -> None:
    a, b = run_bounded(tmp_path, seed)
    for _ in range(3):  # both sites forget everything: a name in a deleted directory counts in nlink till then
        ship(a, b, forget=True)
        ship(b, a, forget=True)
    differ = sorted(set(a.snapshot().items()) ^ set(b.snapshot().items()))
    assert not differ, f"seed {seed}: the sites differ at {differ[:6]}"
    assert conflicts_folder(a) == conflicts_folder(b), f"seed {seed}: /.conflicts differs"


def test_a_file_deleted_here_while_paused_and_written_there_keeps_the_edit(tmp_path: Path) -> None:
    a, b, inos = linked_with_files(tmp_path)
    a.apply(c.PauseCapture(a.tick()))
    a.apply(c.Unlink(ROOT_INO, b"notes.txt", False, a.tick()))  # not captured: paused
    write(b, ino_on(b, b"notes.txt"), 71)  # the later change, not knowing of the delete
    ship(b, a)
    while ship(a, b):
        pass
    if paused(a):
        a.apply(c.ResumeCapture(a.tick()))
    settle(a, b)
    assert_converged(a, b, "deleted here, written there")
    assert b"/notes.txt" not in names(a), "the delete stands"
    assert len(conflicts_folder(a)) == 1, "the edit it did not see is kept, as when linked"
    del inos
