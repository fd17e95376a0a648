"""The superblock: what a device is, to which cluster it belongs, and how it is laid out.

Two copies: block 0 and the last block of the device (as formatted). Each is one BLOCK_SIZE block
whose last 4 bytes are the CRC32C of everything before them; see docs/on-disk-format.md. The copy
exists so that a damaged block 0 does not orphan a device full of data: reading falls back to it,
and fsck rewrites the primary from it.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass

from awsomefsd.io.checksum import crc32c
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.errors import (
    CorruptSuperblockError,
    DeviceInUseError,
    DeviceSizeMismatchError,
    ForeignClusterError,
    NotFormattedError,
    UnsupportedFormatError,
)
from awsomefsd.io.founding import FoundingRecord, Stage, write_founding
from awsomefsd.io.layout import BLOCK_SIZE, MIN_DEVICE_BYTES, DeviceLayout, plan_layout

MAGIC = b"AWSOMEFS"
FORMAT_VERSION = 1
MAX_LABEL_BYTES = 256

# magic, format_version, block_size, cluster_id, device_id, size_bytes, ag_blocks, created_ns, label_len
_HEAD = struct.Struct("<8sII16s16sQQqH")
_CRC = struct.Struct("<I")
_CRC_OFFSET = BLOCK_SIZE - _CRC.size
assert _HEAD.size + MAX_LABEL_BYTES <= _CRC_OFFSET


@dataclass(frozen=True)
class Superblock:
    """The decoded superblock. Construction validates every field (ValueError when impossible)."""

    format_version: int
    cluster_id: uuid.UUID
    device_id: uuid.UUID
    block_size: int
    size_bytes: int
    ag_blocks: int
    created_ns: int
    label: str

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format version {self.format_version}, expected {FORMAT_VERSION}")
        if not isinstance(self.cluster_id, uuid.UUID) or not isinstance(self.device_id, uuid.UUID):
            raise TypeError("cluster_id and device_id must be uuid.UUID")
        if self.cluster_id.int == 0 or self.device_id.int == 0:
            raise ValueError("nil cluster or device id")
        if self.block_size != BLOCK_SIZE:
            raise ValueError(f"block size {self.block_size}, this build uses {BLOCK_SIZE}")
        if self.created_ns < 0:
            raise ValueError(f"negative creation time {self.created_ns}")
        if len(self.label.encode()) > MAX_LABEL_BYTES:
            raise ValueError(f"label longer than {MAX_LABEL_BYTES} bytes")
        if "\0" in self.label:
            raise ValueError("label contains a NUL character")
        self.layout  # noqa: B018  (validates size and AG size)

    @property
    def layout(self) -> DeviceLayout:
        return DeviceLayout(size_bytes=self.size_bytes, ag_blocks=self.ag_blocks)

    def encode(self) -> bytes:
        """Exactly BLOCK_SIZE bytes: fixed header, label, zero padding, CRC32C of all that."""
        label = self.label.encode()
        block = bytearray(BLOCK_SIZE)
        _HEAD.pack_into(block, 0, MAGIC, self.format_version, self.block_size, self.cluster_id.bytes,
                        self.device_id.bytes, self.size_bytes, self.ag_blocks, self.created_ns, len(label))
        block[_HEAD.size : _HEAD.size + len(label)] = label
        _CRC.pack_into(block, _CRC_OFFSET, crc32c(memoryview(block)[:_CRC_OFFSET]))
        return bytes(block)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Superblock:
        """Parse one superblock block. NotFormattedError without the magic, CorruptSuperblockError
        (UnsupportedFormatError for a newer format) when it cannot be trusted."""
        data = bytes(data)
        if len(data) != BLOCK_SIZE:
            raise ValueError(f"a superblock is {BLOCK_SIZE} bytes, got {len(data)}")
        if data[: len(MAGIC)] != MAGIC:
            what = "blank" if not any(data) else "other data"
            raise NotFormattedError(f"no AwsomeFS superblock ({what})")
        (stored_crc,) = _CRC.unpack_from(data, _CRC_OFFSET)
        if crc32c(data[:_CRC_OFFSET]) != stored_crc:
            raise CorruptSuperblockError("superblock checksum mismatch")
        magic, version, block_size, cluster, device, size_bytes, ag_blocks, created_ns, label_len = (
            _HEAD.unpack_from(data, 0)
        )
        assert magic == MAGIC
        if version != FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"superblock format version {version}; this awsomefsd reads version {FORMAT_VERSION}: "
                "upgrade awsomefsd"
            )
        if label_len > MAX_LABEL_BYTES:
            raise CorruptSuperblockError(f"superblock label length {label_len} exceeds {MAX_LABEL_BYTES}")
        try:
            label = data[_HEAD.size : _HEAD.size + label_len].decode()
            return cls(version, uuid.UUID(bytes=cluster), uuid.UUID(bytes=device), block_size, size_bytes,
                       ag_blocks, created_ns, label)
        except (ValueError, TypeError) as exc:
            raise CorruptSuperblockError(f"superblock holds impossible values: {exc}") from None


@dataclass(frozen=True)
class SuperblockReading:
    """The superblock in use, and which of the two copies were intact and identical to it."""

    superblock: Superblock
    primary_ok: bool
    copy_ok: bool


def _read_at(dev: BlockDevice, offset_bytes: int) -> Superblock | NotFormattedError | CorruptSuperblockError:
    try:
        return Superblock.decode(dev.read(offset_bytes, BLOCK_SIZE))
    except (NotFormattedError, CorruptSuperblockError) as exc:
        return exc


def _raw_size_bytes(dev: BlockDevice) -> int | None:
    """The size field of a primary that has the magic but failed its checksum, if plausible: where
    to look for the copy when the device has grown since it was formatted."""
    data = dev.read(0, BLOCK_SIZE)
    if data[: len(MAGIC)] != MAGIC:
        return None
    size_bytes = _HEAD.unpack_from(data, 0)[5]
    if size_bytes % BLOCK_SIZE or not MIN_DEVICE_BYTES <= size_bytes <= dev.size_bytes:
        return None
    return size_bytes


def read_superblock(dev: BlockDevice) -> SuperblockReading:
    """The device's superblock: the primary if intact, else the copy in the last block.

    Raises NotFormattedError when neither slot holds a superblock, CorruptSuperblockError when at
    least one does but none is intact, UnsupportedFormatError for a newer format, and
    DeviceSizeMismatchError when the device is smaller than the superblock says.
    """
    if dev.size_bytes < BLOCK_SIZE:
        raise NotFormattedError(f"{dev.path} is empty ({dev.size_bytes} bytes): format it with awsomefsd format")
    primary = _read_at(dev, 0)
    if isinstance(primary, UnsupportedFormatError):
        raise UnsupportedFormatError(f"{dev.path}: {primary}")
    copy_offsets: list[int] = []
    if isinstance(primary, Superblock):
        _check_size(dev, primary)
        copy_offsets.append(primary.layout.superblock_copy_offset_bytes)
    else:
        if dev.size_bytes >= 2 * BLOCK_SIZE:
            copy_offsets.append(dev.size_bytes - BLOCK_SIZE)
        raw_size = _raw_size_bytes(dev) if isinstance(primary, CorruptSuperblockError) else None
        if raw_size is not None and raw_size - BLOCK_SIZE not in copy_offsets:
            copy_offsets.append(raw_size - BLOCK_SIZE)
    copies = [_read_at(dev, offset) for offset in copy_offsets]
    for found in copies:
        if isinstance(found, UnsupportedFormatError):
            raise UnsupportedFormatError(f"{dev.path}: superblock copy: {found}")
    copy = next((c for c in copies if isinstance(c, Superblock)), None)
    if isinstance(primary, Superblock):
        return SuperblockReading(primary, primary_ok=True, copy_ok=copy == primary)
    if copy is not None:
        _check_size(dev, copy)
        return SuperblockReading(copy, primary_ok=False, copy_ok=True)
    if any(isinstance(found, CorruptSuperblockError) for found in (primary, *copies)):
        raise CorruptSuperblockError(
            f"{dev.path}: both superblocks are damaged (primary: {primary}; copy: "
            f"{'; '.join(str(c) for c in copies) or 'none'}): the device cannot be identified; restore "
            "it from a backup, or reformat it with --force if its data is expendable"
        )
    raise NotFormattedError(f"{dev.path} is not formatted (no AwsomeFS superblock): run awsomefsd format")


def _check_size(dev: BlockDevice, sb: Superblock) -> None:
    if dev.size_bytes < sb.size_bytes:
        raise DeviceSizeMismatchError(
            f"{dev.path} is {dev.size_bytes} bytes but was formatted with {sb.size_bytes}: it has shrunk "
            "and the data at its end is gone; restore its original size"
        )


def write_superblocks(dev: BlockDevice, sb: Superblock) -> None:
    """Write the primary and the copy of `sb`, then fdatasync (format, and fsck's repair)."""
    _check_size(dev, sb)
    block = sb.encode()
    dev.write(0, block)
    dev.write(sb.layout.superblock_copy_offset_bytes, block)
    dev.sync()


def check_cluster(sb: Superblock, expected_cluster_id: uuid.UUID | str) -> None:
    """Raise ForeignClusterError unless the device belongs to `expected_cluster_id`."""
    expected = expected_cluster_id if isinstance(expected_cluster_id, uuid.UUID) else uuid.UUID(expected_cluster_id)
    if sb.cluster_id != expected:
        raise ForeignClusterError(
            f"device {sb.device_id} belongs to cluster {sb.cluster_id}, not to this node's cluster "
            f"{expected}: refusing to use it; check the device path"
        )


def format_device(
    dev: BlockDevice,
    *,
    cluster_id: uuid.UUID,
    label: str = "",
    force: bool = False,
    ag_size_bytes: int | None = None,
    now_ns: int | None = None,
    under_claim: bool = False,
) -> Superblock:
    """Write a fresh superblock (new device id) for `cluster_id`, both copies, synced.

    Refuses (DeviceInUseError) a device that a running daemon on this machine has open, even with
    `force`: that file system is live. Refuses (ForeignClusterError) a device that holds an intact
    superblock of another cluster, in either slot, unless `force`; reformatting for the same
    cluster is allowed. Data blocks are not touched: metadata lives off the device, so a fresh
    superblock is a fresh filesystem.
    """
    if not isinstance(cluster_id, uuid.UUID):
        raise TypeError(f"cluster_id must be a uuid.UUID, got {type(cluster_id).__name__}")
    layout = plan_layout(dev.size_bytes, ag_size_bytes)
    offsets = {0, dev.size_bytes - BLOCK_SIZE}
    primary = _read_at(dev, 0)
    if isinstance(primary, Superblock) and primary.size_bytes <= dev.size_bytes:
        offsets.add(primary.layout.superblock_copy_offset_bytes)
    found = [sb for sb in (primary if offset == 0 else _read_at(dev, offset) for offset in sorted(offsets))
             if isinstance(sb, Superblock)]
    # Under a founding claim (awsomefsd/io/claim.py) the device is blank: no file system is live on
    # it, and nodes waiting for the claim may hold it open.
    users = [] if under_claim else dev.claim_exclusive()
    if users:
        whose = (f"cluster {found[0].cluster_id} (label {found[0].label!r})" if found else "a file system")
        pids = ", ".join(str(p) for p in users if p) or "unknown"
        raise DeviceInUseError(f"{dev.path} is live: {whose} is in use by a running awsomefsd on this machine "
                               f"(pid {pids}); stop it before formatting (--force does not override this)")
    try:
        if not force:
            for other in found:
                if other.cluster_id != cluster_id:
                    raise ForeignClusterError(
                        f"{dev.path} holds a superblock of cluster {other.cluster_id} (label {other.label!r}, "
                        f"device {other.device_id}), not of cluster {cluster_id}; no daemon on this machine uses "
                        "it, but nodes elsewhere may: use --force to overwrite it (this destroys that cluster's data)"
                    )
        sb = Superblock(
            format_version=FORMAT_VERSION,
            cluster_id=cluster_id,
            device_id=uuid.uuid4(),
            block_size=BLOCK_SIZE,
            size_bytes=layout.size_bytes,
            ag_blocks=layout.ag_blocks,
            created_ns=time.time_ns() if now_ns is None else now_ns,
            label=label,
        )
        write_superblocks(dev, sb)
        # A fresh file system has no metadata yet: whatever the record said of the old one is void.
        # (`under_claim`: a founder formats a blank device under its claim, which the record holds.)
        if not under_claim:
            write_founding(dev, FoundingRecord(Stage.FORMATTED, sb.cluster_id, sb.device_id, written_ns=sb.created_ns))
    finally:
        if not under_claim:
            dev.release_exclusive()
    return sb
