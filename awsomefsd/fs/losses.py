"""Buffered writes this node had to drop, and which descriptors still have to hear about it.

A cluster member whose liveness lease expired (it was paused or cut off) has lost its allocation
groups and write leases: other nodes may have written the same files since, so its buffered
writes must never reach the device. They are dropped, and every descriptor that was open on such
a file when that happened reports EIO once (at its next flush, fsync or close), so the
application learns its writes were lost and descriptors opened later are not blamed. Writes a
flush could not write are lost the same way, and reported with the flush's own error (ENOSPC from
a full device, as Linux reports a writeback error to each open file).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from awsomefsd.fs.buffer import WriteBuffer
from awsomefsd.meta.errors import FsError

log = logging.getLogger(__name__)


class LossLedger:
    def __init__(self, buffer: WriteBuffer) -> None:
        self.buffer = buffer
        self.losses = 0  # buffered writes dropped (lose_buffers), counted per file
        self.lost_at: dict[int, int] = {}  # inode -> `losses` when its buffers were last dropped
        self.lost_errno: dict[int, int] = {}  # inode -> why they were dropped (EIO, ENOSPC, ...)

    def lose_buffers(self, reason: str) -> int:
        """Drop every file's dirty bytes (see the module docstring); returns the files hit."""
        hit = 0
        for st in self.buffer.files.values():
            if st.dirty or st.inflight:  # in flight: its flush fails at the fence and drops it (Flusher)
                self.buffer.drop_dirty(st)
                self.mark_lost(st.ino)
                hit += 1
        if hit:
            log.error("dropped the buffered writes of %d files: %s", hit, reason)
        return hit

    def lose_file(self, ino: int, reason: str) -> None:
        """Drop one file's dirty bytes (written under a write lease since lost: see
        ClusterCoherence.writing); every descriptor open on it reports EIO once."""
        st = self.buffer.files.get(ino)
        if st is not None and st.dirty:
            self.buffer.drop_dirty(st)
        self.mark_lost(ino)
        log.error("dropped the buffered writes of inode %d: %s", ino, reason)

    def mark_lost(self, ino: int, error: int = errno.EIO) -> None:
        """The file's buffered writes were dropped; its descriptors report `error` once each."""
        self.losses += 1
        self.lost_at[ino] = self.losses
        self.lost_errno[ino] = error

    def loss_errno(self, ino: int) -> int:
        """The error the file's last loss is reported with."""
        return self.lost_errno.get(ino, errno.EIO)

    def unreported_loss(self, ino: int, seen: int) -> bool:
        """Did `ino` lose buffered writes after the loss count `seen` (taken when a descriptor
        opened, or when it last reported one)?"""
        return self.lost_at.get(ino, 0) > seen


MAX_REPORTED_DIRECTORIES = 1 << 16


class CrashReports:
    """What a daemon that continued a mount after a crash of the one before still has to report.

    The dead daemon acknowledged changes it never committed (up to a commit interval of them;
    design note 1), and nothing tells which: its memory went with it. A file learns it through
    its rebuilt descriptors (handles.CRASH_UNREPORTED). A directory's fsync is the durability
    point of its entries (write f.tmp, fsync it, rename it over f, fsync the directory), so the
    first fsync of each directory that existed before the crash reports EIO, once, as a lost write
    is reported to each file it hit; directories made since (inode numbers from `made_from` on)
    lost nothing. The first syncfs reports it once too. Carried across a hand-over (`export`): the
    next daemon does not report again what this one did.

    Bounded: past MAX_REPORTED_DIRECTORIES directories no more are reported (an application
    fsyncing that many directories after a crash has heard of it many times over)."""

    def __init__(self) -> None:
        self._reset(active=False)

    def _reset(self, *, active: bool) -> None:
        self.active = active
        self.made_from: int | None = None
        """The first inode number handed out after the crash: newer directories lost nothing."""
        self.reported: set[int] = set()
        self.whole_reported = False

    def crashed(self) -> None:
        """This daemon continues the mount of one that crashed."""
        self._reset(active=True)

    def made(self, first_ino: int) -> None:
        """Inode numbers from `first_ino` on are handed out by this daemon."""
        if self.made_from is None:
            self.made_from = first_ino

    def _before(self, ino: int) -> bool:
        return self.active and (self.made_from is None or ino < self.made_from)

    def report_directory(self, ino: int) -> None:
        """EIO if this is the first fsync of directory `ino` since the crash (and it is older)."""
        if not self._before(ino) or ino in self.reported or len(self.reported) >= MAX_REPORTED_DIRECTORIES:
            return
        self.reported.add(ino)
        raise FsError(errno.EIO, "changes to this directory acknowledged before the daemon serving the mount "
                      "crashed may be lost", cause="lost-writes")

    def report_whole(self) -> None:
        """EIO if this is the first syncfs since the crash."""
        if not self.active or self.whole_reported:
            return
        self.whole_reported = True
        raise FsError(errno.EIO, "changes acknowledged before the daemon serving the mount crashed may be lost",
                      cause="lost-writes")

    def export(self) -> dict[str, Any] | None:
        if not self.active:
            return None
        return {"made_from": self.made_from, "reported": sorted(self.reported),
                "whole_reported": self.whole_reported}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue what the daemon before reported (a hand-over); None: nothing to report."""
        self._reset(active=state is not None)
        if state is not None:
            self.made_from = state["made_from"]
            self.reported = set(state["reported"])
            self.whole_reported = state["whole_reported"]
