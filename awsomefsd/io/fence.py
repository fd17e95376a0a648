"""Fencing of device writes: a node whose liveness lease has lapsed stops writing the shared device.

Every node holds a liveness lease renewed through the leader. When a node cannot renew (it is
partitioned, or paused and then woken), the rest of the cluster will, once the lease has ended,
take back its allocation groups and reuse their extents. A write the node issued after that would
land in blocks that now belong to someone else: silent corruption. So `BlockDevice.write_from`
asks a `WriteFence` right before each write system call, and the fence refuses (EIO) once the
lease is about to end.

Timing (all on this node's monotonic clock, the scale of `time.monotonic()` and trio's clock):

    renewed(valid_until_s) ... fence closes at valid_until_s - margin_s ... lease ends ... peers reuse
                                |<------------- margin_s -------------->|<-- margin_s -->|

- Our margin covers the write itself: a write that passed `check` just before the fence closed
  has `margin_s` left, and one device write takes at most `MAX_WRITE_S <= margin_s`. The fence
  cannot abort an issued write, so this bound is an assumption the device's I/O timeout has to
  honour (e.g. multipath must not queue I/O for longer when all paths are down).
- The peers' margin (they wait lease end + margin before reusing extents) covers what the fence
  cannot see: the gap between `check` and the system call (a thread descheduled, or the whole
  process SIGSTOPped right there) and clock-rate differences between nodes. A pause in that gap
  longer than what is left of both margins is the one case this fence does not close; only
  device-side fencing (SCSI-3 / NVMe reservations) would.

A node starts fenced (no lease yet) unless it runs alone: `WriteFence.always_open()` is the fence
for single-node mode and for formatting, where no lease exists and nothing else writes.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections.abc import Callable

from awsomefsd.io.errors import DeviceError

__all__ = ["MAX_WRITE_S", "WriteFence", "WriteFencedError"]

# The longest one device write may take, from the system call to completion. A write moves at most
# one I/O call's worth (device.MAX_IO_BYTES; FileData writes 1 MiB extents), far below this on any
# working device; the margin before the lease ends must be at least this long.
MAX_WRITE_S = 0.5
DEFAULT_MARGIN_S = 0.5
MAX_MARGIN_S = 60.0  # a larger margin is a misconfiguration (the lease itself is seconds long)


class WriteFencedError(DeviceError, OSError):
    """A device write refused because this node's lease has ended (or is about to): errno EIO,
    so it reaches an application as an I/O error. Retry only after the lease is renewed."""

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EIO, message)


class WriteFence:
    """Whether this node may write the shared device now. Thread-safe: `check` runs on whichever
    thread issues the write (worker threads for large writes), `renewed` on the lease's task."""

    def __init__(self, *, margin_s: float = DEFAULT_MARGIN_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not MAX_WRITE_S <= margin_s <= MAX_MARGIN_S:
            raise ValueError(f"fence margin of {margin_s}s outside [{MAX_WRITE_S}, {MAX_MARGIN_S}]: it must "
                             "cover the longest device write")
        self.margin_s = margin_s
        self.clock = clock
        self.fenced_writes = 0
        self._valid_until_s = -math.inf  # no lease yet: closed
        self._lock = threading.Lock()

    @classmethod
    def always_open(cls) -> WriteFence:
        """The fence of a node without a lease (single-node mode, formatting): never refuses."""
        fence = cls()
        fence._valid_until_s = math.inf
        return fence

    @property
    def valid_until_s(self) -> float:
        """When the lease ends (-inf before the first renewal, inf for an always-open fence)."""
        return self._valid_until_s

    def renewed(self, valid_until_s: float) -> bool:
        """The lease now lasts until `valid_until_s` (this clock). Renewals may arrive out of order,
        so an older one is ignored: the deadline never moves backwards. True if it moved."""
        assert math.isfinite(valid_until_s), f"lease end {valid_until_s} is not a time"
        assert self._valid_until_s != math.inf, "an always-open fence has no lease to renew"
        with self._lock:
            if valid_until_s <= self._valid_until_s:
                return False
            self._valid_until_s = valid_until_s
            return True

    def remaining_s(self) -> float:
        """Seconds until the lease ends (negative once it has; the fence closes `margin_s` earlier)."""
        return self._valid_until_s - self.clock()

    def is_open(self) -> bool:
        """True while a write started now would complete `margin_s` before the lease ends."""
        return self.clock() < self._valid_until_s - self.margin_s

    def check(self, size_bytes: int) -> None:
        """Call immediately before a write system call of `size_bytes`; WriteFencedError (EIO) when
        fewer than `margin_s` seconds of lease remain, i.e. the write might outlive the lease."""
        assert size_bytes > 0, f"write of {size_bytes} bytes"
        now = self.clock()
        valid_until_s = self._valid_until_s
        if now < valid_until_s - self.margin_s:
            return
        with self._lock:
            self.fenced_writes += 1
        if valid_until_s == -math.inf:
            why = "node holds no lease yet"
        elif now >= valid_until_s:
            why = f"node lease expired {now - valid_until_s:.3f}s ago"
        else:
            why = f"node lease ends in {valid_until_s - now:.3f}s, within the {self.margin_s}s write margin"
        raise WriteFencedError(f"{why}: device writes fenced (refused a write of {size_bytes} bytes) "
                               "until the lease is renewed")

    def __repr__(self) -> str:
        return f"WriteFence(valid_until_s={self._valid_until_s}, margin_s={self.margin_s})"
