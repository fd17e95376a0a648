"""Space in a cluster follows demand: allocation groups are owned by nodes, and a node that wrote
and deleted most of the device must not keep the others from using the space while it lives
(cluster/duties.py, GroupKeeper: an empty claim is an ask, and owners give the groups they can
spare). ENOSPC means the file system is full, whatever node asks."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

from awsomefsd.cli.devcluster.network import PrivateNetwork
from tests.support.cluster import cluster_in
from tests.support.daemon import wait_for

MiB = 1 << 20
CHUNK = b"s" * MiB
FILL_DEADLINE_S = 60.0


def write_file(path: Path, size: int) -> float:
    """Write `size` bytes and fsync; returns the longest single write() (an ENOSPC raises)."""
    longest = 0.0
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // MiB):
            start = time.monotonic()
            os.write(fd, CHUNK)
            longest = max(longest, time.monotonic() - start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return longest


def free_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize


def test_space_one_node_deleted_is_writable_on_the_others(netns_network: Callable[[int], PrivateNetwork],
                                                          tmp_path: Path) -> None:
    """One node writes half of a small device (16 MiB groups) and deletes the file; `df` shows the
    space free on every node, and another node can then write as much (before: ENOSPC once its own
    groups and the few unowned ones were full, for as long as the first node lived). The rules of
    giving are in tests/unit/test_group_keeper.py."""
    with cluster_in(netns_network(3), tmp_path, size="256M") as cluster:
        a, b, _c = cluster.form(3)
        empty = free_bytes(a.mount)
        big = (empty // 2) // MiB * MiB  # fits in the groups A can claim: before, A could write it
        write_file(a.mount / "big", big)
        os.unlink(a.mount / "big")
        wait_for(lambda: free_bytes(b.mount) >= empty - 8 * MiB, 30, "the deleted space shown free on B")
        start = time.monotonic()
        try:
            longest = write_file(b.mount / "again", big)
        except OSError as exc:
            assert exc.errno != errno.ENOSPC, (
                f"ENOSPC on B after {os.stat(b.mount / 'again').st_size // MiB} MiB of {big // MiB} MiB "
                f"with {free_bytes(b.mount) // MiB} MiB free")
            raise
        took = time.monotonic() - start
        print(f"\nB wrote {big // MiB} MiB after A deleted as much: {took:.1f}s, longest write() {longest:.2f}s")
        assert took < FILL_DEADLINE_S
