"""What crosses between sites is input: frames and digests from the peer are checked field by field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from awsomefsd.crdt import wire
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.repl import verify
from awsomefsd.repl.digest import differences, digest_tree


def test_a_frame_round_trips_with_its_bytes() -> None:
    header, data = wire.unframe(wire.frame({"a": 1, "after": ""}, b"\x00bytes"))
    assert header == {"a": 1, "after": ""} and bytes(data) == b"\x00bytes"
    assert wire.stamp_field(header, "after") is None
    stamp = Stamp(5, 2, os.urandom(16))
    assert wire.stamp_field({"s": wire.stamp_text(stamp)}, "s") == stamp


@pytest.mark.parametrize("message", [b"", b"AWS\x01\x00\x00\x00\x09{}", b"XXXX\x00\x00\x00\x02{}",
                                     b"AWS\x01\x00\x00\x00\x02[]", b"AWS\x01\x00\x00\x00\x02{x"])
def test_a_damaged_frame_is_refused(message: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.unframe(message)


@pytest.mark.parametrize(("header", "name"), [({"s": "zz"}, "s"), ({"s": "00" * 27}, "s"), ({"s": 5}, "s")])
def test_a_bad_stamp_is_refused(header: dict[str, object], name: str) -> None:
    with pytest.raises(wire.WireError):
        wire.stamp_field(header, name)


def test_counts_and_lists_are_bounded() -> None:
    with pytest.raises(wire.WireError):
        wire.int_field({"n": -1}, "n")
    with pytest.raises(wire.WireError):
        wire.int_field({"n": True}, "n")
    with pytest.raises(wire.WireError):
        wire.hex_list({"ops": ["00"] * 5}, "ops", limit=4)
    assert wire.hex_list({"ops": ["00ff"]}, "ops", limit=4) == [b"\x00\xff"]


def test_a_digest_survives_the_wire_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"content")
    os.symlink("target", tmp_path / "l")
    (tmp_path / ".conflicts").mkdir()
    mine = digest_tree(tmp_path, skip_top=verify.PER_SITE)
    assert ".conflicts" not in mine.children[""]
    theirs = verify.decode(verify.encode(mine))
    assert differences(mine, theirs) == [] and theirs.root_hash == mine.root_hash
    broken = verify.encode(mine)
    broken["entries"][""][2].append("ghost")
    with pytest.raises(verify.DigestError):
        verify.decode(broken)
    with pytest.raises(verify.DigestError):
        verify.decode({"entries": []})
