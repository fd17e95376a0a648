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

from awsomefsd.crdt.hlc import Stamp
from awsomefsd.io.checksum import block_checksums as checksums_of
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.records import MAX_EXTENT_BLOCKS, Extent

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


def moved(version: ShippedVersion, old: list[Extent], new: list[Extent]) -> ShippedVersion:
    """`version` after a rewrite of its file that copied the blocks of `old` to those of `new`
    (compaction, recall: the same file blocks, the same bytes, fresh device blocks). Where the
    version held exactly what `old` held, it now names the new copy: the file's next version,
    which maps the copy, is then unchanged there. Without this, a file compacted after a few
    small writes differs from what the peer holds in every MiB compaction rewrote."""
    if not old or not new:
        return version
    lo = min(e.file_block for e in old + new)
    hi = max(e.end_block for e in old + new)
    before, after = _records(old, lo, hi), _records(new, lo, hi)
    held = _records(list(version.extents), lo, hi)
    for block, record in held.items():
        copy = after.get(block)
        if before.get(block) == record and copy is not None and copy[1] == record[1]:
            held[block] = copy
    inside = _extents_of(held)
    end = max((ext.end_block for ext in version.extents), default=hi)
    outside = clipped(version.extents, 0, lo) + clipped(version.extents, hi, max(hi, end))
    return ShippedVersion(version.stamp, version.size,
                          tuple(sorted(outside + inside, key=lambda ext: ext.file_block)))


def _records(extents: list[Extent], lo: int, hi: int) -> dict[int, tuple[int, bytes]]:
    """File block -> (device block, checksum) for the written blocks of [lo, hi)."""
    return {ext.file_block + i: (ext.dev_block + i, ext.checksums[4 * i:4 * i + 4])
            for ext in clipped(extents, lo, hi) if not ext.unwritten for i in range(ext.count)}


def _extents_of(records: dict[int, tuple[int, bytes]]) -> list[Extent]:
    """Per-block records back into extents, contiguous in both the file and the device."""
    out: list[Extent] = []
    for block in sorted(records):
        dev, checksum = records[block]
        last = out[-1] if out else None
        if last is not None and last.end_block == block and last.dev_block + last.count == dev \
                and last.count < MAX_EXTENT_BLOCKS:
            out[-1] = Extent(last.file_block, last.dev_block, last.count + 1, last.checksums + checksum)
        else:
            out.append(Extent(block, dev, 1, checksum))
    return out


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
