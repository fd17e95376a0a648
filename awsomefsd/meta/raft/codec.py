"""Binary forms of messages, entries and membership changes: versioned, bounded, little-endian.

A transport ships `encode_message` bytes; the LMDB log stores `encode_entry` bytes. Decoding checks
every length against a fixed bound before reading, rejects unknown versions and kinds, and refuses
trailing bytes, so a corrupt or hostile frame raises CodecError and nothing else.
"""

from __future__ import annotations

import struct

from .messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

VERSION = 1
MAX_U64 = (1 << 64) - 1
MAX_CONTEXT_BYTES = 4096
MAX_ENTRIES_PER_MESSAGE = 1 << 16
MAX_ENTRY_DATA_BYTES = 64 << 20
MAX_SNAPSHOT_DATA_BYTES = 256 << 20
MAX_CONF_IDS = 1024
MAX_MESSAGE_BYTES = 512 << 20

_MSG_HEAD = struct.Struct("<BBQQQQQQBQHI")  # version, type, to, frm, term, log_term, index, commit,
#                                             flags, reject_hint, context length, entry count
_ENTRY_HEAD = struct.Struct("<QQBI")  # term, index, type, data length
_SNAP_HEAD = struct.Struct("<QQHHQ")  # index, term, voters, learners, data length
_CC_HEAD = struct.Struct("<BBQH")  # version, type, node id, context length
_U64 = struct.Struct("<Q")
_FLAG_REJECT = 1
_FLAG_SNAPSHOT = 2


class CodecError(ValueError):
    """The bytes are not a valid encoding (truncated, oversized, unknown version or kind)."""


def _u64(x: int, what: str) -> int:
    if not 0 <= x <= MAX_U64:
        raise CodecError(f"{what} out of u64 range: {x}")
    return x


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise CodecError(f"truncated: need {n} bytes at {self.pos}, have {len(self.buf) - self.pos}")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        if self.pos + s.size > len(self.buf):
            raise CodecError(f"truncated header at {self.pos}")
        out = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return out

    def finish(self) -> None:
        if self.pos != len(self.buf):
            raise CodecError(f"{len(self.buf) - self.pos} trailing bytes")


# --- entries ----------------------------------------------------------------------------------------
def _put_entry(out: list[bytes], e: Entry) -> None:
    if len(e.data) > MAX_ENTRY_DATA_BYTES:
        raise CodecError(f"entry data too large: {len(e.data)} bytes")
    out.append(_ENTRY_HEAD.pack(_u64(e.term, "term"), _u64(e.index, "index"), int(e.type), len(e.data)))
    out.append(e.data)


def _get_entry(r: _Reader) -> Entry:
    term, index, etype, n = r.unpack(_ENTRY_HEAD)
    if n > MAX_ENTRY_DATA_BYTES:
        raise CodecError(f"entry data length {n} over bound")
    try:
        t = EntryType(etype)
    except ValueError:
        raise CodecError(f"unknown entry type {etype}") from None
    return Entry(term=term, index=index, type=t, data=r.take(n))


def encode_entry(e: Entry) -> bytes:
    out = [bytes([VERSION])]
    _put_entry(out, e)
    return b"".join(out)


def decode_entry(buf: bytes) -> Entry:
    r = _Reader(buf)
    (version,) = r.take(1)
    if version != VERSION:
        raise CodecError(f"unknown entry version {version}")
    e = _get_entry(r)
    r.finish()
    return e


# --- configuration and snapshots -------------------------------------------------------------------
def _put_snapshot(out: list[bytes], s: Snapshot) -> None:
    cs = s.meta.conf_state
    if len(cs.voters) > MAX_CONF_IDS or len(cs.learners) > MAX_CONF_IDS:
        raise CodecError("too many members")
    if len(s.data) > MAX_SNAPSHOT_DATA_BYTES:
        raise CodecError(f"snapshot data too large: {len(s.data)} bytes")
    out.append(
        _SNAP_HEAD.pack(
            _u64(s.meta.index, "index"),
            _u64(s.meta.term, "term"),
            len(cs.voters),
            len(cs.learners),
            len(s.data),
        )
    )
    out.extend(_U64.pack(_u64(i, "node id")) for i in cs.voters + cs.learners)
    out.append(s.data)


def _get_snapshot(r: _Reader) -> Snapshot:
    index, term, nv, nl, n = r.unpack(_SNAP_HEAD)
    if nv > MAX_CONF_IDS or nl > MAX_CONF_IDS or n > MAX_SNAPSHOT_DATA_BYTES:
        raise CodecError("snapshot header over bounds")
    ids = [r.unpack(_U64)[0] for _ in range(nv + nl)]
    try:
        cs = ConfState(tuple(ids[:nv]), tuple(ids[nv:]))
    except AssertionError as e:
        raise CodecError(f"invalid configuration: {e}") from None
    return Snapshot(SnapshotMeta(index, term, cs), r.take(n))


def encode_snapshot_meta(meta: SnapshotMeta) -> bytes:
    out = [bytes([VERSION])]
    _put_snapshot(out, Snapshot(meta, b""))
    return b"".join(out)


def decode_snapshot_meta(buf: bytes | memoryview) -> SnapshotMeta:
    r = _Reader(buf)
    (version,) = r.take(1)
    if version != VERSION:
        raise CodecError(f"unknown snapshot version {version}")
    s = _get_snapshot(r)
    r.finish()
    return s.meta


def encode_conf_change(cc: ConfChange) -> bytes:
    if len(cc.context) > MAX_CONTEXT_BYTES:
        raise CodecError("conf change context too large")
    return _CC_HEAD.pack(VERSION, int(cc.type), _u64(cc.node_id, "node id"), len(cc.context)) + cc.context


def decode_conf_change(buf: bytes) -> ConfChange:
    r = _Reader(buf)
    version, ctype, node_id, n = r.unpack(_CC_HEAD)
    if version != VERSION:
        raise CodecError(f"unknown conf change version {version}")
    if n > MAX_CONTEXT_BYTES:
        raise CodecError("conf change context over bound")
    try:
        t = ConfChangeType(ctype)
    except ValueError:
        raise CodecError(f"unknown conf change type {ctype}") from None
    ctx = r.take(n)
    r.finish()
    return ConfChange(t, node_id, ctx)


# --- messages ---------------------------------------------------------------------------------------
def encode_message(m: Message) -> bytes:
    if len(m.context) > MAX_CONTEXT_BYTES:
        raise CodecError("message context too large")
    if len(m.entries) > MAX_ENTRIES_PER_MESSAGE:
        raise CodecError("too many entries in one message")
    flags = (_FLAG_REJECT if m.reject else 0) | (_FLAG_SNAPSHOT if m.snapshot is not None else 0)
    out = [
        _MSG_HEAD.pack(
            VERSION,
            int(m.type),
            _u64(m.to, "to"),
            _u64(m.frm, "from"),
            _u64(m.term, "term"),
            _u64(m.log_term, "log_term"),
            _u64(m.index, "index"),
            _u64(m.commit, "commit"),
            flags,
            _u64(m.reject_hint, "reject_hint"),
            len(m.context),
            len(m.entries),
        ),
        m.context,
    ]
    for e in m.entries:
        _put_entry(out, e)
    if m.snapshot is not None:
        _put_snapshot(out, m.snapshot)
    data = b"".join(out)
    if len(data) > MAX_MESSAGE_BYTES:
        raise CodecError(f"message too large: {len(data)} bytes")
    return data


def decode_message(buf: bytes) -> Message:
    if len(buf) > MAX_MESSAGE_BYTES:
        raise CodecError(f"message too large: {len(buf)} bytes")
    r = _Reader(buf)
    (version, mtype, to, frm, term, log_term, index, commit, flags, reject_hint, nctx, nents) = r.unpack(
        _MSG_HEAD
    )
    if version != VERSION:
        raise CodecError(f"unknown message version {version}")
    try:
        t = MessageType(mtype)
    except ValueError:
        raise CodecError(f"unknown message type {mtype}") from None
    if flags & ~(_FLAG_REJECT | _FLAG_SNAPSHOT):
        raise CodecError(f"unknown flags {flags:#x}")
    if nctx > MAX_CONTEXT_BYTES or nents > MAX_ENTRIES_PER_MESSAGE:
        raise CodecError("message header over bounds")
    ctx = r.take(nctx)
    entries = tuple(_get_entry(r) for _ in range(nents))
    snap = _get_snapshot(r) if flags & _FLAG_SNAPSHOT else None
    r.finish()
    return Message(
        type=t,
        to=to,
        frm=frm,
        term=term,
        log_term=log_term,
        index=index,
        entries=entries,
        commit=commit,
        snapshot=snap,
        reject=bool(flags & _FLAG_REJECT),
        reject_hint=reject_hint,
        context=ctx,
    )
