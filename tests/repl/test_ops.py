"""The encoding of the replicated model's operations (crdt/ops.py) is the wire's and the outbox's:
written out directly, it must stay byte for byte what the JSON encoder made, which every build
reads (an older peer, an outbox written before an upgrade)."""

from __future__ import annotations

import json
import random
from typing import Any

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import Stamp


def reference(op: o.Operation) -> bytes:
    """The encoding as the JSON encoder made it before it was written out by hand."""
    record: dict[str, Any] = {"v": o.FORMAT, "kind": o._KIND_OF[type(op)], "stamp": op.stamp.pack().hex(),
                              "seen": {site.hex(): stamp.pack().hex() for site, stamp in sorted(op.seen.items())}}
    for name in o._FIELDS[type(op)]:
        value = getattr(op, name)
        record[name] = value.hex() if isinstance(value, bytes) else value
    return json.JSONEncoder(separators=(",", ":")).encode(record).encode()


def random_op(rng: random.Random) -> o.Operation:
    def stamp() -> Stamp:
        return Stamp(rng.randrange(1 << 64), rng.randrange(1 << 32), rng.randbytes(16))

    def ident() -> bytes:
        return rng.randbytes(16)

    seen = {rng.randbytes(16): stamp() for _ in range(rng.randint(0, 2))}
    n = rng.randrange(1 << 64)
    return rng.choice([
        lambda: o.Created(stamp(), ident(), n, n >> 3, n >> 5, n >> 7, rng.randbytes(rng.randint(0, 9)), n, seen),
        lambda: o.Moved(stamp(), ident(), ident(), bytes(rng.choice(b"az.-") for _ in range(rng.randint(1, 9))), ident(), seen),
        lambda: o.AttrsSet(stamp(), ident(), n, n >> 1, n >> 2, n >> 3, n >> 4, seen),
        lambda: o.XattrSet(stamp(), ident(), b"user.x", rng.choice([None, b"", rng.randbytes(5)]), seen),
        lambda: o.ContentSet(stamp(), ident(), n, n >> 1, n >> 2, n >> 3, n >> 4, seen),
        lambda: o.Superseded(stamp(), ident(), seen),
        lambda: o.Resolved(stamp(), rng.randbytes(29), rng.choice(o.KEEPS), seen),
        lambda: o.VolumeSet(stamp(), ident(), b"vol", n, n >> 9, seen),
    ])()


def test_every_kind_encodes_as_the_json_encoder_did_and_decodes_back() -> None:
    rng = random.Random(47)
    kinds = set()
    for _ in range(2000):
        op = random_op(rng)
        kinds.add(type(op))
        assert o.encode(op) == reference(op), op
        assert o.decode(o.encode(op)) == op
    assert len(kinds) == len(o._KINDS)


def test_the_kind_read_from_the_head_is_the_kind_decoded() -> None:
    """`encoded_as` (the shipper's test of its own outbox) agrees with decoding, for every kind
    against every kind, however the fields after the head look."""
    rng = random.Random(48)
    for _ in range(2000):
        op = random_op(rng)
        raw = o.encode(op)
        for kind in o._KINDS.values():
            assert o.encoded_as(raw, kind) == isinstance(o.decode(raw), kind), (op, kind)
