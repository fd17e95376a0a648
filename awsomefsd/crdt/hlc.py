"""Hybrid logical clocks (Kulkarni et al., 2014): the timestamps cross-site replication orders by.

A stamp is (wall_ns, logical, site). `wall_ns` follows the physical clock, so stamps read as times
in logs and in `site conflicts`; `logical` orders events within one nanosecond and carries
causality when a peer's clock runs ahead; `site` (the site's cluster id) breaks the last tie, so
two sites never issue equal stamps and last-writer-wins picks the same winner everywhere.

What a caller may rely on:
- `now()` on one clock is strictly increasing, also across restarts when the clock is built from
  the last stamp it issued (the caller persists that, with the operation it stamped), and also
  when the physical clock steps back.
- After `observe(remote)`, every later `now()` is greater than `remote`: an operation made after
  receiving another is ordered after it, whatever the two machines' clocks say.
- A remote stamp more than `max_drift_ns` ahead of our physical clock is refused (`ClockDrift`),
  not adopted: one peer with a clock a year fast must not drag every later stamp of both sites
  into the future. That is the limit, in TigerBeetle's sense, on what a peer can make us believe.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

SITE_ID_BYTES = 16
"""A site id is its cluster id, a UUID's 16 bytes."""
MAX_LOGICAL = (1 << 32) - 1
DEFAULT_MAX_DRIFT_NS = 60 * 1_000_000_000
_PACKED = struct.Struct(">QI16s")
PACKED_BYTES = _PACKED.size
"""A packed stamp's length: 8 bytes wall time, 4 logical, 16 site; byte order is stamp order."""


class ClockDrift(ValueError):
    """A peer's stamp is further ahead of our physical clock than we accept."""

    def __init__(self, remote: Stamp, ahead_ns: int, max_drift_ns: int) -> None:
        super().__init__(f"a stamp from site {remote.site.hex()} is {ahead_ns / 1e9:.1f} s ahead of this clock "
                         f"(at most {max_drift_ns / 1e9:.0f} s accepted): check both sites' time synchronisation")
        self.remote, self.ahead_ns, self.max_drift_ns = remote, ahead_ns, max_drift_ns


def check_drift(remote: Stamp, physical_ns: int, max_drift_ns: int = DEFAULT_MAX_DRIFT_NS) -> None:
    """Refuse (`ClockDrift`) a peer's stamp more than `max_drift_ns` ahead of `physical_ns`, our
    physical clock: adopted, it would put every later stamp of ours as far in the future (the
    clock never goes back), and our writes would win every conflict until real time caught up."""
    ahead = remote.wall_ns - physical_ns
    if ahead > max_drift_ns:
        raise ClockDrift(remote, ahead, max_drift_ns)


@dataclass(frozen=True, order=True, slots=True)
class Stamp:
    """A point in hybrid logical time; stamps compare as (wall_ns, logical, site)."""

    wall_ns: int
    logical: int
    site: bytes

    def __post_init__(self) -> None:
        assert 0 <= self.wall_ns < 1 << 64, self.wall_ns
        assert 0 <= self.logical <= MAX_LOGICAL, self.logical
        assert len(self.site) == SITE_ID_BYTES, self.site

    def pack(self) -> bytes:
        """Big-endian, so LMDB keys made of stamps sort as the stamps do."""
        return _PACKED.pack(self.wall_ns, self.logical, self.site)

    @classmethod
    def unpack(cls, raw: bytes) -> Stamp:
        if len(raw) != PACKED_BYTES:
            raise ValueError(f"a packed stamp has {PACKED_BYTES} bytes, not {len(raw)}")
        wall_ns, logical, site = _PACKED.unpack(raw)
        return cls(wall_ns, logical, site)

    def __str__(self) -> str:
        return f"{self.wall_ns}.{self.logical}@{self.site.hex()[:8]}"


def happened_before(earlier: Stamp, later: Stamp, later_seen: Mapping[bytes, Stamp]) -> bool:
    """Had the site that made `later` applied `earlier` by then? `later_seen` is what that site
    had applied from each other site (its operations carry it); its own stamps it always had."""
    if earlier.site == later.site:
        return earlier < later
    seen = later_seen.get(earlier.site)
    return seen is not None and earlier <= seen


ZERO_SITE = bytes(SITE_ID_BYTES)
EPOCH = Stamp(0, 0, ZERO_SITE)
"""Before every stamp any clock issues."""


class HybridClock:
    """One site's clock. Not thread-safe: it lives on the trio thread, like the metadata client."""

    def __init__(self, site: bytes, *, last: Stamp | None = None, physical_ns: Callable[[], int] = time.time_ns,
                 max_drift_ns: int = DEFAULT_MAX_DRIFT_NS) -> None:
        if len(site) != SITE_ID_BYTES or site == ZERO_SITE:
            raise ValueError("a site id is 16 bytes, not all zero")
        self.site = site
        self.physical_ns = physical_ns
        self.max_drift_ns = max_drift_ns
        self._wall_ns = last.wall_ns if last is not None else 0
        self._logical = last.logical if last is not None else 0

    def now(self) -> Stamp:
        """A stamp greater than every stamp this clock issued or observed."""
        physical = self.physical_ns()
        if physical > self._wall_ns:
            self._wall_ns, self._logical = physical, 0
        else:
            self._tick()
        return Stamp(self._wall_ns, self._logical, self.site)

    def observe(self, remote: Stamp) -> None:
        """Take in a stamp received from another site, so later stamps order after it."""
        check_drift(remote, self.physical_ns(), self.max_drift_ns)
        if remote.wall_ns > self._wall_ns:
            self._wall_ns, self._logical = remote.wall_ns, remote.logical
        elif remote.wall_ns == self._wall_ns:
            self._logical = max(self._logical, remote.logical)
        # The next now() moves past what we hold now, so past `remote` too.

    def last(self) -> Stamp:
        """The greatest stamp issued or observed (what a restart resumes from)."""
        return Stamp(self._wall_ns, self._logical, self.site)

    def _tick(self) -> None:
        if self._logical == MAX_LOGICAL:  # 4 billion events in one nanosecond: move time on
            self._wall_ns, self._logical = self._wall_ns + 1, 0
        else:
            self._logical += 1
