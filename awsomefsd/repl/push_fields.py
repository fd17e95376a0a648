"""The fields of the other site's `Stage` and `Push` messages that say where a content version's
bytes go (repl/receiver.py applies them): a chunk's pieces, a delta's unchanged ranges, and from
them the byte ranges a sender stages. Each is checked in full before anything is staged: the
bytes come from another site (tests/repl/test_wire_hostile.py).
"""

from __future__ import annotations

import itertools
from typing import Any

from awsomefsd.crdt import ops as o
from awsomefsd.crdt import wire
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.repl import delta
from awsomefsd.repl.endpoint import MAX_STAGE_PIECES


def sent_ranges(op: o.ContentSet, unchanged: tuple[Stamp, list[tuple[int, int, str]]] | None) -> list[tuple[int, int]]:
    """The byte ranges of a content version its sender stages: all of it but the block ranges
    the push names unchanged (the last block cut at the size)."""
    kept = [] if unchanged is None else [(lo, hi) for lo, hi, _ in unchanged[1]]
    nblocks = (op.size + BLOCK_SIZE - 1) // BLOCK_SIZE
    return [(lo * BLOCK_SIZE, min(hi * BLOCK_SIZE, op.size)) for lo, hi in delta.complement(kept, nblocks)]


def pieces(header: dict[str, Any], total: int) -> list[tuple[int, int, int]]:
    """A `Stage` message's pieces, [[offset, length, crc], ...]: their lengths add up to its data,
    and all but the last are whole blocks (only a file's last block is partial)."""
    items = header.get("pieces")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_STAGE_PIECES:
        raise wire.WireError(f"a chunk's pieces are a list of 1 to {MAX_STAGE_PIECES}")
    out: list[tuple[int, int, int]] = []
    for item in items:
        if not isinstance(item, list) or len(item) != 3:
            raise wire.WireError("a piece is [offset, length, crc]")
        described = {"offset": item[0], "length": item[1], "crc": item[2]}
        out.append((wire.int_field(described, "offset", limit=1 << 62), wire.int_field(described, "length", limit=1 << 30),
                    wire.int_field(described, "crc", limit=1 << 32)))
    if sum(length for _, length, _ in out) != total or any(length % BLOCK_SIZE for _, length, _ in out[:-1]):
        raise wire.WireError("a chunk's pieces do not add up to its bytes in whole blocks")
    if any(a[0] + a[1] > b[0] for a, b in itertools.pairwise(out)):
        raise wire.WireError("a chunk's pieces are not in file order")
    return out


def unchanged_ranges(header: dict[str, Any]) -> dict[Stamp, tuple[Stamp, list[tuple[int, int, str]]]]:
    """A push's `unchanged`: for a content version sent as a delta, the version it changes (one
    this site showed when it was acknowledged) and the block ranges it keeps, with their digest:
    [[stamp, base, [[first, end, digest], ...]], ...]."""
    items = header.get("unchanged", [])
    if not isinstance(items, list) or len(items) > 4096:
        raise wire.WireError("a push's unchanged ranges are not a list")
    out: dict[Stamp, tuple[Stamp, list[tuple[int, int, str]]]] = {}
    for item in items:
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[2], list) \
                or len(item[2]) > delta.MAX_SHARED_RANGES:
            raise wire.WireError("an unchanged-ranges entry is [stamp, base, [[first, end, digest], ...]]")
        stamp, base = wire.stamp_field({"s": item[0]}, "s"), wire.stamp_field({"b": item[1]}, "b")
        if stamp is None or base is None:
            raise wire.WireError("an unchanged-ranges entry needs the version's stamp and its base's")
        ranges: list[tuple[int, int, str]] = []
        for entry in item[2]:
            if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[2], str):
                raise wire.WireError("an unchanged range is [first block, end block, digest]")
            first = wire.int_field({"first": entry[0]}, "first", limit=1 << 52)
            end = wire.int_field({"end": entry[1]}, "end", limit=1 << 52)
            if end <= first or (ranges and first < ranges[-1][1]):
                raise wire.WireError("unchanged ranges must be non-empty, in order and disjoint")
            ranges.append((first, end, entry[2]))
        out[stamp] = (base, ranges)
    return out
