"""The wire and disk forms: every value round-trips, and any byte string either decodes to a valid
value or raises CodecError (never another exception, never an unbounded allocation)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.meta.raft import ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType
from awsomefsd.meta.raft.codec import (
    MAX_CONTEXT_BYTES,
    CodecError,
    decode_conf_change,
    decode_entry,
    decode_message,
    decode_snapshot_meta,
    encode_conf_change,
    encode_entry,
    encode_message,
    encode_snapshot_meta,
)
from awsomefsd.meta.raft.messages import Snapshot, SnapshotMeta

u64 = st.integers(0, (1 << 64) - 1)
small = st.integers(0, 1 << 40)
entries = st.builds(Entry, term=u64, index=u64, type=st.sampled_from(EntryType), data=st.binary(max_size=64))
node_ids = st.lists(st.integers(1, 1 << 63), max_size=6, unique=True)


@st.composite
def conf_states(draw: st.DrawFn) -> ConfState:
    ids = draw(node_ids)
    split = draw(st.integers(0, len(ids)))
    return ConfState(tuple(ids[:split]), tuple(ids[split:]))


snapshots = st.builds(
    Snapshot,
    meta=st.builds(SnapshotMeta, index=u64, term=u64, conf_state=conf_states()),
    data=st.binary(max_size=64),
)
messages = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    to=u64,
    frm=u64,
    term=u64,
    log_term=u64,
    index=u64,
    entries=st.lists(entries, max_size=4).map(tuple),
    commit=u64,
    snapshot=st.none() | snapshots,
    reject=st.booleans(),
    reject_hint=u64,
    context=st.binary(max_size=32),
)


@given(messages)
def test_message_round_trip(m: Message) -> None:
    assert decode_message(encode_message(m)) == m


@given(entries)
def test_entry_round_trip(e: Entry) -> None:
    assert decode_entry(encode_entry(e)) == e


@given(snapshots)
def test_snapshot_meta_round_trip(s: Snapshot) -> None:
    assert decode_snapshot_meta(encode_snapshot_meta(s.meta)) == s.meta


@given(
    st.builds(ConfChange, type=st.sampled_from(ConfChangeType), node_id=u64, context=st.binary(max_size=16))
)
def test_conf_change_round_trip(cc: ConfChange) -> None:
    assert decode_conf_change(encode_conf_change(cc)) == cc


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_garbage_never_crashes_the_decoder(buf: bytes) -> None:
    for decode in (decode_message, decode_entry, decode_conf_change, decode_snapshot_meta):
        try:
            decode(buf)
        except CodecError:
            pass


@settings(max_examples=300)
@given(messages, st.data())
def test_corrupted_messages_decode_or_fail_cleanly(m: Message, data: st.DataObject) -> None:
    buf = bytearray(encode_message(m))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        decode_message(bytes(buf[:cut]))
    except CodecError:
        pass


def test_bounds_are_checked_before_reading() -> None:
    # A header claiming a huge context is refused without trying to read it.
    header = struct.pack("<BBQQQQQQBQHI", 1, 3, 1, 2, 3, 0, 0, 0, 0, 0, MAX_CONTEXT_BYTES + 1, 0)
    with pytest.raises(CodecError, match="bounds"):
        decode_message(header)
    with pytest.raises(CodecError, match="version"):
        decode_message(b"\x02" + encode_message(Message(MessageType.APP))[1:])
    with pytest.raises(CodecError, match="trailing"):
        decode_message(encode_message(Message(MessageType.APP)) + b"\x00")
    with pytest.raises(CodecError, match="u64"):
        encode_message(Message(MessageType.APP, term=-1))
