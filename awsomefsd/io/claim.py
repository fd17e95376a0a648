"""Claiming a device's founding: exactly one node makes the metadata of a new file system.

Nodes that start at the same instant on one shared device, each with an empty state directory,
must agree on one founder; the others join it (a cluster) or refuse (a single node). The device is
the one thing they all share, but it offers no compare-and-swap, so the claim is a *delta lease*
on the founding record (as sanlock's host-id leases; Chockler and Malkhi, "Light-weight leases for
storage-centric coordination"):

1. read the record: FOUNDED ends the claim (someone made the metadata); a CLAIMED record of
   another node that still changes (its holder rewrites it every `renew_s`) is waited on; one
   that has not changed for `expiry_s` by our own clock was abandoned;
2. write our own CLAIMED record, at most `read_to_write_s` after that read;
3. wait `settle_s`, read again: still ours, we hold the claim; else start over.

Why it is safe: of the contenders whose reads found the record free, the one whose write landed
last wins, and every other sees that write when it reads again, provided a write lands within
`settle_s` of the read before it (`read_to_write_s` plus the device's write latency). The holder
renews the claim while it works, and writes FOUNDED when the metadata exists; `DeviceClaim.found`
then waits `settle_s` again and checks that the record is still its own before anything is
served, so a contender that broke the timing (a process paused between its check and its write)
is caught before a byte of data is written. On one machine the contenders are serialised first by
a POSIX lock on the record's block, so for an image file that no other machine sees the delay is
not needed (`shared=False`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from awsomefsd.io.device import BlockDevice
from awsomefsd.io.errors import DeviceError
from awsomefsd.io.founding import PRIMARY_BLOCK, FoundingRecord, Stage, read_primary, write_founding
from awsomefsd.io.layout import BLOCK_SIZE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimTiming:
    settle_s: float = 2.0
    renew_s: float = 1.0
    expiry_s: float = 15.0
    read_to_write_s: float = 0.5
    poll_s: float = 0.2

    def __post_init__(self) -> None:
        assert self.read_to_write_s < self.settle_s, "a write must land within settle_s of its read"
        assert self.renew_s * 3 <= self.expiry_s, "a live holder must renew well within the expiry"


class ClaimTimeout(DeviceError):
    """No founder could be settled on in time (another node holds the claim and keeps it)."""


class ClaimLost(DeviceError):
    """Our FOUNDED record was overwritten before we served anything: another node broke the
    claim's timing. Nothing was written to the data area; start again (and join)."""


class DeviceClaim:
    """A claim this process holds; renewed in a thread until `found` or `release`."""

    def __init__(self, device: BlockDevice, record: FoundingRecord, timing: ClaimTiming, shared: bool,
                 lock_fd: int) -> None:
        self.record = record
        self._device = device
        self._timing = timing
        self._shared = shared
        self._lock_fd = lock_fd
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._renewer = threading.Thread(target=self._renew, name="founding-claim", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self._timing.renew_s):
            with self._guard:
                if self._stop.is_set():
                    return
                self.record = replace(self.record, seq=self.record.seq + 1, written_ns=time.time_ns())
                try:
                    write_founding(self._device, self.record)
                except OSError as exc:
                    log.warning("renewing the founding claim on %s failed: %s", self._device.path, exc)

    @property
    def device(self) -> BlockDevice:
        """The claim's own handle (a founder formats a blank device through it)."""
        return self._device

    def _halt(self) -> None:
        with self._guard:
            self._stop.set()
        self._renewer.join()

    def found(self, record: FoundingRecord) -> None:
        """Record that the metadata exists (FOUNDED), then make sure the record stays ours for
        `settle_s` (ClaimLost otherwise) before the caller serves anything."""
        assert record.stage == Stage.FOUNDED
        self._halt()
        write_founding(self._device, record)
        if self._shared:
            time.sleep(self._timing.settle_s)
            now = read_primary(self._device)
            if now != record:
                self._close()
                raise ClaimLost(f"{self._device.path}: the founding record was overwritten by another node "
                                "while this one founded: start again")
        self.record = record
        self._close()

    def release(self, back_to: FoundingRecord | None) -> None:
        """Give the claim up (founding failed): put back the record found before, so that others
        need not wait for the claim to expire."""
        self._halt()
        try:
            if back_to is not None:
                write_founding(self._device, back_to)
        except OSError as exc:
            log.warning("releasing the founding claim on %s failed: %s", self._device.path, exc)
        finally:
            self._close()

    def _close(self) -> None:
        os.close(self._lock_fd)
        self._device.close()


def claim_founding(path: Path, *, shared: bool, base: FoundingRecord, deadline_s: float,
                   timing: ClaimTiming = ClaimTiming(), me: uuid.UUID | None = None, machine_lock: bool = True,
                   on_wait: Callable[[FoundingRecord], None] = lambda _record: None) -> DeviceClaim | FoundingRecord:
    """Claim the founding of the device at `path`: a DeviceClaim when this process is to make the
    metadata, or the FOUNDED record when another did (before or meanwhile). `base` is the record
    the device holds or would hold (FORMATTED, with the cluster and device ids); `me` the claim's
    id (a founder that restarts mid-founding claims again under its old one); `on_wait` hears of
    another node's live claim (once per holder). ClaimTimeout after `deadline_s`. `machine_lock`
    False: no turn-taking on this machine (tests in which threads stand for other machines)."""
    me = me or uuid.uuid4()
    deadline = time.monotonic() + deadline_s
    lock_fd = _lock_record(path, deadline) if machine_lock else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    device = BlockDevice.open(path, shared=shared)
    try:
        return _claim(device, lock_fd, me, shared=shared, base=base, deadline=deadline, timing=timing,
                      on_wait=on_wait)
    except BaseException:
        device.close()
        os.close(lock_fd)
        raise


def _claim(device: BlockDevice, lock_fd: int, me: uuid.UUID, *, shared: bool, base: FoundingRecord,
           deadline: float, timing: ClaimTiming, on_wait: Callable[[FoundingRecord], None]) -> DeviceClaim | FoundingRecord:
    first_seen: dict[tuple[uuid.UUID, int], float] = {}
    told: set[uuid.UUID] = set()
    while True:
        now = time.monotonic()
        if now > deadline:
            raise ClaimTimeout(f"{device.path}: another node has been founding the file system for too long "
                               "(its claim is still renewed); try again, or find that node")
        found = read_primary(device)
        read_at = time.monotonic()
        if found is not None and found.stage == Stage.FOUNDED:
            device.close()
            os.close(lock_fd)
            return found
        if found is not None and found.stage == Stage.CLAIMED and found.owner != me:
            since = first_seen.setdefault((found.owner, found.seq), read_at)
            if read_at - since < timing.expiry_s:
                if found.owner not in told:
                    told.add(found.owner)
                    on_wait(found)
                time.sleep(timing.poll_s)
                continue
            log.warning("%s: the founding claim of %s (host %s) was not renewed for %.0f s: taking it over",
                        device.path, found.owner, found.host or "?", timing.expiry_s)
        if time.monotonic() - read_at > timing.read_to_write_s:
            continue  # the read is too old to act on (we were descheduled): read again
        mine = replace(base, stage=Stage.CLAIMED, owner=me, seq=(found.seq + 1) if found else 1,
                       written_ns=time.time_ns())
        write_founding(device, mine)
        if shared:
            time.sleep(timing.settle_s)
            if read_primary(device) != mine:
                continue
        return DeviceClaim(device, mine, timing, shared, lock_fd)


_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid


def _lock_record(path: Path, deadline: float) -> int:
    """An open-file-description lock on the record's block: contenders on this machine take turns.
    (An OFD lock, not a classic POSIX one, which closing any other descriptor of the file would
    drop; and independent of the whole-file flock every open of the device holds.)"""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, PRIMARY_BLOCK * BLOCK_SIZE, BLOCK_SIZE, 0)
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
            return fd
        except OSError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise ClaimTimeout(f"{path}: another process on this machine is founding the file system") from None
            time.sleep(0.05)
