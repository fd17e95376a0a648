"""Which directory listings a member's kernel may keep (`AppliedCommands.keep_listing`, design
note 141), on the simulated log of test_write_lease_fairness.py: one the kernel read from the
start (`listed`) stays current until a change to the directory's entries made elsewhere is
applied here (another node's; this node's own go through its kernel, which drops the listing
itself), and none survives a reload (a snapshot, an expiry). The kernel's side, on a real
cluster: tests/cluster/test_member_listings.py."""

from __future__ import annotations

import stat
from pathlib import Path

from awsomefsd.meta import commands as c
from awsomefsd.meta.records import ROOT_INO
from tests.cluster.test_write_lease_fairness import Cluster

READER, WRITER = 2, 3


def test_a_listing_is_kept_until_another_node_changes_the_directory(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    d = cluster.h.mk(ROOT_INO, b"d", stat.S_IFDIR | 0o755)
    other = cluster.h.mk(ROOT_INO, b"other", stat.S_IFDIR | 0o755)
    reader = cluster.co(READER)
    assert not reader.keep_listing(d), "never read: whatever the kernel has is dropped"
    reader.listed(d)
    reader.listed(other)
    assert reader.keep_listing(d)

    def create(node: int, parent: int, name: bytes) -> None:
        ino = cluster.h.new_ino()
        command = c.Mknod(parent, name, ino, stat.S_IFREG | 0o644, 0, 0, cluster.h.tick(), 0, b"")
        result = cluster.sim.apply(node, 1, command)
        assert not isinstance(result, Exception), result

    create(READER, d, b"mine")
    assert reader.keep_listing(d), "its own change went through its kernel, which dropped the listing"
    create(WRITER, d, b"theirs")
    assert not reader.keep_listing(d), "another node's create applied here"
    assert reader.keep_listing(other), "every directory on its own"
    reader.listed(d)
    assert reader.keep_listing(d), "read again since"
    cluster.sim.apply(WRITER, 1, c.Rename(d, b"theirs", other, b"moved", 0, cluster.h.tick()))
    assert not reader.keep_listing(d) and not reader.keep_listing(other), "a rename changes both"
    reader.listed(d)
    reader.reload()
    assert not reader.keep_listing(d), "a reload (a snapshot, an expiry) keeps no listing"
