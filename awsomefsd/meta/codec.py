"""Deterministic binary encoding of metadata commands: the bytes a replicated log stores and ships.

Every replica must apply the same bytes, so the encoding is canonical (one encoding per command),
versioned (a tag per command type, a format byte), and bounded (every length is checked before
anything is allocated). Fields are encoded in declaration order from the dataclass annotations;
adding a command means adding it to COMMAND_TAGS with a new tag, never reusing one.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
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
    c.SeedSite: 54,
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


_FIELDS = {cls: [(f.name, _hints(cls)[f.name]) for f in dataclasses.fields(cls)] for cls in COMMAND_TAGS}
_ADDED_IN_FORMAT_3 = {c.Mknod: {"cookie", "lease_to"}, c.Link: {"cookie"}, c.Rename: {"cookie"}}
_ADDED_IN_FORMAT_2 = {c.WriteData: {"mtime_ns"}, c.Rename: {"whiteout_ino", "uid", "gid"}}


def _without(fields: dict[type, list[tuple[str, Any]]], added: dict[type, set[str]]) -> dict[type, list[tuple[str, Any]]]:
    return {cls: [(n, h) for n, h in names if n not in added.get(cls, ())] for cls, names in fields.items()}


_FIELDS_BY_FORMAT = {FORMAT: _FIELDS, 2: _without(_FIELDS, _ADDED_IN_FORMAT_3)}
_FIELDS_BY_FORMAT[1] = _without(_FIELDS_BY_FORMAT[2], _ADDED_IN_FORMAT_2)


def encode(command: c.Command[Any]) -> bytes:
    out = bytearray((FORMAT,))
    _encode_command(out, command, 0)
    return bytes(out)


def decode(data: bytes) -> c.Command[Any]:
    fields = _FIELDS_BY_FORMAT.get(data[0]) if data else None
    if fields is None:
        raise UnknownCommand(f"unknown command format {data[:1]!r}")
    value, pos = _decode_command(memoryview(data), 1, 0, fields)
    if pos != len(data):
        raise CodecError(f"{len(data) - pos} trailing bytes")
    return value


def _encode_command(out: bytearray, command: c.Command[Any], depth: int) -> None:
    tag = COMMAND_TAGS.get(type(command))
    if tag is None or depth > MAX_NESTING:
        raise CodecError(f"cannot encode {type(command).__name__}")
    out.append(tag)
    for name, hint in _FIELDS[type(command)]:
        _encode_value(out, getattr(command, name), hint, depth)


Fields = dict[type, list[tuple[str, Any]]]


def _decode_command(data: memoryview, pos: int, depth: int, fields: Fields) -> tuple[c.Command[Any], int]:
    if pos >= len(data) or depth > MAX_NESTING:
        raise CodecError("truncated command")
    cls = TAG_COMMANDS.get(data[pos])
    if cls is None:
        raise UnknownCommand(f"unknown command tag {data[pos]}")
    pos += 1
    values = {}
    for name, hint in fields[cls]:
        values[name], pos = _decode_value(data, pos, hint, depth, fields)
    return cls(**values), pos


def _encode_value(out: bytearray, value: Any, hint: Any, depth: int) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):  # X | None
        if value is None:
            out.append(0)
            return
        out.append(1)
        _encode_value(out, value, next(a for a in args if a is not type(None)), depth)
    elif hint is bool:
        out.append(1 if value else 0)
    elif hint is int:
        out += _I64.pack(value)
    elif hint is bytes:
        _encode_bytes(out, value)
    elif hint is str:
        _encode_bytes(out, value.encode())
    elif hint is Extent:
        out += _EXTENT_HEAD.pack(value.file_block, value.dev_block, value.count)
        _encode_bytes(out, value.checksums)
    elif origin is tuple:
        item = args[0]
        out += _U32.pack(len(value))
        for element in value:
            if typing.get_origin(item) is c.Command:
                _encode_command(out, element, depth + 1)
            else:
                _encode_value(out, element, item if args[-1] is Ellipsis else args[0], depth)
    else:
        raise CodecError(f"no encoding for {hint!r}")


def _decode_value(data: memoryview, pos: int, hint: Any, depth: int, fields: Fields) -> tuple[Any, int]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            flag = data[pos]
            if flag == 0:
                return None, pos + 1
            if flag != 1:
                raise CodecError("bad optional flag")
            return _decode_value(data, pos + 1, next(a for a in args if a is not type(None)), depth, fields)
        if hint is bool:
            if data[pos] > 1:
                raise CodecError("bad boolean")
            return bool(data[pos]), pos + 1
        if hint is int:
            return _I64.unpack_from(data, pos)[0], pos + 8
        if hint is bytes:
            return _decode_bytes(data, pos)
        if hint is str:
            raw, pos = _decode_bytes(data, pos)
            return raw.decode(), pos
        if hint is Extent:
            file_block, dev_block, count = _EXTENT_HEAD.unpack_from(data, pos)
            checksums, pos = _decode_bytes(data, pos + _EXTENT_HEAD.size)
            if len(checksums) not in (0, 4 * count):  # none: an unwritten extent
                raise CodecError("extent checksums do not match its length")
            return Extent(file_block, dev_block, count, checksums), pos
        if origin is tuple:
            (n,) = _U32.unpack_from(data, pos)
            pos += 4
            if n > MAX_TUPLE_ITEMS:
                raise CodecError("tuple too long")
            items = []
            for _ in range(n):
                if typing.get_origin(args[0]) is c.Command:
                    item, pos = _decode_command(data, pos, depth + 1, fields)
                else:
                    item, pos = _decode_value(data, pos, args[0], depth, fields)
                items.append(item)
            return tuple(items), pos
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise CodecError(f"truncated or corrupt command: {exc}") from None
    raise CodecError(f"no decoding for {hint!r}")


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
