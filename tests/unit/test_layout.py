"""Device layout: reserved areas, data area and allocation groups."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from awsomefsd.io.errors import DeviceError, DeviceTooSmallError
from awsomefsd.io.layout import (
    BLOCK_SIZE,
    MIN_DEVICE_BYTES,
    RESERVED_BLOCKS,
    DeviceLayout,
    GiB,
    MiB,
    plan_layout,
)


def test_minimum_device_gets_four_groups_of_16_mib() -> None:
    layout = plan_layout(MIN_DEVICE_BYTES)
    assert layout.ag_blocks * BLOCK_SIZE == 16 * MiB
    assert layout.data_start_block == RESERVED_BLOCKS == 256
    assert layout.data_end_block == MIN_DEVICE_BYTES // BLOCK_SIZE - 256
    assert layout.ag_count == 4
    start, end = layout.ag_range(3)
    assert end == layout.data_end_block
    assert end - start < layout.ag_blocks  # the last group is shorter


def test_medium_device_splits_into_four_groups() -> None:
    layout = plan_layout(100 * MiB)
    assert layout.ag_count == 4
    assert 16 * MiB < layout.ag_blocks * BLOCK_SIZE < 1 * GiB


def test_large_device_uses_1_gib_groups() -> None:
    layout = plan_layout(10 * GiB)
    assert layout.ag_blocks * BLOCK_SIZE == 1 * GiB
    assert layout.ag_count == 10


def test_size_is_rounded_down_to_whole_blocks() -> None:
    layout = plan_layout(MIN_DEVICE_BYTES + BLOCK_SIZE + 123)
    assert layout.size_bytes == MIN_DEVICE_BYTES + BLOCK_SIZE


def test_too_small_device_is_refused_with_a_device_error() -> None:
    with pytest.raises(DeviceTooSmallError, match="at least"):
        plan_layout(MIN_DEVICE_BYTES - BLOCK_SIZE)
    assert issubclass(DeviceTooSmallError, DeviceError)
    # rounding down can make a device too small
    with pytest.raises(DeviceTooSmallError):
        plan_layout(MIN_DEVICE_BYTES - 1)


def test_explicit_group_size() -> None:
    layout = plan_layout(256 * MiB, ag_size_bytes=8 * MiB)
    assert layout.ag_blocks == 2048
    assert layout.ag_count == -(-(254 * MiB // BLOCK_SIZE) // 2048)
    with pytest.raises(ValueError, match="minimum"):
        plan_layout(256 * MiB, ag_size_bytes=64 * 1024)


def test_ag_of_and_ag_range_reject_blocks_outside_the_data_area() -> None:
    layout = plan_layout(MIN_DEVICE_BYTES)
    with pytest.raises(ValueError):
        layout.ag_of(0)
    with pytest.raises(ValueError):
        layout.ag_of(layout.data_end_block)
    with pytest.raises(ValueError):
        layout.ag_range(layout.ag_count)
    assert layout.is_data_extent(layout.data_start_block, 1)
    assert not layout.is_data_extent(layout.data_end_block - 1, 2)


def test_layout_rejects_impossible_values() -> None:
    with pytest.raises(ValueError):
        DeviceLayout(size_bytes=MIN_DEVICE_BYTES + 1, ag_blocks=4096)
    with pytest.raises(ValueError):
        DeviceLayout(size_bytes=MIN_DEVICE_BYTES, ag_blocks=1)


@given(
    size_blocks=st.integers(MIN_DEVICE_BYTES // BLOCK_SIZE, (64 * GiB) // BLOCK_SIZE),
    ag_mib=st.one_of(st.none(), st.integers(1, 2048)),
)
def test_groups_tile_the_data_area(size_blocks: int, ag_mib: int | None) -> None:
    layout = plan_layout(size_blocks * BLOCK_SIZE, None if ag_mib is None else ag_mib * MiB)
    expected_start = layout.data_start_block
    for ag in (0, 1, layout.ag_count // 2, layout.ag_count - 2, layout.ag_count - 1):
        if not 0 <= ag < layout.ag_count:
            continue
        start, end = layout.ag_range(ag)
        assert start == layout.data_start_block + ag * layout.ag_blocks
        assert 0 < end - start <= layout.ag_blocks
        assert layout.ag_of(start) == ag and layout.ag_of(end - 1) == ag
    assert layout.ag_range(0)[0] == expected_start
    assert layout.ag_range(layout.ag_count - 1)[1] == layout.data_end_block
    if ag_mib is None:
        assert layout.ag_count >= 4 or layout.ag_blocks * BLOCK_SIZE == 16 * MiB
        assert 16 * MiB <= layout.ag_blocks * BLOCK_SIZE <= 1 * GiB
