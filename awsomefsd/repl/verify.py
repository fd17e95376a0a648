"""`awsomefsd site verify`: both sites' trees compared by their digests (repl/digest.py).

Each site digests its own mount (through POSIX calls, in a worker thread: the daemon answers the
FUSE requests that walk makes), the peer's digest comes over the link, and the differences are
named by path and field. What each site keeps for itself is left out: /.volumes and /.snapshots
(not replicated), and /.conflicts (each site keeps there the losing contents it saw lose).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from awsomefsd.repl.digest import TreeDigest, digest_tree

PER_SITE = frozenset({".volumes", ".snapshots", ".conflicts"})
MAX_ENTRIES = 1_000_000
"""Entries a digest from the peer may carry at most."""


class DigestError(ValueError):
    """A digest from the peer that is not one."""


async def local_digest(mount: Path | None) -> dict[str, Any]:
    if mount is None:
        raise DigestError("this site serves no mount to digest")
    digest = await trio.to_thread.run_sync(lambda: digest_tree(mount, skip_top=PER_SITE))
    return encode(digest)


def encode(digest: TreeDigest) -> dict[str, Any]:
    return {"entries": {rel: [digest.hashes[rel].hex(), [[name, _value(v)] for name, v in digest.records[rel]],
                              digest.children[rel]] for rel in digest.records}}


def decode(data: dict[str, Any]) -> TreeDigest:
    entries = data.get("entries")
    if not isinstance(entries, dict) or "" not in entries or len(entries) > MAX_ENTRIES:
        raise DigestError("the peer's digest has no root or too many entries")
    digest = TreeDigest()
    try:
        for rel, (hash_hex, record, children) in entries.items():
            digest.hashes[rel] = bytes.fromhex(hash_hex)
            digest.records[rel] = tuple((str(name), _unvalue(v)) for name, v in record)
            digest.children[rel] = [str(child) for child in children]
        for rel, children in digest.children.items():
            for child in children:
                if (f"{rel}/{child}" if rel else child) not in digest.hashes:
                    raise DigestError(f"the peer's digest names {child!r} under {rel!r} without its entry")
    except (TypeError, ValueError) as exc:
        raise DigestError(f"a malformed digest from the peer: {exc}") from None
    return digest


def _value(value: object) -> object:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, tuple):
        return [_value(v) for v in value]
    return value


def _unvalue(value: object) -> object:
    if isinstance(value, dict):
        return bytes.fromhex(str(value["hex"]))
    if isinstance(value, list):
        return tuple(_unvalue(v) for v in value)
    return value
