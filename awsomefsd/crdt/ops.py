"""The operations one site ships to another (design note 48), in site-independent terms.

A site's metadata commands name local inode numbers and are checked against local state; what
ships instead is what each command did to the replicated model: an object came into being
(`Created`), an entry of the replicated tree moved (`Moved`: create, rename and delete of a
name), or one of an object's registers took a new version (`AttrsSet`, `XattrSet`,
`ContentSet`). Objects and entries are named by global ids (`GlobalId`: the origin site's
16 bytes would make ids long, so its first 8, then 8 of the origin's own numbering).

Every operation carries its stamp and `seen`: per other site, the greatest stamp of that site
its site had applied when it made the operation; causality, which the conflict rules need, is
in `seen`, never in the stamps' order.

The encoding is JSON (bytes as hex): readable in `site` diagnostics, canonical (sorted keys), and
decoded with every field checked, since it crosses from another site: a peer that sends garbage
gets `BadOperation`, and nothing of the batch is applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from awsomefsd.crdt.hlc import PACKED_BYTES, SITE_ID_BYTES, Stamp

GLOBAL_ID_BYTES = 16
MAX_NAME_BYTES = 255
MAX_XATTR_NAME_BYTES = 255
MAX_XATTR_VALUE_BYTES = 64 << 10
MAX_TARGET_BYTES = 4096
MAX_VOLUME_NAME_BYTES = 4096
MAX_OP_BYTES = 256 << 10
"""No encoded operation is longer (the largest is an xattr at its limit, hex-encoded)."""
FORMAT = 1


class BadOperation(ValueError):
    """Bytes from a peer that are not an operation this version understands."""


def global_id(site: bytes, number: int) -> bytes:
    """The global id of an object or entry: the origin site's first 8 bytes and its own number."""
    assert len(site) == SITE_ID_BYTES and 0 <= number < 1 << 64
    return site[:8] + number.to_bytes(8, "big")


Seen: TypeAlias = Mapping[bytes, Stamp]


@dataclass(frozen=True, slots=True)
class Created:
    """An object came into being at its origin; it has no name until a `Moved` places an entry."""

    stamp: Stamp
    object: bytes
    mode: int  # with the file type
    uid: int
    gid: int
    rdev: int = 0
    target: bytes = b""  # symlinks
    mtime_ns: int = 0
    seen: Seen = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Moved:
    """A move of the replicated tree (crdt/tree.py): entry `node`, which names `object`, now is
    `name` in the directory whose entry is `parent` (the tree's TRASH: deleted)."""

    stamp: Stamp
    node: bytes
    parent: bytes
    name: bytes
    object: bytes
    seen: Seen = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttrsSet:
    """The attributes register: mode bits, owner, and the times as set (chmod, chown, utimens)."""

    stamp: Stamp
    object: bytes
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    seen: Seen = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class XattrSet:
    """One extended attribute's register; `value` None: removed."""

    stamp: Stamp
    object: bytes
    name: bytes
    value: bytes | None
    seen: Seen = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ContentSet:
    """The content register: the file's bytes and size (writes, truncates, clones). The bytes
    travel beside the operation (data shipping); the operation says which version they are."""

    stamp: Stamp
    object: bytes
    size: int
    mtime_ns: int
    mode: int = 0o600
    uid: int = 0
    gid: int = 0
    """The file's mode and owner when this version was written: what a copy kept of it, if it
    loses a conflict, is given (so both sites keep the same, and no stranger may read it)."""
    seen: Seen = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Superseded:
    """In place of a content operation a later one of the same site replaces (only the newest
    version's bytes ship). It changes no file; the receiver notes it as the peer's last version
    of `object`, which a local version may have lost to on the peer (meta/sites/conflicts.py,
    `_lost_on_the_peer`)."""

    stamp: Stamp
    object: bytes
    seen: Seen = field(default_factory=dict)


KEEPS = ("winner", "loser", "both")
"""What an operator may keep of a conflict (`site conflicts resolve ID --keep ...`)."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """An operator resolved conflict `conflict` (its key: the losing stamp and the kind's letter,
    the same on both sites) keeping `keep`: the record closes on both sites and the copy kept of
    the loser goes. What was kept travels as the operations that made it (a write, a move)."""

    stamp: Stamp
    conflict: bytes
    keep: str
    seen: Seen = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VolumeSet:
    """A volume came into being at its origin, or its quota grew (design note 52). `object` is
    the volume's root directory; its entry is then placed under the tree's VOLUMES by a `Moved`,
    and a delete of the volume is that entry's move into TRASH. `name` is the name the volume was
    created with (the CSI request's); a quota only rises (0: none yet), so two sites' resizes
    merge by taking the larger number."""

    stamp: Stamp
    object: bytes
    name: bytes
    capacity: int
    inode_limit: int
    seen: Seen = field(default_factory=dict)


Operation: TypeAlias = Created | Moved | AttrsSet | XattrSet | ContentSet | Superseded | Resolved | VolumeSet
_KINDS: dict[str, type[Operation]] = {"create": Created, "move": Moved, "attrs": AttrsSet,
                                      "xattr": XattrSet, "content": ContentSet, "superseded": Superseded,
                                      "resolved": Resolved, "volume": VolumeSet}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}
_INTS = {"mode", "uid", "gid", "rdev", "mtime_ns", "atime_ns", "size", "capacity", "inode_limit"}
_IDS = {"object", "node", "parent"}


_FIELDS = {cls: tuple(name for name in cls.__dataclass_fields__ if name not in ("stamp", "seen"))
           for cls in _KINDS.values()}
_HEADS = {cls: f'{{"v":{FORMAT},"kind":"{kind}","stamp":"' for cls, kind in _KIND_OF.items()}
_HEAD_BYTES = {cls: head.encode() for cls, head in _HEADS.items()}


def encoded_as(raw: bytes, kind: type[Operation]) -> bool:
    """Did `encode` make `raw` from an operation of `kind`? Its canonical head says, with no parse:
    the shipper asks it of every operation in its own outbox, and decoding each to learn that
    was ~7 % of a linked untar's time (issue 47). Only for bytes this site encoded; the other
    site's are decoded and checked."""
    return raw.startswith(_HEAD_BYTES[kind])


def encode(op: Operation) -> bytes:
    """Canonical: the fields always in declaration order (one encoding per operation).

    The JSON object `json.dumps(record, separators=(",", ":"))` makes of {"v", "kind", "stamp",
    "seen", then each field}, bytes as hex, written out directly: every capture encodes its
    operations, and building the dict for the encoder cost a sixth of a linked create. Only
    `keep` is a string that is not hex (one of KEEPS, plain ASCII): it goes through json."""
    parts = [_HEADS[type(op)], op.stamp.pack().hex(), '","seen":{',
             ",".join(f'"{site.hex()}":"{stamp.pack().hex()}"' for site, stamp in sorted(op.seen.items())), "}"]
    for name in _FIELDS[type(op)]:
        value = getattr(op, name)
        if isinstance(value, bytes):
            parts.append(f',"{name}":"{value.hex()}"')
        elif isinstance(value, int):
            parts.append(f',"{name}":{value}')
        else:  # None (a removed xattr), or `keep`
            parts.append(f',"{name}":{json.dumps(value)}')
    parts.append("}")
    return "".join(parts).encode()


def decode(raw: bytes) -> Operation:
    """One operation, every field checked (BadOperation otherwise)."""
    if len(raw) > MAX_OP_BYTES:
        raise BadOperation(f"an operation of {len(raw)} bytes (at most {MAX_OP_BYTES})")
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadOperation(f"not an operation: {exc}") from None
    if not isinstance(record, dict):
        raise BadOperation("not an operation: not an object")
    if record.get("v") != FORMAT:
        raise BadOperation(f"operation format {record.get('v')!r} is not {FORMAT}: upgrade both sites alike")
    kind = record.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None  # a list is unhashable: TypeError
    if cls is None:
        raise BadOperation(f"unknown operation kind {record.get('kind')!r}")
    try:
        fields: dict[str, Any] = {"stamp": _stamp(record["stamp"]), "seen": _seen(record["seen"])}
        for name in cls.__dataclass_fields__:
            if name in fields:
                continue
            fields[name] = _field(name, record[name])
        op = cls(**fields)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise BadOperation(f"a malformed {record['kind']} operation: {exc!r}") from None
    _check(op)
    return op


_kept: dict[bytes, tuple[Operation, int]] = {}
"""The operations `keep_decoded` holds: raw bytes -> (the operation, how many holders)."""


def keep_decoded(raw: bytes) -> Operation:
    """`decode`, and keep the result for `decode_remembered` until `release_decoded` (a holder
    count: a resend of a push may be taken in while the first is). The receiving site decodes a
    push to check it (stamps, clock, contents) before it proposes it, and its `ApplyRemote`
    decodes the same bytes again to apply them: the JSON parse and every field's check, twice,
    were a tenth of a draining receiver's time (issue 47). An LRU of 4,096 did not hold them:
    with the sender's 8 pushes of 512 in flight, each new push evicted the next one to apply,
    so every push was decoded twice (design note 120). Holding them for as long as their push is
    in hand bounds the memory by what the receiver holds anyway. Decoding is a function of the
    bytes alone and an operation is frozen, so sharing one object changes no outcome. A refusal
    is not kept: it raises."""
    held = _kept.get(raw)
    op = decode(raw) if held is None else held[0]
    _kept[raw] = (op, 1 if held is None else held[1] + 1)
    return op


def release_decoded(raws: list[bytes]) -> None:
    """The holder of `raws` (each taken with `keep_decoded`) is done with them."""
    for raw in raws:
        held = _kept.get(raw)
        if held is None:
            continue
        if held[1] <= 1:
            del _kept[raw]
        else:
            _kept[raw] = (held[0], held[1] - 1)


def decode_remembered(raw: bytes) -> Operation:
    """`decode`, without the work when a holder keeps the operation decoded (`keep_decoded`):
    the apply of a push the receiver checked. A member that did not receive the push decodes."""
    held = _kept.get(raw)
    return decode(raw) if held is None else held[0]


def _stamp(text: Any) -> Stamp:
    raw = bytes.fromhex(text)
    if len(raw) != PACKED_BYTES:
        raise ValueError("a stamp's length")
    return Stamp.unpack(raw)


def _seen(record: Any) -> dict[bytes, Stamp]:
    if not isinstance(record, dict) or len(record) > 16:
        raise ValueError("seen is a small map")
    return {bytes.fromhex(site): _stamp(stamp) for site, stamp in record.items()}


def _field(name: str, value: Any) -> Any:
    if name in _INTS:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
            raise ValueError(f"{name} is not an unsigned 64-bit integer")
        return value
    if name == "value" and value is None:
        return None
    if name == "keep":
        if value not in KEEPS:
            raise ValueError(f"keep is one of {', '.join(KEEPS)}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{name} is not hex")
    raw = bytes.fromhex(value)
    if name in _IDS and len(raw) != GLOBAL_ID_BYTES:
        raise ValueError(f"{name} is not a global id")
    return raw


def _check(op: Operation) -> None:
    """Limits and shapes the dataclasses do not check themselves."""
    if isinstance(op, Moved) and (not 0 < len(op.name) <= MAX_NAME_BYTES or b"/" in op.name or b"\x00" in op.name):
        raise BadOperation(f"not a valid entry name: {op.name!r}")
    if isinstance(op, Created) and len(op.target) > MAX_TARGET_BYTES:
        raise BadOperation("a symlink target longer than PATH_MAX")
    if isinstance(op, XattrSet) and (not 0 < len(op.name) <= MAX_XATTR_NAME_BYTES
                                     or (op.value is not None and len(op.value) > MAX_XATTR_VALUE_BYTES)):
        raise BadOperation("an extended attribute beyond the limits")
    if isinstance(op, VolumeSet) and not 0 < len(op.name) <= MAX_VOLUME_NAME_BYTES:
        raise BadOperation(f"a volume name must have 1 to {MAX_VOLUME_NAME_BYTES} bytes")
    if isinstance(op, Resolved) and len(op.conflict) != PACKED_BYTES + 1:
        raise BadOperation("a resolution names no conflict")
