"""What this node's kernel holds: open file and directory handles, and its references to inodes.

The kernel takes a reference to an inode with every entry reply and gives it back with FORGET;
an open handle keeps an unlinked file readable (POSIX). Together they decide when an unlinked
inode may be deleted here (`holds`): a cluster member also counts a lookup answered moments ago,
since an open of its answer may be on its way.

Handle numbers describe their handle: the inode, the open flags that matter (access mode,
O_APPEND) and a serial (`encode_fh`). A daemon that takes over a mount after a crash of the one
before (docs/fuse-transport.md, Restarts) knows no handle the kernel holds; it rebuilds each from
its number the first time the kernel uses it (`adopted`). It cannot know which unlinked inodes
such a handle keeps alive, so after a crash an unlinked inode is purged only once the kernel
forgets it (`forget`), never at unlink or release (`may_purge`).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from awsomefsd.fs.losses import CrashReports
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO

if TYPE_CHECKING:
    from awsomefsd.fs.hotmap import HotMap

LOOKUP_HOLD_S = 2.0
MAX_LOOKED_UP = 1 << 16
MAX_OPEN_FILES = 1 << 20
SERIAL_BITS = 21
FLAG_BITS = 3  # access mode (2 bits), O_APPEND
INO_SHIFT = SERIAL_BITS + FLAG_BITS
MAX_INO = (1 << (64 - INO_SHIFT)) - 1


def encode_fh(ino: int, flags: int, serial: int) -> int:
    """A handle number naming the inode, the flags a handle keeps and a serial."""
    assert 0 < ino <= MAX_INO, ino
    kept = (flags & os.O_ACCMODE) | (4 if flags & os.O_APPEND else 0)
    return ino << INO_SHIFT | (serial & ((1 << SERIAL_BITS) - 1)) << FLAG_BITS | kept


def decode_fh(fh: int) -> tuple[int, int]:
    """(inode, flags) of a handle number made by `encode_fh`."""
    kept = fh & ((1 << FLAG_BITS) - 1)
    return fh >> INO_SHIFT, (kept & os.O_ACCMODE) | (os.O_APPEND if kept & 4 else 0)


def _writable(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_RDONLY


CRASH_UNREPORTED = -1
"""`Handle.seen_loss` of a writable handle rebuilt after a crash: its writes the crashed daemon had
not made durable are gone, and its next flush or fsync says so (EIO, once)."""


@dataclass(slots=True)
class Handle:
    ino: int
    flags: int
    seen_loss: int = 0  # FileData.losses when opened or when a loss was last reported here
    rebuilt: bool = False
    """Opened before a crash of the daemon serving the mount: the kernel's cached size of the
    file may count writes the crash lost (`Operations.appends_at_own_end`)."""


class Handles:
    """Open handles by number, and the kernel's reference count per inode.

    `track_lookups` (a cluster member) also notes when each inode was last looked up."""

    def __init__(self, meta: MetaClient, *, track_lookups: bool = False,
                 kernel_caches: Callable[[int], bool] | None = None) -> None:
        self.meta = meta
        self.track_lookups = track_lookups
        self.kernel_caches = kernel_caches
        """Does the kernel have inode `ino` in its cache at all (None: assume it does)? Asked only
        after a crash, when the dead daemon's handles are unknown: an open file, a working
        directory or a mapping keeps its inode cached, so one the kernel does not cache is held
        by nothing."""
        self.open: dict[int, Handle] = {}
        """Read it freely; change it only through `_opened` and `pop` (they keep the counts)."""
        self._open_of: dict[int, int] = {}
        self._writers_of: dict[int, int] = {}
        """Per inode, its open handles and those open for writing: `is_open` and
        `open_for_writing` are asked per unlink and per flush, so they must not walk every
        handle (a node with thousands of files open paid that walk on each)."""
        self.lookups: dict[int, int] = {}
        self.looked_up: dict[int, float] = {}  # when each inode was last looked up (track_lookups)
        self._evicted_open: set[int] = set()
        """Inodes the kernel forgot while a handle of them was still open here: it sends RELEASE
        in the background, so the FORGET of an evicted inode may overtake it (`evicted_unheld`)."""
        self._serial = 0
        self.adopted = False
        """This process took over a mount whose handles it was not told about (a crash before)."""
        self.may_purge = True
        """False once handles this process does not know of may keep unlinked inodes alive."""
        self.crash = CrashReports()
        """What a crash of the daemon before still has to tell directory fsyncs and syncfs."""
        self.hot: HotMap | None = None
        """With read workers: a file open for writing is hot from before its OPEN is answered
        until its RELEASE is (fs/hotmap.py)."""

    def attach_hot(self, hot: HotMap) -> None:
        """Mark hot every file open for writing now, and from now on."""
        self.hot = hot
        for h in self.open.values():
            if _writable(h.flags):
                hot.hold(h.ino)

    def add(self, ino: int, flags: int, seen_loss: int) -> int:
        """A new handle of `ino`; ENFILE past MAX_OPEN_FILES."""
        if len(self.open) >= MAX_OPEN_FILES:
            raise FsError(errno.ENFILE)
        while True:
            self._serial += 1
            fh = encode_fh(ino, flags, self._serial)
            if fh not in self.open:
                break
        self._opened(fh, Handle(ino, flags, seen_loss))
        return fh

    def _opened(self, fh: int, h: Handle) -> None:
        """The one way a handle comes in: counted per inode, and hot while it may write."""
        assert fh not in self.open, fh
        self.open[fh] = h
        self._open_of[h.ino] = self._open_of.get(h.ino, 0) + 1
        if _writable(h.flags):
            self._writers_of[h.ino] = self._writers_of.get(h.ino, 0) + 1
            if self.hot is not None:
                self.hot.hold(h.ino)

    def find(self, fh: int) -> Handle | None:
        return self.open.get(fh) or self._rebuild(fh)

    def require(self, fh: int) -> Handle:
        """The handle, or EBADF; EIO for a handle of a crashed daemon whose file the crash took
        (created after the last durable point): its writes are lost, and EBADF would tell the
        application its descriptor was never valid."""
        h = self.open.get(fh) or self._rebuild(fh)
        if h is None:
            if self.adopted:
                raise FsError(errno.EIO, "the file this descriptor was open on was created after the last durable "
                              "point, and the daemon serving the mount crashed: it is gone", cause="lost-writes")
            raise FsError(errno.EBADF)
        return h

    def _rebuild(self, fh: int) -> Handle | None:
        """After a takeover from a crashed daemon: a handle the kernel opened before, from its number."""
        if not self.adopted:
            return None
        ino, flags = decode_fh(fh)
        if ino == 0 or self.meta.inode(ino) is None:
            return None  # created and not yet durable when the daemon crashed: gone with it
        h = Handle(ino, flags, CRASH_UNREPORTED if _writable(flags) else 0, rebuilt=True)
        self._opened(fh, h)
        return h

    # -- taking over a mount ------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        """What a daemon taking over this mount needs: every open handle and kernel reference."""
        return {"open": [[fh, h.ino, h.flags, h.seen_loss, h.rebuilt] for fh, h in self.open.items()],
                "lookups": [[ino, n] for ino, n in self.lookups.items()],
                "serial": self._serial, "may_purge": self.may_purge, "crash": self.crash.export(),
                "evicted_open": sorted(self._evicted_open)}

    def take_over(self, state: dict[str, Any] | None) -> None:
        """Continue the mount a daemon before this one served: with its exported state (a planned
        hand-over), or without (it crashed: handles are rebuilt from their numbers, nothing is
        purged, and references the kernel gives back for inodes not known here are ignored)."""
        if state is None:
            self.adopted = True
            self.may_purge = False
            self.crash.crashed()
            return
        self.crash.restore(state.get("crash"))  # absent: a record from a build before the reports
        # a record from a daemon that did not note `rebuilt` has four fields per handle
        self.open, self._open_of, self._writers_of = {}, {}, {}
        for fh, ino, flags, seen, *rest in state["open"]:
            self._opened(fh, Handle(ino, flags, seen, bool(rest and rest[0])))
        self.lookups = {ino: n for ino, n in state["lookups"]}
        self._evicted_open = set(state.get("evicted_open", ()))  # absent: a record from an older build
        self._serial = state["serial"]
        self.may_purge = state["may_purge"]
        self.adopted = not self.may_purge

    def writing(self) -> list[int]:
        """The inodes open for writing here now."""
        return list(self._writers_of)

    def pop(self, fh: int) -> Handle | None:
        h = self.open.pop(fh, None)
        if h is None:
            return None
        _count_down(self._open_of, h.ino)
        if _writable(h.flags):
            _count_down(self._writers_of, h.ino)
            if self.hot is not None:
                self.hot.release(h.ino)
        return h

    def is_open(self, ino: int) -> bool:
        return ino in self._open_of

    def open_for_writing(self, ino: int) -> bool:
        """Is a handle of `ino` open for writing (or may one be, after a crash: unknown until used)?
        A kernel that caches written pages holds them only while one is: close writes them back."""
        return self.adopted or ino in self._writers_of

    def remember(self, ino: int) -> None:
        """The kernel now holds one more reference (an entry reply was sent for `ino`)."""
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        self._evicted_open.discard(ino)
        if self.track_lookups:
            if len(self.looked_up) >= MAX_LOOKED_UP:
                cutoff = time.monotonic() - LOOKUP_HOLD_S
                self.looked_up = {i: t for i, t in self.looked_up.items() if t > cutoff}
            self.looked_up[ino] = time.monotonic()

    def forget(self, ino: int, count: int) -> bool:
        """The kernel gave back `count` references; True when it holds none any more.

        After a crash the references the dead daemon gave were not counted here, but the kernel
        gives an inode's references back all at once when it evicts the inode (FORGET with its
        whole lookup count), and it evicts only an inode nothing holds: no open file, no working
        directory, no mapping. So a FORGET that returns at least what this process gave out
        means the kernel holds none, crash or not. (The one exception is the kernel dropping a
        reply it could not attach, with a count of 1, out of memory.)"""
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
            return False
        self.lookups.pop(ino, None)
        if ino in self._open_of:
            self._evicted_open.add(ino)
        return True

    def evicted_unheld(self, ino: int) -> bool:
        """Was the handle just released the last one of an inode the kernel had already forgotten?
        Then nothing holds the inode (the FORGET said so, and it overtook the RELEASE), which after
        a crash nothing else can tell. True once."""
        if ino in self._open_of or ino not in self._evicted_open:
            return False
        self._evicted_open.discard(ino)
        return True

    def kernel_may_cache(self, ino: int) -> bool:
        """May the kernel cache anything of `ino`: its attributes, its pages, names in it? Only of
        an inode it holds a reference to (an entry answer this process gave and the kernel has not
        forgotten; its eviction drops its pages and names), and of the root, which it always holds.
        After a crash the dead daemon's references were never counted here: any inode then.
        Another node's change of an inode no process here looked up need not reach the kernel
        (issue 42: a follower's unlink burst cost the leader a kernel notification per unlink)."""
        return ino in self.lookups or ino == ROOT_INO or self.adopted

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
        if inode is not None and inode.is_dir and ino in self.lookups:
            return True
        if not self.may_purge:  # a crash before: the dead daemon's handles may hold it
            return self.kernel_caches is None or self.kernel_caches(ino)
        return False


def _count_down(counts: dict[int, int], ino: int) -> None:
    left = counts[ino] - 1
    if left:
        counts[ino] = left
    else:
        del counts[ino]
