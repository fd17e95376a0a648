"""The initial sync streamed (issue 47, log level 20): a walk of the namespace in bounded slices.

Linking a site that holds data captures everything it holds as creates. Done inside `LinkSite`
it was one transaction in proportion to the tree (minutes for a million files, every member of a
cluster applying it with no request or lease renewal served meanwhile, the outbox taking millions
of operations at once). From `SEED_LEVEL` on the walk is replicated state instead: rows of the
`sites` table hold the directories still to walk, in order (`QUEUE`), and where the walk stopped in
the first of them (`AT`); `SeedSite(limit)` seeds the next `limit` entries in walk order, and the
node running the link proposes it while any directory waits (repl/seeding.py). A kill of either
site resumes where the log left the walk.

Seeding an entry is what the one-transaction sync did for it (`_seed_entry`: its create, its
placement, attributes, extended attributes and content as they are now), except that a
directory new to the peer goes to the end of the queue rather than being walked at once; so does
any directory seeded later (a volume's root, a directory moved in from outside the tree).

Local commands while the walk runs, each captured once with the state the peer must end with
(docs/sites.md, "The initial sync"): an entry not seeded yet is seeded later with its state then
(a create in a directory not seeded, a write, an attribute or xattr change, an unlink of such an
entry: nothing now); an entry seeded is captured as on any linked site. What would cross the walk
front is seeded first, on demand (`seed_before`): a rename with either directory seeded seeds
both directories (with their ancestors), the entry it moves and, for an exchange, the entry it
swaps with, before it applies; a directory seeded so joins the queue. A hard link in a seeded
directory to a file not seeded yet seeds the file at its new name (capture.py). Every one of these
folds what waits first (they are not `UNFOLDED`), so a pending capture never meets a seed of its
object made after its command.

Apart because it is the one job that walks the namespace in slices across commands; capture.py's
`_seed_below` is the hook through which every directory new to the peer reaches the queue.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import lmdb

from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.records import CONFLICTS_INO, SNAPSHOTS_INO, VOLUMES_INO, Inode, read_u64, u64
from awsomefsd.meta.sites.capture import SiteCapture
from awsomefsd.meta.sites.tables import scan

QUEUE = b"seed-queue:"
"""Key prefix in the `sites` table: sequence number (8 bytes) -> a directory's inode still to walk."""
AT = b"seed-at"
"""Key in the `sites` table: the first queued directory's inode (8 bytes) and the last name of it the
walk handled (absent: the walk starts that directory from its first name)."""
SKIPPED = b"seed-skipped:"
"""Key prefix in the `sites` table: directory inode (8 bytes) -> b"": a directory the walk reached
while it had no path from the root (from `UNSEEDED_NAMES_LEVEL`), queued again once it has one
(`_walk_again`)."""
PROGRESS = b"seed-progress"
"""Key in the `sites` table: entries seeded, directories queued and walked (ever, for this link),
and the next queue number (`_PROGRESS`)."""
_PROGRESS = struct.Struct(">QQQQ")
LINK_SEEDS = 256
"""Entries `LinkSite` seeds itself (a small site is synced by the link's own command); the walk's
`SeedSite` proposals do the rest. Part of level 20's rules: every replica seeds as many."""
_OUTSIDE = (VOLUMES_INO, SNAPSHOTS_INO, CONFLICTS_INO)


class SiteSeeding(SiteCapture):
    """The initial sync's walk, in slices, and the seeds made on demand while it runs."""

    def streams_seed(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Does this site seed by the replicated walk (`levels.SEED_LEVEL`)? On a cluster only once every
        member's build does: an older one seeds in the command and cannot decode SeedSite."""
        return self.at_level(txn, levels.SEED_LEVEL)

    def seed_first_slice(self, txn: lmdb.Transaction[bytes], now_ns: int) -> None:
        """A first link at `levels.SEED_LEVEL`, once the root's directory and each volume's root are
        queued (`_seed_below`): `LINK_SEEDS` entries are seeded in the link's own command."""
        if self.streams_seed(txn):
            self.seed(txn, LINK_SEEDS, now_ns)

    def seeding(self, txn: lmdb.Transaction[bytes]) -> dict[str, int] | None:
        """The walk's progress (`site status`): entries seeded and directories left, or None when no
        directory waits."""
        if not self._walk_pending(txn):
            return None
        seeded, queued, walked, _ = self._progress(txn)
        return {"entries_seeded": seeded, "directories_left": queued - walked}

    def _walk_pending(self, txn: lmdb.Transaction[bytes]) -> bool:
        return any(True for _ in scan(txn, self.meta, QUEUE))

    def _progress(self, txn: lmdb.Transaction[bytes]) -> tuple[int, int, int, int]:
        raw = txn.get(PROGRESS, db=self.meta)
        if raw is None:
            return 0, 0, 0, 0
        seeded, queued, walked, next_number = _PROGRESS.unpack(bytes(raw))
        return seeded, queued, walked, next_number

    def _queue_dir(self, txn: lmdb.Transaction[bytes], ino: int) -> None:
        seeded, queued, walked, number = self._progress(txn)
        txn.put(QUEUE + u64(number), u64(ino), db=self.meta)
        txn.put(PROGRESS, _PROGRESS.pack(seeded, queued + 1, walked, number + 1), db=self.meta)

    def _seed_below(self, txn: lmdb.Transaction[bytes], ino: int, node: bytes, now_ns: int) -> None:
        """A directory new to the peer: what is below it is queued for the walk (at `levels.SEED_LEVEL`),
        else captured at once as the builds before did."""
        if self.streams_seed(txn):
            self._queue_dir(txn, ino)
        else:
            super()._seed_below(txn, ino, node, now_ns)

    # -- the walk ---------------------------------------------------------------------------------
    def seed(self, txn: lmdb.Transaction[bytes], limit: int, now_ns: int) -> int:
        """`SeedSite`: seed the next entries in walk order, `limit` of them looked at at most (an
        entry seeded already, or not the peer's, counts too: what bounds the transaction is the
        walk's reads). Returns how many were looked at; 0 while capture is paused or the site is
        unlinked (the resume's or the relink's difference capture seeds what is left)."""
        if not self._capturing(txn):
            return 0
        self._entries, self._inodes = [], []
        looked = seeded = walked = 0
        cursor = txn.cursor(db=self.meta)
        with self._holding(txn):
            while looked < limit and cursor.set_range(QUEUE) and bytes(cursor.key()).startswith(QUEUE):
                head_key, directory = bytes(cursor.key()), read_u64(bytes(cursor.value()))
                at = txn.get(AT, db=self.meta)
                after = bytes(at[8:]) if at is not None and read_u64(bytes(at)) == directory else None
                done, last, count, made = self._walk_dir(txn, directory, after, limit - looked, now_ns)
                looked += count + 1
                seeded += made
                if done:
                    txn.delete(head_key, db=self.meta)
                    txn.delete(AT, db=self.meta)
                    walked += 1
                else:
                    assert last is not None
                    txn.put(AT, u64(directory) + last, db=self.meta)
        total, queued, gone, number = self._progress(txn)
        txn.put(PROGRESS, _PROGRESS.pack(total + seeded, queued, gone + walked, number), db=self.meta)
        self._tell_side_effects()
        return looked

    def _walk_dir(self, txn: lmdb.Transaction[bytes], directory: int, after: bytes | None, budget: int,
                  now_ns: int) -> tuple[bool, bytes | None, int, int]:
        """Seed the entries of `directory` after name `after`, `budget` looked at at most: (done
        with it, the last name looked at, how many, how many seeded). A directory gone, no longer
        the peer's (its number used again), or deleted (no path from the root: the peer may have
        released it already, and what is below it here goes when this site releases it) has
        nothing to walk."""
        inode = self.ns.get_inode(txn, directory)
        if inode is None or not inode.is_dir or self.object_of(txn, directory) is None:
            return True, None, 0, 0
        if not self._reachable(txn, directory):
            if self.at_level(txn, levels.UNSEEDED_NAMES_LEVEL):  # a later move may bring it back
                txn.put(SKIPPED + u64(directory), b"", db=self.meta)
            return True, None, 0, 0
        looked = seeded = 0
        last = None
        # A slice read before seeding it: seeding may show names again in this directory.
        names = list(itertools.islice(self._names_after(txn, directory, after), budget + 1))
        for name, child in names:
            if looked >= budget:
                return False, last, looked, seeded
            looked += 1
            last = name
            below = self._unseeded(txn, directory, inode.volume, name, child)
            if below is not None:
                self._seed_entry(txn, directory, name, below, now_ns)
                seeded += 1
        return True, last, looked, seeded

    def _walk_again(self, txn: lmdb.Transaction[bytes]) -> None:
        """Directories the walk skipped as deleted that have a path from the root again (a move
        the other site made concurrently won over the delete) are queued again: what below them
        the walk had not reached would otherwise never be told (seed 7000028). Seeding there is
        safe: a directory that can come back was not released by the peer, which releases only
        once both sites forgot the delete, and nothing brings it back after that. A second walk of
        names already shown only reads them."""
        for key, _ in list(scan(txn, self.meta, SKIPPED)):
            directory = read_u64(bytes(key[len(SKIPPED):]))
            gone = self.ns.get_inode(txn, directory) is None
            if gone or self._reachable(txn, directory):
                txn.delete(bytes(key), db=self.meta)
                if not gone:
                    self._queue_dir(txn, directory)

    def _unseeded(self, txn: lmdb.Transaction[bytes], parent: int, volume: int, name: bytes,
                  child: int) -> Inode | None:
        """The inode at `name` in the peer's directory `parent` (of `volume`) when that entry still
        needs its seed; None when it is shown there already (seeded on demand, or a create captured
        since), is not the peer's (a special directory, another volume), or is a directory seeded
        by another path (a directory's one entry is shown where it is: never two names)."""
        if child in _OUTSIDE or self._node_shown_at(txn, parent, name) is not None:
            return None
        inode = self.ns.get_inode(txn, child)
        if inode is None or inode.volume != volume or (inode.is_dir and self.object_of(txn, child) is not None):
            return None
        return inode

    def _names_after(self, txn: lmdb.Transaction[bytes], directory: int,
                     after: bytes | None) -> Iterator[tuple[bytes, int]]:
        """The entries of `directory` in name order, from the first after `after` (None: all)."""
        for name, child in self.ns.names(txn, directory, b"" if after is None else after):
            if after is not None and name == after:
                continue
            yield name, child

    def _gone_for_peer(self, txn: lmdb.Transaction[bytes], inode: Inode, obj: bytes) -> bool:
        """A file met at a name the peer was never told of (the walk, a hard link) whose every entry
        the peer knows is deleted (here or there) lives on here by names the walk had not reached:
        the peer may have released the object already. It is then sent again whole under its id
        (`_seed_entry`): a create the peer ignores while it still holds the object, and its
        registers as they are now, before the new name."""
        if inode.is_dir or not self.streams_seed(txn):
            return False
        return not any(self._shown_reachably(txn, bytes(key[len(obj):]))
                       for key, _ in scan(txn, self.db["sobjents"], obj))

    # -- seeds on demand --------------------------------------------------------------------------
    def seed_before(self, txn: lmdb.Transaction[bytes], cmd: object) -> None:
        """Before a rename applies while the walk runs: if either directory is the peer's already,
        both are made so (with their ancestors), and so is the entry it moves (and, for an
        exchange, the one it swaps with), so that its capture is a linked site's. A rename between
        directories the walk has not reached needs nothing: it will find the result. Before an
        unlink: `_seed_waiting_name`."""
        # the link first: one read, where the walk's queue is a cursor (through a member's overlay,
        # ~10% of its unlink ahead on a site with no link)
        if not isinstance(cmd, (c.Rename, c.Unlink)) or not self._capturing(txn) or not self._walk_pending(txn):
            return
        if isinstance(cmd, c.Unlink):
            self._seed_waiting_name(txn, cmd.parent, cmd.name, cmd.now_ns)
            return
        sides = [(cmd.old_parent, cmd.old_name), (cmd.new_parent, cmd.new_name)]
        if not any(self.object_of(txn, parent) is not None for parent, _ in sides):
            return
        self._entries, self._inodes = [], []
        for index, (parent, name) in enumerate(sides):
            if not self._seed_dir(txn, parent, cmd.now_ns):
                continue  # outside the tree: the capture makes it a delete, or a create
            if index == 0 or cmd.flags & c.RENAME_EXCHANGE:
                self._seed_name(txn, parent, name, cmd.now_ns)
        self._tell_side_effects()

    def _seed_waiting_name(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes, now_ns: int) -> None:
        """Before an unlink of a name not seeded yet in a directory of the peer's: if the peer's entry
        of that name waits under a derived name here (`_show_node`: the name was this one's), the
        name is seeded first, so that its delete shows the peer's entry under its name again."""
        obj = self.object_of(txn, parent)
        if obj is None or self._node_shown_at(txn, parent, name) is not None \
                or not any(True for _ in scan(txn, self.db["skids"], obj + name + b"\0")):
            return
        self._entries, self._inodes = [], []
        self._seed_name(txn, parent, name, now_ns)
        self._tell_side_effects()

    def _seed_dir(self, txn: lmdb.Transaction[bytes], ino: int, now_ns: int) -> bool:
        """Make directory `ino` the peer's, seeding it and the ancestors it lacks from the top down
        (each joins the queue); False when it is outside the replicated tree."""
        chain: list[Inode] = []
        inode = self.ns.get_inode(txn, ino)
        while inode is not None and self.object_of(txn, inode.ino) is None:
            if inode.ino in _OUTSIDE or not inode.is_dir or inode.ino == inode.parent:
                return False
            chain.append(inode)
            inode = self.ns.get_inode(txn, inode.parent)
        if inode is None or inode.ino in _OUTSIDE:
            return False
        for below in reversed(chain):
            parent = self.ns.require_inode(txn, below.parent)
            name = self._name_in(txn, parent.ino, below.ino)
            if name is None or parent.volume != below.volume:
                return False  # not reachable by a name here (a deleted directory), or another volume
            self._seed_entry(txn, parent.ino, name, below, now_ns)
            self._count_seeded(txn)
        return True

    def _seed_name(self, txn: lmdb.Transaction[bytes], parent: int, name: bytes, now_ns: int) -> None:
        """Seed the entry at `name` in the peer's directory `parent`, unless it is shown already."""
        child = self.ns.lookup(txn, parent, name)
        inode = None if child is None else self._unseeded(txn, parent, self.ns.require_inode(txn, parent).volume,
                                                          name, child)
        if inode is None:
            return
        self._seed_entry(txn, parent, name, inode, now_ns)
        self._count_seeded(txn)

    def _count_seeded(self, txn: lmdb.Transaction[bytes]) -> None:
        seeded, queued, walked, number = self._progress(txn)
        txn.put(PROGRESS, _PROGRESS.pack(seeded + 1, queued, walked, number), db=self.meta)

    def _name_in(self, txn: lmdb.Transaction[bytes], parent: int, child: int) -> bytes | None:
        """The name of directory `child` in `parent` (a directory has one). A scan of `parent`:
        only a rename across the walk front, into a directory not reached yet, asks."""
        for name, ino in self.ns.names(txn, parent):
            if ino == child:
                return name
        return None
