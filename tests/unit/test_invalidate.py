"""Kernel cache invalidation: which cache entries each committed command makes stale, and the worker
that tells the kernel (against a fake kernel that records calls, fails or blocks on request)."""

from __future__ import annotations

import errno
import json
import logging
import stat
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from awsomefsd.fuse import invalidate as inv
from awsomefsd.fuse.invalidate import Invalidator, Target, decode_targets, encode_targets
from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.codec import COMMAND_TAGS
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, Applied, Extent
from awsomefsd.meta.rename import RENAME_EXCHANGE, RENAME_NOREPLACE
from awsomefsd.meta.volumes_sm import SNAPSHOTS_INO, VOLUMES_INO, snapshot_dir_name, volume_dir_name
from tests.unit.test_state_machine import Harness

D, E, F, G = 20, 21, 30, 31  # two directories, two files
EXT = Extent(0, 500, 1, bytes(4))
entry, attr, full = Target.entry, Target.attr_only, Target.inode

# (command, result the state machine returned, targets) — at least one row per command type
CASES: list[tuple[object, object, list[Target]]] = [
    (c.Mknod(D, b"f", F, stat.S_IFREG | 0o644, 0, 0, 1), None, [entry(D, b"f"), attr(D)]),
    (c.MknodFor(D, b"f", F, stat.S_IFREG | 0o644, 0, 0, 1, lease_to=2, lease_epoch=1), None, [entry(D, b"f"), attr(D)]),
    (c.Link(F, E, b"g", 1), None, [entry(E, b"g"), attr(E), attr(F)]),
    (c.MakeTmpfile(D, F, stat.S_IFREG | 0o600, 0, 0, 1, True), None, []),
    (c.LinkTmpfile(F, E, b"g", 1), None, [entry(E, b"g"), attr(E), attr(F)]),
    (c.Unlink(D, b"f", False, 1), F, [entry(D, b"f"), attr(D), attr(F)]),
    (c.Unlink(D, b"f", False, 1), None, [entry(D, b"f"), attr(D)]),
    (c.UnlinkClosed(D, b"f", False, 1, ino=F), F, [entry(D, b"f"), attr(D), full(F)]),  # maybe deleted
    (c.UnlinkClosed(D, b"f", False, 1, ino=F), G, [entry(D, b"f"), attr(D), attr(G)]),  # another was there
    (c.UnlinkAlone(D, b"f", False, 1, ino=F), F, [entry(D, b"f"), attr(D), full(F)]),  # maybe deleted
    (c.Rename(D, b"a", E, b"b", 0, 1), 0, [entry(D, b"a"), entry(E, b"b"), attr(D), attr(E)]),
    (c.Rename(D, b"a", D, b"b", 0, 1), G, [entry(D, b"a"), entry(D, b"b"), attr(D), attr(G)]),
    (c.Rename(D, b"a", E, b"b", RENAME_EXCHANGE, 1), 0, [entry(D, b"a"), entry(E, b"b"), attr(D), attr(E)]),
    (c.SetAttr(F, 1, mode=0o600), None, [attr(F)]),
    (c.SetAttr(F, 1, size=0), None, [full(F)]),
    (c.WriteData(F, (EXT,), 10, 1), None, [full(F)]),
    (c.WriteData(F, (EXT,), 10, 1, touch=False), None, []),
    (c.Preallocate(F, (Extent(4, 600, 2, b""),), 1), None, [attr(F)]),
    (c.PunchHole(F, 1, 3, 1), None, [full(F)]),
    (c.CloneRange(G, 0, F, 4, 2, 24_576, 1), None, [full(F)]),
    (c.SetXattr(F, b"user.a", b"1", 0, 1), None, [attr(F)]),
    (c.RemoveXattr(F, b"user.a", 1), None, [attr(F)]),
    (c.ReserveInodes(10), (100, 110), []),
    (c.Purge(F, 1), True, [full(F)]),
    (c.Purge(F, 1), False, []),
    (c.ReclaimFrees(1), [(1, 2)], []),
    (c.PlanTierObject(1), 1, []),
    (c.CommitTierObject(1, (F,), (Extent(0, 300, 1, b"abcd"),), 1), 1, []),  # same bytes, elsewhere
    (c.AbandonTierObjects((1,), 1), 1, []),
    (c.ForgetTierObjects((1,)), 1, []),
    (c.LinkSite(b"p" * 16, 1), 3, []),
    (c.UnlinkSite(1), None, []),
    (c.ForgetSite(b"s" * 28, 1), 2, []),
    (c.FoldCapture(4096), 3, []),
    (c.UpdateSiteLink(("a:1",), (), 1), None, []),
    (c.PauseCapture(1), None, []),
    (c.ResumeCapture(1), 4, []),
    (c.SeedSite(256, 1), 256, []),
    (c.ApplyRemote(b"p" * 16, b"", (), (), (), 1), Applied(1, ((D, b"f"),), (F, D)), [entry(D, b"f"), full(F), full(D)]),
    (c.ApplyRemoteSharing(b"p" * 16, b"", (), (), (), (), (), 1), Applied(0, (), (F,)), [full(F)]),
    (c.ResolveConflict(b"k" * 29, "loser", 1), Applied(0, ((4, b"x"),), (4,)), [entry(4, b"x"), full(4)]),
    (c.GrantGroups(1, (0, 1)), None, []),
    (c.ReleaseLeaked(((1, 2),)), 2, []),
    (c.CreateVolume(7, "v", 40, 1 << 30, 0, 1), None, [entry(VOLUMES_INO, volume_dir_name(7)), attr(VOLUMES_INO)]),
    (c.DeleteVolume(7, 1), True, [entry(VOLUMES_INO, volume_dir_name(7)), attr(VOLUMES_INO)]),
    (c.ResizeVolume(7, 2 << 30, 1), None, []),
    (c.CreateSnapshot(8, "s", 7, 1), None, [entry(SNAPSHOTS_INO, snapshot_dir_name(8)), attr(SNAPSHOTS_INO)]),
    (c.DeleteSnapshot(8, 1), True, [entry(SNAPSHOTS_INO, snapshot_dir_name(8)), attr(SNAPSHOTS_INO)]),
    (c.Batch((c.SetXattr(F, b"user.a", b"1", 0, 1), c.WriteData(F, (EXT,), 10, 2), c.SetAttr(G, 3, uid=1))),
     None, [full(F), attr(G)]),
    (c.Fenced(1, 2, (c.SetAttr(F, 1, size=0),)), object(), [full(F)]),
    (c.Fenced(1, 2, (c.Unlink(D, b"f", False, 1), c.SetXattr(G, b"user.a", b"", 0, 1))), [F, None],
     [entry(D, b"f"), attr(D), attr(F), attr(G)]),
    (c.Fenced(1, 2, (c.SetAttr(F, 1, size=0),)), FsError(errno.EIO), []),  # its lease epoch had ended
    (cc.InitCluster(b"ca", b"key", b"v", 3, 0, 1024, 8, 1, "n1", "a:1", "a:2", 1), 1, []),
    (cc.AddMember("n2", "b:1", "b:2", 1), 2, []),
    (cc.SetMemberCert(2, "ab"), None, []),
    (cc.UpdateMemberAddress(2, "c:1", "c:2"), None, []),
    (cc.RemoveMember(2, 1), None, []),
    (cc.SetJoinVerifier(b"v2"), None, []),
    (c.SetLogLevel(4, (1,)), 4, []),
    (cc.RenewLease(1, 2), True, []),
    (cc.ExpireNode(2, 1), [F], []),
    (cc.ReleaseOrphans(2, (F, G), 1), 1, [full(F), full(G)]),
    (cc.ReleaseOrphans(2, (F,), 1), 0, []),
    (cc.ClaimGroups(1, 2, 3), (0, 1, 2), []),
    (cc.AcquireWriteLease(F, 1, 2), 1, []),
    (cc.ReleaseWriteLease(F, 1), True, []),
]


def test_every_command_type_has_a_decision() -> None:
    """A new command type must say what it makes stale before it can ship."""
    assert set(inv.RULES) == set(COMMAND_TAGS)
    assert {type(cmd) for cmd, _, _ in CASES} == set(COMMAND_TAGS)


@pytest.mark.parametrize(("command", "result", "expected"), CASES, ids=lambda v: type(v).__name__)
def test_targets(command: object, result: object, expected: list[Target]) -> None:
    assert inv.targets(command, result) == expected


def test_batch_is_the_union_of_its_commands_less_the_failed_ones() -> None:
    batch = c.Batch((
        c.Mknod(D, b"x", F, stat.S_IFREG, 0, 0, 1),
        c.Mknod(D, b"y", G, stat.S_IFREG, 0, 0, 1),  # failed: changed nothing
        c.Unlink(D, b"z", False, 1),
        c.Batch((c.SetAttr(F, 1, size=3),)),
    ))
    results = [object(), FsError(errno.EEXIST), 40, [object()]]
    assert inv.targets(batch, results) == [entry(D, b"x"), attr(D), entry(D, b"z"), attr(40), full(F)]
    assert inv.targets(batch) == [entry(D, b"x"), attr(D), entry(D, b"y"), entry(D, b"z"), full(F)]


def test_failed_or_unknown_commands_change_nothing() -> None:
    assert inv.targets(c.Mknod(D, b"f", F, stat.S_IFREG, 0, 0, 1), FsError(errno.EEXIST)) == []
    assert inv.targets(object()) == []


def test_compact_keeps_first_positions_and_prefers_full_invalidation() -> None:
    assert inv.compact([attr(F), entry(D, b"a"), full(F), entry(D, b"a"), attr(G)]) == [
        full(F), entry(D, b"a"), attr(G)]


def test_results_as_the_state_machine_returns_them(tmp_path: Path) -> None:
    """Unlink and rename name the inode that lost a link only in their result."""
    h = Harness(tmp_path / "meta")
    f = h.mk(ROOT_INO, b"f")
    h.apply(c.Link(f, ROOT_INO, b"f2", h.tick()))
    g = h.mk(ROOT_INO, b"g")
    unlink = c.Unlink(ROOT_INO, b"f2", False, h.tick())
    assert inv.targets(unlink, h.apply(unlink)) == [entry(ROOT_INO, b"f2"), attr(ROOT_INO), attr(f)]
    rename = c.Rename(ROOT_INO, b"f", ROOT_INO, b"g", 0, h.tick())
    assert inv.targets(rename, h.apply(rename)) == [
        entry(ROOT_INO, b"f"), entry(ROOT_INO, b"g"), attr(ROOT_INO), attr(g)]
    noreplace = c.Rename(ROOT_INO, b"g", ROOT_INO, b"f", RENAME_NOREPLACE, h.tick())
    assert inv.targets(noreplace, h.apply(noreplace)) == [
        entry(ROOT_INO, b"g"), entry(ROOT_INO, b"f"), attr(ROOT_INO)]
    batch = c.Batch((c.Unlink(ROOT_INO, b"f", False, h.tick()), c.Unlink(ROOT_INO, b"nope", False, h.tick())))
    assert inv.targets(batch, h.apply(batch)) == [entry(ROOT_INO, b"f"), attr(ROOT_INO), attr(f)]


# -- the worker ---------------------------------------------------------------------------------
class FakeKernel:
    """Records notifications; `fail` maps a target to the errno it raises, `gates` to an event it
    waits for first (a notification the kernel holds until a related request is answered)."""

    def __init__(self) -> None:
        self.calls: list[Target] = []
        self.fail: dict[Target, int] = {}
        self.gates: dict[Target, threading.Event] = {}
        self.waiting = threading.Event()  # a call is waiting at its gate

    def _call(self, t: Target) -> None:
        gate = self.gates.get(t)
        if gate is not None:
            self.waiting.set()
            assert gate.wait(10), "gate never opened"
        self.calls.append(t)
        if t in self.fail:
            raise OSError(self.fail[t], "fake")

    def invalidate_inode(self, ino: int, attr_only: bool) -> None:
        self._call(attr(ino) if attr_only else full(ino))

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self._call(entry(parent, name))


async def test_processes_in_submission_order_in_bounded_batches() -> None:
    kernel = FakeKernel()
    invalidator = Invalidator(kernel, batch_targets=2)
    sent = [entry(D, b"a"), attr(D), full(F), attr(G), entry(E, b"b")]
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        invalidator.submit(sent[:3])
        invalidator.submit(sent[3:])
        with trio.fail_after(5):
            await invalidator.drain()
        assert kernel.calls == sent
        assert invalidator.invalidations == 5 and invalidator.errors == 0 and invalidator.pending == 0
        nursery.cancel_scope.cancel()


async def test_a_batch_holds_each_target_once() -> None:
    kernel = FakeKernel()
    invalidator = Invalidator(kernel)
    invalidator.submit([attr(F), entry(D, b"a")])
    invalidator.submit([entry(D, b"a"), full(F), attr(F)])  # queued before run: one batch
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        with trio.fail_after(5):
            await invalidator.drain()
        nursery.cancel_scope.cancel()
    assert kernel.calls == [full(F), entry(D, b"a")]


async def test_drain_waits_for_what_was_submitted_before_it_and_no_more() -> None:
    kernel = FakeKernel()
    kernel.gates = {attr(F): threading.Event(), attr(G): threading.Event()}
    invalidator = Invalidator(kernel)
    drained = trio.Event()

    async def drain() -> None:
        await invalidator.drain()
        drained.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        invalidator.submit([entry(D, b"a"), attr(F)])
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        invalidator.submit([attr(G)])  # after the drain started: not waited for
        assert not drained.is_set()
        kernel.gates[attr(F)].set()
        with trio.fail_after(5):
            await drained.wait()
        assert kernel.calls == [entry(D, b"a"), attr(F)]
        kernel.gates[attr(G)].set()
        with trio.fail_after(5):
            await invalidator.drain()
        assert kernel.calls[-1] == attr(G)
        nursery.cancel_scope.cancel()


async def test_a_cancelled_drain_leaves_the_invalidator_working() -> None:
    kernel = FakeKernel()
    kernel.gates = {attr(F): threading.Event()}
    invalidator = Invalidator(kernel)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        invalidator.submit([attr(F)])
        with trio.move_on_after(0.05):
            await invalidator.drain()
        kernel.gates[attr(F)].set()
        invalidator.submit([attr(G)])
        with trio.fail_after(5):
            await invalidator.drain()
        assert kernel.calls == [attr(F), attr(G)]
        nursery.cancel_scope.cancel()


async def test_a_full_queue_drops_counts_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    kernel = FakeKernel()
    invalidator = Invalidator(kernel, max_pending=2)
    with caplog.at_level(logging.WARNING, logger=inv.__name__):
        invalidator.submit([attr(D), attr(E), attr(F)])
        invalidator.submit([attr(E), attr(G)])  # attr(E) is already queued: coalesced, not dropped
    assert invalidator.dropped == 2 and invalidator.pending == 2
    assert [r.message for r in caplog.records if "queue full" in r.message] != []
    assert len(caplog.records) == 1
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        with trio.fail_after(5):
            await invalidator.drain()
        invalidator.submit([attr(G)])  # room again
        with trio.fail_after(5):
            await invalidator.drain()
        nursery.cancel_scope.cancel()
    assert kernel.calls == [attr(D), attr(E), attr(G)]
    assert invalidator.dropped == 2


async def test_enoent_is_nothing_cached_and_other_errors_are_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kernel = FakeKernel()
    kernel.fail = {entry(D, b"a"): errno.ENOENT, attr(F): errno.ENOSYS, attr(G): errno.EINVAL}
    invalidator = Invalidator(kernel)
    with caplog.at_level(logging.WARNING, logger=inv.__name__):
        async with trio.open_nursery() as nursery:
            await nursery.start(invalidator.run)
            invalidator.submit([entry(D, b"a"), attr(F), attr(G), attr(E)])
            with trio.fail_after(5):
                await invalidator.drain()
            nursery.cancel_scope.cancel()
    assert kernel.calls == [entry(D, b"a"), attr(F), attr(G), attr(E)]
    assert invalidator.invalidations == 2 and invalidator.errors == 2
    assert any("2 of 4" in r.getMessage() for r in caplog.records)


async def test_cancelling_run_mid_batch_releases_drain_and_keeps_what_was_not_sent() -> None:
    kernel = FakeKernel()
    kernel.gates = {attr(F): threading.Event()}
    invalidator = Invalidator(kernel)
    drained = trio.Event()

    async def drain() -> None:
        await invalidator.drain()
        drained.set()

    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as inner:
            await inner.start(invalidator.run)
            invalidator.submit([attr(F), attr(G)])
            outer.start_soon(drain)
            await trio.to_thread.run_sync(kernel.waiting.wait, 5)
            inner.cancel_scope.cancel()
            kernel.gates[attr(F)].set()  # the call in flight completes; the next one never starts
        with trio.fail_after(5):
            await drained.wait()  # released by run() ending, though attr(G) was never processed
    assert kernel.calls == [attr(F)]
    invalidator.submit([attr(E)])
    assert invalidator.pending == 0
    assert invalidator.left() == [attr(G), attr(E)], "the rest of the batch, then what came after"
    with trio.fail_after(5):
        await invalidator.drain()


async def test_what_was_queued_when_run_ended_is_left_in_order_and_bounded() -> None:
    kernel = FakeKernel()
    kernel.gates = {attr(F): threading.Event()}
    invalidator = Invalidator(kernel, batch_targets=1, max_pending=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        invalidator.submit([attr(F), entry(D, b"a"), full(G)])
        await trio.to_thread.run_sync(kernel.waiting.wait, 5)
        nursery.cancel_scope.cancel()
        kernel.gates[attr(F)].set()
    assert invalidator.left() == [entry(D, b"a"), full(G)], "the batch cancelled before it was sent, then the queue"
    invalidator.submit([entry(D, b"a"), attr(E), attr(G)])  # left already; kept; one past max_pending
    assert invalidator.left() == [entry(D, b"a"), full(G), attr(E)]
    assert invalidator.dropped == 1


def test_targets_round_trip_through_the_session_record() -> None:
    sent = [entry(D, b"a\xffb"), attr(F), full(G)]
    assert decode_targets(json.loads(json.dumps(encode_targets(sent)))) == sent
    assert decode_targets([["entry", D], ["nonsense", 1, ""], 7, ["inode", F, ""]]) == [full(F)]
