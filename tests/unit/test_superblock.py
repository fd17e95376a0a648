"""Superblock format, the two copies, and refusing the wrong device."""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.io.checksum import crc32c
from awsomefsd.io.device import BlockDevice, create_image
from awsomefsd.io.errors import (
    CorruptSuperblockError,
    DeviceSizeMismatchError,
    DeviceTooSmallError,
    ForeignClusterError,
    NotFormattedError,
    UnsupportedFormatError,
)
from awsomefsd.io.layout import BLOCK_SIZE, MIN_DEVICE_BYTES, MiB
from awsomefsd.io.superblock import (
    FORMAT_VERSION,
    MAGIC,
    Superblock,
    check_cluster,
    format_device,
    read_superblock,
    write_superblocks,
)

CLUSTER = uuid.UUID("11111111-2222-3333-4444-555555555555")
OTHER = uuid.UUID("99999999-8888-7777-6666-555555555555")
SIZE = MIN_DEVICE_BYTES


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "device.img"
    create_image(path, SIZE)
    return path


@pytest.fixture
def dev(image: Path) -> Iterator[BlockDevice]:
    with BlockDevice.open(image) as device:
        yield device


def _sample() -> Superblock:
    return Superblock(FORMAT_VERSION, CLUSTER, uuid.uuid4(), BLOCK_SIZE, SIZE, 4096, 1_700_000_000_000_000_000, "lab")


def _smash(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        f.write(b"\xff\xee")


def _reseal(block: bytearray) -> bytes:
    struct.pack_into("<I", block, BLOCK_SIZE - 4, crc32c(bytes(block[: BLOCK_SIZE - 4])))
    return bytes(block)


def test_encode_decode_round_trip() -> None:
    sb = _sample()
    data = sb.encode()
    assert len(data) == BLOCK_SIZE
    assert data.startswith(MAGIC)
    assert Superblock.decode(data) == sb
    assert sb.layout.ag_blocks == 4096 and sb.layout.size_bytes == SIZE


def test_decode_blank_or_foreign_data_is_not_formatted() -> None:
    with pytest.raises(NotFormattedError, match="blank"):
        Superblock.decode(bytes(BLOCK_SIZE))
    with pytest.raises(NotFormattedError, match="other data"):
        Superblock.decode(b"\x53\xef" * (BLOCK_SIZE // 2))


def test_decode_detects_bit_flips_and_nonsense_fields() -> None:
    data = bytearray(_sample().encode())
    data[60] ^= 0x04
    with pytest.raises(CorruptSuperblockError, match="checksum"):
        Superblock.decode(bytes(data))
    nonsense = bytearray(_sample().encode())
    struct.pack_into("<I", nonsense, 12, 512)  # block size
    with pytest.raises(CorruptSuperblockError, match="impossible"):
        Superblock.decode(_reseal(nonsense))
    newer = bytearray(_sample().encode())
    struct.pack_into("<I", newer, 8, FORMAT_VERSION + 1)
    with pytest.raises(UnsupportedFormatError, match="upgrade"):
        Superblock.decode(_reseal(newer))


def test_label_limits() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(_sample(), label="x" * 257)
    assert Superblock.decode(dataclasses.replace(_sample(), label="ü" * 128).encode()).label == "ü" * 128


def test_format_writes_both_copies(dev: BlockDevice, image: Path) -> None:
    sb = format_device(dev, cluster_id=CLUSTER, label="prod", now_ns=123)
    assert (sb.cluster_id, sb.label, sb.created_ns, sb.size_bytes) == (CLUSTER, "prod", 123, SIZE)
    raw = image.read_bytes()
    assert raw[:BLOCK_SIZE] == raw[-BLOCK_SIZE:] == sb.encode()
    reading = read_superblock(dev)
    assert reading.superblock == sb and reading.primary_ok and reading.copy_ok


def test_corrupt_primary_falls_back_to_the_copy_and_repair_rewrites_it(dev: BlockDevice, image: Path) -> None:
    sb = format_device(dev, cluster_id=CLUSTER)
    _smash(image, 0)
    reading = read_superblock(dev)
    assert reading.superblock == sb
    assert (reading.primary_ok, reading.copy_ok) == (False, True)
    write_superblocks(dev, reading.superblock)
    reading = read_superblock(dev)
    assert (reading.primary_ok, reading.copy_ok) == (True, True)


def test_zeroed_primary_also_falls_back_to_the_copy(dev: BlockDevice, image: Path) -> None:
    sb = format_device(dev, cluster_id=CLUSTER)
    dev.write(0, bytes(BLOCK_SIZE))
    reading = read_superblock(dev)
    assert reading.superblock == sb and not reading.primary_ok


def test_corrupt_copy_is_reported(dev: BlockDevice, image: Path) -> None:
    sb = format_device(dev, cluster_id=CLUSTER)
    _smash(image, SIZE - BLOCK_SIZE)
    reading = read_superblock(dev)
    assert reading.superblock == sb
    assert (reading.primary_ok, reading.copy_ok) == (True, False)


def test_both_corrupt_is_a_clear_error(dev: BlockDevice, image: Path) -> None:
    format_device(dev, cluster_id=CLUSTER)
    _smash(image, 0)
    _smash(image, SIZE - BLOCK_SIZE)
    with pytest.raises(CorruptSuperblockError, match="both superblocks are damaged"):
        read_superblock(dev)


def test_blank_device_is_not_formatted(dev: BlockDevice) -> None:
    with pytest.raises(NotFormattedError, match="awsomefsd format"):
        read_superblock(dev)


def test_foreign_cluster_is_refused_and_force_overwrites(dev: BlockDevice) -> None:
    theirs = format_device(dev, cluster_id=OTHER, label="theirs")
    with pytest.raises(ForeignClusterError) as info:
        format_device(dev, cluster_id=CLUSTER)
    message = str(info.value)
    assert str(OTHER) in message and str(CLUSTER) in message and "--force" in message
    assert read_superblock(dev).superblock == theirs
    ours = format_device(dev, cluster_id=CLUSTER, force=True)
    assert read_superblock(dev).superblock == ours
    assert ours.device_id != theirs.device_id


def test_foreign_copy_alone_is_enough_to_refuse(dev: BlockDevice) -> None:
    format_device(dev, cluster_id=OTHER)
    dev.write(0, bytes(BLOCK_SIZE))
    with pytest.raises(ForeignClusterError):
        format_device(dev, cluster_id=CLUSTER)


def test_reformat_for_the_same_cluster_is_allowed(dev: BlockDevice) -> None:
    first = format_device(dev, cluster_id=CLUSTER)
    second = format_device(dev, cluster_id=CLUSTER, ag_size_bytes=4 * MiB)
    assert second.cluster_id == first.cluster_id and second.ag_blocks == 1024


def test_too_small_device_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.img"
    create_image(path, MIN_DEVICE_BYTES - BLOCK_SIZE)
    with BlockDevice.open(path) as dev, pytest.raises(DeviceTooSmallError):
        format_device(dev, cluster_id=CLUSTER)


def test_shrunk_device_is_refused(dev: BlockDevice, image: Path) -> None:
    format_device(dev, cluster_id=CLUSTER)
    os.truncate(image, SIZE - MiB)
    with BlockDevice.open(image) as shrunk, pytest.raises(DeviceSizeMismatchError, match="shrunk"):
        read_superblock(shrunk)


def test_grown_device_keeps_its_superblock_and_finds_the_copy(dev: BlockDevice, image: Path) -> None:
    sb = format_device(dev, cluster_id=CLUSTER)
    create_image(image, SIZE + 16 * MiB)
    with BlockDevice.open(image) as grown:
        assert read_superblock(grown).superblock == sb
        _smash(image, 0)
        reading = read_superblock(grown)
        assert reading.superblock == sb and not reading.primary_ok


def test_check_cluster() -> None:
    sb = _sample()
    check_cluster(sb, CLUSTER)
    check_cluster(sb, str(CLUSTER))
    with pytest.raises(ForeignClusterError, match=str(OTHER)):
        check_cluster(sb, OTHER)
