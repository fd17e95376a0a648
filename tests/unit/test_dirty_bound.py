"""The bound on the kernel's cached writes of the mount (fuse/dirty_bound.py): half the room left
less a margin, between a floor and the cap `tune_bdi` gave, lowered at once and raised in steps;
near a full device it says so, and again when the room is back. The bdi directory here is a
temporary one standing in for /sys/class/bdi/<device> (the mounted test_writeback.py runs it
against the kernel's)."""

from __future__ import annotations

from pathlib import Path

from awsomefsd.fuse.dirty_bound import (
    FLOOR_BYTES,
    MARGIN_BYTES,
    NEAR_FULL_BYTES,
    ROOM_AGAIN_BYTES,
    DirtyBound,
)

MiB = 1 << 20
CAP = 1024 * MiB


def _bdi(tmp_path: Path) -> Path:
    (tmp_path / "max_bytes").write_text(str(CAP))
    (tmp_path / "strict_limit").write_text("0")
    return tmp_path


def test_the_limit_follows_half_the_room_within_floor_and_cap(tmp_path: Path) -> None:
    bdi = _bdi(tmp_path)
    room = [64 * 1024 * MiB]
    said: list[bool] = []
    bound = DirtyBound(bdi, lambda: room[0], said.append)
    assert bound.start() and (bdi / "strict_limit").read_text() == "1", "the device held to its own limit"
    assert int((bdi / "max_bytes").read_text()) == CAP, "room to spare: the cap"

    room[0] = 1000 * MiB
    bound.look()
    assert int((bdi / "max_bytes").read_text()) == (room[0] - MARGIN_BYTES) // 2, "lowered at once"
    room[0] -= 10 * MiB  # less than a tenth lower: left as it is
    bound.look()
    assert int((bdi / "max_bytes").read_text()) == (1000 * MiB - MARGIN_BYTES) // 2
    room[0] = 1100 * MiB  # more room, not yet a quarter more: left
    bound.look()
    assert int((bdi / "max_bytes").read_text()) == (1000 * MiB - MARGIN_BYTES) // 2
    room[0] = 4 * 1024 * MiB
    bound.look()
    assert int((bdi / "max_bytes").read_text()) == CAP, "back at the cap"

    room[0] = NEAR_FULL_BYTES - 1
    bound.look()
    assert int((bdi / "max_bytes").read_text()) == FLOOR_BYTES and said == [True] and bound.near_full_now()
    room[0] = ROOM_AGAIN_BYTES - 1  # not yet: no flapping at the edge
    bound.look()
    assert said == [True] and not bound.near_full_now()
    room[0] = ROOM_AGAIN_BYTES
    bound.look()
    assert said == [True, False]


def test_a_kernel_that_refuses_the_bound_ends_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-device"
    assert not DirtyBound(missing, lambda: 0, lambda full: None).start()
    bdi = _bdi(tmp_path)
    bound = DirtyBound(bdi, lambda: 1000 * MiB, lambda full: None)
    assert bound.start()
    (bdi / "max_bytes").unlink()
    (bdi / "max_bytes").mkdir()  # a write to it now fails
    bound.room_bytes = lambda: 100 * MiB
    bound.look()
    assert not bound.active


def test_room_far_beyond_what_the_kernel_lets_be_dirty_needs_no_bound_of_its_own(tmp_path: Path) -> None:
    """The device is held to its own limit (strict_limit) only once the room is within twice the
    kernel's whole dirty limit: before, the kernel cannot hold more than the device takes."""
    bdi = _bdi(tmp_path)
    room = [64 * 1024 * MiB]
    bound = DirtyBound(bdi, lambda: room[0], lambda full: None, kernel_limit_bytes=4 * 1024 * MiB)
    assert bound.start() and (bdi / "strict_limit").read_text() == "0"
    room[0] = 8 * 1024 * MiB - 1
    bound.look()
    assert (bdi / "strict_limit").read_text() == "1" and int((bdi / "max_bytes").read_text()) == CAP
    room[0] = 600 * MiB
    bound.look()
    assert int((bdi / "max_bytes").read_text()) == (room[0] - MARGIN_BYTES) // 2
    room[0] = 9 * 1024 * MiB
    bound.look()
    assert (bdi / "strict_limit").read_text() == "0" and int((bdi / "max_bytes").read_text()) == CAP


def test_a_room_that_cannot_be_read_ends_the_bound_and_fails_no_write(tmp_path: Path) -> None:
    """`look` runs after a WRITE was taken: an error there would answer that WRITE with EIO, and
    the kernel would drop the pages. It ends the bound instead (logged)."""
    bdi = _bdi(tmp_path)
    bound = DirtyBound(bdi, lambda: 1000 * MiB, lambda full: None)
    assert bound.start()

    def unreadable() -> int:
        raise RuntimeError("the metadata store cannot be read")

    bound.room_bytes = unreadable
    assert not bound.near_full_now()
    bound.look()
    assert not bound.active
