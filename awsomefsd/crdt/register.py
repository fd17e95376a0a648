"""A replicated register of one object's attributes, one xattr or its content (design note 48):
last writer wins, and no write is lost without a trace.

Plain last-writer-wins keeps the version with the greatest stamp and forgets the rest, so a
write that another site overwrote without ever seeing it vanishes. This register keeps every
version no later version has seen (the causally maximal ones, as Dynamo's siblings): the one with
the greatest stamp is what the object shows (`winner`); the others are the conflict's losers,
which the file system keeps reachable (a sibling file for content) and `site conflicts` lists.
A version that a later one saw was overwritten knowingly, on purpose, and is dropped. A write
made after seeing every version replaces them all: that is how a conflict ends.

The state is a function of the set of versions applied, whatever their order, so sites that
applied the same versions agree on the winner and on the losers. For that the register remembers
what the versions it dropped had seen: `seen` names only what its writer had applied itself, so
with three sites c's write can see b's and a's see c's without naming b's. A site that got a's,
then b's, kept b's as a loser, while one that got b's, then c's, then a's had dropped it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from awsomefsd.crdt.hlc import Stamp, happened_before

V = TypeVar("V")
MAX_VERSIONS = 64
"""Concurrent versions one register keeps at most. Two sites make at most a few (one per site
between exchanges); this bounds what a misbehaving peer can make us hold."""


class TooManyVersions(ValueError):
    """A register was sent more concurrent versions than it keeps."""


@dataclass(frozen=True, slots=True)
class Version(Generic[V]):
    stamp: Stamp
    value: V
    seen: Mapping[bytes, Stamp] = field(default_factory=dict)
    """Per other site, the greatest of its stamps the writing site had applied when it wrote."""

    def saw(self, other: Version[V]) -> bool:
        return happened_before(other.stamp, self.stamp, self.seen)


@dataclass(frozen=True, slots=True)
class Outcome(Generic[V]):
    """What one `apply` changed: `shown` is True when the winner changed; `lost` lists versions
    that became losers (conflicts to keep and report), `settled` the losers a new write replaced."""

    shown: bool
    lost: tuple[Version[V], ...] = ()
    settled: tuple[Version[V], ...] = ()


class MultiValueRegister(Generic[V]):
    """The versions no applied version saw, and what the versions it dropped had seen (`_past`,
    greatest stamp per site, as `seen` is; `_latest`, each site's greatest stamp dropped, which
    saw that site's earlier ones). Rebuilt from its versions alone, as the state machine does per
    command, it has forgotten what the dropped ones saw: harmless with two sites whose versions
    arrive in order, where no version arrives that one applied before had seen."""

    def __init__(self, versions: tuple[Version[V], ...] = ()) -> None:
        self._versions: list[Version[V]] = []
        self._past: dict[bytes, Stamp] = {}
        self._latest: dict[bytes, Stamp] = {}
        for version in versions:
            self.apply(version)

    @property
    def versions(self) -> tuple[Version[V], ...]:
        """The versions no other has seen, the winner first, then by stamp, newest first."""
        return tuple(self._versions)

    @property
    def winner(self) -> Version[V] | None:
        return self._versions[0] if self._versions else None

    @property
    def losers(self) -> tuple[Version[V], ...]:
        return tuple(self._versions[1:])

    def apply(self, version: Version[V]) -> Outcome[V]:
        """Take in a version (local or from another site); applying one again changes nothing.

        A version that one applied here saw is dropped, whether that one is held or was dropped
        in turn (overwritten knowingly too), and what a dropped version saw goes with it: with
        three sites a held version may be one it saw and its successor did not name."""
        for held in self._versions:
            if held.stamp == version.stamp:
                if held != version:
                    raise ValueError(f"two different versions with stamp {version.stamp}")
                return Outcome(shown=False)
        past, latest = dict(self._past), dict(self._latest)
        kept: list[Version[V]] = []
        dropped: list[Version[V]] = []
        for candidate in (*self._versions, version):
            if any(other.saw(candidate) for other in (*self._versions, version)):
                dropped.append(candidate)
            else:
                kept.append(candidate)
        while True:  # what a dropped version saw may drop another, whose own past then counts too
            for gone in dropped:
                _remember(gone, past, latest)
            dropped = [v for v in kept if _seen_by(v.stamp, past, latest)]
            if not dropped:
                break
            kept = [v for v in kept if v not in dropped]
        if len(kept) > MAX_VERSIONS:
            raise TooManyVersions(f"more than {MAX_VERSIONS} concurrent versions of one register")
        before, old_losers = self.winner, self.losers
        self._versions = sorted(kept, key=lambda v: v.stamp, reverse=True)
        self._past, self._latest = past, latest
        was_loser = {v.stamp for v in old_losers}
        still_loser = {v.stamp for v in self.losers}
        return Outcome(shown=self.winner is not before,
                       lost=tuple(v for v in self.losers if v.stamp not in was_loser),
                       settled=tuple(v for v in old_losers if v.stamp not in still_loser))


def _remember(gone: Version[V], past: dict[bytes, Stamp], latest: dict[bytes, Stamp]) -> None:
    """Fold a dropped version's knowledge into the register's memory of what was seen."""
    site = gone.stamp.site
    if site not in latest or latest[site] < gone.stamp:
        latest[site] = gone.stamp
    for other, stamp in gone.seen.items():
        if other != site and (other not in past or past[other] < stamp):
            past[other] = stamp


def _seen_by(stamp: Stamp, past: dict[bytes, Stamp], latest: dict[bytes, Stamp]) -> bool:
    """Had one of the dropped versions seen `stamp` (`happened_before` against each of them)?"""
    return (stamp.site in past and stamp <= past[stamp.site]) or (stamp.site in latest and stamp < latest[stamp.site])
