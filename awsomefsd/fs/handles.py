"""What this node's kernel holds: open file and directory handles, and its references to inodes.

The kernel takes a reference to an inode with every entry reply and gives it back with FORGET;
an open handle keeps an unlinked file readable (POSIX). Together they decide when an unlinked
inode may be deleted here (`holds`): a cluster member also counts a lookup answered moments ago,
since an open of its answer may be on its way.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass

from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError

LOOKUP_HOLD_S = 2.0
MAX_LOOKED_UP = 1 << 16
MAX_OPEN_FILES = 1 << 20


@dataclass(slots=True)
class Handle:
    ino: int
    flags: int
    seen_loss: int = 0  # FileData.losses when opened or when a loss was last reported here


class Handles:
    """Open handles by number, and the kernel's reference count per inode.

    `track_lookups` (a cluster member) also notes when each inode was last looked up."""

    def __init__(self, meta: MetaClient, *, track_lookups: bool = False) -> None:
        self.meta = meta
        self.track_lookups = track_lookups
        self.open: dict[int, Handle] = {}
        self.lookups: dict[int, int] = {}
        self.looked_up: dict[int, float] = {}  # when each inode was last looked up (track_lookups)
        self._next_fh = 1

    def add(self, ino: int, flags: int, seen_loss: int) -> int:
        """A new handle of `ino`; ENFILE past MAX_OPEN_FILES."""
        if len(self.open) >= MAX_OPEN_FILES:
            raise FsError(errno.ENFILE)
        fh = self._next_fh
        self._next_fh += 1
        self.open[fh] = Handle(ino, flags, seen_loss)
        return fh

    def find(self, fh: int) -> Handle | None:
        return self.open.get(fh)

    def require(self, fh: int) -> Handle:
        """The handle, or EBADF."""
        h = self.open.get(fh)
        if h is None:
            raise FsError(errno.EBADF)
        return h

    def pop(self, fh: int) -> Handle | None:
        return self.open.pop(fh, None)

    def is_open(self, ino: int) -> bool:
        return any(h.ino == ino for h in self.open.values())

    def remember(self, ino: int) -> None:
        """The kernel now holds one more reference (an entry reply was sent for `ino`)."""
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        if self.track_lookups:
            if len(self.looked_up) >= MAX_LOOKED_UP:
                cutoff = time.monotonic() - LOOKUP_HOLD_S
                self.looked_up = {i: t for i, t in self.looked_up.items() if t > cutoff}
            self.looked_up[ino] = time.monotonic()

    def forget(self, ino: int, count: int) -> bool:
        """The kernel gave back `count` references; True when it holds none any more."""
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
            return False
        self.lookups.pop(ino, None)
        return True

    def holds(self, ino: int) -> bool:
        """Does anything on this node still reach the inode: an open handle; for a directory, a
        kernel reference (it may be a working directory); for anything, a lookup answered within
        LOOKUP_HOLD_S (an open of that lookup's answer may be on its way: purging under it would
        turn a read of a file another node just replaced into ESTALE)."""
        if self.is_open(ino):
            return True
        if time.monotonic() - self.looked_up.get(ino, -LOOKUP_HOLD_S) < LOOKUP_HOLD_S:
            return True
        inode = self.meta.inode(ino)
        return inode is not None and inode.is_dir and ino in self.lookups
