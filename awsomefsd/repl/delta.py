"""Delta transfer of content versions (design note 50): which blocks of a file are unchanged since
a version the other site shows, and the digest both sites compute over them.

A file's blocks are copy-on-write: a write maps fresh device blocks, and a written block is never
changed in place (only a reserved, unwritten one is written in place, once). So a block whose map
record (device block and checksum) is the same in two versions of a file held the same bytes in
both, and the other site, which received the older version, still has them. The sender keeps
what it shipped of each large file (`ShippedVersion`: the map records of the bytes it sent), sends
only the blocks whose records changed, and names the rest by range with a digest of their
per-block checksums; the receiver shares those blocks of its own file when it shows that very
version and its blocks there have the same digest, and otherwise asks for the whole version.

A hole and an unwritten block read as zeros: they count as the checksum of a zero block, so a hole
on one site and a block of zeros on the other (the stager leaves zero blocks out) agree.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from awsomefsd.io.checksum import block_checksums as checksums_of
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.records import Extent
from awsomefsd.repl.hlc import Stamp

ZERO_BLOCK_CHECKSUM = checksums_of(bytes(BLOCK_SIZE))
MAX_SHARED_RANGES = 1024
"""Unchanged ranges one version may name; a file changed in more places than that ships whole
(a push's header stays small, and so does the receiver's work to check them)."""


@dataclass(frozen=True)
class ShippedVersion:
    """A content version the other site acknowledged: its size and the map records of the bytes
    it received, in file order (data only: holes and unwritten blocks were zeros)."""

    stamp: Stamp
    size: int
    extents: tuple[Extent, ...]


def clipped(extents: Iterable[Extent], first: int, end: int) -> list[Extent]:
    """The parts of `extents` (in file order) within file blocks [first, end)."""
    out = []
    for ext in extents:
        lo, hi = max(ext.file_block, first), min(ext.end_block, end)
        if lo < hi:
            out.append(ext.slice(lo, hi))
    return out


def range_digest(extents: Iterable[Extent], first: int, end: int) -> str:
    """What both sites compare for a range named unchanged: a hash of its per-block checksums,
    where a hole or an unwritten block has the checksum of a zero block.

    Hashed as runs, never as one buffer: a run of zero blocks is its length, a run of other
    blocks the hash of their checksums; so a terabyte of sparse image digests in the time of its
    written blocks, and a peer naming a huge range costs no memory. The runs are maximal, which
    makes the digest a function of the per-block sequence only, however each site's map cuts it."""
    digest = _RunDigest()
    block = first
    for ext in clipped(extents, first, end):
        digest.zeros(ext.file_block - block)
        if ext.unwritten:
            digest.zeros(ext.count)
        else:
            digest.checksums(ext.checksums)
        block = ext.end_block
    digest.zeros(end - block)
    return digest.hexdigest()


class _RunDigest:
    """BLAKE2b over a block sequence's maximal runs: b"Z" and the count for zero blocks, b"D", the
    count and a BLAKE2b of the checksums for the others."""

    def __init__(self) -> None:
        self._outer = hashlib.blake2b(digest_size=16)
        self._zero_run = 0
        self._data_run = 0
        self._data = hashlib.blake2b(digest_size=16)

    def zeros(self, count: int) -> None:
        if count:
            self._end_data()
            self._zero_run += count

    def checksums(self, sums: bytes) -> None:
        """Per-block checksums of written blocks; those of zero blocks count as zeros."""
        at = 0
        for zero in _zero_blocks(sums):
            self._data_blocks(sums[at:zero])
            self.zeros(1)
            at = zero + 4
        self._data_blocks(sums[at:])

    def hexdigest(self) -> str:
        self._end_data()
        self._end_zeros()
        return self._outer.hexdigest()

    def _data_blocks(self, sums: bytes) -> None:
        if sums:
            self._end_zeros()
            self._data.update(sums)
            self._data_run += len(sums) // 4

    def _end_zeros(self) -> None:
        if self._zero_run:
            self._outer.update(b"Z" + self._zero_run.to_bytes(8, "little"))
            self._zero_run = 0

    def _end_data(self) -> None:
        if self._data_run:
            self._outer.update(b"D" + self._data_run.to_bytes(8, "little") + self._data.digest())
            self._data_run = 0
            self._data = hashlib.blake2b(digest_size=16)


def _zero_blocks(sums: bytes) -> Iterator[int]:
    """The offsets in `sums` (4 bytes a block) of the blocks with a zero block's checksum."""
    at = sums.find(ZERO_BLOCK_CHECKSUM)
    while at != -1:
        if at % 4 == 0:
            yield at
            at = sums.find(ZERO_BLOCK_CHECKSUM, at + 4)
        else:
            at = sums.find(ZERO_BLOCK_CHECKSUM, at + 1)


def unchanged_ranges(old: Iterable[Extent], new: Iterable[Extent], end: int) -> list[tuple[int, int]]:
    """The block ranges of [0, end) where both maps hold the same: the same device block with
    the same checksum, or zeros (a hole or an unwritten block) in both. Merged, in order."""
    old_pieces, new_pieces = clipped(old, 0, end), clipped(new, 0, end)
    cuts = sorted({0, end, *(e.file_block for e in old_pieces + new_pieces),
                   *(e.end_block for e in old_pieces + new_pieces)})
    out: list[tuple[int, int]] = []
    i = j = 0
    for lo, hi in itertools.pairwise(cuts):
        while i < len(old_pieces) and old_pieces[i].end_block <= lo:
            i += 1
        while j < len(new_pieces) and new_pieces[j].end_block <= lo:
            j += 1
        a = old_pieces[i] if i < len(old_pieces) and old_pieces[i].file_block <= lo else None
        b = new_pieces[j] if j < len(new_pieces) and new_pieces[j].file_block <= lo else None
        for run_lo, run_hi in _alike(a, b, lo, hi):
            if out and out[-1][1] == run_lo:
                out[-1] = (out[-1][0], run_hi)
            else:
                out.append((run_lo, run_hi))
    return out


def _alike(a: Extent | None, b: Extent | None, lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs of blocks in [lo, hi) where the records covering them (None: a hole) agree."""
    a_zero, b_zero = a is None or a.unwritten, b is None or b.unwritten
    if a_zero or b_zero:
        return [(lo, hi)] if a_zero and b_zero else []
    assert a is not None and b is not None
    a, b = a.slice(lo, hi), b.slice(lo, hi)
    if a.dev_block != b.dev_block:
        return []
    if a.checksums == b.checksums:
        return [(lo, hi)]
    runs: list[tuple[int, int]] = []
    for k in range(hi - lo):
        if a.checksums[4 * k:4 * k + 4] == b.checksums[4 * k:4 * k + 4]:
            if runs and runs[-1][1] == lo + k:
                runs[-1] = (runs[-1][0], lo + k + 1)
            else:
                runs.append((lo + k, lo + k + 1))
    return runs


def complement(ranges: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """The parts of [0, end) that `ranges` (merged, in order) leave out."""
    out, block = [], 0
    for lo, hi in ranges:
        if block < lo:
            out.append((block, lo))
        block = max(block, hi)
    if block < end:
        out.append((block, end))
    return out
