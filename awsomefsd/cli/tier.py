"""`awsomefsd tier status|evict|recall`: what is in the object store, and moving files now.

`status` reads the node's metadata (read-only, beside the running daemon) and what its engine
wrote after its last pass. `evict` and `recall` act through the mount: each file's
`trusted.awsomefs.tier` attribute (fs/operations.py, TIER_XATTR), so they work on any node of a
cluster, need root (CAP_SYS_ADMIN) as the kernel asks for `trusted.` names, and each file is done
when its line is printed.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from awsomefsd.config import Settings
from awsomefsd.daemon.tiering import TierConfigError, open_store, read_status
from awsomefsd.fs.xattr_ops import TIER_XATTR
from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.inspect import read_tier_objects
from awsomefsd.tier.store import StoreError

CAP_SYS_ADMIN = 21
PROBE_TIMEOUT_S = 5.0


def tier_summary(settings: Settings) -> dict[str, Any]:
    """The objects table's totals and what this node's engine last wrote (`status` shows it too)."""
    meta = settings.node.state_dir / "meta"
    objects = read_tier_objects(meta) if (meta / "data.mdb").exists() else []
    live = [o for o in objects if o.state == "live"]
    info: dict[str, Any] = {
        "configured": settings.tier.enabled,
        "store": f"{settings.tier.endpoint}/{settings.tier.bucket}/{settings.tier.prefix}" if settings.tier.enabled else "",
        "objects": len(live),
        "stored_bytes": sum(o.bytes for o in live),
        "tiered_bytes": sum(o.live_blocks for o in live) * BLOCK_SIZE,
        "pending_uploads": sum(1 for o in objects if o.state == "pending"),
        "dead_objects": sum(1 for o in objects if o.state == "dead"),
        "node": read_status(settings.node.state_dir),
        "store_error": _probe(settings) if settings.tier.enabled else None,
    }
    return info


def _probe(settings: Settings) -> str:
    """Ask the store now whether it answers: "" when it does, else why not (one line)."""
    quick = settings.model_copy(update={"tier": settings.tier.model_copy(update={
        "read_timeout_s": min(settings.tier.read_timeout_s, PROBE_TIMEOUT_S)})})
    try:
        open_store(quick).probe()
    except (TierConfigError, StoreError) as exc:
        return str(exc)
    return ""


def render_tier_status(info: dict[str, Any], device: dict[str, Any], free_bytes: int | None) -> str:
    """`tier status` for a terminal: `info` from `tier_summary`, the device and its free bytes from
    `awsomefsd status`'s collection (empty and None when unknown)."""
    node = info["node"] or {}
    engine, cache = node.get("engine", {}), node.get("cache", {})
    size = device.get("size_bytes", 0)
    rows = [
        ("object store", info["store"] or "not configured ([tier] endpoint)"),
        ("device", f"{_mib(size - free_bytes)} in use of {_mib(size)}" if size and free_bytes is not None else "-"),
        ("file data in the store", _mib(info["tiered_bytes"])),
        ("objects", f"{info['objects']} live ({_mib(info['stored_bytes'])}), {info['pending_uploads']} uploading, "
                    f"{info['dead_objects']} to delete"),
    ]
    if info.get("store_error") is not None:  # asked just now
        rows.append(("store reachable", f"NO: {info['store_error']}" if info["store_error"] else "yes"))
    elif node:
        rows.append(("store reachable", "yes" if engine.get("store_ok") else f"NO: {engine.get('last_error', '')}"))
    if node:
        if engine.get("unreadable_objects"):
            rows.append(("objects that do not read back",
                         f"{engine['unreadable_objects']} (last: {engine.get('last_unreadable', '')})"))
        rows += [
            ("cold data found, not moved yet", _mib(engine.get("candidate_bytes", 0))),
            ("this node uploaded", f"{_mib(engine.get('bytes_put', 0))} in {engine.get('objects_put', 0)} objects"),
            ("cache hit rate", f"{cache.get('hit_rate', 0.0):.0%} ({_mib(cache.get('disk_bytes', 0))} on disk)"),
            ("files recalled", str(node.get("recalls", 0))),
        ]
    elif info["configured"]:
        rows.append(("engine", "no pass recorded on this node (not running, or not the leader)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def tier_move(paths: list[Path], action: str) -> int:
    """`evict` or `recall` every regular file under `paths`; one line per file, 1 if any failed."""
    failed = 0
    for path in _files(paths):
        try:
            _placement(path)  # first: never write the attribute onto another file system's file
            os.setxattr(path, TIER_XATTR.decode(), action.encode())
            state = _placement(path)
        except OSError as exc:
            failed += 1
            print(f"{path}: {_why(exc, path)}", file=sys.stderr, flush=True)
            continue
        print(f"{path}: {_mib(state['tiered_bytes'])} in the object store, {_mib(state['device_bytes'])} on the device",
              flush=True)
    return 1 if failed else 0


def _placement(path: Path) -> dict[str, Any]:
    """The file's bytes on the device and in the store, as the mount's virtual attribute tells.
    Anything else (no such attribute, or one some other file system stored under that name) means
    the file is not on an AwsomeFS mount: EOPNOTSUPP."""
    raw = os.getxattr(path, TIER_XATTR.decode())
    try:
        state = json.loads(raw)
    except ValueError:
        state = None
    if not isinstance(state, dict) or "tiered_bytes" not in state:
        raise OSError(errno.EOPNOTSUPP, "not an awsomefs placement")
    return state


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    child = Path(root) / name
                    if child.is_file() and not child.is_symlink():
                        yield child
        else:
            yield path


def _why(exc: OSError, path: Path) -> str:
    """One line: what went wrong, as the mount explains it where it can."""
    if exc.errno in (errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM) and not _may_use_trusted_attributes():
        # the kernel hides trusted.* attributes from others (ENODATA) and refuses to set them (EPERM)
        return "needs root (CAP_SYS_ADMIN): the kernel lets only root use trusted.* attributes"
    if exc.errno in (errno.EOPNOTSUPP, errno.ENODATA):
        return "not on an awsomefs mount, or no object store configured ([tier])"
    try:
        reason = _placement(path).get("error")
    except OSError:
        reason = None
    return str(reason) if reason else exc.strerror or str(exc)


def _may_use_trusted_attributes() -> bool:
    """CAP_SYS_ADMIN in the effective set (what the kernel checks for trusted.* names)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
