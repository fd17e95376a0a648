"""Command encoding: round trips for every command type, canonical bytes, corrupt input refused."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from awsomefsd.meta import cluster_commands as cc
from awsomefsd.meta import commands as c
from awsomefsd.meta.codec import COMMAND_TAGS, CodecError, decode, encode
from awsomefsd.meta.records import Extent

i64 = st.integers(-(1 << 63), (1 << 63) - 1)
u = st.integers(0, (1 << 62))
extents = st.builds(lambda fb, db, n: Extent(fb, db, n, bytes(4 * n)), u, u, st.integers(1, 8))
names = st.binary(min_size=1, max_size=255)

EXAMPLES = [
    c.Mknod(1, b"name", 17, 0o100644, 1000, 1000, 123, 0, b""),
    c.Mknod(1, b"link", 18, 0o120777, 0, 0, 124, 0, b"target"),
    c.Link(17, 1, b"other", 5), c.Unlink(1, b"x", True, 6, 1000), c.UnlinkClosed(1, b"y", False, 6, 1000, 17),
    c.Rename(1, b"a", 2, b"b", 2, 7),
    c.SetAttr(17, 8, mode=0o600, size=10, tail=Extent(0, 300, 1, b"abcd")), c.SetAttr(17, 9),
    c.WriteData(17, (Extent(0, 300, 2, b"12345678"), Extent(2, 900, 1, b"zzzz")), 12_000, 10, touch=False),
    c.SetXattr(17, b"user.k", b"\x00value", 1, 11), c.RemoveXattr(17, b"user.k", 12),
    c.ReserveInodes(1024), c.Purge(17, 13), c.ReclaimFrees(14), c.GrantGroups(1, (0, 1, 2)),
    c.ReleaseLeaked(((5, 6), (100, 2))), c.CreateVolume(40, "pvc-é", 40, 1 << 30, 0, 15, "snapshot", 41),
    c.DeleteVolume(40, 16), c.ResizeVolume(40, 2 << 30, 17), c.CreateSnapshot(41, "s", 40, 18),
    c.DeleteSnapshot(41, 19), c.Batch((c.Purge(1, 2), c.ReclaimFrees(3))),
    cc.InitCluster(b"cert", b"key", b"v" * 48, 3, 256, 4096, 64, 1, "n1", "10.0.0.1:7470", "10.0.0.1:7471", 20),
    cc.AddMember("n2", "10.0.0.2:7470", "10.0.0.2:7471", 21), cc.SetMemberCert(2, "1be1"),
    cc.UpdateMemberAddress(2, "10.0.0.3:7470", "10.0.0.3:7471"), cc.RemoveMember(2, 22),
    cc.SetJoinVerifier(b"w" * 48), cc.RenewLease(2, 1), cc.ExpireNode(2, 24), cc.ClaimGroups(2, 1, 4),
    cc.AcquireWriteLease(17, 2, 1), cc.ReleaseWriteLease(17, 2), cc.ReleaseOrphans(2, (17, 18), 25),
    c.PunchHole(17, 1, 3, 26), c.CloneRange(17, 0, 18, 4, 2, 24_576, 27), c.SetLogLevel(4, (1, 2, 3)),
    c.Preallocate(17, (Extent(0, 500, 2, b""), Extent(8, 900, 1, b"")), 28),
    c.PlanTierObject(29), c.CommitTierObject(3, (17, 18), (Extent(0, 300, 1, b"abcd"), Extent(4, 9, 1, b"efgh")), 30),
    c.AbandonTierObjects((1, 2), 31), c.ForgetTierObjects((4,)),
    c.LinkSite(b"p" * 16, 32), c.UnlinkSite(33), c.ApplyRemote(b"p" * 16, b"", (b"{}", b"[]"), (Extent(0, 300, 1, b"abcd"),), (1,), 34),
    c.ForgetSite(b"s" * 28, 35), c.ResolveConflict(b"s" * 29, "loser", 36),
    c.ApplyRemoteSharing(b"p" * 16, b"", (b"{}",), (Extent(2, 300, 1, b"abcd"),), (1,), (Extent(0, 40, 2, b"abcdefgh"),),
                         (1,), 37),
    c.UpdateSiteLink(("10.0.0.1:9450", "10.0.0.2:9450"), ("7f3a",), 38),
    c.Fenced(2, 1, (c.WriteData(17, (Extent(0, 300, 1, b"abcd"),), 4096, 23),)),
    c.MakeTmpfile(1, 17, 0o100600, 1000, 1000, 39, True, 3), c.LinkTmpfile(17, 1, b"named", 40),
    c.FoldCapture(4096), c.PauseCapture(41), c.ResumeCapture(42), c.SeedSite(256, 43),
    c.UnlinkAlone(1, b"z", False, 44, 1000, 18),
    c.MknodFor(1, b"for", 19, 0o100644, 1000, 1000, 45, 0, b"", 1 << 62 | 19, 3, 7),
]


def test_every_command_type_has_an_example_and_round_trips() -> None:
    assert {type(e) for e in EXAMPLES} == set(COMMAND_TAGS)
    for command in EXAMPLES:
        data = encode(command)
        assert decode(data) == command
        assert encode(decode(data)) == data, "canonical"


def test_every_command_declares_what_its_apply_returns() -> None:
    """`MetaClient.propose(command)` returns the `R` of the command's `Command[R]`, and mypy checks
    its callers against it: a command without one (a bare `Command`, or `Command[Any]`) would hand
    them an unchecked Any."""
    for cls in COMMAND_TAGS:
        bases = getattr(cls, "__orig_bases__", ())
        declared = [base for base in bases if typing.get_origin(base) is c.Command]
        assert declared, f"{cls.__name__} does not subclass Command[...]"
        assert typing.get_args(declared[0]) != (typing.Any,), f"{cls.__name__} declares Command[Any]"


@settings(max_examples=200, deadline=None)
@given(st.builds(c.Mknod, u, names, u, u, u, u, i64, u, st.binary(max_size=100)),
       st.builds(c.WriteData, u, st.lists(extents, max_size=5).map(tuple), u, i64, st.booleans(), st.booleans()),
       st.builds(c.Rename, u, names, u, names, st.integers(0, 3), i64))
def test_round_trip_property(mknod: c.Mknod, write: c.WriteData, rename: c.Rename) -> None:
    for command in (mknod, write, rename):
        assert decode(encode(command)) == command


def test_corrupt_or_truncated_bytes_are_refused() -> None:
    data = encode(EXAMPLES[7])
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:cut])
    with pytest.raises(CodecError):
        decode(data + b"\x00")
    with pytest.raises(CodecError):
        decode(b"\x09" + data[1:])
    with pytest.raises(CodecError):
        decode(bytes([1, 250]))


def test_field_order_is_part_of_the_format() -> None:
    # a new field must be appended with a default, never inserted: pin today's layout
    assert [f.name for f in dataclasses.fields(c.WriteData)] == [
        "ino", "extents", "size", "now_ns", "kill_suid", "touch", "mtime_ns"]


def test_format_1_write_data_still_decodes() -> None:
    """A log written before WriteData gained mtime_ns replays after an upgrade (mtime = now_ns)."""
    command = c.WriteData(7, (Extent(0, 100, 1, b"\x01\x02\x03\x04"),), 4096, 1234, touch=True, mtime_ns=999)
    v3 = encode(command)
    assert v3[0] == 3 and decode(v3) == command
    v2 = bytes([2]) + v3[1:]  # format 3 changed nothing in WriteData
    assert decode(v2) == command
    v1 = bytes([1]) + v2[1:-8]  # format 1 had no mtime_ns: the same bytes without the last field
    assert decode(v1) == c.WriteData(7, command.extents, 4096, 1234, touch=True)



def test_format_2_namespace_commands_decode_without_a_cookie() -> None:
    """A log written before Mknod, Link and Rename gained `cookie` (and Mknod `lease_to`) replays,
    with those fields at 0: the log's own cookie, no lease."""
    for command, added in ((c.Mknod(1, b"n", 20, 0o100644, 0, 0, 5, 0, b""), 2),
                           (c.Link(20, 1, b"m", 6), 1),
                           (c.Rename(1, b"n", 1, b"o", 0, 7, 0, 0, 0), 1)):
        v3 = encode(command)
        assert v3[-8 * added:] == bytes(8 * added), "the fields added in format 3 are the last ones"
        assert decode(bytes([2]) + v3[1 : -8 * added]) == command
    chosen = c.Mknod(1, b"n", 20, 0o100644, 0, 0, 5, cookie=c.delegated_cookie(20), lease_to=3)
    assert decode(encode(chosen)) == chosen


def test_the_bytes_of_every_example_are_pinned() -> None:
    """The encoding is what every replica stores and ships: a faster codec must write the same
    bytes (this digest was taken from the annotation-reading codec before it was compiled)."""
    import hashlib

    digest = hashlib.sha256(b"".join(encode(command) for command in EXAMPLES)).hexdigest()
    assert digest == "9f92f2ecac302ef3f1d7b76ae15a89720ac5a699c8524ef20bccc548e05ce91c"
