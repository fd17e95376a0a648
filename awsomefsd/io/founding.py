"""The founding record: what a device says about the metadata that describes it.

Metadata lives off the device, in each node's LMDB. A node whose state directory is empty (a new
node, a typo, a replaced system disk, a wiped hostPath) cannot tell from its own state whether the
device already holds a file system; if it initialised fresh metadata it would hand out blocks that
hold other files. So the device itself records it, in block 1 (a copy in block 2, both in the
reserved area before the data; docs/on-disk-format.md):

    FORMATTED  `format` wrote a superblock; no metadata exists yet: the first node may make it
    CLAIMED    a node is making the metadata now (awsomefsd/io/claim.py), renewing `seq`
    FOUNDED    metadata exists: for a single node, in the state directory `state_dir` of `host`
               (identified by `owner`, the metadata id kept in that store); for a cluster, with its
               members (`seeds` are addresses to join through; `ca_fingerprint` pins the cluster
               CA and `proof` binds it to the cluster token's secret)

Only `format` (and its `--force`) goes back from FOUNDED. A device formatted by a build that kept
no record has none (`read_founding` returns None): its metadata may exist somewhere, so nothing
may initialise over it either (awsomefsd/daemon/node.py says what to do).
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

from awsomefsd.io.checksum import crc32c
from awsomefsd.io.device import BlockDevice
from awsomefsd.io.layout import BLOCK_SIZE

MAGIC = b"AWFSFND1"
RECORD_VERSION = 1
PRIMARY_BLOCK = 1
COPY_BLOCK = 2
NIL = uuid.UUID(int=0)
MAX_HOST_BYTES = 255
MAX_STATE_DIR_BYTES = 1024
MAX_SEEDS = 16
MAX_SEED_BYTES = 128
FINGERPRINT_BYTES = 32
PROOF_BYTES = 32

# magic, version, state, mode, cluster_id, device_id, owner, seq, written_ns, ca_fingerprint, proof
_HEAD = struct.Struct("<8sHBB16s16s16sQq32s32s")
_CRC = struct.Struct("<I")
_CRC_OFFSET = BLOCK_SIZE - _CRC.size
assert _HEAD.size + 1 + MAX_HOST_BYTES + 2 + MAX_STATE_DIR_BYTES + 1 + MAX_SEEDS * (1 + MAX_SEED_BYTES) <= _CRC_OFFSET


class Stage(enum.IntEnum):
    FORMATTED = 1
    CLAIMED = 2
    FOUNDED = 3


class Mode(enum.IntEnum):
    NONE = 0
    SINGLE = 1
    CLUSTER = 2


@dataclass(frozen=True)
class FoundingRecord:
    """One decoded record. Construction checks every bound (ValueError)."""

    stage: Stage
    cluster_id: uuid.UUID
    device_id: uuid.UUID
    mode: Mode = Mode.NONE
    owner: uuid.UUID = NIL
    """Who claimed (CLAIMED: the claimant's id) or whose metadata this is (FOUNDED: the metadata
    id of a single node's store; the cluster id for a cluster)."""
    seq: int = 0
    written_ns: int = 0
    host: str = ""
    state_dir: str = ""
    seeds: tuple[str, ...] = ()
    ca_fingerprint: bytes = bytes(FINGERPRINT_BYTES)
    proof: bytes = bytes(PROOF_BYTES)

    def __post_init__(self) -> None:
        if len(self.host.encode()) > MAX_HOST_BYTES:
            raise ValueError(f"host name longer than {MAX_HOST_BYTES} bytes")
        if len(self.state_dir.encode()) > MAX_STATE_DIR_BYTES:
            raise ValueError(f"state directory path longer than {MAX_STATE_DIR_BYTES} bytes")
        if len(self.seeds) > MAX_SEEDS or any(len(s.encode()) > MAX_SEED_BYTES for s in self.seeds):
            raise ValueError(f"at most {MAX_SEEDS} seed addresses of {MAX_SEED_BYTES} bytes")
        if len(self.ca_fingerprint) != FINGERPRINT_BYTES or len(self.proof) != PROOF_BYTES:
            raise ValueError("bad CA fingerprint or proof length")
        if not 0 <= self.seq < 1 << 64:
            raise ValueError("sequence out of range")

    @property
    def founded(self) -> bool:
        return self.stage == Stage.FOUNDED

    def encode(self) -> bytes:
        block = bytearray(BLOCK_SIZE)
        _HEAD.pack_into(block, 0, MAGIC, RECORD_VERSION, self.stage, self.mode, self.cluster_id.bytes,
                        self.device_id.bytes, self.owner.bytes, self.seq, self.written_ns, self.ca_fingerprint,
                        self.proof)
        pos = _HEAD.size
        host = self.host.encode()
        block[pos] = len(host)
        block[pos + 1 : pos + 1 + len(host)] = host
        pos += 1 + len(host)
        state_dir = self.state_dir.encode()
        struct.pack_into("<H", block, pos, len(state_dir))
        block[pos + 2 : pos + 2 + len(state_dir)] = state_dir
        pos += 2 + len(state_dir)
        block[pos] = len(self.seeds)
        pos += 1
        for seed in self.seeds:
            raw = seed.encode()
            block[pos] = len(raw)
            block[pos + 1 : pos + 1 + len(raw)] = raw
            pos += 1 + len(raw)
        _CRC.pack_into(block, _CRC_OFFSET, crc32c(memoryview(block)[:_CRC_OFFSET]))
        return bytes(block)

    @classmethod
    def decode(cls, data: bytes) -> FoundingRecord | None:
        """The record in one block; None when the block holds none or one that fails its checks
        (a torn write: the other copy decides)."""
        if len(data) != BLOCK_SIZE or data[: len(MAGIC)] != MAGIC:
            return None
        if crc32c(data[:_CRC_OFFSET]) != _CRC.unpack_from(data, _CRC_OFFSET)[0]:
            return None
        try:
            (_magic, version, stage, mode, cluster, device, owner, seq, written_ns, fingerprint,
             proof) = _HEAD.unpack_from(data, 0)
            if version != RECORD_VERSION:
                return None
            pos = _HEAD.size
            host = data[pos + 1 : pos + 1 + data[pos]].decode()
            pos += 1 + data[pos]
            (length,) = struct.unpack_from("<H", data, pos)
            state_dir = data[pos + 2 : pos + 2 + length].decode()
            pos += 2 + length
            seeds = []
            count, pos = data[pos], pos + 1
            for _ in range(count):
                seeds.append(data[pos + 1 : pos + 1 + data[pos]].decode())
                pos += 1 + data[pos]
            return cls(Stage(stage), uuid.UUID(bytes=cluster), uuid.UUID(bytes=device), Mode(mode),
                       uuid.UUID(bytes=owner), seq, written_ns, host, state_dir, tuple(seeds), fingerprint, proof)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError):
            return None

    def describe(self) -> str:
        """Whose metadata this is, for an operator's error line."""
        if self.mode == Mode.CLUSTER:
            where = f" (members at {', '.join(self.seeds)})" if self.seeds else ""
            return f"the cluster {self.cluster_id}{where}"
        return f"the single node {self.host or '?'} in its state directory {self.state_dir or '?'}"


def read_founding(device: BlockDevice) -> FoundingRecord | None:
    """The device's record: the primary when intact, else the copy; None when neither is."""
    for block in (PRIMARY_BLOCK, COPY_BLOCK):
        record = FoundingRecord.decode(device.read(block * BLOCK_SIZE, BLOCK_SIZE))
        if record is not None:
            return record
    return None


def write_founding(device: BlockDevice, record: FoundingRecord) -> None:
    """Write the primary, then the copy, each made durable before the next: a torn write leaves
    one of them whole, old or new."""
    block = record.encode()
    for where in (PRIMARY_BLOCK, COPY_BLOCK):
        device.write(where * BLOCK_SIZE, block)
        device.sync()


def read_primary(device: BlockDevice) -> FoundingRecord | None:
    """The primary alone (the claim protocol compares what is there now, not a fallback)."""
    return FoundingRecord.decode(device.read(PRIMARY_BLOCK * BLOCK_SIZE, BLOCK_SIZE))
