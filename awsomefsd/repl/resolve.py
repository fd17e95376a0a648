"""What resolving a conflict writes through the mount (`awsomefsd site conflicts resolve`).

Keeping a losing content, attribute value or extended attribute means writing it again, now,
through the mount as an operator would: it is captured and shipped like any change, it settles
the conflict's register on both sites (the new version has seen both), and the kernel's caches
see it. Keeping both versions of a content places the loser beside the file under the conflict
name (`name.conflict-<site>-<time>`), a new file of the replicated tree. A losing move is made
again by the state machine itself (a deleted object has no path to rename). Keeping the winner
writes nothing: the `ResolveConflict` command that follows closes the record and drops the copy
kept in /.conflicts, on both sites.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from awsomefsd.crdt.hlc import Stamp
from awsomefsd.crdt.tree import conflict_name


class ResolveError(Exception):
    """The resolution cannot be carried out (the file or the kept copy is gone): nothing was written."""


def write_back(mount: Path, record: dict[str, Any], keep: str) -> str:
    """Write what keeping `keep` of conflict `record` (as `site conflicts` lists it) takes; returns
    what was done, for the operator."""
    kind = record["kind"]
    if keep == "winner" or kind in ("move", "skipped-move"):
        return f"kept the {keep}"
    if kind in ("attributes", "xattr"):
        return _write_value(mount, record)
    kept = _kept_copy(mount, record)
    if kind == "content":
        path = _current_path(mount, record)
        if keep == "loser":
            _copy_content(kept, path)
            return f"wrote the losing version into {record['path']}"
        beside = path.with_name(conflict_name(path.name.encode(), _loser(record)).decode(errors="surrogateescape"))
        return _place_copy(kept, beside, mount)
    # edit against delete: the edit, deleted with its file, comes back as a file
    restore_to = record.get("restore_to")
    target = mount / restore_to.lstrip("/") if restore_to else mount / kept.name
    if not target.parent.is_dir():  # its directory went too
        target = mount / target.name
    if os.path.lexists(target):
        target = target.with_name(conflict_name(target.name.encode(), _loser(record)).decode(errors="surrogateescape"))
    return _place_copy(kept, target, mount)


def _loser(record: dict[str, Any]) -> Stamp:
    return Stamp.unpack(bytes.fromhex(record["loser"]))


def _kept_copy(mount: Path, record: dict[str, Any]) -> Path:
    if not record.get("kept_as"):
        raise ResolveError("the losing version is no longer kept (settled, or /.conflicts was cleaned)")
    kept = mount / bytes.fromhex(record["kept_as"]).decode(errors="surrogateescape")
    if not kept.is_file():
        raise ResolveError(f"the copy of the losing version, /{kept.relative_to(mount)}, is gone")
    return kept


def _current_path(mount: Path, record: dict[str, Any]) -> Path:
    if not record.get("path"):
        raise ResolveError("the file has no name on this site now: keep the winner, or copy the loser "
                           f"from /{bytes.fromhex(record.get('kept_as', '')).decode(errors='replace')} yourself")
    return mount / record["path"].lstrip("/")


def _copy_content(source: Path, destination: Path) -> None:
    """The file's bytes and mtime become the kept version's; the file stays the same file (its
    other names, its attributes): a write to its content register. The copy's name goes with the
    first write (the loser is overwritten by its own site: its copy is superseded), so everything
    of it is read through the descriptor opened before."""
    with open(source, "rb") as src, open(destination, "r+b") as dst:
        kept_mtime_ns = os.fstat(src.fileno()).st_mtime_ns
        dst.truncate(0)
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    os.utime(destination, ns=(os.stat(destination).st_atime_ns, kept_mtime_ns))


def _place_copy(source: Path, destination: Path, mount: Path) -> str:
    if os.path.lexists(destination):
        raise ResolveError(f"/{destination.relative_to(mount)} exists already")
    shutil.copy2(source, destination)
    with open(destination, "rb") as done:
        os.fsync(done.fileno())
    return f"kept the losing version as /{destination.relative_to(mount)}"


def _write_value(mount: Path, record: dict[str, Any]) -> str:
    if "loser_value" not in record:
        raise ResolveError("the losing value is no longer known (settled by a later change)")
    path = _current_path(mount, record)
    value = record["loser_value"]
    if record["kind"] == "attributes":
        mode, uid, gid, atime_ns, mtime_ns = value
        os.chown(path, uid, gid, follow_symlinks=False)
        if not path.is_symlink():
            os.chmod(path, mode)
        os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=False)
        return f"set {record['path']} back to mode {mode:o}, owner {uid}:{gid} and its times"
    name = bytes.fromhex(record["xattr"])
    if value is None:
        os.removexattr(path, name, follow_symlinks=False)
        return f"removed {name.decode(errors='replace')} of {record['path']} again"
    os.setxattr(path, name, bytes.fromhex(value), follow_symlinks=False)
    return f"set {name.decode(errors='replace')} of {record['path']} back"
