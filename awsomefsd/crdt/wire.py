"""The messages between two linked sites (repl/service.py), as bytes on gRPC's generic handlers.

A message is a frame: 4 bytes of magic and format, 4 bytes of header length, a JSON header, then
raw bytes (file content) if any. Every field of a header from the other site is checked before it
is used (`WireError`, reported back as INVALID_ARGUMENT): what arrives from another site is
input, however much we trust its certificate.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from awsomefsd.crdt.hlc import PACKED_BYTES, Stamp

MAGIC = b"AWS\x01"
_HEAD = struct.Struct(">4sI")
MAX_HEADER_BYTES = 64 << 20
"""A push of `batch_operations` operations at their largest (an xattr value each) fits."""


class WireError(ValueError):
    """A message from the other site that is not one this version understands."""


def frame(header: dict[str, Any], data: bytes | bytearray | memoryview = b"") -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, len(body)) + body + bytes(data)


def unframe(message: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(message) < _HEAD.size:
        raise WireError("a message shorter than its frame")
    magic, length = _HEAD.unpack_from(message)
    if magic != MAGIC:
        raise WireError(f"not a site-link message of format 1 (magic {magic!r}): upgrade both sites alike")
    if length > MAX_HEADER_BYTES or _HEAD.size + length > len(message):
        raise WireError("a message whose header runs past its end")
    try:
        header = json.loads(message[_HEAD.size:_HEAD.size + length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"a header that is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("a header that is not an object")
    return header, memoryview(message)[_HEAD.size + length:]


def stamp_field(header: dict[str, Any], name: str) -> Stamp | None:
    """A packed stamp in hex, or "" for none."""
    value = header.get(name)
    if value == "":
        return None
    try:
        raw = bytes.fromhex(value)  # type: ignore[arg-type]
        if len(raw) != PACKED_BYTES:
            raise ValueError("length")
        return Stamp.unpack(raw)
    except (TypeError, ValueError):
        raise WireError(f"field {name!r} is not a stamp") from None


def stamp_text(stamp: Stamp | None) -> str:
    return "" if stamp is None else stamp.pack().hex()


def int_field(header: dict[str, Any], name: str, *, limit: int = 1 << 63) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise WireError(f"field {name!r} is not a count")
    return value


def hex_list(header: dict[str, Any], name: str, *, limit: int) -> list[bytes]:
    value = header.get(name)
    if not isinstance(value, list) or len(value) > limit:
        raise WireError(f"field {name!r} is not a list of at most {limit}")
    try:
        return [bytes.fromhex(item) for item in value]
    except (TypeError, ValueError):
        raise WireError(f"field {name!r} holds something that is not hex") from None
