"""Where things are on the shared device: reserved areas, the data area and allocation groups.

The device is addressed in blocks of BLOCK_SIZE bytes, the unit of allocation, of checksums and of
O_DIRECT alignment. The first and the last RESERVED_BYTES are reserved: the superblock is in block 0
and its copy in the last block, the rest is kept free for future format versions. The data area in
between is cut into allocation groups (AGs) of `ag_blocks` blocks each (the last one may be shorter),
so that the leader can grant whole groups to nodes and a node allocates inside its groups with no
round trip. A layout is a pure function of (size, AG size), both stored in the superblock.
"""

from __future__ import annotations

from dataclasses import dataclass

from awsomefsd.io.errors import DeviceTooSmallError

BLOCK_SIZE = 4096
MiB = 1 << 20
GiB = 1 << 30
RESERVED_BYTES = 1 * MiB
RESERVED_BLOCKS = RESERVED_BYTES // BLOCK_SIZE
MIN_DEVICE_BYTES = 64 * MiB
MAX_DEVICE_BYTES = 1 << 60
DEFAULT_AG_BYTES = 1 * GiB
MIN_DEFAULT_AG_BYTES = 16 * MiB
MIN_DEFAULT_AG_COUNT = 4
# An explicit AG size may be smaller than the default floor (tests want many groups on small
# images) but not absurdly small: every AG costs the leader a record and a grant.
MIN_AG_BYTES = 1 * MiB
MAX_AG_COUNT = 1 << 20

assert RESERVED_BYTES % BLOCK_SIZE == 0
assert MIN_DEVICE_BYTES > 2 * RESERVED_BYTES


@dataclass(frozen=True)
class DeviceLayout:
    """The block geometry of a formatted device. Block numbers are absolute device blocks."""

    size_bytes: int
    ag_blocks: int

    def __post_init__(self) -> None:
        if self.size_bytes % BLOCK_SIZE != 0:
            raise ValueError(f"device size {self.size_bytes} is not a multiple of {BLOCK_SIZE}")
        if not MIN_DEVICE_BYTES <= self.size_bytes <= MAX_DEVICE_BYTES:
            raise ValueError(f"device size {self.size_bytes} outside [{MIN_DEVICE_BYTES}, {MAX_DEVICE_BYTES}]")
        if self.ag_blocks < MIN_AG_BYTES // BLOCK_SIZE:
            raise ValueError(f"allocation group of {self.ag_blocks} blocks is below {MIN_AG_BYTES} bytes")
        if self.ag_count > MAX_AG_COUNT:
            raise ValueError(f"{self.ag_count} allocation groups exceed the limit of {MAX_AG_COUNT}")

    @property
    def total_blocks(self) -> int:
        return self.size_bytes // BLOCK_SIZE

    @property
    def data_start_block(self) -> int:
        return RESERVED_BLOCKS

    @property
    def data_end_block(self) -> int:
        """First block past the data area (exclusive)."""
        return self.total_blocks - RESERVED_BLOCKS

    @property
    def data_blocks(self) -> int:
        return self.data_end_block - self.data_start_block

    @property
    def ag_count(self) -> int:
        return -(-self.data_blocks // self.ag_blocks)

    @property
    def superblock_copy_offset_bytes(self) -> int:
        """Byte offset of the superblock copy: the last block of the device."""
        return self.size_bytes - BLOCK_SIZE

    def ag_range(self, ag: int) -> tuple[int, int]:
        """(start_block, end_block) of allocation group `ag`, end exclusive; the last may be shorter."""
        if not 0 <= ag < self.ag_count:
            raise ValueError(f"allocation group {ag} outside [0, {self.ag_count})")
        start = self.data_start_block + ag * self.ag_blocks
        end = min(start + self.ag_blocks, self.data_end_block)
        assert start < end
        return start, end

    def ag_of(self, block: int) -> int:
        """The allocation group holding data block `block`."""
        if not self.data_start_block <= block < self.data_end_block:
            raise ValueError(
                f"block {block} outside the data area [{self.data_start_block}, {self.data_end_block})"
            )
        return (block - self.data_start_block) // self.ag_blocks

    def is_data_extent(self, start_block: int, count_blocks: int) -> bool:
        """True when [start, start+count) is a non-empty range inside the data area."""
        return count_blocks > 0 and self.data_start_block <= start_block and (
            start_block + count_blocks <= self.data_end_block
        )


def plan_layout(size_bytes: int, ag_size_bytes: int | None = None) -> DeviceLayout:
    """The layout for a device of `size_bytes` (rounded down to a whole block).

    By default AGs are 1 GiB, but a small device still gets at least 4 of them (so that a few nodes
    can each own one) as long as each stays at least 16 MiB. An explicit `ag_size_bytes` is rounded
    down to whole blocks and must be at least MIN_AG_BYTES.
    """
    if size_bytes < 0:
        raise ValueError(f"negative device size {size_bytes}")
    size_bytes -= size_bytes % BLOCK_SIZE
    if size_bytes < MIN_DEVICE_BYTES:
        raise DeviceTooSmallError(
            f"device holds {size_bytes} bytes but AwsomeFS needs at least {MIN_DEVICE_BYTES} "
            f"({MIN_DEVICE_BYTES // MiB} MiB): use a larger device or image"
        )
    if size_bytes > MAX_DEVICE_BYTES:
        raise ValueError(f"device size {size_bytes} exceeds the supported maximum of {MAX_DEVICE_BYTES} bytes")
    data_bytes = size_bytes - 2 * RESERVED_BYTES
    if ag_size_bytes is None:
        ag_bytes = min(DEFAULT_AG_BYTES, max(MIN_DEFAULT_AG_BYTES, data_bytes // MIN_DEFAULT_AG_COUNT))
    else:
        if ag_size_bytes < MIN_AG_BYTES:
            raise ValueError(f"allocation group size {ag_size_bytes} is below the minimum {MIN_AG_BYTES} bytes")
        ag_bytes = ag_size_bytes
    ag_blocks = ag_bytes // BLOCK_SIZE
    if -(-data_bytes // ag_bytes) > MAX_AG_COUNT:
        raise ValueError(
            f"allocation groups of {ag_bytes} bytes would make more than {MAX_AG_COUNT} groups: use larger ones"
        )
    layout = DeviceLayout(size_bytes=size_bytes, ag_blocks=ag_blocks)
    assert layout.ag_count >= 1
    assert layout.ag_range(layout.ag_count - 1)[1] == layout.data_end_block
    return layout
