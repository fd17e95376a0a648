"""Which inodes read workers must not serve (docs/multicore.md, rules R1 and R2): the hot map.

Read workers (fuse/kernel/workers.py) answer the READ requests the proposer (this daemon's trio
process) hands them, from the metadata as last committed to LMDB and from the device. The proposer
knows more than that about some inodes: a handle open for writing (the kernel may send WRITEs for
it at any moment), bytes buffered or being flushed, a metadata command applied in the open,
uncommitted batch of the log. Those inodes are **hot**: the proposer hands no READ of them, and a
worker that finds one hot (it turned hot after the READ was handed) gives the READ back.

The map is a shared memory segment (a memfd the workers map read-only) of `SLOTS` slots, each
two 64-bit words: the count of reasons the slot's inodes are hot, and a generation bumped
whenever the count rises from zero. Inodes share a slot by hash (a false "hot" only forwards a
request; a false "cold" cannot happen). Slot 0 is every inode's: held while a command whose
inodes are not known here is uncommitted (volume and site commands, tier objects).

R2, in the proposer: an inode is marked before the change can be observed (before OPEN for
writing is answered, as a command applies) and cleared only once the log's commit covers
every command applied to it so far and nothing of it is buffered: `release` queues the clear,
`settle` (called after each commit, and every `SETTLE_S`) performs the due ones. In a worker
(`HotView`): look at the slot (count zero, else forward; keep the generation), read the
committed state and the device, look again (still zero, same generation: answer; else forward).
The counter is raised before the generation is bumped, so a worker that saw the old generation
and a zero count before the raise sees the new generation after it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from awsomefsd.meta import commands as c

SLOTS = 1 << 16
WORD = struct.Struct("=Q")
SIZE = SLOTS * 16
SETTLE_S = 0.02
"""How often queued clears are looked at when no commit says so (a worker forwards meanwhile)."""
EVERY = 0
"""The slot that makes every inode hot."""

NO_DATA = (c.Mknod, c.Link, c.MakeTmpfile, c.LinkTmpfile, c.Unlink, c.Rename, c.SetXattr, c.RemoveXattr,
           c.ReserveInodes, c.ReclaimFrees, c.GrantGroups, c.ReleaseLeaked, c.SetLogLevel)
"""Commands that change no file's size, block map or bytes: a name, an xattr, free space. An
unlinked file keeps its data until `Purge`, which is per inode."""


def slot_of(ino: int) -> int:
    """The inode's slot: never 0 (`EVERY`)."""
    return 1 + (ino * 0x9E3779B97F4A7C15 >> 17) % (SLOTS - 1)


def inodes_of(command: Any) -> Iterable[int] | None:
    """The inodes whose data `command` may change; None: not known here (every inode)."""
    if isinstance(command, c.SetAttr):  # chmod, chown, utimensat: no byte, size or map; a truncate: all
        return () if command.size is None else (command.ino,)
    if isinstance(command, c.UnlinkClosed):  # may purge, as Purge does
        return (command.ino,)
    if isinstance(command, NO_DATA):
        return ()
    if isinstance(command, c.Batch):
        found: list[int] = []
        for inner in command.commands:
            some = inodes_of(inner)
            if some is None:
                return None
            found.extend(some)
        return found
    if isinstance(command, (c.WriteData, c.PunchHole, c.Preallocate, c.Purge)):
        return (command.ino,)
    if isinstance(command, c.CloneRange):
        return (command.src_ino, command.dst_ino)
    if isinstance(command, c.CommitTierObject):
        return command.inos
    return None


class HotMap:
    """The proposer's side: marks and clears, in the segment workers map (`fd`).

    `applied()` and `committed()`: the log's last applied and last committed (in LMDB) command
    indexes; `buffered(ino)`: does the write buffer hold anything of the inode."""

    def __init__(self, applied: Callable[[], int], committed: Callable[[], int],
                 buffered: Callable[[int], bool]) -> None:
        self.fd = os.memfd_create("awsomefs-hot", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, SIZE)
        self._map = mmap.mmap(self.fd, SIZE)
        self._words = memoryview(self._map).cast("Q")
        self._applied = applied
        self._committed = committed
        self._buffered = buffered
        self._due: deque[tuple[int, int, int]] = deque()  # (applied index then, slot, inode or -1), in index order
        self._buffered_due: list[tuple[int, int]] = []  # (slot, inode): committed, waiting for its buffer to empty
        self.marks = 0

    def hold(self, ino: int) -> None:
        """Mark `ino` hot now (count first, then the generation: the module's docstring says why)."""
        self._raise(slot_of(ino))

    def _raise(self, slot: int) -> None:
        words = self._words
        count = words[2 * slot]
        words[2 * slot] = count + 1
        if count == 0:
            words[2 * slot + 1] += 1
        self.marks += 1

    def release(self, ino: int) -> None:
        """One reason `ino` was hot ended: cleared once what was applied to it so far is committed
        and nothing of it is buffered."""
        self._due.append((self._applied(), slot_of(ino), ino))

    def changed(self, command: Any) -> None:
        """A command was applied (or refused): its inodes are hot until the commit covers it."""
        inos = inodes_of(command)
        if inos is None:
            self._raise(EVERY)
            self._due.append((self._applied(), EVERY, -1))
            return
        for ino in inos:
            self.hold(ino)
            self._due.append((self._applied(), slot_of(ino), ino))

    def settle(self) -> None:
        """Perform the clears that are due: those the log's commit covers now, of inodes with
        nothing buffered. Cheap when none is (called after every commit tick)."""
        words = self._words
        if self._due:
            committed = self._committed()
            due = self._due
            while due and due[0][0] <= committed:
                _, slot, ino = due.popleft()
                self._buffered_due.append((slot, ino))
        if self._buffered_due:
            keep = []
            for slot, ino in self._buffered_due:
                if ino >= 0 and self._buffered(ino):
                    keep.append((slot, ino))
                else:
                    words[2 * slot] -= 1
            self._buffered_due = keep

    def count(self, ino: int) -> int:
        """The reasons `ino`'s slot is hot now (tests, and `status`)."""
        return int(self._words[2 * slot_of(ino)]) + int(self._words[2 * EVERY])

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self.fd)


class HotView:
    """A worker's side: the segment mapped read-only from descriptor `fd`."""

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, SIZE, prot=mmap.PROT_READ)
        self._words = memoryview(self._map).cast("Q")

    def look(self, ino: int) -> tuple[int, int] | None:
        """(generation of the inode's slot, of slot 0) when the inode is cold now; None when hot."""
        words, slot = self._words, slot_of(ino)
        gen, every = words[2 * slot + 1], words[1]
        if words[2 * slot] or words[0]:
            return None
        return gen, every

    def still(self, ino: int, seen: tuple[int, int]) -> bool:
        """Still cold, and never hot since `look` gave `seen`?"""
        words, slot = self._words, slot_of(ino)
        return not words[2 * slot] and not words[0] and (words[2 * slot + 1], words[1]) == seen
