"""The one-member replicated log: group commit, what a crash keeps, and map growth."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import lmdb
import pytest
import trio
import trio.testing

from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.log import LocalLog
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore


def open_log(path: Path, **kwargs: object) -> tuple[MetaStore, StateMachine, LocalLog]:
    store = MetaStore(path, map_size_bytes=kwargs.pop("map_size_bytes", None))  # type: ignore[arg-type]
    sm = StateMachine(store)
    with store.env.begin(write=True) as txn:
        if sm.meta_value(txn, b"format") is None:
            sm.bootstrap(txn, cluster_id="c", device_id="d", data_extent=(256, 10_000), now_ns=1)
    with store.env.begin() as txn:
        sm.load(txn)
    return store, sm, LocalLog(store, sm, **kwargs)  # type: ignore[arg-type]


def mknod(ino: int, name: bytes) -> c.Mknod:
    return c.Mknod(ROOT_INO, name, ino, stat.S_IFREG | 0o644, 0, 0, 5)


def committed_names(store: MetaStore, sm: StateMachine) -> set[bytes]:
    with store.env.begin() as txn:  # a separate reader sees only committed batches
        return {name for name, _ in sm.ns.names(txn, ROOT_INO)}


async def test_visible_at_once_durable_at_barrier(tmp_path: Path) -> None:
    store, sm, log = open_log(tmp_path / "m")
    await log.propose(mknod(100, b"a"))
    assert log.applied_index == 1 and log.committed_index == 0
    assert sm.ns.lookup(log.read_txn(), ROOT_INO, b"a") == 100
    assert b"a" not in committed_names(store, sm)
    await log.barrier()
    assert b"a" in committed_names(store, sm) and log.committed_index == 1


async def test_crash_keeps_the_committed_prefix(tmp_path: Path) -> None:
    store, sm, log = open_log(tmp_path / "m")
    await log.propose(mknod(100, b"kept"))
    await log.barrier()
    await log.propose(mknod(101, b"lost"))
    store.env.close()  # the process dies: the open batch is never committed
    store, sm, log = open_log(tmp_path / "m")
    assert committed_names(store, sm) >= {b"kept"} and b"lost" not in committed_names(store, sm)
    assert log.applied_index == 1, "replay position survives with the data it describes"


async def test_map_growth_replays_the_batch(tmp_path: Path) -> None:
    store, sm, log = open_log(tmp_path / "m", map_size_bytes=1 << 20, max_batch_commands=50_000,
                              batch_headroom_bytes=0)
    for i in range(5000):
        await log.propose(mknod(1000 + i, b"%04d-" % i + b"x" * 200))
    assert store.map_size_bytes > 1 << 20
    assert log.replays >= 1, "the batch outgrew the map and was applied again, invisibly"
    await log.barrier()
    assert len(committed_names(store, sm)) == 5000 + 2  # and .volumes, .snapshots


async def test_group_commit_interval(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    _, _, log = open_log(tmp_path / "m", commit_interval_ms=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(10):
            await log.propose(mknod(100 + i, b"f%d" % i))
        start = trio.current_time()
        while log.committed_index < 10:
            await trio.sleep(0.01)
        assert 0.99 <= trio.current_time() - start <= 1.1
        assert log.commits == 1, "ten commands, one commit"
        nursery.cancel_scope.cancel()


async def test_a_failing_command_fails_alone(tmp_path: Path) -> None:
    """A command whose apply raises what is no refusal (a check the state machine lacks) gets EIO;
    the commands acknowledged before it in the batch stay, what it wrote before failing does not,
    and the batch goes on (issue 41: `touch -d 2300-01-01` used to drop the whole batch)."""
    store, sm, log = open_log(tmp_path / "m")
    await log.propose(mknod(100, b"before"))
    mknod_handler = sm._handlers[c.Mknod]

    def half_then_fail(txn: lmdb.Transaction[bytes], cmd: c.Mknod) -> object:
        result = mknod_handler(txn, cmd)
        if cmd.name == b"broken":  # its entry is written, then a bug strikes
            raise OverflowError("int too large to convert")
        return result

    sm._handlers[c.Mknod] = half_then_fail
    with pytest.raises(FsError) as failed:
        await log.propose(mknod(101, b"broken"))
    assert failed.value.errno == errno.EIO and "OverflowError" in str(failed.value)
    await log.propose(mknod(102, b"after"))
    assert {b"before", b"after"} <= {name for name, _ in sm.ns.names(log.read_txn(), ROOT_INO)}
    assert sm.ns.lookup(log.read_txn(), ROOT_INO, b"broken") is None
    assert log.applied_index == 2
    await log.barrier()
    names = committed_names(store, sm)
    assert {b"before", b"after"} <= names and b"broken" not in names


async def test_what_prepare_proposes_commits_with_the_batch(tmp_path: Path) -> None:
    """A barrier and a group commit await `prepare` first (closed files' data, fs/batch.py): what
    it proposes is in the commit, so nothing proposed before it can commit without it."""
    store, sm, log = open_log(tmp_path / "m", commit_interval_ms=10_000, commit_idle_ms=20)
    made = iter(range(200, 300))

    async def prepare() -> None:
        await trio.sleep(0)  # as a device write would, it awaits
        await log.propose(mknod(next(made), f"prepared-{log.applied_index}".encode()))

    log.prepare = prepare
    await log.propose(mknod(100, b"a"))
    await log.barrier()
    assert {b"a", b"prepared-1"} <= committed_names(store, sm)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await log.propose(mknod(101, b"b"))
        with trio.fail_after(5):
            while log.committed_index < log.applied_index:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert {b"b", b"prepared-3"} <= committed_names(store, sm)


async def test_a_full_batch_waiting_for_prepare_commits_from_run(tmp_path: Path) -> None:
    """A batch that reaches its size while `prepare` has work does not commit inside `propose`
    (it cannot await there): `run` prepares and commits it at once, not at the interval."""
    store, sm, log = open_log(tmp_path / "m", commit_interval_ms=60_000, max_batch_commands=3)
    prepared = []

    async def prepare() -> None:
        prepared.append(log.applied_index)

    log.prepare, log.preparing = prepare, lambda: True
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(3):
            await log.propose(mknod(100 + i, f"f{i}".encode()))
        assert log.committed_index == 0, "committed inside propose, before prepare"
        with trio.fail_after(5):
            while log.committed_index < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert prepared and {b"f0", b"f1", b"f2"} <= committed_names(store, sm)
