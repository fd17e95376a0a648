"""Everything the other site sends is read with its type checked before use: arbitrary input to
the operation decoder and to the readers of a push's and a chunk's header ends in the one error
the link answers INVALID_ARGUMENT for (BadOperation, WireError), never in another exception that
would answer INTERNAL (issue 47: "every call from the other site is validated before use")."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.crdt import ops as o
from awsomefsd.crdt import wire
from awsomefsd.repl.push_fields import pieces, unchanged_ranges

SCALARS = st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70) | \
    st.floats(allow_nan=False) | st.text(max_size=30) | st.sampled_from(["00" * 16, "ff" * 26, "0a"])
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=10)
KINDS = sorted(o._KIND_OF.values())  # a real kind with hostile fields reaches the field checks


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "kind", "stamp", "seen", "obj", "parent", "name", "node", "size",
                                        "value", "key", "keep", "mode"]), JSON, max_size=8),
       st.sampled_from(KINDS), st.booleans())
def test_an_operation_is_decoded_or_refused_as_bad(record: dict[str, Any], kind: str, real_kind: bool) -> None:
    record = {"v": o.FORMAT, **record, "kind": kind} if real_kind else {"v": o.FORMAT, **record}
    try:
        o.decode(json.dumps(record).encode())
    except o.BadOperation:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_bytes_that_are_no_operation_are_refused_as_bad(raw: bytes) -> None:
    try:
        o.decode(raw)
    except o.BadOperation:
        pass


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["pieces", "unchanged", "stamp", "after", "ops", "offset", "crc"]), JSON,
                       max_size=5), st.integers(min_value=0, max_value=1 << 20))
def test_a_push_or_chunk_header_is_read_or_refused_as_malformed(header: dict[str, Any], total: int) -> None:
    for read in (lambda: pieces(header, total), lambda: unchanged_ranges(header),
                 lambda: wire.stamp_field(header, "stamp"), lambda: wire.hex_list(header, "ops", limit=4096),
                 lambda: wire.int_field(header, "offset", limit=1 << 62)):
        try:
            read()
        except wire.WireError:
            pass
