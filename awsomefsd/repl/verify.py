"""`awsomefsd site verify`: both sites' trees compared by their digests (repl/digest.py).

Each site digests its own mount (through POSIX calls, in a worker thread: the daemon answers the
FUSE requests that walk makes), the peer's digest comes over the link, and the differences are
named by path and field. What each site keeps for itself is left out: /.snapshots (per site),
/.conflicts (each site keeps there the losing contents it saw lose), and /.volumes as a directory:
a volume's directory there is named after the number each site gave it, so each volume that
ships is digested on its own and paired with the other site's by its root's global id
(`.volumes/<id>` in the differences).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from awsomefsd.repl.digest import TreeDigest, differences, digest_tree

PER_SITE = frozenset({".volumes", ".snapshots", ".conflicts"})
MAX_ENTRIES = 1_000_000
"""Entries a digest from the peer may carry at most."""


class DigestError(ValueError):
    """A digest from the peer that is not one."""


MAX_VOLUMES = 100_000


async def local_digest(mount: Path | None, volumes: Mapping[str, str]) -> dict[str, Any]:
    """This site's digest: the tree below the root, and each volume that ships (`volumes`: its
    root's global id -> its directory in /.volumes here).

    Cancellable: the walk's thread makes FUSE requests of this very daemon, so a daemon stopping
    while a verify of a large tree ran waited for a thread whose requests it no longer answered
    (a stop took longer than a minute, and the mount stayed busy). On cancellation the thread is
    abandoned and told to stop at its next entry."""
    if mount is None:
        raise DigestError("this site serves no mount to digest")
    stop = threading.Event()

    def unless_stopped(rel: str) -> None:
        if stop.is_set():
            raise DigestError("the digest was cancelled")

    def digest_all() -> dict[str, Any]:
        root = encode(digest_tree(mount, skip_top=PER_SITE, on_entry=unless_stopped))
        root["volumes"] = {key: encode(digest_tree(mount / ".volumes" / directory, on_entry=unless_stopped))
                           for key, directory in sorted(volumes.items())}
        return root
    try:
        return await trio.to_thread.run_sync(digest_all, abandon_on_cancel=True)
    finally:
        stop.set()


@dataclass(frozen=True)
class SiteDigest:
    """A site's digest: its root's tree, and each volume's by the global id of its root."""

    root: TreeDigest
    volumes: dict[str, TreeDigest]


def decode_site(data: dict[str, Any]) -> SiteDigest:
    """A site's digest as `local_digest` encodes it (no volumes from a build before them)."""
    found = data.get("volumes", {})
    if not isinstance(found, dict) or len(found) > MAX_VOLUMES:
        raise DigestError("the peer's volume digests are not a map of ids")
    return SiteDigest(decode(data), {str(key): decode(value) for key, value in found.items()})


def compare(mine: SiteDigest, theirs: SiteDigest) -> list[str]:
    """Where two sites' digests differ: the root's tree, then each volume's (by its global id)."""
    found = differences(mine.root, theirs.root)
    my_volumes, their_volumes = mine.volumes, theirs.volumes
    for key in sorted(my_volumes.keys() | their_volumes.keys()):
        where = f".volumes/{key}"
        if key not in their_volumes:
            found.append(f"{where}: only in the first")
        elif key not in my_volumes:
            found.append(f"{where}: only in the second")
        else:
            found += [f"{where}/{line}" for line in differences(my_volumes[key], their_volumes[key])]
    return found


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
