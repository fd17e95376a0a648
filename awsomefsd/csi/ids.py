"""Opaque, path-safe identifiers for CSI volumes and snapshots.

A CSI id travels through Kubernetes objects and comes back in every later RPC, so it is untrusted
input. Ids have one fixed shape, `vol-` or `snap-` followed by 32 lowercase hex digits, and the CSI
layer checks that shape (`is_volume_id`, `is_snapshot_id`) before an id reaches the core or is
joined into a path: a traversal attempt such as `../../etc` simply names no volume.

Ids are derived from the CO's name with SHA-256 over a domain-separated input, so two
different names never share an id (128 bits of the digest) and a retried CreateVolume maps onto the
same id without any lookup. The core may use `derive_volume_id` / `derive_snapshot_id` or
`random_volume_id`; either way the shape is the same.
"""

from __future__ import annotations

import hashlib
import re
import secrets

VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"
ID_HEX_CHARS = 32
MAX_NAME_BYTES = 128  # the CSI spec's general limit for string fields

_VOLUME_ID_RE = re.compile(r"vol-[0-9a-f]{32}")
_SNAPSHOT_ID_RE = re.compile(r"snap-[0-9a-f]{32}")
# Names may be any Unicode but these control characters (CSI spec, CreateVolumeRequest.name).
_BANNED_NAME_CHARS_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def is_volume_id(value: str) -> bool:
    return _VOLUME_ID_RE.fullmatch(value) is not None


def is_snapshot_id(value: str) -> bool:
    return _SNAPSHOT_ID_RE.fullmatch(value) is not None


def name_problem(name: str) -> str | None:
    """Why `name` is not acceptable as a CO-supplied volume or snapshot name, or None."""
    if not name:
        return "name is required"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"name longer than {MAX_NAME_BYTES} bytes"
    if _BANNED_NAME_CHARS_RE.search(name):
        return "name contains control characters"
    return None


def _digest_hex(domain: str, name: str) -> str:
    return hashlib.sha256(f"awsomefs/{domain}\x00{name}".encode()).hexdigest()[:ID_HEX_CHARS]


def derive_volume_id(name: str) -> str:
    """The volume id for CO name `name`: stable across retries, distinct for distinct names."""
    assert name_problem(name) is None, name
    return VOLUME_PREFIX + _digest_hex("volume", name)


def derive_snapshot_id(name: str) -> str:
    assert name_problem(name) is None, name
    return SNAPSHOT_PREFIX + _digest_hex("snapshot", name)


def random_volume_id() -> str:
    return VOLUME_PREFIX + secrets.token_hex(ID_HEX_CHARS // 2)


def random_snapshot_id() -> str:
    return SNAPSHOT_PREFIX + secrets.token_hex(ID_HEX_CHARS // 2)
