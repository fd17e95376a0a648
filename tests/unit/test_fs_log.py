"""The filesystem's metadata on the Raft engine (one-member group): durable on acknowledgement,
refusals replicated as outcomes, crash replay without double application."""

from __future__ import annotations

import errno
import stat
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import lmdb
import pytest
import trio
import trio.testing

from awsomefsd.duty import fatal_reason, is_fatal
from awsomefsd.meta import codec
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.raft import Entry, HardState
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.meta.replication.fs_log import ReplicatedFsLog
from awsomefsd.meta.replication.lmdb_storage import LmdbRaftStorage
from awsomefsd.meta.replication.proposals import HEADER
from awsomefsd.meta.state_machine import StateMachine
from awsomefsd.meta.store import MetaStore


def open_fs_log(path: Path) -> tuple[MetaStore, StateMachine, ReplicatedFsLog]:
    store = MetaStore(path)
    sm = StateMachine(store)
    with store.env.begin(write=True) as txn:
        if sm.meta_value(txn, b"format") is None:
            sm.bootstrap(txn, cluster_id="c", device_id="d", data_extent=(256, 10_000), now_ns=1)
    with store.env.begin() as txn:
        sm.load(txn)
    return store, sm, ReplicatedFsLog(store, sm)


@asynccontextmanager
async def running(log: ReplicatedFsLog) -> AsyncIterator[ReplicatedFsLog]:
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        yield log
        nursery.cancel_scope.cancel()


def mknod(ino: int, name: bytes) -> c.Mknod:
    return c.Mknod(ROOT_INO, name, ino, stat.S_IFREG | 0o644, 0, 0, 5)


def committed_names(store: MetaStore, sm: StateMachine) -> set[bytes]:
    with store.env.begin() as txn:
        return {name for name, _ in sm.ns.names(txn, ROOT_INO)}


async def test_a_proposal_waits_out_an_election(tmp_path: Path) -> None:
    """No leader yet: the proposal stalls (a mount sees a pause, not an error) and goes through
    once the group has elected one."""
    _, sm, log = open_fs_log(tmp_path / "m")
    async with trio.open_nursery() as nursery:
        result: list[object] = []

        async def propose_early() -> None:
            result.append(await log.propose(mknod(100, b"early")))

        nursery.start_soon(propose_early)
        await trio.testing.wait_all_tasks_blocked()
        assert not result and log.node.raw.leader_id == 0
        await nursery.start(log.run)
        with trio.fail_after(10):
            while not result:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert log.stalls == 1
    assert sm.ns.lookup(log.read_txn(), ROOT_INO, b"early") == 100


async def test_no_leader_within_the_stall_budget_is_eio(tmp_path: Path) -> None:
    _, _, log = open_fs_log(tmp_path / "m")
    log.stall_s = 0.3
    with pytest.raises(FsError) as err:
        await log.propose(mknod(100, b"early"))
    assert err.value.errno == errno.EIO and "metadata unavailable" in str(err.value)


async def test_after_a_stall_ran_out_the_next_proposals_fail_at_once_until_a_leader_is_known(tmp_path: Path) -> None:
    """The kernel repeats a lookup that got EIO: on a cut-off node each repeat used to wait the
    whole budget again (an operation blocked twice `stall_s`)."""
    _, sm, log = open_fs_log(tmp_path / "m")
    log.stall_s = 0.3
    with pytest.raises(FsError):
        await log.propose(mknod(100, b"first"))
    began = trio.current_time()
    with pytest.raises(FsError) as err:
        await log.propose(mknod(101, b"repeat"))
    assert trio.current_time() - began < 0.1 and err.value.errno == errno.EIO, "the repeat waited again"
    assert "no leader since" in str(err.value)
    async with running(log):  # a leader again: proposals go through
        await log.propose(mknod(102, b"later"))
    assert sm.ns.lookup(log.read_txn(), ROOT_INO, b"later") == 102


async def test_durable_and_visible_when_acknowledged(tmp_path: Path) -> None:
    store, sm, log = open_fs_log(tmp_path / "m")
    flushed: list[int] = []
    log.before_commit = lambda: flushed.append(log.applied_index)
    async with running(log):
        inode = await log.propose(mknod(100, b"a"))
        assert inode.ino == 100
        assert sm.ns.lookup(log.read_txn(), ROOT_INO, b"a") == 100
        assert b"a" in committed_names(store, sm), "acknowledged means committed to LMDB"
        assert flushed, "the device is flushed before metadata entries are persisted"
        start, end = await log.propose(c.ReserveInodes(10))
        assert end - start == 10


async def test_refusal_is_the_replicated_outcome(tmp_path: Path) -> None:
    store, sm, log = open_fs_log(tmp_path / "m")
    async with running(log):
        await log.propose(mknod(100, b"a"))
        with pytest.raises(FsError) as err:
            await log.propose(mknod(101, b"a"))
        assert err.value.errno == errno.EEXIST
        await log.propose(mknod(102, b"b"))
    assert committed_names(store, sm) >= {b"a", b"b"}


async def test_restart_applies_a_persisted_tail_exactly_once(tmp_path: Path) -> None:
    store, sm, log = open_fs_log(tmp_path / "m")
    async with running(log):
        await log.propose(mknod(100, b"a"))
        applied = log.applied_index
    term = log.node.raw.raft.term
    log.close()
    # Crash after persisting an entry but before it was committed and applied.
    raw = LmdbRaftStorage(env=store.env)
    tail = Entry(term, raw.last_index() + 1, data=HEADER.pack(7, 7) + codec.encode(mknod(101, b"tail")))
    raw.save(HardState(term, 1, raw.hard_state.commit), [tail])
    store.close()
    store, sm, log = open_fs_log(tmp_path / "m")
    assert log.applied_index == applied
    async with running(log):
        await log.propose(mknod(102, b"after"))
        names = committed_names(store, sm)
    assert {b"a", b"tail", b"after"} <= names
    with store.env.begin() as txn:
        assert sm.ns.lookup(txn, ROOT_INO, b"tail") == 101
    store.close()


async def test_status_shows_term_leader_indexes_and_match(tmp_path: Path) -> None:
    from awsomefsd.cli.status import _meta_status, _raft_rows

    store, _, log = open_fs_log(tmp_path / "m")
    async with running(log):
        await log.propose(mknod(100, b"a"))
    store.close()  # one process may open an environment once; status runs in another process
    info: dict[str, object] = {"daemon_running": True, "role": "?", "problems": [], "healthy": True}
    meta = _meta_status(tmp_path / "m", info)
    raft = meta["raft"]
    assert raft["term"] >= 2 and raft["leader"] == 1 and raft["voters"] == [1]
    assert raft["commit_index"] == raft["applied_index"] == raft["last_index"] == log.applied_index
    assert raft["match_index"] == {"1": raft["last_index"]}
    assert meta["applied_index"] == log.applied_index
    (row,) = _raft_rows(raft)
    assert row[1].startswith(f"term {raft['term']}, leader 1, commit {raft['commit_index']}")


async def test_observers_see_each_command_a_nested_batch_carries(tmp_path: Path) -> None:
    """A command proposed while others wait in the pipeline (a write lease's hand-over, a claim of
    allocation groups) reaches the log inside the pipeline's Batch: observers must still see it,
    with its own result. (Unseen, a hand-over left its new holder waiting for its next request,
    2 s later, and a claim's groups never reached the allocator.)"""
    _, _, log = open_fs_log(tmp_path / "m")
    seen: list[tuple[object, object]] = []
    log.commands.observers.append(lambda command, result, _mine: seen.append((command, result)))
    inner = c.Batch((mknod(100, b"a"), mknod(101, b"a")))
    async with running(log):
        result = await log.propose(c.Batch((mknod(102, b"b"), inner)))
    assert [type(r) for r in result] == [type(result[0]), list]
    assert [command for command, _ in seen] == [mknod(102, b"b"), mknod(100, b"a"), mknod(101, b"a")]
    assert seen[1][1].ino == 100
    assert isinstance(seen[2][1], FsError) and seen[2][1].errno == errno.EEXIST


async def test_a_command_from_a_newer_build_stops_the_log_with_one_clear_reason(tmp_path: Path) -> None:
    """A member downgraded below the cluster's log level meets a command it cannot decode: applying
    stops there, nothing after it is applied, and the daemon's reason is one line that says what
    to do (awsomefsd/duty.py prints it instead of a traceback)."""
    store, sm, log = open_fs_log(tmp_path / "m")
    async with running(log):
        await log.propose(mknod(100, b"a"))
        applied = log.applied_index
    term = log.node.raw.raft.term
    log.close()
    raw = LmdbRaftStorage(env=store.env)
    newer = bytes((codec.FORMAT, max(codec.TAG_COMMANDS) + 1))
    entries = [Entry(term, raw.last_index() + 1, data=HEADER.pack(7, 7) + newer),
               Entry(term, raw.last_index() + 2, data=HEADER.pack(7, 8) + codec.encode(mknod(101, b"after")))]
    raw.save(HardState(term, 1, raw.hard_state.commit), entries)
    store.close()
    store, sm, log = open_fs_log(tmp_path / "m")
    with pytest.raises(BaseException) as stopped:
        async with running(log):
            await trio.sleep(30)
    assert is_fatal(stopped.value)
    reason = fatal_reason(stopped.value)
    assert reason is not None and "cannot decode" in reason and "downgrades are not supported" in reason
    assert "\n" not in reason
    assert log.applied_index == applied
    assert b"after" not in committed_names(store, sm)
    log.close()
    store.close()


def plant_bug(sm: StateMachine, name: bytes) -> None:
    """Mknod of `name` writes its entry, then fails as a check the state machine lacks would."""
    handler = sm._handlers[c.Mknod]

    def half_then_fail(txn: lmdb.Transaction[bytes], cmd: c.Mknod) -> object:
        result = handler(txn, cmd)
        if cmd.name == name:
            raise struct.error("argument out of range")
        return result

    sm._handlers[c.Mknod] = half_then_fail


async def test_a_command_that_fails_on_every_replica_fails_alone(tmp_path: Path) -> None:
    """A command whose apply raises what is no refusal fails the same way on every replica: it
    is refused with EIO and undone alone; the entries applied with it in the same transaction,
    the commands of the same Batch, and the entries after it are applied (issue 41)."""
    store, sm, log = open_fs_log(tmp_path / "m")
    plant_bug(sm, b"broken")
    async with running(log):
        results: dict[bytes, object] = {}

        async def propose(command: object, key: bytes) -> None:
            try:
                results[key] = await log.propose(command)
            except FsError as exc:
                results[key] = exc

        async with trio.open_nursery() as nursery:  # one Ready, one transaction
            for i, name in enumerate((b"a", b"broken", b"b")):
                nursery.start_soon(propose, mknod(100 + i, name), name)
        batch = await log.propose(c.Batch((mknod(110, b"c"), mknod(111, b"broken"), mknod(112, b"d"))))
    broken = results[b"broken"]
    assert isinstance(broken, FsError) and broken.errno == errno.EIO, broken
    assert isinstance(batch[1], FsError) and batch[1].errno == errno.EIO, batch
    assert [type(r) for r in (batch[0], batch[2])] == [type(results[b"a"])] * 2
    names = committed_names(store, sm)
    assert {b"a", b"b", b"c", b"d"} <= names and b"broken" not in names


async def test_replay_goes_past_a_command_that_fails_everywhere(tmp_path: Path) -> None:
    """A persisted, unapplied entry that fails on apply after a restart does not stop the log."""
    store, sm, log = open_fs_log(tmp_path / "m")
    async with running(log):
        await log.propose(mknod(100, b"a"))
    term = log.node.raw.raft.term
    log.close()
    raw = LmdbRaftStorage(env=store.env)
    tail = [Entry(term, raw.last_index() + 1 + i, data=HEADER.pack(7, 7 + i) + codec.encode(mknod(101 + i, name)))
            for i, name in enumerate((b"broken", b"tail"))]
    raw.save(HardState(term, 1, raw.hard_state.commit), tail)
    store.close()
    store, sm, log = open_fs_log(tmp_path / "m")
    plant_bug(sm, b"broken")
    async with running(log):
        await log.propose(mknod(110, b"after"))
    names = committed_names(store, sm)
    assert {b"a", b"tail", b"after"} <= names and b"broken" not in names
    store.close()
