"""The blocks a member's requests hold leases and delegations in (cluster/coherence_blocks.py), on a
real `ClusterCoherence` over a real metadata core: what each counts while entered, what it leaves
behind, and what a failure inside or while entering does. A writer still counted after its block
keeps a hand-over waiting for good; one not counted while inside lets a hand-over start under it."""

from __future__ import annotations

import errno

import pytest
import trio

from awsomefsd.cluster.coherence import ClusterCoherence
from awsomefsd.daemon.node import Core
from awsomefsd.fuse.invalidate import Invalidator
from awsomefsd.meta.errors import FsError
from tests.support.no_kernel import NoKernel

DIR_A, DIR_B, FILE = 100, 101, 200


def member(core: Core, lost: list[tuple[int, str]] | None = None) -> ClusterCoherence:
    coherence = ClusterCoherence(1, core.meta, Invalidator(kernel=NoKernel()), lambda: 1,  # type: ignore[arg-type]
                                 lose_file=None if lost is None else lambda ino, why: lost.append((ino, why)))
    coherence.held.update({DIR_A, DIR_B, FILE})
    return coherence


async def test_changing_counts_each_directory_once_while_inside_and_leaves_them_touched(core: Core) -> None:
    coherence = member(core)
    async with coherence.changing([DIR_B, DIR_A, DIR_B]) as ahead:
        assert ahead is True
        assert coherence._writers == {DIR_A: 1, DIR_B: 1}
        async with coherence.taking([DIR_A]) as value:
            assert value is None
            assert coherence._writers == {DIR_A: 2, DIR_B: 1}
        assert coherence._writers == {DIR_A: 1, DIR_B: 1}
    assert coherence._writers == {}
    assert {DIR_A, DIR_B} <= coherence._delegated and {DIR_A, DIR_B} <= set(coherence._touched)


async def test_changing_in_strict_mode_takes_nothing_and_says_go_through_the_log(core: Core) -> None:
    coherence = member(core)
    coherence.strict = True
    async with coherence.changing([DIR_A]) as ahead:
        assert ahead is False
        assert coherence._writers == {}


async def test_a_failure_while_taking_the_second_directory_gives_back_the_first(
        core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    coherence = member(core)
    plain = coherence._acquire

    async def refuse_b(ino: int) -> None:
        if ino == DIR_B:
            raise FsError(errno.EIO, "no lease in time")
        await plain(ino)

    monkeypatch.setattr(coherence, "_acquire", refuse_b)
    with pytest.raises(FsError):
        async with coherence.changing([DIR_A, DIR_B]):
            raise AssertionError("the block ran without its delegations")
    assert coherence._writers == {}


async def test_a_cancel_inside_the_block_leaves_nothing_counted(core: Core) -> None:
    coherence = member(core)
    with trio.move_on_after(0.01):
        async with coherence.changing([DIR_A]), coherence.writing(FILE):
            await trio.sleep_forever()
    assert coherence._writers == {}


async def test_a_write_whose_node_expired_meanwhile_fails_and_its_file_is_lost(core: Core) -> None:
    lost: list[tuple[int, str]] = []
    coherence = member(core, lost)
    with pytest.raises(FsError) as err:
        async with coherence.writing(FILE):
            assert coherence._writers == {FILE: 1}
            coherence.expiries += 1  # ExpireNode applied while the write was inside
    assert err.value.errno == errno.EIO and err.value.cause == "lease"
    assert lost and lost[0][0] == FILE and coherence._writers == {}


async def test_a_write_that_failed_itself_reports_its_own_error_not_the_expiry(core: Core) -> None:
    lost: list[tuple[int, str]] = []
    coherence = member(core, lost)
    with pytest.raises(ValueError):
        async with coherence.writing(FILE):
            coherence.expiries += 1
            raise ValueError("the write's own failure")
    assert lost == [] and coherence._writers == {}


async def test_holding_counts_only_what_this_node_holds(core: Core) -> None:
    coherence = member(core)
    async with coherence.holding(FILE) as held:
        assert held is True and coherence._writers == {FILE: 1}
    async with coherence.holding(999) as held:
        assert held is False and coherence._writers == {}
    coherence._releasing.add(FILE)  # a hand-over of it under way: not ours to use any more
    async with coherence.holding(FILE) as held:
        assert held is False and coherence._writers == {}
    assert coherence._writers == {}
