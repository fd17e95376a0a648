"""What a daemon taking over a live mount needs besides its descriptor: the session record.

Written to the node's state directory when the kernel's INIT is answered (what was negotiated,
which mount: its device number in /proc/self/mountinfo) and again at a planned hand-over, then
with every open handle and kernel reference (`Handles.export`). A daemon that finds a kept
descriptor (keeper.py) checks the record against the mount that is there now before it serves
the descriptor: a record of another mount, or a mount gone meanwhile, means a fresh mount.
A record without handles means the daemon before did not hand over: it crashed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SESSION_FILE = "fuse-session.json"
REFUSED_FILE = "hand-over-refused"
"""Why the daemon did not hand its mount over when asked (it serves on): for `awsomefsd hand-over`,
which otherwise waits for the daemon to exit."""


@dataclass(frozen=True)
class SessionRecord:
    mountpoint: str
    device: str
    """major:minor of the mount, as /proc/self/mountinfo shows it (one per FUSE connection)."""
    minor: int
    flags: int
    max_write: int
    handles: dict[str, Any] | None = None
    """`Handles.export()` of a planned hand-over; None while a daemon serves the mount."""
    invalidations: list[Any] | None = None
    """Kernel cache invalidations the daemon handing over had not sent (fuse/invalidate.py
    `encode_targets`): the next one sends them once it serves. None while a daemon serves."""


def save(state_dir: Path, record: SessionRecord) -> None:
    """Replace the record atomically: a crash of the daemon leaves the old one or the new one.
    Not fsynced: the record matters only while the mount lives, and a crash of the machine ends
    the mount (the fsyncs cost a hand-over two waits on the state directory's disk, while
    applications wait)."""
    path = state_dir / SESSION_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(asdict(record), fh)
    os.replace(tmp, path)


def load(state_dir: Path) -> SessionRecord | None:
    path = state_dir / SESSION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SessionRecord(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring the FUSE session record %s: %s", path, exc)
        return None


def forget(state_dir: Path) -> None:
    (state_dir / SESSION_FILE).unlink(missing_ok=True)


def refuse(state_dir: Path, reason: str) -> None:
    """Tell `awsomefsd hand-over` that the daemon does not hand over, and why."""
    tmp = state_dir / (REFUSED_FILE + ".tmp")
    tmp.write_text(reason + "\n", encoding="utf-8")
    os.replace(tmp, state_dir / REFUSED_FILE)


def refusal(state_dir: Path) -> str | None:
    try:
        return (state_dir / REFUSED_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def clear_refusal(state_dir: Path) -> None:
    (state_dir / REFUSED_FILE).unlink(missing_ok=True)
