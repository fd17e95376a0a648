"""Deterministic binary encoding of metadata commands: the bytes a replicated log stores and ships.

Every replica must apply the same bytes, so the encoding is canonical (one encoding per command),
versioned (a tag per command type, a format byte), and bounded (every length is checked before
anything is allocated). Fields are encoded in declaration order from the dataclass annotations;
adding a command means adding it to COMMAND_TAGS with a new tag, never reusing one.
"""

from __future__ import annotations

import dataclasses
import operator
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.records import Extent

FORMAT = 3
"""3: Mknod, Link and Rename gained `cookie` (chosen by a node that changes a directory ahead of
the log), Mknod `lease_to`. 2: WriteData gained `mtime_ns` (a flush stamps the time of its writes, not its own).
Commands of earlier formats still decode, with the fields added since at their defaults: a log
written before an upgrade replays."""
MAX_BYTES_FIELD = 16 << 20
MAX_TUPLE_ITEMS = 1 << 20
MAX_NESTING = 4

COMMAND_TAGS: dict[type, int] = {
    c.Mknod: 1, c.Link: 2, c.Unlink: 3, c.Rename: 4, c.SetAttr: 5, c.WriteData: 6, c.SetXattr: 7,
    c.RemoveXattr: 8, c.ReserveInodes: 9, c.Purge: 10, c.ReclaimFrees: 11, c.GrantGroups: 12,
    c.ReleaseLeaked: 13, c.CreateVolume: 14, c.DeleteVolume: 15, c.ResizeVolume: 16,
    c.CreateSnapshot: 17, c.DeleteSnapshot: 18, c.Batch: 19, cc.InitCluster: 20, cc.AddMember: 21,
    cc.SetMemberCert: 22, cc.UpdateMemberAddress: 23, cc.RemoveMember: 24, cc.SetJoinVerifier: 25,
    cc.RenewLease: 26, cc.ExpireNode: 27, cc.ClaimGroups: 28, cc.AcquireWriteLease: 29, cc.ReleaseWriteLease: 30,
    c.Fenced: 31, cc.ReleaseOrphans: 32, c.PunchHole: 33, c.CloneRange: 34, c.SetLogLevel: 35,
    c.Preallocate: 36, c.PlanTierObject: 37, c.CommitTierObject: 38, c.AbandonTierObjects: 39,
    c.ForgetTierObjects: 40, c.LinkSite: 41, c.UnlinkSite: 42, c.ApplyRemote: 43, c.ForgetSite: 44,
    c.ResolveConflict: 45, c.ApplyRemoteSharing: 46, c.UpdateSiteLink: 47, c.MakeTmpfile: 48,
    c.LinkTmpfile: 49, c.FoldCapture: 50, c.UnlinkClosed: 51, c.PauseCapture: 52, c.ResumeCapture: 53,
    c.SeedSite: 54, c.UnlinkAlone: 55, c.MknodFor: 56,
}

TAG_COMMANDS = {tag: cls for cls, tag in COMMAND_TAGS.items()}
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_EXTENT_HEAD = struct.Struct(">QQI")


class CodecError(ValueError):
    """The bytes are not a valid command (corrupt, truncated or from a newer format)."""


class UnknownCommand(CodecError):
    """A command format or tag this build does not know: a newer build wrote it."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(c))


Encoder = Callable[[bytearray, Any, int], None]
"""Appends one value's bytes (`depth`: how deep in nested commands it is)."""
Decoder = Callable[[memoryview, int, int, "Decoders"], tuple[Any, int]]
"""One value from `pos`: (value, the position after it)."""
Decoders = dict[type, list[tuple[str, Decoder]]]
"""Per command type, its fields' decoders in order, for one format."""


def _value_codec(hint: Any) -> tuple[Encoder, Decoder]:
    """The encoder and decoder of a field's type, made once per field at import: reading the
    annotations (typing.get_origin/get_args) for every value cost a follower's apply 12 % of its
    loop under a creating member (a 30-create batch decoded in 415 µs)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        return _optional_codec(_value_codec(next(a for a in args if a is not type(None))))
    if hint is bool:
        return _encode_bool, _decode_bool
    if hint is int:
        return _encode_int, _decode_int
    if hint is bytes:
        return _encode_bytes_field, _decode_bytes_field
    if hint is str:
        return _encode_str, _decode_str
    if hint is Extent:
        return _encode_extent, _decode_extent
    if origin is tuple:
        # every item as the first argument says (tuple[int, int] too): the format since FORMAT 1
        if typing.get_origin(args[0]) is c.Command:
            return _tuple_codec((_encode_nested, _decode_nested))
        return _tuple_codec(_value_codec(args[0]))
    raise CodecError(f"no encoding for {hint!r}")


def _optional_codec(inner: tuple[Encoder, Decoder]) -> tuple[Encoder, Decoder]:
    encode_inner, decode_inner = inner

    def encode_optional(out: bytearray, value: Any, depth: int) -> None:
        if value is None:
            out.append(0)
        else:
            out.append(1)
            encode_inner(out, value, depth)

    def decode_optional(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[Any, int]:
        flag = data[pos]
        if flag == 0:
            return None, pos + 1
        if flag != 1:
            raise CodecError("bad optional flag")
        return decode_inner(data, pos + 1, depth, decoders)

    return encode_optional, decode_optional


def _tuple_codec(item: tuple[Encoder, Decoder]) -> tuple[Encoder, Decoder]:
    encode_item, decode_item = item

    def encode_tuple(out: bytearray, value: Any, depth: int) -> None:
        out += _U32.pack(len(value))
        for element in value:
            encode_item(out, element, depth)

    def decode_tuple(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[Any, int]:
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > MAX_TUPLE_ITEMS:
            raise CodecError("tuple too long")
        items = []
        for _ in range(n):
            element, pos = decode_item(data, pos, depth, decoders)
            items.append(element)
        return tuple(items), pos

    return encode_tuple, decode_tuple


def _encode_bool(out: bytearray, value: Any, depth: int) -> None:
    out.append(1 if value else 0)


def _decode_bool(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[Any, int]:
    if data[pos] > 1:
        raise CodecError("bad boolean")
    return bool(data[pos]), pos + 1


def _encode_int(out: bytearray, value: Any, depth: int) -> None:
    out += _I64.pack(value)


def _decode_int(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[Any, int]:
    return _I64.unpack_from(data, pos)[0], pos + 8


def _encode_bytes_field(out: bytearray, value: Any, depth: int) -> None:
    _encode_bytes(out, value)


def _decode_bytes_field(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[Any, int]:
    return _decode_bytes(data, pos)


def _encode_str(out: bytearray, value: Any, depth: int) -> None:
    _encode_bytes(out, value.encode())


def _decode_str(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[Any, int]:
    raw, pos = _decode_bytes(data, pos)
    return raw.decode(), pos


def _encode_extent(out: bytearray, value: Any, depth: int) -> None:
    out += _EXTENT_HEAD.pack(value.file_block, value.dev_block, value.count)
    _encode_bytes(out, value.checksums)


def _decode_extent(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[Any, int]:
    file_block, dev_block, count = _EXTENT_HEAD.unpack_from(data, pos)
    checksums, pos = _decode_bytes(data, pos + _EXTENT_HEAD.size)
    if len(checksums) not in (0, 4 * count):  # none: an unwritten extent
        raise CodecError("extent checksums do not match its length")
    return Extent(file_block, dev_block, count, checksums), pos


def _encode_nested(out: bytearray, value: Any, depth: int) -> None:
    _encode_command(out, value, depth + 1)


def _decode_nested(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[Any, int]:
    return _decode_command(data, pos, depth + 1, decoders)


_FIELDS = {cls: [(f.name, _hints(cls)[f.name]) for f in dataclasses.fields(cls)] for cls in COMMAND_TAGS}
_ADDED_IN_FORMAT_3 = {c.Mknod: {"cookie", "lease_to"}, c.Link: {"cookie"}, c.Rename: {"cookie"}}
_ADDED_IN_FORMAT_2 = {c.WriteData: {"mtime_ns"}, c.Rename: {"whiteout_ino", "uid", "gid"}}
_CODECS = {cls: [(name, _value_codec(hint)) for name, hint in fields] for cls, fields in _FIELDS.items()}


def _decoders(*added_since: dict[type, set[str]]) -> Decoders:
    """The decoders of a format written before the fields of every `added_since` existed."""
    return {cls: [(name, codec[1]) for name, codec in fields
                  if not any(name in added.get(cls, ()) for added in added_since)]
            for cls, fields in _CODECS.items()}


_DECODERS_BY_FORMAT = {FORMAT: _decoders(), 2: _decoders(_ADDED_IN_FORMAT_3),
                       1: _decoders(_ADDED_IN_FORMAT_3, _ADDED_IN_FORMAT_2)}


def _plan(cls: type) -> list[tuple[struct.Struct | None, Any, Any]]:
    """A command type's fields as steps: each run of integer fields one Struct (with the getter
    of those fields, for encoding), every other field its own codec. Decoding a member's batch
    field by field, a function call and a dictionary entry each, cost 3.2 µs a create (4-5 in a
    member's loop, where every other member's batch is decoded); in runs, 2.1 (design note 157)."""
    steps: list[tuple[struct.Struct | None, Any, Any]] = []
    run: list[str] = []

    def close_run() -> None:
        if run:
            steps.append((struct.Struct(">" + "q" * len(run)), operator.attrgetter(*run) if len(run) > 1
                          else _one_field(run[0]), None))
            run.clear()

    for (name, hint), (_, (encode_field, decode_field)) in zip(_FIELDS[cls], _CODECS[cls], strict=True):
        if hint is int:
            run.append(name)
        else:
            close_run()
            steps.append((None, (name, encode_field), decode_field))
    close_run()
    return steps


def _one_field(name: str) -> Callable[[Any], tuple[Any]]:
    """attrgetter of one name gives the value, not a 1-tuple: what Struct.pack(*...) needs."""
    get = operator.attrgetter(name)
    return lambda command: (get(command),)


_PLANS = {cls: _plan(cls) for cls in COMMAND_TAGS}
"""How each command type's fields are encoded and (in this FORMAT) decoded, in declaration order:
the same bytes field by field (tests/unit/test_codec.py compares both ways)."""


def encode(command: c.Command[Any]) -> bytes:
    out = bytearray((FORMAT,))
    _encode_command(out, command, 0)
    return bytes(out)


def decode(data: bytes) -> c.Command[Any]:
    decoders = _DECODERS_BY_FORMAT.get(data[0]) if data else None
    if decoders is None:
        raise UnknownCommand(f"unknown command format {data[:1]!r}")
    try:
        value, pos = _decode_command(memoryview(data), 1, 0, decoders)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise CodecError(f"truncated or corrupt command: {exc}") from None
    if pos != len(data):
        raise CodecError(f"{len(data) - pos} trailing bytes")
    return value


def _encode_command(out: bytearray, command: c.Command[Any], depth: int) -> None:
    tag = COMMAND_TAGS.get(type(command))
    if tag is None or depth > MAX_NESTING:
        raise CodecError(f"cannot encode {type(command).__name__}")
    out.append(tag)
    for fixed, field, _ in _PLANS[type(command)]:
        if fixed is not None:
            out += fixed.pack(*field(command))
        else:
            name, encode_field = field
            encode_field(out, getattr(command, name), depth)


def _decode_command(data: memoryview, pos: int, depth: int, decoders: Decoders) -> tuple[c.Command[Any], int]:
    if pos >= len(data) or depth > MAX_NESTING:
        raise CodecError("truncated command")
    cls = TAG_COMMANDS.get(data[pos])
    if cls is None:
        raise UnknownCommand(f"unknown command tag {data[pos]}")
    pos += 1
    if decoders is _CURRENT:  # every field there, in order: positional, in runs
        values: list[Any] = []
        for fixed, _, decode_field in _PLANS[cls]:
            if fixed is not None:
                values += fixed.unpack_from(data, pos)
                pos += fixed.size
            else:
                value, pos = decode_field(data, pos, depth, decoders)
                values.append(value)
        return cls(*values), pos
    named = {}  # an older format: the fields added since take their defaults
    for name, decode_field in decoders[cls]:
        named[name], pos = decode_field(data, pos, depth, decoders)
    return cls(**named), pos


_CURRENT = _DECODERS_BY_FORMAT[FORMAT]


def _encode_bytes(out: bytearray, value: bytes) -> None:
    if len(value) > MAX_BYTES_FIELD:
        raise CodecError("field too large")
    out += _U32.pack(len(value))
    out += value


def _decode_bytes(data: memoryview, pos: int) -> tuple[bytes, int]:
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if n > MAX_BYTES_FIELD or pos + n > len(data):
        raise CodecError("bytes field overruns the command")
    return bytes(data[pos : pos + n]), pos + n
