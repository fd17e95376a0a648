"""A tree's digest: what `site verify` compares between two sites, and what tests compare between
a tree on AwsomeFS and the same tree on ext4 (design note 48).

It walks a mounted tree through the ordinary POSIX calls, so it checks what applications see, on
any file system. Each entry's record holds what a copy must keep: type, permission bits, owner,
size, modification time, content (SHA-256 of the bytes read: a hole and written zeros are alike),
a symlink's target, a device's number, extended attributes, and which names are hard links of one
file (by the first of its paths, never by inode numbers, which differ between sites). A
directory's hash covers its record and its children's names and hashes (a Merkle tree), so two
digests are compared from the top down and the differences named by path and field.

Left out, on purpose: inode numbers, ctime (no call sets it, so no copy can keep it), atime (a read
changes it), `security.*` attributes (each host's policy labels its own files), our virtual
`trusted.awsomefs.*` attribute, and by default directories' mtimes (every entry made inside
changes them; `directory_mtimes=True` compares them too).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Record = tuple[tuple[str, object], ...]
"""An entry's fields, in a fixed order: (name, value) pairs."""
READ_CHUNK_BYTES = 1 << 20
SKIPPED_XATTR_PREFIXES = ("security.", "trusted.awsomefs.")
MAX_XATTRS = 65536
"""Attributes read per entry at most: more than any file system here allows (a list of 64 KiB)."""


@dataclass
class TreeDigest:
    """Per path relative to the root ("" for the root): its record and its (Merkle) hash."""

    records: dict[str, Record] = field(default_factory=dict)
    hashes: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)

    @property
    def root_hash(self) -> str:
        return self.hashes[""].hex()


def digest_tree(root: Path, *, directory_mtimes: bool = False, mtime_resolution_ns: int = 1,
                on_entry: Callable[[str], None] | None = None, skip_top: frozenset[str] = frozenset()) -> TreeDigest:
    """The digest of everything under `root` (not following symlinks, nor descending into other
    file systems mounted below it: a mount point is recorded as the directory it is).
    `mtime_resolution_ns`: compare times at a coarser grain (tar keeps whole seconds).
    `on_entry` sees each path as it is read (progress). `skip_top`: names in `root` left out."""
    digest = TreeDigest()
    root_dev = os.lstat(root).st_dev
    first_path: dict[tuple[int, int], str] = {}
    order: list[str] = []
    pending = [""]  # depth first, names in sorted order, without recursion (trees may be deep)
    while pending:
        rel = pending.pop()
        path = root / rel if rel else root
        st = os.lstat(path)
        if on_entry is not None:
            on_entry(rel)
        digest.records[rel] = _record(path, rel, st, first_path, directory_mtimes, mtime_resolution_ns)
        names = sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) and st.st_dev == root_dev else []
        if not rel and skip_top:
            names = [name for name in names if name not in skip_top]
        digest.children[rel] = names
        order.append(rel)
        pending.extend(f"{rel}/{name}" if rel else name for name in reversed(names))
    for rel in reversed(order):  # children before their parent
        h = hashlib.sha256(repr(digest.records[rel]).encode())
        for name in digest.children[rel]:
            h.update(os.fsencode(name) + b"\0" + digest.hashes[f"{rel}/{name}" if rel else name])
        digest.hashes[rel] = h.digest()
    return digest


def _record(path: Path, rel: str, st: os.stat_result, first_path: dict[tuple[int, int], str],
            directory_mtimes: bool, resolution: int) -> Record:
    kind = stat.S_IFMT(st.st_mode)
    fields: list[tuple[str, object]] = [("type", kind), ("mode", stat.S_IMODE(st.st_mode)),
                                        ("uid", st.st_uid), ("gid", st.st_gid)]
    if kind != stat.S_IFDIR or directory_mtimes:
        fields.append(("mtime", st.st_mtime_ns // resolution))
    if kind != stat.S_IFDIR and st.st_nlink > 1:
        first = first_path.setdefault((st.st_dev, st.st_ino), rel)
        if first != rel:
            fields.append(("hard link of", first))
    if kind == stat.S_IFREG:
        fields += [("size", st.st_size), ("content", _content_hash(path))]
    elif kind == stat.S_IFLNK:
        fields.append(("target", os.readlink(path)))
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        fields.append(("rdev", st.st_rdev))
    fields.append(("xattrs", _xattrs(path)))
    return tuple(fields)


def _content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: Path) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    kept = sorted(n for n in names if not n.startswith(SKIPPED_XATTR_PREFIXES))[:MAX_XATTRS]
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in kept)


def differences(first: TreeDigest, second: TreeDigest, *, limit: int = 1000) -> list[str]:
    """Where two digests differ, from the top down: a path only on one side, or the fields of one
    entry that differ. Subtrees with equal hashes are not looked into. At most `limit` lines."""
    found: list[str] = []
    pending = [""]
    while pending and len(found) < limit:
        rel = pending.pop()
        if first.hashes[rel] == second.hashes[rel]:
            continue
        mine, theirs = dict(first.records[rel]), dict(second.records[rel])
        changed = [name for name in dict.fromkeys([*mine, *theirs]) if mine.get(name) != theirs.get(name)]
        if changed:
            found.append(f"{rel or '/'}: " + ", ".join(
                f"{name} {_show(name, mine.get(name))} != {_show(name, theirs.get(name))}" for name in changed))
        a, b = set(first.children[rel]), set(second.children[rel])
        for name in sorted(a | b, reverse=True):
            child = f"{rel}/{name}" if rel else name
            if name not in b:
                found.append(f"{child}: only in the first")
            elif name not in a:
                found.append(f"{child}: only in the second")
            else:
                pending.append(child)
    return found[:limit]


def _show(field_name: str, value: object) -> str:
    if field_name in ("type", "mode") and isinstance(value, int):
        return oct(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
