"""Per-block CRC32C: packing, verification, and the EIO error."""

from __future__ import annotations

import errno
import mmap
import random
import struct

import pytest

from awsomefsd.io.checksum import (
    ChecksumMismatch,
    block_checksums,
    crc32c,
    first_bad_block,
    verify_blocks,
)
from awsomefsd.io.layout import BLOCK_SIZE


def _data(blocks: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(blocks * BLOCK_SIZE)


def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283


def test_block_checksums_pack_one_little_endian_crc_per_block() -> None:
    data = _data(3)
    sums = block_checksums(data)
    assert len(sums) == 12
    for i in range(3):
        assert struct.unpack_from("<I", sums, 4 * i)[0] == crc32c(data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])


def test_every_buffer_kind_gives_the_same_checksums() -> None:
    data = _data(4)
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    expected = block_checksums(data)
    assert block_checksums(bytearray(data)) == expected
    assert block_checksums(buf) == expected
    assert block_checksums(memoryview(buf)[BLOCK_SIZE:]) == expected[4:]
    buf.close()  # no memoryview left exported


def test_partial_blocks_are_a_caller_bug() -> None:
    with pytest.raises(AssertionError):
        block_checksums(b"x" * (BLOCK_SIZE + 1))


def test_first_bad_block_finds_the_first_corrupt_block() -> None:
    data = bytearray(_data(8))
    sums = block_checksums(data)
    assert first_bad_block(data, sums) == -1
    data[5 * BLOCK_SIZE + 17] ^= 0x01
    assert first_bad_block(data, sums) == 5
    data[2 * BLOCK_SIZE] ^= 0x80
    assert first_bad_block(data, sums) == 2


def test_one_block_is_checked_as_any_other() -> None:
    """A 4 KiB read takes its own shorter path (one CRC): a flipped bit anywhere fails it."""
    data = bytearray(_data(1))
    sums = block_checksums(data)
    assert first_bad_block(memoryview(data), sums) == -1
    for at in (0, BLOCK_SIZE - 1):
        data[at] ^= 0x01
        assert first_bad_block(memoryview(data), sums) == 0
        data[at] ^= 0x01
    assert first_bad_block(data, bytes(reversed(sums))) == 0


def test_checksums_of_the_wrong_length_are_a_caller_bug() -> None:
    data = _data(2)
    with pytest.raises(AssertionError):
        first_bad_block(data, block_checksums(data)[:4])


def test_verify_blocks_raises_eio_naming_the_device_block() -> None:
    data = bytearray(_data(4))
    sums = block_checksums(data)
    verify_blocks(data, sums, first_device_block=1000)
    data[3 * BLOCK_SIZE] ^= 1
    with pytest.raises(ChecksumMismatch) as info:
        verify_blocks(data, sums, first_device_block=1000)
    assert info.value.errno == errno.EIO
    assert info.value.device_block == info.value.block == 1003
    assert isinstance(info.value, OSError)
    assert "1003" in str(info.value)
