"""Metadata records: the typed values the metadata client hands out, and the binary layout of
the LMDB tables' keys and values (which only `meta/` uses).

Keys are big-endian so that LMDB's byte order is numeric order: a cursor walks a directory's
entries, or a file's extents, as one contiguous range. docs/on-disk-format.md describes every table.

Outside `meta/` only the dataclasses, the limits and the namespace's fixed inodes are used: code
there never sees a key, a packed value or a JSON record.
"""

from __future__ import annotations

import errno
import functools
import json
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.errors import FsError

U64 = struct.Struct(">Q")
U64_PAIR = struct.Struct(">QQ")
ROOT_INO = 1
MAX_NAME_BYTES = 255
MAX_SYMLINK_BYTES = 4095
MAX_XATTR_NAME_BYTES = 255
MAX_XATTR_VALUE_BYTES = 64 * 1024
MAX_XATTR_TOTAL_BYTES = 1024 * 1024  # names and values of one inode
MAX_XATTR_LIST_BYTES = 64 * 1024  # its names as listxattr returns them (the kernel's XATTR_LIST_MAX)
MAX_FILE_SIZE_BYTES = 1 << 60
MAX_EXTENT_BLOCKS = 256  # one file-map record covers at most 1 MiB: keeps values and rewrites small
MAX_RANGE_BLOCKS = 1 << 18
"""Blocks one PunchHole or CloneRange may cover (1 GiB): bounds the transaction every member
applies. The file layer splits larger requests (copy_file_range may return a short count)."""
MAX_HARD_LINKS = 65000
MIN_TIME_NS = -(1 << 63)
MAX_TIME_NS = (1 << 63) - 1
"""An inode's times are signed 64-bit nanoseconds since 1970: 1677-09-21 to 2262-04-11. A time
set outside is stored as the nearest end (`clamp_time_ns`), as ext4 stores one outside its own
range (1901 to 2446) as the nearest end."""
MAX_ID = (1 << 32) - 2
"""The largest uid or gid: (uid_t)-1 is no owner (chown's "leave it"), which Linux refuses."""
MAX_RDEV = (1 << 32) - 1
"""A device number as the kernel holds one (dev_t: 12 bits major, 20 bits minor)."""
FILE_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                        stat.S_IFSOCK})
VOLUMES_INO = 2  # /.volumes: one directory per volume
SNAPSHOTS_INO = 3  # /.snapshots: one read-only directory per snapshot
CONFLICTS_INO = 4  # /.conflicts: the losing file contents of cross-site conflicts (meta/sites/conflicts.py), made when needed

_INODE = struct.Struct("<IIIIQqqqQQQQQ")
INODE_MODE = struct.Struct("<I")
"""The packed inode's first field: a listing reads an entry's type from it without decoding the rest."""


u64: Callable[[int], bytes] = U64.pack
"""An inode number or counter as an 8-byte big-endian key: the bound method itself, since every
command calls it several times (a wrapper's frame was a visible share of an apply)."""


def read_u64(data: bytes, offset: int = 0) -> int:
    return U64.unpack_from(data, offset)[0]


@dataclass(slots=True)
class Inode:
    """A file's attributes. `blocks` counts allocated data blocks (what quotas and st_blocks use)."""

    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    volume: int = 0
    blocks: int = 0
    parent: int = 0  # directories only: the one parent, for `..` and rename cycle checks
    generation: int = 0

    def pack(self) -> bytes:
        return _INODE.pack(
            self.mode, self.uid, self.gid, self.nlink, self.size, self.atime_ns, self.mtime_ns,
            self.ctime_ns, self.rdev, self.volume, self.blocks, self.parent, self.generation,
        )

    @classmethod
    def unpack(cls, ino: int, data: bytes) -> Inode:
        return cls(ino, *_INODE.unpack(data))

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def dentry_key(parent: int, name: bytes) -> bytes:
    return U64.pack(parent) + name


def dentry_value(child: int, cookie: int) -> bytes:
    return U64_PAIR.pack(child, cookie)


def read_dentry_value(data: bytes) -> tuple[int, int]:
    """(child inode, readdir cookie)."""
    return U64_PAIR.unpack(data)  # type: ignore[return-value]


def cookie_key(parent: int, cookie: int) -> bytes:
    return U64_PAIR.pack(parent, cookie)


def xattr_key(ino: int, name: bytes) -> bytes:
    return U64.pack(ino) + name


def fmap_key(ino: int, file_block: int) -> bytes:
    return U64_PAIR.pack(ino, file_block)


_FMAP_HEAD = struct.Struct(">QI")


@dataclass(frozen=True, slots=True)
class Extent:
    """`count` file blocks starting at `file_block` stored at device block `dev_block`.

    `checksums` holds one little-endian CRC32C per block. Records never overlap within a file and
    never exceed MAX_EXTENT_BLOCKS.

    An extent without checksums is *unwritten* (fallocate's reservation, design note 43): its
    blocks are the file's, counted in its size on disk, and read as zeros whatever the device
    holds there. The first write to such a block goes in place (the block holds nothing anyone
    reads); the WriteData that commits it turns the block into an ordinary one.
    """

    file_block: int
    dev_block: int
    count: int
    checksums: bytes

    def pack_value(self) -> bytes:
        return _FMAP_HEAD.pack(self.dev_block, self.count) + self.checksums

    @classmethod
    def unpack(cls, file_block: int, value: bytes) -> Extent:
        dev_block, count = _FMAP_HEAD.unpack_from(value)
        return cls(file_block, dev_block, count, bytes(value[_FMAP_HEAD.size :]))

    @staticmethod
    def written_run(file_block: int, value: bytes, first: int, end: int) -> tuple[int, bytes] | None:
        """From the record of the extent starting at `file_block`, when it is written, on the
        device (not tiered) and holds every block of [first, end): the device block of `first`
        and those blocks' checksums; None otherwise. `unpack` without the object and the copy
        of every other block's checksum (the common read looks up one run)."""
        head = _FMAP_HEAD.size
        dev_block, count = _FMAP_HEAD.unpack_from(value)
        if file_block > first or file_block + count < end or dev_block >= TIER_BASE_BLOCK or len(value) <= head:
            return None
        return dev_block + first - file_block, bytes(value[head + 4 * (first - file_block) : head + 4 * (end - file_block)])

    @property
    def end_block(self) -> int:
        return self.file_block + self.count

    @property
    def unwritten(self) -> bool:
        """Reserved, never written: reads as zeros, carries no checksums."""
        return not self.checksums

    def slice(self, first: int, end: int) -> Extent:
        """The part of this extent covering file blocks [first, end)."""
        assert self.file_block <= first < end <= self.end_block, (self, first, end)
        skip = first - self.file_block
        return Extent(first, self.dev_block + skip, end - first, self.checksums[4 * skip : 4 * (end - self.file_block)])


# -- tiered data (design note 47) -------------------------------------------------------------------
TIER_BASE_BLOCK = 1 << 52
"""Block addresses from here on are not on the device: they name blocks of objects in the object
store. A file-map record, a reference count or a delayed free holds them like device blocks, so
snapshots, clones and the grace period work on tiered data unchanged."""
MAX_OBJECTS_PER_COMMAND = 4096
"""Objects one AbandonTierObjects or ForgetTierObjects may name (bounds the transaction)."""
OBJECT_SPAN_BLOCKS = 1 << 16
"""Addresses each object owns (256 MiB): object `n` is blocks [TIER_BASE_BLOCK + n * span, + span)."""


def is_tiered(block: int) -> bool:
    """Is this block address in an object rather than on the device?"""
    return block >= TIER_BASE_BLOCK


def object_block(object_id: int, offset_blocks: int = 0) -> int:
    """The address of block `offset_blocks` of object `object_id`."""
    assert object_id > 0 and 0 <= offset_blocks < OBJECT_SPAN_BLOCKS, (object_id, offset_blocks)
    return TIER_BASE_BLOCK + object_id * OBJECT_SPAN_BLOCKS + offset_blocks


def object_of(block: int) -> tuple[int, int]:
    """(object id, block offset in it) of a tiered block address."""
    assert is_tiered(block), block
    return divmod(block - TIER_BASE_BLOCK, OBJECT_SPAN_BLOCKS)


TierObjectState = Literal["pending", "live", "dead"]


@dataclass(frozen=True, slots=True)
class TierObject:
    """An object of the object store, as the log knows it. `pending`: planned, maybe being
    uploaded, nothing points into it yet; `live`: `blocks` long, `live_blocks` of them still
    referenced; `dead`: nothing points into it, so it is to be deleted from the store (since
    `changed_ns`) and then forgotten."""

    id: int
    state: TierObjectState
    blocks: int
    live_blocks: int
    created_ns: int
    changed_ns: int

    @property
    def bytes(self) -> int:
        return self.blocks * BLOCK_SIZE


def blocks_for(size_bytes: int) -> int:
    return (size_bytes + BLOCK_SIZE - 1) // BLOCK_SIZE


def check_name(name: bytes) -> None:
    """A valid new directory entry name, or the FsError mknod/link/rename answer."""
    if len(name) > MAX_NAME_BYTES:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, "invalid file name")
    if name in (b".", b".."):
        raise FsError(errno.EEXIST)


def check_xattr_name(name: bytes) -> None:
    """An extended attribute's name of 1 to 255 bytes, or ERANGE as Linux answers."""
    if not 0 < len(name) <= MAX_XATTR_NAME_BYTES:
        raise FsError(errno.ERANGE, "extended attribute name empty or too long")


def clamp_time_ns(time_ns: int) -> int:
    """The time an inode stores for `time_ns` (see MIN_TIME_NS)."""
    return min(max(time_ns, MIN_TIME_NS), MAX_TIME_NS)


def check_times(*times_ns: int | None) -> None:
    """Times a command carries fit the inode (the file layer clamps what callers set). A loop, not
    a generator: every create and setattr asks (issue 40's per-request cost)."""
    for t in times_ns:
        if t is not None and not MIN_TIME_NS <= t <= MAX_TIME_NS:
            raise FsError(errno.EINVAL, "a time outside 1677-09-21 .. 2262-04-11")


def check_owner(uid: int | None, gid: int | None) -> None:
    """A uid and gid a file may have (None: unchanged), or EINVAL as chown(2) answers."""
    if (uid is not None and not 0 <= uid <= MAX_ID) or (gid is not None and not 0 <= gid <= MAX_ID):
        raise FsError(errno.EINVAL, "no such user or group id")


def check_new_inode(mode: int, uid: int, gid: int, rdev: int) -> None:
    """The values mknod(2) may give a new inode: one of the seven file types with permission
    bits only, an owner, a device number; EINVAL otherwise, as mknod(2) answers."""
    if not 0 <= mode <= 0xFFFF or stat.S_IFMT(mode) not in FILE_TYPES:
        raise FsError(errno.EINVAL, "not a file type")
    if not 0 <= rdev <= MAX_RDEV:
        raise FsError(errno.EINVAL, "not a device number")
    check_owner(uid, gid)


def volume_dir_name(volume: int) -> bytes:
    """The volume's directory in /.volumes."""
    return b"vol-%016x" % volume


def snapshot_dir_name(snapshot: int) -> bytes:
    """The snapshot's directory in /.snapshots."""
    return b"snap-%016x" % snapshot


# -- what the metadata client returns (awsomefsd/meta/client.py) ------------------------------------
VolumeKind = Literal["volume", "snapshot"]


@dataclass(frozen=True, slots=True)
class Volume:
    """A volume (quota'd tree under /.volumes) or a snapshot (read-only copy under /.snapshots).

    `capacity_bytes` 0 is no quota (snapshots); `source_kind`/`source_id` name what a clone or a
    snapshot was made from ("" and 0 for a new, empty volume)."""

    id: int
    kind: VolumeKind
    name: str
    root: int
    capacity_bytes: int
    inode_limit: int
    used_blocks: int
    used_inodes: int
    created_ns: int
    source_kind: Literal["", "volume", "snapshot"]
    source_id: int

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * BLOCK_SIZE


@dataclass(frozen=True, slots=True)
class Member:
    """A cluster member. `epoch` is its liveness-lease generation; `expired` means the leader
    declared that lease over (it must renew under the current epoch to come back)."""

    node: int
    name: str
    address: str
    join_address: str
    serial: str  # its certificate's serial (hex), "" until issued
    state: Literal["active", "removed"]
    epoch: int
    expired: bool
    joined_ns: int

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True, slots=True)
class Orphan:
    """An unlinked inode that may still be open. In a cluster `holders` are the members that must
    each release it before it is deleted (empty on a single node)."""

    ino: int
    holders: tuple[int, ...]


@functools.lru_cache(maxsize=1024)
def pack_holders(holders: tuple[int, ...]) -> bytes:
    """An orphan mark's value: its holders as a JSON list, b"" for none (the format every replica
    stores). Memoized, as `unpack_holders`: a cluster has few distinct holder lists, and each
    unlink on a 3-node cluster encoded one and decoded and re-encoded three per member (about a
    tenth of a follower's apply during an unlink burst)."""
    return json.dumps(list(holders)).encode() if holders else b""


@functools.lru_cache(maxsize=1024)
def unpack_holders(raw: bytes) -> tuple[int, ...]:
    """The holders an orphan mark's value lists (`pack_holders`)."""
    return tuple(json.loads(raw)) if raw else ()


@dataclass(frozen=True, slots=True)
class DeferredFree:
    """Superseded extents `(device block, count)` that return to free space at `not_before_ns`."""

    seq: int
    not_before_ns: int
    extents: tuple[tuple[int, int], ...]

    @property
    def blocks(self) -> int:
        return sum(n for _, n in self.extents)


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What InitCluster recorded: the CA (certificate and key, PEM), the join token's verifier and
    how many voters the cluster aims for."""

    ca_cert_pem: bytes
    ca_key_pem: bytes
    join_verifier: bytes
    voters_target: int


@dataclass(frozen=True, slots=True)
class Applied:
    """What an ApplyRemote (another site's batch, meta/sites/apply.py) did: the conflicts it made, and
    what a kernel may cache that changed (directory entries as (parent, name), inodes), for the
    mount's invalidations."""

    conflicts: int
    entries: tuple[tuple[int, bytes], ...]
    inodes: tuple[int, ...]
    apply_s: float = field(default=0.0, compare=False)
    """How long this replica took to apply the batch: not state (each replica's differs, and only
    the proposer hears it), the cost the receiver sizes its next slice by on a cluster, where the
    proposal's wall time is mostly the log's round trip (repl/receiver.py `Receiver._slice_cost`)."""
