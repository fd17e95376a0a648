"""The link with the peer, and `SiteTables`: every job of the package, as the state machine uses it.

Linking starts capture (with an initial sync of what exists, or, linking again the site the
tables were kept for, what changed since: relink.py), unlinking stops it and keeps the tables
for a relink (unlinking again, or linking another site, drops them); what the link service reads to ship, to take in and to report
(the outbox, a content version's bytes, the cursors) is read here.

Apart because `SiteTables` is the one class the rest of meta names (the state machine builds it
and calls in; the client reads through it): it is made of the job classes (capture, apply,
forget, resolve), each of which inherits only the jobs it calls.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.crdt.tree import ROOT
from awsomefsd.meta import commands as c
from awsomefsd.meta import levels
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import ROOT_INO, read_u64, u64
from awsomefsd.meta.sites import pending as p
from awsomefsd.meta.sites.bound import SiteBound
from awsomefsd.meta.sites.forget import SiteForget
from awsomefsd.meta.sites.resolve import SiteResolve
from awsomefsd.meta.sites.tables import CONTENT, SITE_TABLES, scan, scan_from


class SiteTables(SiteBound, SiteForget, SiteResolve):
    """The site tables' semantics; the state machine calls in (`record`, `apply_remote`, ...)."""

    def link(self, txn: lmdb.Transaction[bytes], cmd: c.LinkSite) -> int:
        """Pair with `cmd.peer`: from now on every replicated command is captured. What exists
        already is captured too, as creates from the root down (the initial sync: from
        `levels.SEED_LEVEL` on only its first slice, the walk's `SeedSite` does the rest); or, when the
        tables were kept for a relink to this same peer, only what changed since the unlink
        (relink.py). Kept for another site, they are dropped first: a first link. Returns the
        number of operations that puts in the outbox."""
        if len(cmd.peer) != 16 or cmd.peer == self.site(txn):
            raise FsError(errno.EINVAL, "a site links to another site's 16-byte id")
        current = self.peer(txn)
        if current is not None:
            raise FsError(errno.EEXIST, f"already linked to site {current.hex()}: unlink it first")
        kept = self.kept_peer(txn)
        if kept is not None and kept != cmd.peer:
            self._forget_kept_link(txn)
        txn.put(b"peer", cmd.peer, db=self.meta)
        txn.put(b"link", json.dumps({"peer": cmd.peer.hex(), "ca_pem": cmd.peer_ca_pem.decode(),
                                     "addresses": list(cmd.peer_addresses), "since_ns": cmd.now_ns}).encode(),
                db=self.meta)
        before = txn.stat(self.db["soutbox"])["entries"]
        if kept == cmd.peer:
            self.relink(txn, cmd.now_ns)
        else:
            self._set_ids(txn, ROOT_INO, ROOT)
            self._seed_below(txn, ROOT_INO, ROOT, cmd.now_ns)  # from levels.SEED_LEVEL on: queued for the walk
            for number, record in self._sm.volumes.all(txn):
                if record["kind"] == "volume":
                    self._capture_volume(txn, number, record, cmd.now_ns)
            self.seed_first_slice(txn, cmd.now_ns)
        return int(txn.stat(self.db["soutbox"])["entries"]) - int(before)

    def update_link(self, txn: lmdb.Transaction[bytes], cmd: c.UpdateSiteLink) -> None:
        """Keep what the peer says of itself now (`UpdateSiteLink`) with the link."""
        info = self.link_info(txn)
        if info is None:
            raise FsError(errno.ENOENT, "not linked to any site")
        info["addresses"], info["revoked"] = list(cmd.addresses), list(cmd.revoked)
        txn.put(b"link", json.dumps(info).encode(), db=self.meta)

    def unlink(self, txn: lmdb.Transaction[bytes], cmd: c.UnlinkSite) -> None:
        """Stop capturing and shipping, keeping the tables for a relink to the same site
        (relink.py). Unlinked already with the tables kept: drop them (`site unlink --forget`)."""
        peer = self.peer(txn)
        if peer is not None and not self.at_level(txn, levels.RELINK_LEVEL):
            self._drop_link(txn)
        elif peer is not None:
            self.keep_for_relink(txn, peer)
        elif self.kept_peer(txn) is not None:
            self._forget_kept_link(txn)
        else:
            raise FsError(errno.ENOENT, "not linked to any site")

    def _drop_link(self, txn: lmdb.Transaction[bytes]) -> None:
        """An unlink below `levels.RELINK_LEVEL`, as the builds before relinking did it (a cluster's
        members must all do alike): the tables go at once; the inodes the tree kept after their
        last name went become orphans."""
        kept = [inode for ino in self.kept_inodes(txn)
                if (inode := self.ns.get_inode(txn, ino)) is not None and inode.nlink == 0]
        self._release_and_drop(txn, self.kept_inodes(txn))
        for inode in kept:
            self._sm.orphan(txn, inode)

    def _forget_kept_link(self, txn: lmdb.Transaction[bytes]) -> None:
        """The outbox, the cursors, the ids and the tree are dropped (a new link starts over with
        an initial sync); recorded conflicts stay. Objects kept only for the tree are released
        to the orphan purge."""
        # In the tree's TRASH, or (unlinked meanwhile, nothing captured) with no name left.
        kept = sorted(set(self.kept_inodes(txn)) | {
            ino for ino in (read_u64(bytes(key)) for key, _ in scan(txn, self.db["sinos"], b""))
            if (inode := self.ns.get_inode(txn, ino)) is not None and inode.nlink == 0})
        self._release_and_drop(txn, kept)
        for ino in kept:
            inode = self.ns.get_inode(txn, ino)
            if inode is not None and inode.nlink == 0:
                self._sm.orphan(txn, inode)

    def _release_and_drop(self, txn: lmdb.Transaction[bytes], kept: list[int]) -> None:
        """Release what is below each deleted directory of `kept`, then drop every site table but
        the recorded conflicts."""
        for ino in kept:
            inode = self.ns.get_inode(txn, ino)
            if inode is not None and inode.is_dir and inode.nlink == 0:
                self._release_below(txn, ino, [])  # a deleted volume's files: nothing keeps them now
        for name in SITE_TABLES:
            if name not in ("sconflicts",):
                txn.drop(self.db[name], delete=False)

    def link_info(self, txn: lmdb.Transaction[bytes]) -> dict[str, Any] | None:
        """The peer as LinkSite recorded it: its id, CA certificate and addresses (and, once it
        told them, `revoked`: its removed members' certificate serials; UpdateSiteLink)."""
        raw = txn.get(b"link", db=self.meta)
        return None if raw is None else json.loads(raw)

    # -- reads for the shipper and for `site status` --------------------------------------------
    def head(self, txn: lmdb.Transaction[bytes]) -> Stamp | None:
        """This site's last operation (an acknowledgement carries it: repl/link.py, Ack.head)."""
        raw = txn.get(b"head", db=self.meta)
        return None if raw is None else Stamp.unpack(bytes(raw))

    def applied_from_peer(self, txn: lmdb.Transaction[bytes]) -> Stamp | None:
        return self._seen_stamp(txn)

    def outbox(self, txn: lmdb.Transaction[bytes], after: Stamp | None, limit: int) -> list[tuple[Stamp, bytes]]:
        start = b"" if after is None else after.pack()
        found = []
        for key, value in scan_from(txn, self.db["soutbox"], start):
            stamp = Stamp.unpack(bytes(key))
            if after is not None and stamp <= after:
                continue
            found.append((stamp, bytes(value)))
            if len(found) >= limit:
                break
        return found

    def pending_after(self, txn: lmdb.Transaction[bytes], after: Stamp | None) -> int:
        """How many outbox entries come after `after` (the peer's acknowledgement), with the
        captures not folded yet (each an operation or two to come): all of the outbox but those
        at or before it, which `ForgetSite` has not dropped yet and are few. Every
        acknowledgement and `site status` asks: a count of what comes after was a scan of the
        whole backlog each time (issue 47: 12% of a draining sender's loop, polled by status)."""
        total = int(txn.stat(self.db["soutbox"])["entries"]) + self.unfolded(txn)
        if after is None:
            return total
        settled = 0
        for key, _ in scan_from(txn, self.db["soutbox"], b""):
            if Stamp.unpack(bytes(key)) > after:
                break
            settled += 1
        return total - settled

    def shipping(self, txn: lmdb.Transaction[bytes], raw: bytes) -> tuple[bytes, int | None]:
        """What to send for an outbox entry: the operation, and for a content version the inode
        whose bytes are that version (the file while it shows it, the sibling a conflict kept it
        in). A version a later one of this site replaced is sent as `Superseded`: only the
        newest bytes travel; so is one of an object this site no longer has (released after its
        every entry was deleted): there are no bytes to send, and the peer deleted it too; and,
        while capture is paused, one whose file was written since (bound.py: the resume sends it)."""
        if not o.encoded_as(raw, o.ContentSet):
            return raw, None
        op = o.decode(raw)
        assert isinstance(op, o.ContentSet)
        versions = self._versions(txn, op.object + CONTENT)
        ino = self._ino(txn, op.object)
        if versions and versions[0].stamp == op.stamp and ino is not None \
                and not self.content_moved_on(txn, op.object, ino):  # written since, capture paused
            return raw, ino
        # A version kept in /.conflicts ships from there even once settled here: the peer keeps it too.
        record = txn.get(op.stamp.pack() + b"c", db=self.db["sconflicts"])
        kept = None if record is None else json.loads(record).get("kept_ino")
        if kept is not None and txn.get(u64(kept), db=self.db["inodes"]) is not None:
            return raw, int(kept)
        return o.encode(o.Superseded(op.stamp, op.object, op.seen)), None

    def newest_unfolded(self, txn: lmdb.Transaction[bytes]) -> int | None:
        """The number of the newest record waiting for a fold, None when none waits: it moves
        while local writes go on capturing (repl/folding.py waits for it to stand still)."""
        cursor = txn.cursor(db=self.meta)
        if cursor.last() and (last := bytes(cursor.key())).startswith(p.PENDING):
            return read_u64(last, len(p.PENDING))
        return None

    def unfolded(self, txn: lmdb.Transaction[bytes]) -> int:
        """How many records wait for a fold: numbered in a row, and a fold takes the oldest first,
        so the first and the last tell (a scan of them all was a cost of every count)."""
        newest = self.newest_unfolded(txn)
        if newest is None:
            return 0
        cursor = txn.cursor(db=self.meta)
        cursor.set_range(p.PENDING)
        return newest - read_u64(bytes(cursor.key()), len(p.PENDING)) + 1

    def content_base(self, txn: lmdb.Transaction[bytes], obj: bytes) -> tuple[int, Stamp] | None:
        """The regular file that shows `obj` here and the stamp of the content version it shows
        (the register's winner), or None: what a content version shipped as a delta from that
        version may reuse (design note 50). None too while a capture waits for its fold: the file
        may hold bytes of a write its register does not know yet."""
        if self.newest_unfolded(txn) is not None:
            return None
        ino = self._ino(txn, obj)
        versions = self._versions(txn, obj + CONTENT)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        if inode is None or not inode.is_reg or not versions:
            return None
        return inode.ino, versions[0].stamp
