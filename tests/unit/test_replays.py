"""A node's own predictions written as predicted when the log applies them (meta/replays.py), on a
real one-member Raft log through the metadata client, against a reference state machine that
applies every command by its handler, in the log's order: the tables must match byte for byte,
whether the predictions were written as they were or applied in full because something else was
applied in between."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path

import pytest

from awsomefsd.meta import ahead
from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, Extent
from awsomefsd.meta.replays import Replays
from tests.unit.test_ahead import COMPARED_TABLES, Reference, client, table_contents

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


async def both(meta: MetaClient, reference: Reference, command: c.Command[object]) -> object:
    """Propose `command` and wait (applied in full), and apply it to the reference."""
    result = await meta.propose(command)
    assert reference.apply(command) == result
    return result


def assert_same_tables(meta: MetaClient, reference: Reference) -> None:
    for table in (*COMPARED_TABLES, "volumes", "meta"):
        ours = table_contents(meta._sm.store.env, meta._sm.db[table])
        theirs = table_contents(reference.store.env, reference.sm.db[table])
        if table == "meta":  # the log's own bookkeeping differs: compare what the handlers keep
            ours = [(k, v) for k, v in ours if k.endswith(b"_next")]
            theirs = [(k, v) for k, v in theirs if k.endswith(b"_next")]
        assert ours == theirs, table


async def setup_directory(meta: MetaClient, reference: Reference, name: bytes = b"d") -> tuple[int, int]:
    """A directory at the root, and the first of the inode numbers reserved after it."""
    first, _ = await both(meta, reference, c.ReserveInodes(10_000))  # type: ignore[misc]
    await both(meta, reference, c.Mknod(ROOT_INO, name, first, DIR, 0, 0, 10))
    return first, first + 1


async def test_a_burst_of_changes_run_ahead_is_written_as_predicted(tmp_path: Path) -> None:
    """Creates, attribute changes and unlinks (of files with no data) run ahead with nothing else
    applied in between: each is written as predicted, none run again, and the tables are the
    reference's."""
    reference = Reference(tmp_path / "ref")
    async with client(tmp_path / "node") as meta:
        directory, ino = await setup_directory(meta, reference)
        commands: list[c.Command[object]] = []
        for i in range(40):
            commands.append(c.Mknod(directory, b"f%d" % i, ino + i, FILE, 1, 1, 100 + i,
                                    cookie=c.delegated_cookie(ino + 1000 + i)))
        commands += [c.SetAttr(ino + i, 200 + i, mode=0o600, mtime_ns=300 + i) for i in range(0, 40, 3)]
        commands += [c.SetXattr(ino + 1, b"user.k", b"v", 0, 400)]
        commands += [c.Unlink(directory, b"f%d" % i, False, 500 + i) for i in range(0, 40, 2)]
        commands += [c.UnlinkAlone(directory, b"f%d" % i, False, 600 + i, ino=ino + i) for i in range(1, 40, 4)]
        commands += [c.Rename(directory, b"f3", directory, b"g3", 0, 700, cookie=c.delegated_cookie(ino + 2000))]
        for command in commands:
            assert await meta.run_ahead(command) == reference.apply(command)
        await meta.barrier()
        assert meta._sm.replays.replayed == len(commands)
        assert len(meta._sm.replays) == 0
        assert meta.ahead.losses == 0
        assert_same_tables(meta, reference)


async def test_a_change_applied_in_between_has_the_waiting_predictions_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another member's unlink of a second name of the same file commits while this node's unlink
    of the first name waits in the pipeline: the prediction counted two links, the log applies it
    to a file with one. Written as predicted it would leave the file with a link and no name; it
    is predicted again on the state the log applies it to, and what was predicted on it runs in
    full (a chmod of that file, made on the first prediction, would otherwise bring the link
    back)."""
    monkeypatch.setattr(ahead, "GATHER_S", 30.0)  # held until the barrier: the other change goes first
    reference = Reference(tmp_path / "ref")
    async with client(tmp_path / "node") as meta:
        d1, ino = await setup_directory(meta, reference, b"d1")
        d2 = ino
        await both(meta, reference, c.Mknod(ROOT_INO, b"d2", d2, DIR, 0, 0, 11))
        x = ino + 1
        await both(meta, reference, c.Mknod(d1, b"a", x, FILE, 0, 0, 12))
        await both(meta, reference, c.Link(x, d2, b"b", 13))
        mine = c.Unlink(d1, b"a", False, 100)
        after = c.Mknod(d1, b"later", ino + 2, FILE, 0, 0, 101, cookie=c.delegated_cookie(ino + 3))
        theirs = c.Unlink(d2, b"b", False, 102)  # another member's, in the directory it holds
        assert await meta.run_ahead(mine) == x
        await meta.run_ahead(after)
        await meta.ahead._log.propose(theirs)  # straight to the log, ahead of the batch being gathered
        chmod = c.SetAttr(x, 103, mode=0o600)  # predicted after theirs applied, on mine's prediction
        await meta.run_ahead(chmod)
        await meta.barrier()
        for command in (theirs, mine, after, chmod):
            reference.apply(command)
        # Mine is predicted again on what the log applies it to (the chmod, made since the other
        # unlink applied, could stay exact), and writes other records: no link left, not one. The
        # chmod, made on mine's prediction, is then no longer exact: it and the create run in full.
        assert (meta._sm.replays.predicted_again, meta._sm.replays.replayed) == (1, 1)
        assert_same_tables(meta, reference)
        left = meta.inode(x)
        assert left is None or left.nlink == 0, left  # an orphan, or gone: no link without a name


@pytest.mark.parametrize("bug", [False, True], ids=["exact", "bug-predicting-again"])
async def test_a_change_elsewhere_in_between_leaves_the_later_predictions_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: bool) -> None:
    """Another member's create in another directory commits between this node's two creates: the
    first, predicted before it, is predicted again and writes the same records, so the second,
    predicted after it, is still exact and written as it is (a busy member is not left running
    every later change in full). With a command's bug (COMMAND_BUGS) met while predicting again,
    the log's transaction does not fail: both run in full, which keeps the bug that command's."""
    monkeypatch.setattr(ahead, "GATHER_S", 30.0)
    reference = Reference(tmp_path / "ref")
    async with client(tmp_path / "node") as meta:
        directory, ino = await setup_directory(meta, reference)
        first = c.Mknod(directory, b"f", ino, FILE, 0, 0, 100, cookie=c.delegated_cookie(ino + 1))
        theirs = c.Mknod(ROOT_INO, b"other", ino + 2, FILE, 0, 0, 101)
        second = c.Mknod(directory, b"g", ino + 3, FILE, 0, 0, 102, cookie=c.delegated_cookie(ino + 4))
        await meta.run_ahead(first)
        await meta.ahead._log.propose(theirs)
        await meta.run_ahead(second)
        if bug:
            def buggy(*_: object) -> None:
                raise ValueError("planted")

            meta._sm.replays.predict_again = buggy
        await meta.barrier()
        for command in (theirs, first, second):
            reference.apply(command)
        assert (meta._sm.replays.predicted_again, meta._sm.replays.replayed) == ((0, 0) if bug else (1, 2))
        assert_same_tables(meta, reference)


async def test_writes_take_and_free_space_as_the_full_apply_does(tmp_path: Path) -> None:
    """A WriteData's new extents are checked and taken from free space by the real apply, and the
    extents an overwrite supersedes are deferred, in the tables and in memory; a prediction only
    notes those, and writing it as predicted does them: free space, the deferred frees and the
    counters end as the reference's."""
    reference = Reference(tmp_path / "ref")
    async with client(tmp_path / "node") as meta:
        directory, ino = await setup_directory(meta, reference)
        commands: list[c.Command[object]] = [
            c.Mknod(directory, b"f", ino, FILE, 0, 0, 100, cookie=c.delegated_cookie(ino + 1)),
            c.WriteData(ino, (Extent(0, 400, 2, bytes(8)),), 8192, 101),
            c.SetAttr(ino, 102, mtime_ns=5),
            c.WriteData(ino, (Extent(1, 402, 1, bytes(4)), Extent(2, 403, 1, bytes(4))), 12288, 103),
            c.WriteData(ino, (Extent(0, 404, 1, bytes(4)),), 12288, 104),
        ]
        for command in commands:
            assert await meta.run_ahead(command) == reference.apply(command)
        await meta.barrier()
        assert meta._sm.replays.replayed == len(commands)
        for start in range(400, 405):
            assert not meta._sm.space.mirror.contains_free(start, 1)
        assert_same_tables(meta, reference)
        for table in ("free", "dfree"):
            assert table_contents(meta._sm.store.env, meta._sm.db[table]) == \
                table_contents(reference.store.env, reference.sm.db[table]), table


async def test_a_write_whose_blocks_were_taken_meanwhile_is_refused_as_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another command takes the blocks a waiting write maps before the write's batch applies (a
    member writing into groups it no longer owns: what the check exists for). The prediction could
    not see it; the command applied in between makes the write run in full, which refuses it, and
    the loss is reported at the next durability point."""
    monkeypatch.setattr(ahead, "GATHER_S", 30.0)
    reference = Reference(tmp_path / "ref")
    async with client(tmp_path / "node") as meta:
        directory, ino = await setup_directory(meta, reference)
        await both(meta, reference, c.Mknod(directory, b"f", ino, FILE, 0, 0, 100))
        await both(meta, reference, c.Mknod(directory, b"g", ino + 1, FILE, 0, 0, 100))
        mine = c.WriteData(ino, (Extent(0, 500, 2, bytes(8)),), 8192, 101)
        theirs = c.WriteData(ino + 1, (Extent(0, 501, 1, bytes(4)),), 4096, 102)
        await meta.run_ahead(mine)
        await meta.ahead._log.propose(theirs)
        reference.apply(theirs)
        with pytest.raises(FsError):
            reference.apply(mine)
        with pytest.raises(FsError):
            await meta.barrier()  # the lost write is reported at the durability point
        assert (meta._sm.replays.predicted_again, meta._sm.replays.replayed) == (0, 0)  # nothing after it
        assert_same_tables(meta, reference)


async def test_on_a_linked_site_nothing_is_written_as_predicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture on a linked site tells listeners what it kept, which a prediction does not: every
    change is applied in full, and none is predicted again for nothing (a change applied in
    between made the first two inexact)."""
    from tests.repl.test_sites_sm import Site

    monkeypatch.setattr(ahead, "GATHER_S", 30.0)
    here = str(uuid.UUID(int=0xA << 120))
    peer = Site(tmp_path / "peer", str(uuid.UUID(int=0xB << 120)), 10**12)
    peer.apply(c.LinkSite(uuid.UUID(here).bytes, peer.tick()))
    async with client(tmp_path / "node", here) as meta:
        await meta.propose(c.LinkSite(peer.id, 10**12))
        first, _ = await meta.propose(c.ReserveInodes(100))
        for i in range(5):
            if i == 2:
                await meta.ahead._log.propose(c.Mknod(ROOT_INO, b"other", first + 99, FILE, 0, 0, 10**12 + 6))
            await meta.run_ahead(c.Mknod(ROOT_INO, b"x%d" % i, first + i, FILE, 0, 0, 10**12 + 5 + i,
                                         cookie=c.delegated_cookie(first + 50 + i)))
        await meta.barrier()
        assert meta.ahead.losses == 0
        assert (meta._sm.replays.predicted_again, meta._sm.replays.replayed) == (0, 0)


def test_only_the_oldest_prediction_of_its_generation_is_exact() -> None:
    """The bookkeeping alone: a full apply while predictions wait, a prediction decided without its
    apply, and an apply out of the order predicted each leave the waiting ones inexact."""
    replays = Replays()
    a, b, d, e = (c.SetAttr(n, 1) for n in range(4))
    for command in (a, b):
        replays.record(command, {}, None, [])
    assert replays.take(a)[1] and replays.take(b)[1]  # in order, nothing between
    replays.applied_in_full()  # nothing waits: the generation need not move
    replays.record(d, {}, None, [])
    replays.applied_in_full()
    assert replays.take(d)[1] is False
    replays.record(a, {}, None, [])
    replays.record(b, {}, None, [])
    replays.forget(a)  # decided, never applied (its batch refused)
    assert not replays.take(b)[1]
    replays.record(d, {}, None, [])
    replays.record(e, {}, None, [])
    replay, exact = replays.take(e)
    assert replay is not None and not exact  # d was skipped
    assert replays.take(c.SetAttr(2, 1)) == (None, False)  # an equal command, not the one predicted
    assert len(replays) == 1


def test_predicting_again_stops_when_exact_predictions_do_not_follow() -> None:
    """Predicting again costs a second apply: it goes on only while, lately, enough exact
    predictions were written per prediction made again (and one made since the last full apply
    waits); past the probes without exact ones it stops, and starts again once exact ones come."""
    from awsomefsd.meta import replays as r

    replays = Replays()
    commands = [c.SetAttr(n, 1) for n in range(4 * r.PAYOFF_WINDOW)]
    stale, fresh = commands[0], commands[1]
    replays.record(stale, {}, None, [])
    replays.applied_in_full()
    assert not replays.worth_predicting_again()  # nothing made since waits: the full apply is cheaper
    replays.record(fresh, {}, None, [])
    made_again = 0
    while replays.worth_predicting_again():
        replays.predicting_again()
        made_again += 1
        assert made_again <= r.PROBE
    assert made_again == r.PROBE
    for command in commands[2:]:  # a long run of exact ones, as after a lone change elsewhere
        replays.record(command, {}, None, [])
    assert not replays.take(stale)[1]  # made again: it wrote what it had, nothing moved on
    for command in [fresh, *commands[2:]]:
        assert replays.take(command)[1]
    replays.record(commands[2], {}, None, [])
    replays.applied_in_full()
    replays.record(commands[3], {}, None, [])
    assert replays.worth_predicting_again()
