"""When a member's open may keep the kernel's pages of a file (`keep_cache`): not after another
node changed the file, and not at the file's first open since this daemon started, since the
daemon before it (on a mount continued after a hand-over or a crash) may have seen a change this
one never will; the member's kernel drops the pages then (coherence clause 2)."""

from __future__ import annotations

import pytest

from awsomefsd.cluster import coherence_applied
from awsomefsd.cluster.coherence import ClusterCoherence
from awsomefsd.fuse.invalidate import Invalidator
from awsomefsd.meta import commands as c
from tests.support.no_kernel import NoKernel


def _coherence() -> ClusterCoherence:
    return ClusterCoherence(2, None, Invalidator(kernel=NoKernel()), lambda: 1)  # type: ignore[arg-type]


def _changed_elsewhere(coherence: ClusterCoherence, ino: int) -> None:
    """Another node's change to the file's data, applied here."""
    coherence.observe(c.SetAttr(ino=ino, now_ns=1, size=0), None, False)


def test_a_files_first_open_since_the_start_drops_its_pages_then_they_are_kept() -> None:
    coherence = _coherence()
    assert not coherence.keep_cache(7), "the daemon before may have seen a change to it"
    assert coherence.keep_cache(7)
    assert coherence.keep_cache(7)
    assert not coherence.keep_cache(8)


def test_a_change_elsewhere_drops_the_pages_at_the_next_open_only() -> None:
    coherence = _coherence()
    assert not coherence.keep_cache(7)
    _changed_elsewhere(coherence, 7)
    assert not coherence.keep_cache(7)
    assert coherence.keep_cache(7)
    _changed_elsewhere(coherence, 9)  # before its first open: one drop covers both reasons
    assert not coherence.keep_cache(9)
    assert coherence.keep_cache(9)


def test_past_the_bound_files_are_dropped_once_more_never_kept_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coherence_applied, "MAX_OPENED_TRACKED", 3)
    coherence = _coherence()
    assert [coherence.keep_cache(ino) for ino in (1, 2, 3)] == [False] * 3
    assert [coherence.keep_cache(ino) for ino in (1, 2, 3)] == [True] * 3
    assert not coherence.keep_cache(4)  # the memory is emptied: 1 is opened "first" again
    assert not coherence.keep_cache(1)
    assert coherence.keep_cache(4)


async def test_an_open_catches_up_unless_this_node_holds_the_files_write_lease() -> None:
    """Close-to-open (`ClusterCoherence.opening`): a file whose write lease this node holds was
    written nowhere else since the grant it applied, so its open asks the leader nothing; any
    other open does a read barrier first: a file another node may hold, one whose hand-over has
    begun (the next holder may write and close before this open answers), any file while this
    node's liveness lease is not known valid (the cluster may have expired it and moved its
    leases), and every file in strict mode."""
    barriers: list[float] = []

    async def read_barrier(*, timeout_s: float) -> None:
        barriers.append(timeout_s)

    lease = [True]
    coherence = ClusterCoherence(2, None, Invalidator(kernel=NoKernel()), lambda: 1,  # type: ignore[arg-type]
                                 read_barrier=read_barrier, lease_valid=lambda: lease[0])
    coherence.held.add(7)
    await coherence.opening(7)
    assert not barriers and coherence.opens_held == 1
    cases = ("not held", "handing over", "lease lapsed", "strict")
    for case in cases:
        coherence.held.add(7)
        if case == "not held":
            coherence.held.discard(7)
        elif case == "handing over":
            coherence._releasing.add(7)
        elif case == "lease lapsed":
            coherence._releasing.discard(7)
            lease[0] = False
        else:
            lease[0] = True
            coherence.strict = True
        await coherence.opening(7)
        assert len(barriers) == cases.index(case) + 1, case
    assert coherence.opens_held == 1
