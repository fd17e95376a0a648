"""Under the writeback cache, the kernel never holds more written pages of the mount than the device can take.

A write() the kernel caches returns before the daemon sees it. If the daemon must refuse the page
later (ENOSPC), the bytes write() acknowledged are lost: reported at fsync and close, and at the
writer's next write() (fuse/kernel/refusals.py), but lost. ext4 never does that: delayed
allocation reserves the space at write(). Without a bound the kernel starts writing back only at
its background threshold (10 % of the available memory: 2.6 GiB went into the page cache of a
64 MiB device in a test before the first refusal).

So the daemon keeps the kernel's limit on this mount's dirty pages (the device's `max_bytes`
under /sys/class/bdi, with `strict_limit` so that the kernel holds each device to its own limit)
at half the room left (free blocks less what the daemon's buffer will need, less a margin),
never above the share `tune_bdi` gave and never below a floor. A writer past the limit waits in
the kernel while its pages are written back. The limit is looked at after every cached WRITE the
daemon takes (`look`): room shrinks only by what is written, so it is lowered before the kernel
can hold more than the room left.

The limit bounds what the kernel holds at once, not what a writer adds over time: at the floor a
writer still fills the device at the pace of write-back, and what it holds when the device fills
would be dropped. So below NEAR_FULL_BYTES of room the device counts as full for cached writes
(`full(True)`: their writers hear ENOSPC at their next write()) while the margin still takes what
the kernel holds (one write() in progress; a single write() larger than the margin may still lose
its tail, reported at close); it counts as not full again from ROOM_AGAIN_BYTES. A bound the
kernel refuses (no writable sysfs in a container) is logged once and given up: refused
write-backs still reach the writer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MARGIN_BYTES = 8 << 20
"""Room held back from the kernel: what a write() in progress adds, and blocks the daemon's own
flushes and metadata take."""
FLOOR_BYTES = 256 << 10
"""The smallest limit set: below it a writer would wait for every page."""
NEAR_FULL_BYTES = MARGIN_BYTES + 2 * FLOOR_BYTES
"""Below this room, cached writes count the device full (the limit is at its floor by then)."""
ROOM_AGAIN_BYTES = 2 * MARGIN_BYTES
PENDING_BELOW_BYTES = 4 * ROOM_AGAIN_BYTES
"""Below this room the blocks waiting out their grace period after a delete or an overwrite
count too (a write short of room waits for them rather than fail: `SpaceGuard.wait_for_frees`).
Counting them is a walk of the delayed frees, so only near a full device."""
UNBOUNDED_FACTOR = 2
"""Room this many times the kernel's whole dirty limit needs no bound of the device's own."""
LOWER_FACTOR = 0.9
RAISE_FACTOR = 1.25
"""A new limit is written only when it is this much lower or higher than the one set (the room
moves in steps of a write); reaching the cap is always written."""


def kernel_dirty_limit_bytes(threshold: str = "dirty") -> int:
    """The dirty bytes past which the whole kernel acts: "dirty", where it makes writers wait
    (vm.dirty_bytes, or vm.dirty_ratio % of the available memory); "dirty_background", where it
    starts writing back. 0 when unknown."""
    vm = Path("/proc/sys/vm")
    try:
        absolute = int((vm / f"{threshold}_bytes").read_text())
        if absolute:
            return absolute
        ratio = int((vm / f"{threshold}_ratio").read_text())
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * ratio // 100
    except (OSError, ValueError):
        pass
    return 0


class DirtyBound:
    """The kernel's limit on the mount's dirty pages, kept at half the room left (`look`).

    Only where it matters: while the room is more than UNBOUNDED_FACTOR times what the whole
    kernel lets be dirty, the kernel could not hold more than the device takes anyway, and the
    device runs without `strict_limit` (sequential writes measured 0.83x with it on an 8 GiB
    device)."""

    def __init__(self, bdi: Path, room_bytes: Callable[[], int], full: Callable[[bool], None],
                 pending_bytes: Callable[[], int] = lambda: 0, kernel_limit_bytes: int = 0) -> None:
        """`bdi`: the mount's /sys/class/bdi directory, as `tune_bdi` left it (its `max_bytes`
        is the cap). `room_bytes`: the bytes the daemon can still promise to write;
        `pending_bytes`: those its delayed frees will add. `full`: told when the device comes
        near full for cached writes (True) and has room again (False). `kernel_limit_bytes`:
        `kernel_dirty_limit_bytes()` (0: unknown, always bounded)."""
        self.bdi = bdi
        self.room_bytes = room_bytes
        self.pending_bytes = pending_bytes
        self.full = full
        self.unbounded_from = UNBOUNDED_FACTOR * kernel_limit_bytes if kernel_limit_bytes else 0
        self.near_full = False
        self.strict = False
        self.cap = 0
        self.limit = 0
        self.active = False
        self.lowered = 0

    def start(self) -> bool:
        """Bound the kernel's cached writes from now on; False (logged) when the kernel refuses."""
        try:
            self.cap = int((self.bdi / "max_bytes").read_text())
            (self.bdi / "strict_limit").write_text("0")
        except (OSError, ValueError) as exc:
            log.warning("cannot bound the kernel's cached writes of the mount to the room on the device (%s): "
                        "past a full device they are refused when written back, and reported", exc)
            return False
        self.limit = self.cap
        self.active = True
        self.look()
        return self.active

    def room(self) -> int:
        """The room left, with the delayed frees near a full device."""
        room = self.room_bytes()
        return room + self.pending_bytes() if room < PENDING_BELOW_BYTES else room

    def near_full_now(self) -> bool:
        """Is the room below NEAR_FULL_BYTES now (asked when a writer's GETATTR comes)? What the
        bound last saw when the room cannot be read now (logged by `look`)."""
        try:
            return self.room() < NEAR_FULL_BYTES
        except Exception:
            return self.near_full

    def look(self) -> None:
        """Set the limit the room asks for now, and say when the device comes near full or has
        room again. A limit the kernel refuses ends the bound (logged)."""
        if not self.active:
            return
        try:
            room = self.room()
        except Exception:  # asked after a WRITE was taken: its answer must not become an error
            log.exception("the room on the device cannot be read: the bound on the kernel's cached writes is given up")
            self.active = False
            return
        if (not self.near_full and room < NEAR_FULL_BYTES) or (self.near_full and room >= ROOM_AGAIN_BYTES):
            self.near_full = not self.near_full
            self.full(self.near_full)
        wanted = max(FLOOR_BYTES, min(self.cap, (room - MARGIN_BYTES) // 2))
        strict = not self.unbounded_from or room < self.unbounded_from
        try:
            if strict != self.strict and not strict:
                (self.bdi / "strict_limit").write_text("0")
                self.strict = False
            if wanted != self.limit and not (self.limit * LOWER_FACTOR < wanted < min(self.cap, self.limit * RAISE_FACTOR)):
                (self.bdi / "max_bytes").write_text(str(wanted))  # before the device is held to it
                self.lowered += wanted < self.limit
                self.limit = wanted
            if strict != self.strict:
                (self.bdi / "strict_limit").write_text("1")
                self.strict = True
        except OSError as exc:
            log.warning("cannot set the kernel's limit on the mount's cached writes to %d bytes (%s): given up",
                        wanted, exc)
            self.active = False
