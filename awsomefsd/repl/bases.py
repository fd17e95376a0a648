"""What the peer holds of this site's large files: per file, the content version it acknowledged
last, with the map records it was read from, which is the base a delta of the next version is
computed against (design note 50). The shipper remembers what the peer acknowledged, the receiver
what the peer sent and this site shows (a file edited at both sites by turns goes as deltas both
ways), and the compactor's copies are followed so that a base still names the blocks that hold it.
"""

from __future__ import annotations

import collections

from awsomefsd.crdt import ops as o
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.records import Extent
from awsomefsd.repl import delta
from awsomefsd.repl.endpoint import Endpoint

MAX_REMEMBERED_FILES = 4096
MAX_REMEMBERED_PIECES = 1 << 16
"""Bounds on what the shipper remembers of the large versions it sent (bases of deltas): files,
and map records per file."""
MAX_MOVES_KEPT = 64
"""The compactor's copies kept per file for versions in flight (one per MiB it rewrote)."""


class DeltaBases(Endpoint):
    """The bases of deltas, shared by the receiver and the shipper of `SiteService`."""

    _shipped: dict[bytes, delta.ShippedVersion]
    """Per object, the large content version the peer acknowledged last (the base of a delta),
    oldest first; forgotten at a restart or a restage (then versions go whole)."""
    _sending: set[int]
    """The files whose versions the batch being pushed carries."""
    _moves: dict[int, collections.deque[tuple[int, list[Extent], list[Extent]]]]
    """Per file being sent, the compactor's latest copies (Compactor.moved), numbered: a
    version being sent is read before some of them and remembered after (`_caught_up`)."""
    _moves_made: int
    _moves_dropped: int
    """The number of the latest copy no longer kept."""

    def _remember_received(self, op: o.ContentSet) -> None:
        """A large version of the peer's that this site now shows is on both sites alike: the base
        of a delta of this site's next change to the file (a file edited at both sites by turns
        goes as deltas both ways). Its map is read between two looks at the winner: a write here
        meanwhile makes another version the winner, for good."""
        found = self.meta.site_content_base(op.object)
        if found is None or found[1] != op.stamp:
            return
        nblocks = (op.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        pieces = [p for p in delta.clipped(self.meta.extents(found[0], 0, nblocks), 0, nblocks) if not p.unwritten]
        if self.meta.site_content_base(op.object) == found and len(pieces) <= MAX_REMEMBERED_PIECES:
            self._remember_shipped(op.object, delta.ShippedVersion(op.stamp, op.size, tuple(pieces)))

    def blocks_moved(self, ino: int, old: list[Extent], new: list[Extent]) -> None:
        """The compactor copied a file's blocks elsewhere (Compactor.moved): the version the peer
        holds, if it is a delta's base, now names the copy where it held the same blocks; so
        will a version being sent now, which may have read the map before (`_caught_up`)."""
        self._moves_made += 1
        if ino in self._sending:
            moves = self._moves.setdefault(ino, collections.deque(maxlen=MAX_MOVES_KEPT))
            if len(moves) == MAX_MOVES_KEPT:
                self._moves_dropped = max(self._moves_dropped, moves[0][0])
            moves.append((self._moves_made, old, new))
        obj = self.meta.site_object_of(ino)
        base = None if obj is None else self._shipped.get(obj)
        if obj is None or base is None:
            return
        after = delta.moved(base, old, new)
        if len(after.extents) > MAX_REMEMBERED_PIECES:
            self._shipped.pop(obj)
        else:
            self._shipped[obj] = after

    def _caught_up(self, ino: int, version: delta.ShippedVersion, since: int) -> delta.ShippedVersion | None:
        """`version`, read from the map of `ino` after copy number `since`, with the compactor's
        later copies applied; None when some of them are no longer known."""
        if self._moves_dropped > since:  # possibly one of this file's
            return None
        for number, old, new in self._moves.get(ino, ()):
            if number <= since:
                continue
            version = delta.moved(version, old, new)
        return version if len(version.extents) <= MAX_REMEMBERED_PIECES else None

    def _remember_shipped(self, obj: bytes, version: delta.ShippedVersion | None) -> None:
        """The peer acknowledged a content version of `obj`: the base of its next delta (None:
        no base; a small version went whole, or its pieces were too many to keep)."""
        self._shipped.pop(obj, None)
        if version is not None:
            self._shipped[obj] = version
            while len(self._shipped) > MAX_REMEMBERED_FILES:
                self._shipped.pop(next(iter(self._shipped)))
