"""Invalidation against a real kernel: bench/nullfs.py mounted in this process with 60 s entry and
attribute timeouts and keep_cache, changed behind the kernel's back (as another node's command
would change our metadata), then the Invalidator's worker thread makes the change visible.

The filesystem is served on this trio thread, so every file access runs in another thread."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import pytest
import trio

from awsomefsd.fuse.invalidate import Invalidator, Target
from awsomefsd.fuse.transport import Pyfuse3Kernel
from bench.nullfs import Node, NullFs

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


class Mounted:
    def __init__(self, fs: NullFs, path: Path, invalidator: Invalidator) -> None:
        self.fs = fs
        self.path = path
        self.invalidator = invalidator

    async def invalidate(self, *targets: Target) -> None:
        self.invalidator.submit(targets)
        with trio.fail_after(10):
            await self.invalidator.drain()


def _read(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _exists(path: Path) -> bool:
    return os.path.exists(path)


@pytest.fixture
async def mounted() -> AsyncIterator[Mounted]:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-inval-", dir="/var/tmp"))
    fs = NullFs()
    pyfuse3.init(fs, str(base), {"fsname=awsomefs-inval-test", "default_permissions", "noatime"})  # as awsomefsd
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            invalidator = Invalidator(Pyfuse3Kernel())
            await nursery.start(invalidator.run)
            yield Mounted(fs, base, invalidator)
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        shutil.rmtree(base, ignore_errors=True)


async def test_changed_attributes_and_data_show_only_after_invalidation(mounted: Mounted) -> None:
    path = mounted.path / "f"
    await trio.to_thread.run_sync(path.write_bytes, b"a")
    assert await trio.to_thread.run_sync(_read, path) == b"a"  # now in the page cache (keep_cache)
    st = await trio.to_thread.run_sync(os.stat, path)  # and the attributes in theirs

    node = mounted.fs.nodes[st.st_ino]
    node.mode = (node.mode & ~0o7777) | 0o600  # another node's chmod
    node.chunks[0][:] = b"b"  # another node's write, same size and times: only the data differs
    assert (await trio.to_thread.run_sync(os.stat, path)).st_mode & 0o7777 == st.st_mode & 0o7777
    assert await trio.to_thread.run_sync(_read, path) == b"a"

    await mounted.invalidate(Target.attr_only(st.st_ino))
    assert (await trio.to_thread.run_sync(os.stat, path)).st_mode & 0o7777 == 0o600
    assert await trio.to_thread.run_sync(_read, path) == b"a", "attributes only: the pages stay"

    await mounted.invalidate(Target.inode(st.st_ino))
    assert await trio.to_thread.run_sync(_read, path) == b"b"
    assert mounted.invalidator.errors == 0


async def test_a_negative_dentry_goes_with_its_entry(mounted: Mounted) -> None:
    path = mounted.path / "late"
    assert not await trio.to_thread.run_sync(_exists, path)  # cached as absent for 60 s
    root = mounted.fs.nodes[pyfuse3.ROOT_INODE]
    ino = mounted.fs.next_ino
    mounted.fs.next_ino += 1
    mounted.fs.nodes[ino] = Node(0o100644, 0, 0)
    mounted.fs.parents[ino] = pyfuse3.ROOT_INODE
    root.children[b"late"] = ino  # another node's create
    assert not await trio.to_thread.run_sync(_exists, path)

    await mounted.invalidate(Target.entry(pyfuse3.ROOT_INODE, b"late"), Target.entry(pyfuse3.ROOT_INODE, b"never"))
    assert await trio.to_thread.run_sync(_exists, path)
    # "never" was not cached: ENOENT from the kernel is not an error
    assert mounted.invalidator.errors == 0 and mounted.invalidator.invalidations == 2
