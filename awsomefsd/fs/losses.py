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

from awsomefsd.fs.buffer import WriteBuffer

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
