"""Tiered data in the state machine (meta/tiered.py): an object's life from plan to forget, and the
rules that keep a file's bytes right while its data moves: only ranges still mapped as read move,
device blocks are freed after the grace period, and an object dies only when nothing (no file, no
clone, no snapshot, no pending free) refers to its blocks."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest

from awsomefsd.meta import commands as c
from awsomefsd.meta.records import ROOT_INO, Extent, TierObject, is_tiered, object_block, object_of
from awsomefsd.meta.tiered import MAX_OBJECT_BLOCKS
from tests.unit.test_state_machine import DATA_START, GRACE_NS, Harness


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path / "meta")


def written(file_block: int, dev_block: int, count: int, seed: int = 1) -> Extent:
    return Extent(file_block, dev_block, count, b"".join((seed * 1000 + i).to_bytes(4, "little") for i in range(count)))


def obj(h: Harness, object_id: int) -> TierObject | None:
    with h.store.env.begin() as txn:
        return h.sm.space.tiered.get(txn, object_id)


def make_file(h: Harness, name: bytes, *extents: Extent) -> int:
    f = h.mk(ROOT_INO, name, stat.S_IFREG | 0o644)
    h.apply(c.WriteData(f, extents, max(e.end_block for e in extents) * 4096, h.tick()))
    return f


def reclaim(h: Harness) -> None:
    h.now += GRACE_NS
    h.apply(c.ReclaimFrees(h.tick()))


def test_a_committed_object_holds_the_data_and_the_device_blocks_come_free_after_the_grace(h: Harness) -> None:
    src = written(0, DATA_START, 8)
    f = make_file(h, b"f", src)
    free = h.free_blocks()
    object_id = h.apply(c.PlanTierObject(h.tick()))
    assert obj(h, object_id) == TierObject(object_id, "pending", 0, 0, h.now, h.now)
    assert h.apply(c.CommitTierObject(object_id, (f,), (src,), h.tick())) == 8
    (moved,) = h.extents(f)
    assert is_tiered(moved.dev_block) and object_of(moved.dev_block) == (object_id, 0)
    assert moved.checksums == src.checksums and (moved.file_block, moved.count) == (0, 8)
    assert h.inode(f).blocks == 8 and h.inode(f).size == 8 * 4096  # st_blocks and size stay
    assert obj(h, object_id).state == "live" and obj(h, object_id).live_blocks == 8
    assert h.free_blocks() == free  # not before the grace period: a reader may still read them
    reclaim(h)
    assert h.free_blocks() == free + 8
    assert (DATA_START, 8) in h.freed


def test_ranges_rewritten_since_they_were_read_stay_where_the_writes_put_them(h: Harness) -> None:
    a, b = written(0, DATA_START, 4), written(0, DATA_START + 10, 4, seed=2)
    fa, fb = make_file(h, b"a", a), make_file(h, b"b", b)
    object_id = h.apply(c.PlanTierObject(h.tick()))
    h.apply(c.WriteData(fb, (written(2, DATA_START + 20, 1, seed=3),), 4 * 4096, h.tick()))  # b changed meanwhile
    assert h.apply(c.CommitTierObject(object_id, (fa, fb), (a, b), h.tick())) == 4
    assert object_of(h.extents(fa)[0].dev_block) == (object_id, 0)
    assert not any(is_tiered(e.dev_block) for e in h.extents(fb))
    assert obj(h, object_id).blocks == 8 and obj(h, object_id).live_blocks == 4


def test_an_object_whose_sources_all_changed_is_dead_at_once(h: Harness) -> None:
    src = written(0, DATA_START, 4)
    f = make_file(h, b"f", src)
    object_id = h.apply(c.PlanTierObject(h.tick()))
    h.apply(c.SetAttr(f, h.tick(), size=0))
    assert h.apply(c.CommitTierObject(object_id, (f,), (src,), h.tick())) == 0
    assert obj(h, object_id).state == "dead"


def test_a_changed_checksum_or_a_shared_range_is_not_moved(h: Harness) -> None:
    src = written(0, DATA_START, 4)
    f = make_file(h, b"f", src)
    object_id = h.apply(c.PlanTierObject(h.tick()))
    lying = Extent(0, DATA_START, 4, written(0, 0, 4, seed=9).checksums)
    assert h.apply(c.CommitTierObject(object_id, (f,), (lying,), h.tick())) == 0
    g = h.mk(ROOT_INO, b"g")
    h.apply(c.CloneRange(f, 0, g, 0, 4, 4 * 4096, h.tick()))
    second = h.apply(c.PlanTierObject(h.tick()))
    assert h.apply(c.CommitTierObject(second, (f,), (src,), h.tick())) == 0


def test_an_abandoned_upload_cannot_commit_and_only_dead_objects_are_forgotten(h: Harness) -> None:
    src = written(0, DATA_START, 4)
    f = make_file(h, b"f", src)
    object_id = h.apply(c.PlanTierObject(h.tick()))
    other = h.apply(c.PlanTierObject(h.tick()))
    assert other == object_id + 1
    assert h.apply(c.ForgetTierObjects((object_id,))) == 0  # pending: still someone's upload
    assert h.apply(c.AbandonTierObjects((object_id,), h.tick())) == 1
    assert h.error(c.CommitTierObject(object_id, (f,), (src,), h.tick())) == errno.ESTALE
    assert not any(is_tiered(e.dev_block) for e in h.extents(f))
    assert h.apply(c.ForgetTierObjects((object_id, other))) == 1
    assert obj(h, object_id) is None and obj(h, other).state == "pending"


def test_deleting_tiered_data_kills_the_object_only_when_no_clone_still_refers_to_it(h: Harness) -> None:
    src = written(0, DATA_START, 6)
    f = make_file(h, b"f", src)
    object_id = h.apply(c.PlanTierObject(h.tick()))
    h.apply(c.CommitTierObject(object_id, (f,), (src,), h.tick()))
    g = h.mk(ROOT_INO, b"g")
    h.apply(c.CloneRange(f, 2, g, 0, 2, 2 * 4096, h.tick()))  # g shares object blocks 2 and 3
    assert h.extents(g)[0].dev_block == object_block(object_id, 2)
    h.apply(c.Unlink(ROOT_INO, b"f", False, h.tick()))
    h.apply(c.Purge(f, h.tick()))
    reclaim(h)
    assert obj(h, object_id).state == "live" and obj(h, object_id).live_blocks == 2
    h.apply(c.WriteData(g, (written(0, DATA_START + 50, 2, seed=4),), 2 * 4096, h.tick()))  # overwrite the clone
    reclaim(h)
    dead = obj(h, object_id)
    assert dead.state == "dead" and dead.live_blocks == 0 and dead.changed_ns == h.now
    assert all(start < object_block(1) for start, _ in h.freed)  # tiered blocks never join free space
    assert h.apply(c.ForgetTierObjects((object_id,))) == 1


def test_malformed_commits_are_refused_whole(h: Harness) -> None:
    src = written(0, DATA_START, 4)
    f = make_file(h, b"f", src)
    object_id = h.apply(c.PlanTierObject(h.tick()))
    assert h.error(c.CommitTierObject(object_id, (f, f), (src,), h.tick())) == errno.EINVAL
    assert h.error(c.CommitTierObject(object_id, (f,), (Extent(0, DATA_START, 4, b""),), h.tick())) == errno.EINVAL
    tiered_source = written(0, object_block(object_id), 4)
    assert h.error(c.CommitTierObject(object_id, (f,), (tiered_source,), h.tick())) == errno.EINVAL
    too_many = tuple(written(i * 256, DATA_START, 256) for i in range(MAX_OBJECT_BLOCKS // 256 + 1))
    assert h.error(c.CommitTierObject(object_id, (f,) * len(too_many), too_many, h.tick())) == errno.EINVAL
    assert h.error(c.CommitTierObject(object_id + 5, (f,), (src,), h.tick())) == errno.ESTALE
    assert obj(h, object_id).state == "pending"

