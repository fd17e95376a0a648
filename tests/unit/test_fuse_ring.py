"""The FUSE ring's buffers: a request in an entry is rebuilt as the bytes read() of /dev/fuse
gives (what every handler parses), and an answer is split into the entry's out header and
payload with the payload's size stated. No FUSE mount: only an io_uring instance is needed."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.fuse.kernel import abi
from awsomefsd.fuse.kernel.fuse_ring import (
    ENT_IN_OUT,
    ENT_OFFSET,
    HEADER_SLOT,
    IN_OUT_SIZE,
    FuseRing,
    possible_cpus,
)
from awsomefsd.fuse.kernel.uring import RingUnavailable

PAYLOAD = 8192


@pytest.fixture
def ring() -> Iterator[FuseRing]:
    try:
        r = FuseRing(-1, queues=2, depth=2, payload_size=PAYLOAD)  # fd -1: commits complete with EBADF
    except RingUnavailable as exc:
        pytest.skip(f"no io_uring here: {exc}")
    yield r
    r.close()


def put_request(ring: FuseRing, i: int, opcode: int, op_header: bytes, payload: bytes, unique: int) -> bytes:
    """Write a request into entry `i` as the kernel does; returns what read() would have given."""
    length = abi.IN_HEADER.size + len(op_header) + len(payload)
    header = abi.IN_HEADER.pack(length, opcode, unique, 5, 0, 0, 0, 0, 0)
    h = i * HEADER_SLOT
    ring.headers[h:h + len(header)] = header
    ring.headers[h + IN_OUT_SIZE:h + IN_OUT_SIZE + len(op_header)] = op_header
    ENT_IN_OUT.pack_into(ring.headers, h + ENT_OFFSET, 0, unique, len(payload), 0)
    p = i * PAYLOAD
    ring.payloads[p:p + len(payload)] = payload
    return header + op_header + payload


def test_a_write_request_is_rebuilt_as_read_gives_it(ring: FuseRing) -> None:
    op = abi.WRITE_IN.pack(9, 4096, 11, 0, 0, 0, 0)
    data = bytes(range(256)) * 20
    wanted = put_request(ring, 3, abi.Op.WRITE, op, data, unique=77)
    got, commit_id = ring.request(3)
    assert got == wanted and commit_id == 77
    header = abi.parse_header(got)
    assert header.opcode == abi.Op.WRITE and header.unique == 77


def test_a_request_with_only_a_name_in_the_payload_is_rebuilt(ring: FuseRing) -> None:
    wanted = put_request(ring, 0, abi.Op.LOOKUP, b"", b"name\0", unique=5)  # the kernel's zero-size arg0
    assert ring.request(0) == (wanted, 5)


def test_lengths_that_do_not_add_up_give_a_request_parse_header_refuses(ring: FuseRing) -> None:
    put_request(ring, 1, abi.Op.GETATTR, abi.GETATTR_IN.pack(0, 0, 0), b"", unique=6)
    h = HEADER_SLOT
    ENT_IN_OUT.pack_into(ring.headers, h + ENT_OFFSET, 0, 6, 10_000, 0)  # more payload than the length says
    data, _ = ring.request(1)
    with pytest.raises(abi.Malformed):
        abi.parse_header(data)


def test_an_answer_goes_to_the_out_header_and_the_payload(ring: FuseRing) -> None:
    body = abi.ATTR_OUT.pack(1, 0, 0) + bytes(88)
    ring.commit(2, 44, [abi.OUT_HEADER.pack(16 + len(body), 0, 44), body[:10], memoryview(body)[10:]])
    h, p = 2 * HEADER_SLOT, 2 * PAYLOAD
    assert abi.OUT_HEADER.unpack_from(ring.headers, h) == (16 + len(body), 0, 44)
    assert ENT_IN_OUT.unpack_from(ring.headers, h + ENT_OFFSET)[1:3] == (44, len(body))
    assert ring.payloads[p:p + len(body)] == body


def test_an_answer_in_one_piece_and_an_error_answer(ring: FuseRing) -> None:
    ring.commit(1, 8, [abi.reply(8, b"xyz")])
    assert ENT_IN_OUT.unpack_from(ring.headers, HEADER_SLOT + ENT_OFFSET)[2] == 3
    assert ring.payloads[PAYLOAD:PAYLOAD + 3] == b"xyz"
    ring.commit(1, 9, [abi.error_reply(9, errno.ENOENT)])
    assert abi.OUT_HEADER.unpack_from(ring.headers, HEADER_SLOT) == (16, -errno.ENOENT, 9)
    assert ENT_IN_OUT.unpack_from(ring.headers, HEADER_SLOT + ENT_OFFSET)[2] == 0


def test_an_answer_larger_than_the_entry_becomes_eio(ring: FuseRing) -> None:
    ring.commit(0, 3, [abi.OUT_HEADER.pack(16 + PAYLOAD + 1, 0, 3), bytes(PAYLOAD + 1)])
    assert abi.OUT_HEADER.unpack_from(ring.headers, 0) == (16, -errno.EIO, 3)
    assert ENT_IN_OUT.unpack_from(ring.headers, ENT_OFFSET)[2] == 0


def test_commits_reach_the_kernel_as_uring_commands(ring: FuseRing) -> None:
    ring.commit(0, 3, [abi.reply(3)])
    ring.ring.flush_work()
    results = ring.ring.completions()
    assert results == [(0, -errno.EBADF)]  # submitted: the kernel looked for descriptor -1


@pytest.mark.parametrize(("text", "count"), [("0-1", 2), ("0", 1), ("0,2-5", 5), ("0-3,8-11", 8)])
def test_possible_cpus_counts_the_kernels_queues(tmp_path: Path, text: str, count: int) -> None:
    path = tmp_path / "possible"
    path.write_text(text + "\n")
    assert possible_cpus(path) == count


def test_the_command_area_layout_matches_the_kernels() -> None:
    assert struct.calcsize("<QQH6x") == 24  # fuse_uring_cmd_req
    assert ENT_IN_OUT.size == 32 and ENT_OFFSET == 256  # fuse_uring_ent_in_out after in_out and op_in
