"""Checks shared by the CSI servicers: capabilities, capacity ranges, parameters, paths, ids.

Each check raises `RpcAbort` with the status code the CSI spec assigns to that failure, so the
servicers read as the spec's happy path. `backend_errors()` is the single translation of the core's
`VolumeError`s into status codes.

The spec gives each RPC's errors but not their order; the servicers check in one order everywhere,
the one the spec's codes imply (docs/csi.md, "Error order"): REQUIRED fields present
(`require_fields`, INVALID_ARGUMENT), then each argument valid (INVALID_ARGUMENT, OUT_OF_RANGE),
then the objects named exist (NOT_FOUND; an id of the wrong shape names nothing), then their
state (ALREADY_EXISTS, FAILED_PRECONDITION). A request missing a field is INVALID_ARGUMENT whatever
else is wrong with it. The paths of NodeGetVolumeStats and NodeExpandVolume say where a volume is
and come after its existence (docs/csi.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from awsomefsd.csi import ids
from awsomefsd.csi.backend import (
    CapacityOutOfRange,
    InsufficientCapacity,
    VolumeAlreadyExists,
    VolumeBusy,
    VolumeNotFound,
)
from awsomefsd.csi.generated import csi_pb2
from awsomefsd.rpc.bridge import RpcAbort

ALIGN_BYTES = 4096  # volume capacities are whole blocks (BLOCK_SIZE, awsomefsd/io/layout.py)
DEFAULT_CAPACITY_BYTES = 1 << 30  # a CreateVolume without a capacity range gets 1 GiB
MAX_CAPACITY_BYTES = 1 << 50  # 1 PiB: far above any device, well inside int64
MAX_INODE_LIMIT = 1 << 40
MAX_CAPABILITIES = 16
MAX_MOUNT_FLAGS = 16
MAX_PATH_BYTES = 4096
MAX_PARAMETERS = 32
MAX_PAGE_ENTRIES = 1000
FS_TYPES = frozenset({"", "awsomefs", "fuse.awsomefs"})
# Flags a bind mount can honour (applied by a remount); `rw` is accepted and means the default.
MOUNT_FLAGS = frozenset({"ro", "rw", "nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime"})
PARAM_INODE_LIMIT = "inodeLimit"
# Keys the Kubernetes sidecars add (e.g. csi.storage.k8s.io/pvc/name with --extra-create-metadata).
K8S_PARAM_PREFIX = "csi.storage.k8s.io/"

T = TypeVar("T")
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})
SUPPORTED_MODES = frozenset(
    {
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.MULTI_NODE_READER_ONLY,
        Mode.MULTI_NODE_SINGLE_WRITER,
        Mode.MULTI_NODE_MULTI_WRITER,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    }
)


def invalid(message: str) -> RpcAbort:
    return RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RpcAbort:
    return RpcAbort(grpc.StatusCode.NOT_FOUND, message)


def require(value: object, field: str) -> None:
    """INVALID_ARGUMENT when a REQUIRED field is absent (empty string, zero, empty list/map)."""
    if not value:
        raise invalid(f"{field} is required")


def require_fields(request: Message, *fields: str) -> None:
    """INVALID_ARGUMENT naming the first of the REQUIRED `fields` the request lacks: a message
    field not set, an empty string, a repeated field or map without elements. The first check of
    every RPC that has REQUIRED fields."""
    for field in fields:
        value = getattr(request, field)
        require(request.HasField(field) if isinstance(value, Message) else value, field)


def capability_malformed(cap: csi_pb2.VolumeCapability) -> str | None:
    """What `cap` lacks that the spec requires (an access type, an access mode), or None."""
    if cap.WhichOneof("access_type") is None:
        return "volume_capability.access_type (mount or block) is required"
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        return "volume_capability.access_mode is required"
    if len(cap.mount.mount_flags) > MAX_MOUNT_FLAGS:
        return f"more than {MAX_MOUNT_FLAGS} mount_flags"
    return None


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why this plugin cannot serve `cap` (malformed, or asking what AwsomeFS volumes cannot
    do), or None when it can."""
    malformed = capability_malformed(cap)
    if malformed is not None:
        return malformed
    if cap.WhichOneof("access_type") == "block":
        return "block volumes are not supported: AwsomeFS volumes are directory trees (use a mount volume)"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        return f"access mode {cap.access_mode.mode} is not supported"
    if cap.mount.fs_type not in FS_TYPES:
        return f"fs_type {cap.mount.fs_type!r} is not supported (leave it empty or use 'awsomefs')"
    unknown = sorted({f for f in cap.mount.mount_flags if f not in MOUNT_FLAGS})
    if unknown:
        return f"mount flags {unknown} are not supported by a bind mount (allowed: {sorted(MOUNT_FLAGS)})"
    return None


def check_capabilities(caps: Iterable[csi_pb2.VolumeCapability], field: str) -> None:
    """INVALID_ARGUMENT unless every capability is present and servable."""
    caps = list(caps)
    require(caps, field)
    if len(caps) > MAX_CAPABILITIES:
        raise invalid(f"more than {MAX_CAPABILITIES} {field}")
    for cap in caps:
        problem = capability_problem(cap)
        if problem is not None:
            raise invalid(problem)


def check_capability(cap: csi_pb2.VolumeCapability, *,
                     unsupported: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
    """A malformed capability is INVALID_ARGUMENT; one the volume cannot serve is `unsupported`
    (the Node stage and publish tables call that "Exceeds capabilities": FAILED_PRECONDITION)."""
    malformed = capability_malformed(cap)
    if malformed is not None:
        raise invalid(malformed)
    problem = capability_problem(cap)
    if problem is not None:
        raise RpcAbort(unsupported, problem)


def check_capacity_range(rng: csi_pb2.CapacityRange) -> None:
    """INVALID_ARGUMENT for negative values (the argument check; whether a size fits is
    OUT_OF_RANGE, decided later by `capacity_from_range`)."""
    if rng.required_bytes < 0 or rng.limit_bytes < 0:
        raise invalid("capacity_range values must not be negative")


def capacity_from_range(rng: csi_pb2.CapacityRange, has_range: bool, default_bytes: int) -> int:
    """The capacity to provision for `rng`: at least required, at most limit, whole blocks.

    Negative values are INVALID_ARGUMENT; a range no block-aligned size satisfies, or beyond
    MAX_CAPACITY_BYTES, is OUT_OF_RANGE (the spec's code for an unsupported capacity range).
    """
    check_capacity_range(rng)
    required, limit = (rng.required_bytes, rng.limit_bytes) if has_range else (0, 0)
    if limit and required > limit:
        raise RpcAbort(grpc.StatusCode.OUT_OF_RANGE, f"required_bytes {required} exceeds limit_bytes {limit}")
    if required > MAX_CAPACITY_BYTES:
        raise RpcAbort(
            grpc.StatusCode.OUT_OF_RANGE, f"required_bytes {required} exceeds {MAX_CAPACITY_BYTES}"
        )
    want = required or (min(default_bytes, limit) if limit else default_bytes)
    capacity = -(-want // ALIGN_BYTES) * ALIGN_BYTES
    if limit and capacity > limit:
        capacity = limit // ALIGN_BYTES * ALIGN_BYTES
    capacity = min(capacity, MAX_CAPACITY_BYTES)
    if capacity < max(required, ALIGN_BYTES):
        raise RpcAbort(
            grpc.StatusCode.OUT_OF_RANGE,
            f"no whole number of {ALIGN_BYTES}-byte blocks fits required {required} / limit {limit}",
        )
    return capacity


def inode_limit_from_parameters(params: Mapping[str, str]) -> int:
    """The StorageClass parameters AwsomeFS understands; unknown keys are INVALID_ARGUMENT."""
    if len(params) > MAX_PARAMETERS:
        raise invalid(f"more than {MAX_PARAMETERS} parameters")
    inode_limit = 0
    for key, value in params.items():
        if key.startswith(K8S_PARAM_PREFIX):
            continue
        if key != PARAM_INODE_LIMIT:
            raise invalid(f"unknown parameter {key!r} (known: {PARAM_INODE_LIMIT})")
        if not value.isdigit() or not 0 <= int(value) <= MAX_INODE_LIMIT:
            raise invalid(f"{PARAM_INODE_LIMIT} must be an integer in 0..{MAX_INODE_LIMIT}")
        inode_limit = int(value)
    return inode_limit


def volume_id_or_not_found(volume_id: str, field: str = "volume_id") -> str:
    """A syntactically valid volume id; missing is INVALID_ARGUMENT, malformed names nothing
    (NOT_FOUND). Checked after every argument (see the module docstring)."""
    require(volume_id, field)
    if not ids.is_volume_id(volume_id):
        raise not_found(f"volume {volume_id[:80]!r} does not exist")
    return volume_id


def snapshot_id_or_not_found(snapshot_id: str, field: str = "snapshot_id") -> str:
    """As `volume_id_or_not_found`, for snapshot ids."""
    require(snapshot_id, field)
    if not ids.is_snapshot_id(snapshot_id):
        raise not_found(f"snapshot {snapshot_id[:80]!r} does not exist")
    return snapshot_id


def node_path(path: str, field: str) -> str:
    """An absolute, normalised node path (no `..`, no `//`, no NUL, bounded); else INVALID_ARGUMENT."""
    require(path, field)
    if "\x00" in path or len(path.encode()) > MAX_PATH_BYTES:
        raise invalid(f"{field} is not a valid path")
    pure = PurePosixPath(path)
    if not pure.is_absolute() or ".." in pure.parts or os.path.normpath(path) != path or path == "/":
        raise invalid(f"{field} must be an absolute, normalised path other than /: {path[:200]!r}")
    return path


def within(path: str, root: str) -> bool:
    """True when `path` is `root` or below it, after resolving both (symlinks included)."""
    real_path, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real_path, real_root]) == real_root


@contextmanager
def backend_errors() -> Iterator[None]:
    """Translate the core's VolumeErrors into the CSI spec's status codes."""
    try:
        yield
    except VolumeNotFound as exc:
        raise not_found(str(exc) or "not found") from exc
    except VolumeAlreadyExists as exc:
        raise RpcAbort(grpc.StatusCode.ALREADY_EXISTS, str(exc) or "already exists") from exc
    except CapacityOutOfRange as exc:
        raise RpcAbort(grpc.StatusCode.OUT_OF_RANGE, str(exc) or "capacity out of range") from exc
    except InsufficientCapacity as exc:
        raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "insufficient capacity") from exc
    except VolumeBusy as exc:
        raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, str(exc) or "volume busy") from exc


def page(
    items: Sequence[T],
    max_entries: int,
    starting_token: str,
    token_ok: Callable[[str], bool],
    key: Callable[[T], str],
) -> tuple[list[T], str]:
    """One page of `items` (sorted by `key`) starting at `starting_token`; (entries, next_token).

    The token is the id of the first entry of the page (ids are opaque and stable, and items are
    ordered by id, so deletions between pages never repeat or skip a survivor). A token that is not
    an id of the right shape is ABORTED, as the spec asks for an invalid starting_token.
    """
    if max_entries < 0:
        raise invalid("max_entries must not be negative")
    selected = list(items)
    if starting_token:
        if not token_ok(starting_token):
            raise RpcAbort(grpc.StatusCode.ABORTED, f"invalid starting_token {starting_token[:80]!r}")
        selected = [item for item in selected if key(item) >= starting_token]
    size = min(max_entries or MAX_PAGE_ENTRIES, MAX_PAGE_ENTRIES)
    entries, rest = selected[:size], selected[size:]
    return entries, key(rest[0]) if rest else ""
