"""Another node's change reaches the kernel only where the kernel may cache something of it
(`Handles.kernel_may_cache`, `ClusterCoherence._tell_kernel`): an inode this process gave the kernel
a reference to and it has not forgotten, the root, or anything after a crash (the dead daemon's
references were never counted). A real `Invalidator` runs with a kernel that records what it is
told; a real `Handles` keeps the references."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from awsomefsd.cluster.coherence import ClusterCoherence
from awsomefsd.daemon.node import Core
from awsomefsd.fs.handles import Handles
from awsomefsd.fuse.invalidate import Invalidator
from awsomefsd.meta import commands as c
from awsomefsd.meta.records import ROOT_INO

KNOWN_DIR, UNKNOWN_DIR, FILE = 100, 101, 200


class RecordingKernel:
    def __init__(self) -> None:
        self.told: list[tuple[str, int]] = []

    def invalidate_inode(self, ino: int, attr_only: bool) -> None:
        self.told.append(("inode", ino))

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.told.append(("entry", parent))


@asynccontextmanager
async def observing(core: Core, handles: Handles) -> AsyncIterator[tuple[ClusterCoherence, RecordingKernel]]:
    """A member's coherence whose invalidations reach a recording kernel; all of them sent on the
    way out."""
    kernel = RecordingKernel()
    invalidator = Invalidator(kernel=kernel)
    coherence = ClusterCoherence(1, core.meta, invalidator, lambda: 1,  # type: ignore[arg-type]
                                 kernel_may_cache=handles.kernel_may_cache)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        yield coherence, kernel
        await invalidator.drain()
        nursery.cancel_scope.cancel()


async def told_after(core: Core, handles: Handles, *commands: tuple[c.Command[object], object]) -> list[tuple[str, int]]:
    """What the kernel was told after other nodes' `commands` (with their results) were applied."""
    async with observing(core, handles) as (coherence, kernel):
        for command, result in commands:
            coherence.observe(command, result, False)
    return kernel.told


async def test_a_change_elsewhere_reaches_the_kernel_only_for_what_it_holds(core: Core) -> None:
    handles = Handles(core.meta)
    handles.remember(KNOWN_DIR)
    told = await told_after(core, handles,
                            (c.Unlink(KNOWN_DIR, b"a", False, 1), FILE),
                            (c.Unlink(UNKNOWN_DIR, b"b", False, 1), FILE + 1),
                            (c.Mknod(ROOT_INO, b"c", FILE + 2, 0o100644, 0, 0, 1), None))
    assert ("inode", KNOWN_DIR) in told  # its attributes (the entry itself waits for its timeout: `_safe`)
    assert ("inode", ROOT_INO) in told
    assert not {UNKNOWN_DIR, FILE, FILE + 1, FILE + 2} & {ino for _, ino in told}


async def test_forgotten_inodes_are_not_told_and_after_a_crash_everything_is(core: Core) -> None:
    handles = Handles(core.meta)
    handles.remember(FILE)
    handles.remember(FILE)
    assert handles.forget(FILE, 1) is False
    assert await told_after(core, handles, (c.SetAttr(FILE, mode=0o600, now_ns=1), None)) == [("inode", FILE)]
    assert handles.forget(FILE, 1) is True
    assert await told_after(core, handles, (c.SetAttr(FILE, mode=0o600, now_ns=1), None)) == []
    handles.adopted = True  # a start after a crash: references of the dead daemon are unknown
    assert await told_after(core, handles, (c.SetAttr(UNKNOWN_DIR, mode=0o700, now_ns=1), None)) == [
        ("inode", UNKNOWN_DIR)]


async def test_pages_of_a_file_the_kernel_holds_are_dropped_at_its_next_open_after_a_change_elsewhere(core: Core) -> None:
    """A size change elsewhere (a truncate) makes the pages the kernel holds stale: its attributes
    are told now, the pages dropped at the next open (`keep_cache` False once). A file the kernel
    holds nothing of has no pages to drop; it is not told, and an attributes-only change drops no
    pages of a held one."""
    handles = Handles(core.meta)
    handles.remember(FILE)
    async with observing(core, handles) as (coherence, kernel):
        assert coherence.keep_cache(FILE) is False  # its first open since the start
        assert coherence.keep_cache(FILE) is True
        coherence.observe(c.SetAttr(FILE, mode=0o600, now_ns=1), None, False)
        assert coherence.keep_cache(FILE) is True  # attributes only: the pages still hold
        coherence.observe(c.SetAttr(FILE, size=0, now_ns=2), None, False)
        coherence.observe(c.SetAttr(FILE + 1, size=0, now_ns=2), None, False)
    assert set(kernel.told) == {("inode", FILE)}  # (one queued invalidation covers the next)
    assert coherence.keep_cache(FILE) is False
    assert coherence.keep_cache(FILE) is True
