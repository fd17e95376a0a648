"""Changes acknowledged ahead of the log (meta/ahead.py, meta/overlay.py), differentially: random
commands run ahead through the metadata client on a real (one-member Raft) log, against the same
commands applied one by one to a second state machine. Every predicted result must be the one the
reference gives, every read in between must see the reference's state, and once the pipeline has
drained the two stores must hold the same tables byte for byte."""

from __future__ import annotations

import errno
import random
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio
import trio.testing

from awsomefsd.meta import ahead
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.ahead import can_run_ahead
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError, OutcomeUnknown, certainly_not_applied
from awsomefsd.meta.overlay import Overlay, OverlayTxn
from awsomefsd.meta.records import ROOT_INO, Extent
from awsomefsd.meta.replication.fs_log import ReplicatedFsLog
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import TABLES, MetaStore
from tests.support import seeds

NAMES = [b"a", b"b", b"c", b"d", b"e", b"f"]
COMPARED_TABLES = ("inodes", "dentries", "cookies", "xattrs", "symlinks", "orphans", "fmap", "wleases", "free", "dfree")
assert set(COMPARED_TABLES) <= set(TABLES)


def bootstrapped(path: Path, cluster_id: str = "c") -> tuple[MetaStore, StateMachine]:
    store = MetaStore(path)
    sm = StateMachine(store)
    with store.env.begin(write=True) as txn:
        sm.bootstrap(txn, cluster_id=cluster_id, device_id="d", data_extent=(256, 10_000), now_ns=1)
    with store.env.begin() as txn:
        sm.load(txn)
    return store, sm


class Reference:
    """The same commands, applied at once, each in its own transaction."""

    def __init__(self, path: Path) -> None:
        self.store, self.sm = bootstrapped(path)

    def apply(self, command: object) -> Any:
        with self.store.env.begin(write=True) as txn:
            return self.sm.apply(txn, command)

    def lookup(self, parent: int, name: bytes) -> int | None:
        with self.store.env.begin() as txn:
            return self.sm.ns.lookup(txn, parent, name)

    def entries(self, parent: int) -> list[tuple[int, bytes, int]]:
        with self.store.env.begin() as txn:
            return list(self.sm.ns.entries(txn, parent))


@asynccontextmanager
async def client(path: Path, cluster_id: str = "c") -> AsyncIterator[MetaClient]:
    store, sm = bootstrapped(path, cluster_id)
    log = ReplicatedFsLog(store, sm)
    meta = MetaClient(log, sm)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await nursery.start(meta.run_pipeline)
        yield meta
        nursery.cancel_scope.cancel()


def outcome(fn: Any) -> Any:
    try:
        return fn()
    except FsError as exc:
        return ("error", exc.errno)


async def outcome_async(fn: Any) -> Any:
    try:
        return await fn()
    except FsError as exc:
        return ("error", exc.errno)


class Workload:
    """Random namespace commands in two directories, with numbers from a reserved range."""

    def __init__(self, seed: int, dirs: list[int], first_ino: int) -> None:
        self.rng = random.Random(seed)
        self.dirs = dirs
        self.next = first_ino
        self.now = 100
        self.known = list(dirs)
        self.device_next = 300  # fresh device blocks for WriteData, never reused

    def fresh(self) -> int:
        self.next += 1
        return self.next

    def command(self) -> object:
        rng, self.now = self.rng, self.now + 1
        parent, name = rng.choice(self.dirs), rng.choice(NAMES)
        kind = rng.random()
        if kind < 0.35:
            ino = self.fresh()
            self.known.append(ino)
            mode = rng.choice([stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777])
            return c.Mknod(parent, name, ino, mode, 1000, 1000, self.now,
                           target=b"t" if stat.S_ISLNK(mode) else b"", cookie=c.delegated_cookie(ino),
                           lease_to=rng.choice([0, 7]))
        if kind < 0.55:
            return c.Unlink(parent, name, rng.random() < 0.3, self.now)
        if kind < 0.75:
            return c.Rename(parent, name, rng.choice(self.dirs), rng.choice(NAMES),
                            rng.choice([0, c.RENAME_NOREPLACE, c.RENAME_EXCHANGE]), self.now,
                            cookie=c.delegated_cookie(self.fresh()))
        if kind < 0.8:
            return c.Link(rng.choice(self.known), parent, name, self.now, cookie=c.delegated_cookie(self.fresh()))
        if kind < 0.9:
            return c.SetAttr(rng.choice(self.known), self.now, mode=rng.randrange(0o7777), mtime_ns=rng.randrange(1 << 40))
        if kind < 0.93:
            blocks = rng.randrange(1, 3)
            self.device_next += blocks
            extent = Extent(rng.randrange(4), self.device_next - blocks, blocks, bytes(4 * blocks))
            return c.WriteData(rng.choice(self.known), (extent,), extent.end_block * 4096 - rng.randrange(4096), self.now)
        if kind < 0.96:
            return c.SetXattr(rng.choice(self.known), b"user." + name, bytes([rng.randrange(256)]) * 3,
                              rng.choice([0, 1, 2]), self.now)
        return c.RemoveXattr(rng.choice(self.known), b"user." + name, self.now)


def table_contents(env: lmdb.Environment, db: Any) -> list[tuple[bytes, bytes]]:
    with env.begin() as txn:
        return [(bytes(k), bytes(v)) for k, v in txn.cursor(db)]


@pytest.mark.parametrize("seed", seeds.params("ahead", 3))
async def test_run_ahead_predicts_what_the_log_applies(tmp_path: Path, seed: int) -> None:
    reference = Reference(tmp_path / "ref")
    async with client(tmp_path / "node") as meta:
        setup = [c.ReserveInodes(100_000)]
        first, _end = reference.apply(setup[0])
        assert await meta.propose(setup[0]) == (first, _end)
        dirs = []
        for i, name in enumerate((b"d1", b"d2")):
            mk = c.Mknod(ROOT_INO, name, first + i, stat.S_IFDIR | 0o755, 0, 0, 10)
            reference.apply(mk)
            await meta.propose(mk)
            dirs.append(first + i)
        workload = Workload(seed, dirs, first + 10)
        for step in range(600):
            command = workload.command()
            assert can_run_ahead(command)
            expected = outcome(lambda cmd=command: reference.apply(cmd))
            got = await outcome_async(lambda cmd=command: meta.run_ahead(cmd))
            assert got == expected, (step, command)
            parent = dirs[step % 2]
            for name in NAMES:
                assert meta.lookup(parent, name) == reference.lookup(parent, name), (step, name)
            listed = [(cookie, name, inode.ino, inode.mode) for cookie, name, inode in meta.entries(parent)]
            assert [entry[:3] for entry in listed] == reference.entries(parent), step
            assert list(meta.listing(parent)) == listed, step
            pause = workload.rng.random()
            if pause < 0.1:
                await trio.sleep(0.002)  # let a batch commit while later changes to the same records wait
            elif pause < 0.3:
                await trio.sleep(0)
            if step % 97 == 0:
                await meta.barrier()  # a durability point in the middle: nothing was lost
            if workload.rng.random() < 0.03:  # a reservation straight to the log, before what waits:
                reserve = c.ReserveInodes(7)  # it leaves the predictions exact (UNSEEN_BY_PREDICTIONS)
                assert await meta.ahead._log.propose(reserve) == reference.apply(reserve)
        await meta.barrier()
        assert meta.ahead.losses == 0
        assert meta.ahead.ran_ahead > 100 and meta.ahead.proposals < meta.ahead.ran_ahead
        assert meta._sm.replays.replayed > 0  # some were written as predicted (meta/replays.py)
        for table in COMPARED_TABLES:
            ours = table_contents(meta._sm.store.env, meta._sm.db[table])
            theirs = table_contents(reference.store.env, reference.sm.db[table])
            assert ours == theirs, table


async def lose_a_create(meta: MetaClient) -> int:
    """Acknowledge a create of /x ahead (inode `first`, returned) that the log then refuses:
    another proposer took the name first, which a delegation rules out. /x is `first + 1`."""
    first, _ = await meta.propose(c.ReserveInodes(100))
    mine = c.Mknod(ROOT_INO, b"x", first, stat.S_IFREG | 0o644, 0, 0, 5, cookie=c.delegated_cookie(first))
    theirs = c.Mknod(ROOT_INO, b"x", first + 1, stat.S_IFREG | 0o644, 0, 0, 5)
    async with trio.open_nursery() as nursery:
        # `theirs` goes straight to the log (nothing queued yet), `mine` is predicted before it lands
        nursery.start_soon(meta.ahead._log.propose, theirs)
        await trio.sleep(0)
        inode = await meta.run_ahead(mine)
    assert inode.ino == first
    return int(first)


async def test_a_refused_change_is_reported_at_the_next_durability_point(tmp_path: Path) -> None:
    """A change acknowledged ahead that the log then refuses (here: another proposer took the name
    first, which a delegation rules out) is lost: the next barrier says so, once."""
    async with client(tmp_path / "node") as meta:
        first = await lose_a_create(meta)
        with pytest.raises(FsError) as info:
            await meta.barrier()
        assert info.value.errno == errno.EIO
        await meta.barrier()  # reported once
        assert meta.lookup(ROOT_INO, b"x") == first + 1


async def test_the_daemons_own_barrier_leaves_the_report_to_the_applications_fsync(tmp_path: Path) -> None:
    """The link's and tiering's barriers (`report=False`) make everything durable as any barrier
    does, but a change acknowledged ahead and lost is the application's to hear of: such a
    barrier neither fails on it nor takes the one report its next durability point is owed (the
    shipper's barrier took it, failed the push with EIO, and the fsync after it succeeded)."""
    async with client(tmp_path / "node") as meta:
        first = await lose_a_create(meta)
        await meta.barrier(report=False)
        await meta.barrier(first, report=False)
        with pytest.raises(FsError) as info:
            await meta.barrier(first)
        assert info.value.errno == errno.EIO and "this file" in str(info.value)


async def test_an_fsync_of_a_file_whose_change_was_lost_fails_though_another_fsync_took_the_report(
        tmp_path: Path) -> None:
    """A lost change is reported to the next durability point anywhere, and also to the fsync of
    the file it touched: the nemesis found a process told its file was durable after its create
    was lost, because another process's fsync, of another file, had taken the one report."""
    async with client(tmp_path / "node") as meta:
        first = await lose_a_create(meta)
        with pytest.raises(FsError):
            await meta.barrier(first + 50)  # another file's fsync: the next durability point
        with pytest.raises(FsError) as info:
            await meta.barrier(first)
        assert info.value.errno == errno.EIO and "this file" in str(info.value)
        await meta.barrier(first)  # reported to it once
        await meta.barrier(first + 50)


def test_merged_cursor_walks_committed_and_overlay_records_in_key_order(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "env"), max_dbs=2, map_size=1 << 24)
    db = env.open_db(b"t")
    rng = random.Random(7)
    model: dict[bytes, bytes] = {}
    with env.begin(write=True) as txn:
        for _ in range(200):
            key, value = bytes([rng.randrange(40), rng.randrange(4)]), bytes([rng.randrange(256)])
            txn.put(key, value, db=db)
            model[key] = value
    overlay = Overlay()
    for entry in range(1, 30):
        scratch: dict[tuple[Any, bytes], bytes | None] = {}
        with env.begin() as base:
            view = OverlayTxn(base, overlay, scratch)
            for _ in range(5):
                key = bytes([rng.randrange(40), rng.randrange(4)])
                if rng.random() < 0.4:
                    view.delete(key, db=db)
                    model.pop(key, None)
                else:
                    view.put(key, bytes([rng.randrange(256)]), db=db)
                    model[key] = scratch[(db, key)]  # type: ignore[assignment]
        overlay.record(entry, scratch)
    ordered = sorted(model.items())
    with env.begin() as base:
        view = OverlayTxn(base, overlay)
        assert list(view.cursor(db)) == ordered
        cursor = view.cursor(db)
        for probe in [bytes([i, j]) for i in range(41) for j in range(5)]:
            at_or_after = [kv for kv in ordered if kv[0] >= probe]
            assert cursor.set_range(probe) == bool(at_or_after)
            if at_or_after:
                assert cursor.item() == at_or_after[0]
                before = [kv for kv in ordered if kv[0] < at_or_after[0][0]]
                assert cursor.prev() == bool(before)
                if before:
                    assert cursor.item() == before[-1]
            assert cursor.set_key(probe) == (probe in model)
            if probe in model:
                assert cursor.item() == (probe, model[probe])
        assert cursor.last() and cursor.item() == ordered[-1]
        assert [view.get(k, db=db) for k, _ in ordered] == [v for _, v in ordered]
        # a command's own writes, not recorded yet, on top of the overlay (what a prediction reads)
        scratch: dict[tuple[Any, bytes], bytes | None] = {}
        speculating = OverlayTxn(base, overlay, scratch)
        for key, _ in ordered[::3]:
            speculating.delete(key, db=db)
            model.pop(key)
        for i in range(0, 40, 7):
            speculating.put(bytes([i, 9]), b"new", db=db)
            model[bytes([i, 9])] = b"new"
        ordered = sorted(model.items())
        assert list(speculating.cursor(db)) == ordered
        cursor = speculating.cursor(db)
        assert cursor.last() and cursor.item() == ordered[-1]
        walked_back = [cursor.item()]
        while cursor.prev():
            walked_back.append(cursor.item())
        assert walked_back == ordered[::-1]


def test_a_cursor_sees_a_commands_own_writes_and_skips_the_merge_where_nothing_is_pending(tmp_path: Path) -> None:
    """A table nothing pending wrote is read through the committed cursor (a prediction's unlink
    walks the members table at every file); a table only the running command wrote is merged."""
    env = lmdb.open(str(tmp_path / "env"), max_dbs=3, map_size=1 << 24)
    quiet, busy = env.open_db(b"quiet"), env.open_db(b"busy")
    with env.begin(write=True) as txn:
        for i in range(5):
            txn.put(bytes([i]), b"c", db=quiet)
            txn.put(bytes([i]), b"c", db=busy)
    overlay = Overlay()
    with env.begin() as base:
        committed = [(bytes([i]), b"c") for i in range(5)]
        scratch: dict[tuple[Any, bytes], bytes | None] = {}
        view = OverlayTxn(base, overlay, scratch)
        assert [(bytes(k), bytes(v)) for k, v in view.cursor(quiet)] == committed
        view.put(b"\x09", b"mine", db=busy)  # written by the running command only, in no overlay
        view.delete(b"\x00", db=busy)
        assert list(view.cursor(busy)) == [*committed[1:], (b"\x09", b"mine")]
        overlay.record(1, scratch)
        later = OverlayTxn(base, overlay, {})
        assert list(later.cursor(busy)) == [*committed[1:], (b"\x09", b"mine")]
        assert [(bytes(k), bytes(v)) for k, v in later.cursor(quiet)] == committed
        cursor = later.cursor(quiet)
        assert cursor.set_range(b"\x03") and bytes(cursor.key()) == b"\x03"
        overlay.resolve(1)
        assert [(bytes(k), bytes(v)) for k, v in OverlayTxn(base, overlay, {}).cursor(busy)] == committed


class ScriptedLog:
    """A log that commits through a real state machine and fails the proposals it is told to:
    what the pipeline sends, and in which order, is what is checked."""

    def __init__(self, path: Path, fail_batches: set[int], *, failure: FsError | None = None) -> None:
        self.reference = Reference(path)
        self.fail_batches = fail_batches
        self.failure = failure or FsError(errno.EIO, "the log refused the batch (fenced)")
        self.batches: list[tuple[object, ...]] = []
        self.release = trio.Event()
        self.proposing = trio.Event()  # a proposal waits for `release`
        self.applied_listeners: list[Any] = []

    def read_txn(self) -> lmdb.Transaction[bytes]:
        return self.reference.store.env.begin()

    def lease_epoch(self) -> int | None:
        return None

    @property
    def applied_index(self) -> int:
        return len(self.batches)

    async def barrier(self) -> None:
        pass

    async def propose(self, command: object, *, epoch: int | None = None) -> Any:
        self.proposing.set()
        await self.release.wait()
        self.proposing = trio.Event()
        assert isinstance(command, c.Batch), "the pipeline proposes batches"
        self.batches.append(command.commands)
        if len(self.batches) in self.fail_batches:
            raise self.failure
        return self.reference.apply(command)


def scripted(tmp_path: Path, fail_batches: set[int], **kw: Any) -> tuple[ScriptedLog, MetaClient, Callable[[int], c.Mknod]]:
    """A ScriptedLog, a client on it, and `mk(i)`: the create of file f<i> with the i-th inode of a
    reservation (a create that runs ahead)."""
    log = ScriptedLog(tmp_path / "log", fail_batches, **kw)
    first, _ = log.reference.apply(c.ReserveInodes(1000))

    def mk(i: int) -> c.Mknod:
        return c.Mknod(ROOT_INO, b"f%d" % i, first + i, stat.S_IFREG | 0o644, 0, 0, 5, cookie=c.delegated_cookie(first + i))

    return log, MetaClient(log, log.reference.sm), mk  # type: ignore[arg-type]


async def test_a_failed_batch_fails_everything_queued_after_it_and_nothing_after_it_is_sent(tmp_path: Path) -> None:
    log, meta, mk = scripted(tmp_path, fail_batches={2})
    first = mk(0).ino

    async with trio.open_nursery() as nursery:
        await nursery.start(meta.run_pipeline)
        await meta.run_ahead(mk(0))
        log.release.set()
        await meta.ahead.drain()  # batch 1: f0
        log.release = trio.Event()
        for i in range(1, 4):
            await meta.run_ahead(mk(i))  # all three go in batch 2, which fails
        with trio.fail_after(5):
            await log.proposing.wait()  # batch 2 is on its way
        for i in range(4, 6):
            await meta.run_ahead(mk(i))  # queued while batch 2 is decided: failed with it, never sent
        log.release.set()
        with pytest.raises(FsError) as info:
            await meta.barrier()
        assert info.value.errno == errno.EIO
        assert meta.ahead.losses == 5
        assert [len(b) for b in log.batches] == [1, 3], "nothing queued behind the failed batch was sent"
        assert meta.lookup(ROOT_INO, b"f0") == first and meta.lookup(ROOT_INO, b"f4") is None
        await meta.run_ahead(mk(6))  # a change after the failure goes on normally
        await meta.barrier()
        assert [len(b) for b in log.batches] == [1, 3, 1] and meta.lookup(ROOT_INO, b"f6") == first + 6
        nursery.cancel_scope.cancel()


async def test_a_background_command_rides_the_batch_being_gathered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An orphan release (hurry=False) joins the changes queued ahead and goes with the batch being
    gathered; a command someone waits for sends the queue at once."""
    monkeypatch.setattr(ahead, "GATHER_S", 60.0)  # only a hurry sends before a minute
    log, meta, mk = scripted(tmp_path, fail_batches=set())
    first = mk(0).ino
    release = cc.ReleaseOrphans(2, (first + 500,), 5)
    async with trio.open_nursery() as nursery:
        await nursery.start(meta.run_pipeline)
        await meta.run_ahead(mk(0))
        nursery.start_soon(lambda: meta.propose(release, hurry=False))
        with trio.move_on_after(0.3):
            await log.proposing.wait()
        assert not log.proposing.is_set(), "the background command sent the batch being gathered"
        await meta.run_ahead(mk(1))
        log.release.set()
        await meta.barrier()  # a durability point hurries
        assert log.batches == [(mk(0), release, mk(1))]
        await meta.run_ahead(mk(2))
        await meta.propose(cc.ReleaseOrphans(2, (first + 501,), 5))  # awaited: at once, not after a minute
        assert [len(b) for b in log.batches] == [3, 2]
        nursery.cancel_scope.cancel()


async def test_a_create_made_for_another_member_cuts_the_gathering_short(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The other member's kernel waits for the commit (design note 147): a create made for it
    sends the batch being gathered after TOLD_GATHER_S, whether it comes during the gathering or
    before it began, and the holder's own changes go in the same batch; after BUSY_TOLD_GATHER_S
    when the holder is busy with its own (its last batch held BUSY_BATCH changes: note 158)."""
    monkeypatch.setattr(ahead, "GATHER_S", 60.0)
    monkeypatch.setattr(ahead, "BUSY_TOLD_GATHER_S", 1.0)
    log, meta, mk = scripted(tmp_path, fail_batches=set())
    log.release.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(meta.run_pipeline)
        await meta.run_ahead(mk(0))
        await trio.testing.wait_all_tasks_blocked()  # the pipeline gathers, for a minute
        with trio.fail_after(5):
            _, committed = await meta.run_ahead_committed(mk(1))
            await committed()
            _, committed = await meta.run_ahead_committed(mk(2))  # before any gathering began
            await meta.run_ahead(mk(3))
            await committed()
        assert log.batches == [(mk(0), mk(1)), (mk(2), mk(3))]
        # A node whose last batch was a full one is busy with its own changes: the create made for
        # another member cuts the gathering to BUSY_TOLD_GATHER_S (here a second), not to
        # TOLD_GATHER_S, and not to nothing.
        for i in range(4, 4 + ahead.BUSY_BATCH):
            await meta.run_ahead(mk(i))
        await meta.barrier()
        assert len(log.batches[-1]) == ahead.BUSY_BATCH
        proposing = log.proposing
        await meta.run_ahead(mk(98))
        await trio.testing.wait_all_tasks_blocked()  # the pipeline gathers, for a minute
        _, committed = await meta.run_ahead_committed(mk(99))
        with trio.move_on_after(0.3):
            await proposing.wait()
        assert not proposing.is_set(), "a busy holder's gathering was cut to the idle holder's"
        with trio.fail_after(5):  # not the minute of GATHER_S
            await committed()
        assert log.batches[-1] == (mk(98), mk(99))
        nursery.cancel_scope.cancel()


async def test_only_the_batch_whose_outcome_is_unknown_may_have_committed(tmp_path: Path) -> None:
    """A batch whose proposal timed out may still commit: its own changes hear OutcomeUnknown (a
    flush then keeps its blocks from reuse). What was queued behind it was never sent: those hear
    a failure that is certain, and may give back what they reserved."""
    log, meta, mk = scripted(tmp_path, fail_batches={1}, failure=OutcomeUnknown("test: timed out"))
    outcomes: dict[str, BaseException] = {}

    async def propose(name: str, command: object) -> None:
        try:
            await meta.propose(command)
        except FsError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(meta.run_pipeline)
        await meta.run_ahead(mk(0))
        with trio.fail_after(5):
            await log.proposing.wait()  # batch 1 is on its way
        nursery.start_soon(propose, "queued", c.SetAttr(ROOT_INO, 6, mode=0o755))
        await wait_until_one_is_queued_behind(meta)
        log.release.set()
        with trio.fail_after(5):
            while "queued" not in outcomes:
                await trio.sleep(0.001)
        assert not certainly_not_applied(OutcomeUnknown("x"))
        assert certainly_not_applied(outcomes["queued"]), outcomes["queued"]
        assert [len(b) for b in log.batches] == [1], "the queued change was never sent"
        nursery.cancel_scope.cancel()


async def wait_until_one_is_queued_behind(meta: MetaClient) -> None:
    """Until the pipeline holds a change besides the one in flight."""
    with trio.fail_after(5):
        while meta.ahead.pending < 2:
            await trio.sleep(0.001)


async def test_on_a_linked_site_a_change_whose_capture_needs_the_log_is_proposed_instead(tmp_path: Path) -> None:
    """On a site linked to another, what a change's capture does besides (meta/sites/capture.py) may need
    one of the log's counters: here an unlink gives the other site's file, shown under a conflict
    name, its own name back (a new entry, a new cookie). The prediction cannot know those, so the
    unlink is proposed and waited for (`Unpredictable`), not acknowledged ahead: the random
    two-site test on a cluster failed such an unlink with EIO."""
    from tests.repl.test_sites_sm import Site

    here = str(uuid.UUID(int=0xA << 120))
    peer = Site(tmp_path / "peer", str(uuid.UUID(int=0xB << 120)), 10**12)
    peer.apply(c.LinkSite(uuid.UUID(here).bytes, peer.tick()))
    peer.apply(c.Mknod(ROOT_INO, b"x", peer.new_ino(), stat.S_IFREG | 0o644, 0, 0, peer.tick()))
    async with client(tmp_path / "node", here) as meta:
        await meta.propose(c.LinkSite(peer.id, 10**12))
        first, _ = await meta.propose(c.ReserveInodes(100))
        await meta.run_ahead(c.Mknod(ROOT_INO, b"x", first, stat.S_IFREG | 0o644, 0, 0, 10**12 + 5,
                                     cookie=c.delegated_cookie(first)))
        raws = tuple(raw for _, raw in peer.outbox_after(None))
        await meta.propose(c.ApplyRemote(peer.id, b"", raws, (), (), 10**12 + 10))
        shown = sorted(name for _, name, _ in meta.entries(ROOT_INO) if name.startswith(b"x"))
        assert len(shown) == 2 and shown[0] == b"x", shown  # two creates of one name: both kept
        other = meta.lookup(ROOT_INO, shown[1])
        proposed = meta.ahead.unpredictable
        await meta.run_ahead(c.Unlink(ROOT_INO, b"x", False, 10**12 + 20))
        assert meta.ahead.unpredictable == proposed + 1
        assert meta.lookup(ROOT_INO, b"x") == other, "the other file has its name back"
        await meta.barrier()
        assert meta.ahead.losses == 0


async def test_a_command_someone_waits_for_is_not_gathered_behind_a_batch_of_another_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch holds one epoch: a change run ahead under the node's lease epoch and a command
    proposed without one (a lease's acquisition) go in two batches. The second is sent as soon as
    the first is decided, not after a gathering: its caller waits (design note 152: the first
    create in each directory a member did not hold took 32 ms instead of 8)."""
    monkeypatch.setattr(ahead, "GATHER_S", 60.0)  # a gathering would outlast the test
    log, meta, mk = scripted(tmp_path, fail_batches=set())
    log.release.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(meta.run_pipeline)
        await meta.run_ahead(mk(0), epoch=1)
        with trio.fail_after(5):
            await meta.propose(cc.ReleaseOrphans(2, (mk(0).ino + 500,), 5))
        assert [len(b) for b in log.batches] == [1, 1]
        await meta.run_ahead(mk(1), epoch=1)  # nobody waits: this one is gathered again
        await trio.testing.wait_all_tasks_blocked()
        assert [len(b) for b in log.batches] == [1, 1], "a change nobody waits for was sent at once"
        nursery.cancel_scope.cancel()


async def test_every_proposal_waits_for_the_hook_and_a_failed_hook_fails_it_like_the_log(tmp_path: Path) -> None:
    """`before_propose` (a member writes the data blocks its changes map: io/write_behind.py) runs
    before each batch and before a command proposed with nothing queued; when it fails, nothing
    is proposed and the batch and everything queued behind it fail, as a refused batch does."""
    log, meta, mk = scripted(tmp_path, fail_batches=set())
    log.release.set()
    hooked: list[int] = []
    failing = [False]

    async def hook() -> None:
        hooked.append(len(log.batches))
        if failing[0]:
            raise FsError(errno.EIO, "writing held file data failed")

    meta.ahead.before_propose = hook
    async with trio.open_nursery() as nursery:
        await nursery.start(meta.run_pipeline)
        await meta.run_ahead(mk(0))
        await meta.barrier()
        assert hooked == [0] and len(log.batches) == 1, "the hook ran before the batch, once"
        failing[0] = True
        for i in (1, 2):
            await meta.run_ahead(mk(i))
        with pytest.raises(FsError):
            await meta.barrier()
        assert len(log.batches) == 1 and meta.ahead.losses == 2 and meta.lookup(ROOT_INO, b"f1") is None
        with pytest.raises(FsError):  # nothing queued: proposed directly, after the hook
            await meta.propose(c.Batch((mk(3),)))
        assert len(log.batches) == 1
        failing[0] = False
        await meta.propose(c.Batch((mk(4),)))
        assert hooked[-1] == 1 and len(log.batches) == 2 and meta.lookup(ROOT_INO, b"f4") == mk(4).ino
        nursery.cancel_scope.cancel()
