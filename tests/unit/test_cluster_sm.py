"""The cluster's part of the state machine (meta/cluster_sm.py): members, allocation groups,
liveness-lease epochs and fencing, write leases, orphans held by several members."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest

from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.cluster_sm import LINK_MAX
from awsomefsd.meta.errors import Delegated, FsError
from awsomefsd.meta.levels import UNLIMITED_SUBDIRS_LEVEL
from awsomefsd.meta.records import ROOT_INO, Extent, pack_holders, unpack_holders
from tests.unit.test_state_machine import DATA_START, Harness

AG_BLOCKS = 1000  # the harness's 10,000 data blocks make 10 groups


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    harness = Harness(tmp_path / "meta")
    founder = harness.apply(cc.InitCluster(b"cert", b"key", b"v" * 48, 3, DATA_START, AG_BLOCKS, 10, 1, "n1",
                                          "10.0.0.1:7470", "10.0.0.1:7471", 5))
    assert founder == 1
    return harness


def fenced(node: int, epoch: int, cmd: object) -> c.Fenced:
    return c.Fenced(node, epoch, (cmd,))


def members(h: Harness) -> dict[int, dict[str, object]]:
    with h.store.env.begin() as txn:
        return h.sm.cluster.members(txn)


def test_members_get_consecutive_ids_and_removal_revokes(h: Harness) -> None:
    assert h.apply(cc.AddMember("n2", "10.0.0.2:7470", "10.0.0.2:7471", 6)) == 2
    assert h.apply(cc.AddMember("n3", "10.0.0.3:7470", "10.0.0.3:7471", 7)) == 3
    h.apply(cc.SetMemberCert(3, "abc123"))
    with h.store.env.begin() as txn:
        assert h.sm.cluster.active_members(txn) == [1, 2, 3]
    h.apply(cc.RemoveMember(3, 8))  # a record seen active before: its new state counts
    with h.store.env.begin() as txn:
        assert h.sm.cluster.revoked_serials(txn) == {0xABC123}
        assert h.sm.cluster.active_members(txn) == [1, 2]
    with pytest.raises(FsError):
        h.apply(cc.RemoveMember(3, 9))  # twice: a clear refusal, nothing changes
    with pytest.raises(FsError) as err:
        h.apply(cc.InitCluster(b"x", b"y", b"z" * 48, 3, 0, 1, 1, 1, "n", "a:1", "a:2", 1))
    assert err.value.errno == errno.EEXIST


def test_member_names_are_unique_in_the_cluster(h: Harness) -> None:
    """Nodes on one host (or cloned machines) share a host name; `status` must tell them apart."""
    assert h.apply(cc.AddMember("n1", "b:1", "b:2", 6)) == 2
    assert h.apply(cc.AddMember("", "c:1", "c:2", 7)) == 3
    assert h.apply(cc.AddMember("n4", "d:1", "d:2", 8)) == 4
    h.apply(cc.RemoveMember(4, 9))
    assert h.apply(cc.AddMember("n4", "e:1", "e:2", 10)) == 5  # a removed member's name is free again
    names = {node: record["name"] for node, record in members(h).items()}
    assert names == {1: "n1", 2: "n1-2", 3: "node-3", 4: "n4", 5: "n4"}


def test_groups_are_claimed_lowest_first_and_never_twice(h: Harness) -> None:
    h.apply(cc.AddMember("n2", "b:1", "b:2", 6))
    assert h.apply(cc.ClaimGroups(1, 1, 2)) == (0, 1)
    assert h.apply(cc.ClaimGroups(2, 1, 3)) == (2, 3, 4)
    assert h.apply(cc.ClaimGroups(1, 1, 64)) == (5, 6, 7, 8, 9)
    assert h.apply(cc.ClaimGroups(2, 1, 1)) == ()  # all owned: nothing, and no error


def test_an_expired_epoch_is_refused_everything(h: Harness) -> None:
    h.apply(cc.AddMember("n2", "b:1", "b:2", 6))
    h.apply(cc.ClaimGroups(2, 1, 1))  # group 0: blocks 256..1255
    ino = h.ino
    h.apply(fenced(2, 1, c.Mknod(ROOT_INO, b"f", ino, stat.S_IFREG | 0o644, 0, 0, 10)))
    assert h.apply(cc.AcquireWriteLease(ino, 2, 1)) == 2
    assert h.apply(cc.ExpireNode(2, 11)) == [0]
    with h.store.env.begin() as txn:
        assert h.sm.cluster.groups_of(txn, 2) == []
        assert h.sm.cluster.lease_holder(txn, ino) == 0, "an expired node's write leases are free"
    assert h.apply(cc.RenewLease(2, 1)) is False, "the old epoch may not renew"
    with pytest.raises(FsError) as err:
        h.apply(fenced(2, 1, c.WriteData(ino, (Extent(0, DATA_START, 1, b"\0" * 4),), 4096, 12)))
    assert err.value.errno == errno.EIO
    assert h.apply(cc.RenewLease(2, 2)) is True, "the node comes back under the new epoch"
    assert members(h)[2]["expired"] is False


def test_new_extents_must_lie_in_the_proposers_groups(h: Harness) -> None:
    h.apply(cc.AddMember("n2", "b:1", "b:2", 6))
    h.apply(cc.ClaimGroups(1, 1, 1))  # group 0
    h.apply(cc.ClaimGroups(2, 1, 1))  # group 1: blocks 1256..2255
    ino = h.ino
    h.apply(fenced(1, 1, c.Mknod(ROOT_INO, b"f", ino, stat.S_IFREG | 0o644, 0, 0, 10)))
    with pytest.raises(FsError) as err:
        h.apply(fenced(1, 1, c.WriteData(ino, (Extent(0, DATA_START + AG_BLOCKS, 1, b"\0" * 4),), 4096, 12)))
    assert err.value.errno == errno.EIO and "outside" in str(err.value)
    with pytest.raises(FsError):  # straddling the end of its own group into the next one
        h.apply(fenced(1, 1, c.WriteData(ino, (Extent(0, DATA_START + AG_BLOCKS - 1, 2, b"\0" * 8),), 8192, 12)))
    inode = h.apply(fenced(1, 1, c.WriteData(ino, (Extent(0, DATA_START, 1, b"\0" * 4),), 4096, 12)))
    assert inode.size == 4096


def test_write_lease_goes_to_the_first_asker_until_released(h: Harness) -> None:
    h.apply(cc.AddMember("n2", "b:1", "b:2", 6))
    assert h.apply(cc.AcquireWriteLease(50, 1, 1)) == 1
    assert h.apply(cc.AcquireWriteLease(50, 2, 1)) == 1, "held: the answer names the holder"
    assert h.apply(cc.ReleaseWriteLease(50, 2)) is False, "only the holder releases"
    assert h.apply(cc.ReleaseWriteLease(50, 1)) is True
    assert h.apply(cc.AcquireWriteLease(50, 2, 1)) == 2


def test_an_orphan_is_deleted_when_every_member_released_it(h: Harness) -> None:
    h.apply(cc.AddMember("n2", "b:1", "b:2", 6))
    h.apply(cc.AddMember("n3", "c:1", "c:2", 6))
    ino = h.ino
    h.apply(c.Mknod(ROOT_INO, b"f", ino, stat.S_IFREG | 0o644, 0, 0, 10))
    h.apply(c.Unlink(ROOT_INO, b"f", False, 11))
    assert h.apply(cc.ReleaseOrphans(1, (ino,), 12)) == 0
    assert h.apply(cc.ReleaseOrphans(1, (ino,), 12)) == 0, "releasing twice counts once"
    assert h.apply(cc.ReleaseOrphans(3, (ino,), 13)) == 0
    with h.store.env.begin() as txn:
        assert h.sm.ns.get_inode(txn, ino) is not None, "node 2 may still read it"
    assert h.apply(cc.ExpireNode(2, 14)) == [], "a node that is gone holds nothing open"
    with h.store.env.begin() as txn:
        assert h.sm.ns.get_inode(txn, ino) is None


def orphan_mark(h: Harness, ino: int) -> bytes | None:
    with h.store.env.begin() as txn:
        raw = txn.get(ino.to_bytes(8, "big"), db=h.sm.db["orphans"])
    return None if raw is None else bytes(raw)


def test_a_file_only_its_creator_can_reach_goes_with_its_last_name(h: Harness) -> None:
    """UnlinkAlone: the proposer, holding the file's write lease (its create ahead granted it),
    answers for every member: the file is deleted at once, data and lease with it, and no orphan
    mark waits for three releases. Anyone else's word, or a file with a name left, is an Unlink's."""
    h.apply(cc.AddMember("n2", "b:1", "b:2", 6))
    h.apply(cc.AddMember("n3", "c:1", "c:2", 7))
    h.apply(cc.ClaimGroups(2, 1, 1))  # group 0: blocks 256..1255
    mine, theirs, linked = h.ino, h.ino + 1, h.ino + 2
    for ino, name in ((mine, b"mine"), (theirs, b"theirs"), (linked, b"linked")):
        h.apply(fenced(2, 1, c.Mknod(ROOT_INO, name, ino, stat.S_IFREG | 0o644, 0, 0, 10, lease_to=2)))
    h.apply(fenced(2, 1, c.WriteData(mine, (Extent(0, DATA_START, 2, b"\0" * 8),), 8192, 11)))
    h.apply(fenced(2, 1, c.Link(linked, ROOT_INO, b"other-name", 11)))
    free = h.free_blocks()

    assert h.apply(fenced(2, 1, c.UnlinkAlone(ROOT_INO, b"mine", False, 12, ino=mine))) == mine
    assert h.inode(mine) is None and orphan_mark(h, mine) is None
    with h.store.env.begin() as txn:
        assert h.sm.cluster.lease_holder(txn, mine) == 0
    h.apply(c.ReclaimFrees(10**18))
    assert h.free_blocks() == free + 2, "its blocks come back after the grace period"

    assert h.apply(fenced(3, 1, c.UnlinkAlone(ROOT_INO, b"theirs", False, 12, ino=theirs))) == theirs
    assert h.inode(theirs).nlink == 0 and orphan_mark(h, theirs) == b"[1, 2, 3]", \
        "node 3 does not hold its lease: every member may hold it open"

    assert h.apply(fenced(2, 1, c.UnlinkAlone(ROOT_INO, b"linked", False, 12, ino=linked))) == linked
    assert h.inode(linked).nlink == 1 and orphan_mark(h, linked) is None, "a name is left: only unlinked"


def test_a_create_run_for_another_member_leases_the_file_to_it_only_while_its_epoch_holds(h: Harness) -> None:
    """MknodFor: the directory's holder (node 2) creates for node 3, in node 3's inode number; the
    file's write lease goes to node 3 when node 3's liveness lease is the epoch the command names,
    and to nobody when it expired meanwhile (a lease granted to an expired member would stay with
    no one able to hand it over). The holder's delegation is what lets it change the directory."""
    h.apply(cc.AddMember("n2", "b:1", "b:2", 6))
    h.apply(cc.AddMember("n3", "c:1", "c:2", 7))
    directory = h.ino
    h.apply(fenced(2, 1, c.Mknod(ROOT_INO, b"d", directory, stat.S_IFDIR | 0o755, 0, 0, 9, lease_to=2)))
    current, stale = h.ino + 1, h.ino + 2
    made = h.apply(fenced(2, 1, c.MknodFor(directory, b"current", current, stat.S_IFREG | 0o644, 5, 6, 10,
                                           cookie=c.delegated_cookie(current), lease_to=3, lease_epoch=1)))
    assert made.ino == current and made.uid == 5
    h.apply(cc.ExpireNode(3, 11))  # node 3's epoch becomes 2
    h.apply(fenced(2, 1, c.MknodFor(directory, b"stale", stale, stat.S_IFREG | 0o644, 5, 6, 12,
                                    cookie=c.delegated_cookie(stale), lease_to=3, lease_epoch=1)))
    with h.store.env.begin() as txn:
        assert h.sm.cluster.lease_holder(txn, current) == 0, "node 3's expiry freed the lease it had"
        assert h.sm.cluster.lease_holder(txn, stale) == 0, "not granted to an expired epoch"
        assert h.sm.ns.lookup(txn, directory, b"stale") == stale, "the file is made all the same"
    again = h.ino + 3
    assert h.apply(cc.RenewLease(3, 2)) is True
    h.apply(fenced(2, 1, c.MknodFor(directory, b"again", again, stat.S_IFREG | 0o644, 5, 6, 14,
                                    cookie=c.delegated_cookie(again), lease_to=3, lease_epoch=2)))
    with h.store.env.begin() as txn:
        assert h.sm.cluster.lease_holder(txn, again) == 3
    with pytest.raises(Delegated):  # only the holder changes its directory
        h.apply(fenced(3, 2, c.MknodFor(directory, b"x", h.ino + 4, stat.S_IFREG | 0o644, 5, 6, 15,
                                        lease_to=3, lease_epoch=2)))


def test_an_orphan_mark_keeps_the_format_every_replica_stores() -> None:
    """Its holders as a JSON list (b"" for none): replicas of older builds decode it (the memoized
    codec must write the same bytes)."""
    assert pack_holders((1, 2, 3)) == b"[1, 2, 3]" and pack_holders((7,)) == b"[7]" and pack_holders(()) == b""
    assert unpack_holders(b"[1, 2, 3]") == (1, 2, 3) and unpack_holders(b"") == ()


def test_a_delegated_directory_is_changed_only_by_its_holder(h: Harness) -> None:
    """A member that does not hold a directory's delegation may not change its entries while
    another does: the holder may have acknowledged changes the log has not seen (Delegated)."""
    h.apply(cc.AddMember("n2", "b:1", "b:2", 6))
    h.apply(cc.AddMember("n3", "c:1", "c:2", 7))
    held, other = h.ino, h.ino + 1
    h.apply(fenced(2, 1, c.Mknod(ROOT_INO, b"held", held, stat.S_IFDIR | 0o755, 0, 0, 10, lease_to=2)))
    h.apply(fenced(2, 1, c.Mknod(ROOT_INO, b"other", other, stat.S_IFDIR | 0o755, 0, 0, 10)))
    h.apply(fenced(2, 1, c.Mknod(held, b"sub", other + 1, stat.S_IFDIR | 0o755, 0, 0, 11)))
    h.apply(fenced(2, 1, c.Mknod(other, b"f", other + 2, stat.S_IFREG | 0o644, 0, 0, 11)))
    refused = [
        c.Mknod(held, b"g", other + 3, stat.S_IFREG | 0o644, 0, 0, 12),
        c.Link(other + 2, held, b"l", 12),
        c.Unlink(held, b"sub", True, 12),
        c.Unlink(ROOT_INO, b"held", True, 12),  # its emptiness is its holder's to know
        c.Rename(other, b"f", held, b"f", 0, 12),
        c.Rename(held, b"sub", other, b"sub", 0, 12),
    ]
    for cmd in refused:
        with pytest.raises(Delegated) as err:
            h.apply(fenced(3, 1, cmd))
        assert (err.value.directory, err.value.holder, err.value.errno) in ((held, 2, errno.EAGAIN),), cmd
    with h.store.env.begin() as txn:
        assert sorted(name for _, name, _ in h.sm.ns.entries(txn, held)) == [b"sub"]
    h.apply(fenced(2, 1, c.Mknod(held, b"g", other + 3, stat.S_IFREG | 0o644, 0, 0, 12)))  # the holder's
    h.apply(fenced(3, 1, c.Mknod(other, b"h", other + 4, stat.S_IFREG | 0o644, 0, 0, 12)))  # not delegated
    h.apply(c.Mknod(held, b"unfenced", other + 5, stat.S_IFREG | 0o644, 0, 0, 12))  # no member proposed it
    h.apply(cc.ReleaseWriteLease(held, 2))
    h.apply(fenced(3, 1, c.Mknod(held, b"now", other + 6, stat.S_IFREG | 0o644, 0, 0, 13)))


def test_the_log_level_only_rises(h: Harness) -> None:
    """SetLogLevel (a rolling upgrade's end): recorded once every member decodes it, never lowered
    (a late or repeated proposal from a leader that asked earlier changes nothing)."""
    with h.store.env.begin() as txn:
        assert h.sm.cluster.log_level(txn) is None  # formed before the gate: the base level
    assert h.apply(c.SetLogLevel(4, (1,))) == 4
    assert h.apply(c.SetLogLevel(3, (1,))) == 4
    assert h.apply(cc.AddMember("n2", "10.0.0.2:7470", "10.0.0.2:7471", 6)) == 2
    assert h.apply(c.SetLogLevel(5, (1,))) == 4  # node 2 joined after the leader asked: not raised
    assert h.apply(c.SetLogLevel(5, (1, 2))) == 5
    with h.store.env.begin() as txn:
        assert h.sm.cluster.log_level(txn) == 5


def test_subdirectories_are_unlimited_once_every_member_applies_it_so(h: Harness, tmp_path: Path) -> None:
    """ext4's dir_nlink: no subdirectory limit. A cluster below UNLIMITED_SUBDIRS_LEVEL keeps
    ext4's old limit (64,998: link count 65,000), since a member on an older build applies it."""
    def full_directory(harness: Harness, name: bytes, ino: int) -> None:
        harness.apply(c.Mknod(ROOT_INO, name, ino, stat.S_IFDIR | 0o755, 0, 0, 20))
        with harness.store.env.begin(write=True) as txn:
            inode = harness.sm.ns.require_inode(txn, ino)
            inode.nlink = LINK_MAX
            harness.sm.ns.put_inode(txn, inode)

    full_directory(h, b"full", 9000)
    with pytest.raises(FsError) as err:
        h.apply(c.Mknod(9000, b"one-more", 9001, stat.S_IFDIR | 0o755, 0, 0, 21))
    assert err.value.errno == errno.EMLINK
    h.apply(c.Mknod(9000, b"a-file", 9002, stat.S_IFREG | 0o644, 0, 0, 21))  # only subdirectories count
    assert h.apply(c.SetLogLevel(UNLIMITED_SUBDIRS_LEVEL, (1,))) == UNLIMITED_SUBDIRS_LEVEL
    h.apply(c.Mknod(9000, b"one-more", 9001, stat.S_IFDIR | 0o755, 0, 0, 22))
    single = Harness(tmp_path / "single")  # a single node waits for nobody
    full_directory(single, b"full", 9000)
    single.apply(c.Mknod(9000, b"one-more", 9001, stat.S_IFDIR | 0o755, 0, 0, 21))
    for harness in (h, single):
        with harness.store.env.begin() as txn:
            assert harness.sm.ns.require_inode(txn, 9000).nlink == LINK_MAX + 1
