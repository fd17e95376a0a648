"""A bounded outbox: a site whose peer is away for days stops capturing instead of growing.

Past `[site] outbox_max_operations`, the node running the link proposes `PauseCapture`: each
object is noted as the peer was last told (`_as_kept`, as `site unlink` notes it for a relink),
the link stays, and nothing more is captured: the outbox (at most the bound, and what the commands
committed before the pause) still ships, and the peer's operations still apply. Once the peer
acknowledged the whole outbox, `ResumeCapture` captures what changed here meanwhile as a relink
does (relink.py): one version per register that changed and one move per entry that did, so its
cost follows the objects changed, not the commands run, and the outbox stays bounded by the
namespace, whatever the peer's absence lasted.

While paused the tables keep what the peer was told, and the peer's operations change them and
the namespace together. So that the resume does not send the peer's changes back as local ones
(each would meet the peer's next change of that object as a conflict), applying one of its
operations refreshes the note of the object it touched; and a local change of that object made
before, not captured yet, is captured first (at its inode's ctime), so that it meets the peer's
as a concurrent change does, judged and kept, rather than being overwritten unseen.

Apart because it is the one job that decides when capture stops and starts again; it reuses the
relink's notes and difference capture, and wraps the apply of each of the peer's operations.
"""

from __future__ import annotations

import errno
from typing import Any

import lmdb

from awsomefsd.crdt import ops as o
from awsomefsd.crdt.hlc import Stamp
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.sites.apply import SiteApply
from awsomefsd.meta.sites.relink import KEPT_HEAD, SiteRelink
from awsomefsd.meta.sites.tables import CAPTURE_PAUSED, KEPT_MAP, scan

_MEETS = (o.Created, o.AttrsSet, o.XattrSet, o.ContentSet, o.Moved)
"""The peer's operations that meet an object's local state: what changed here is captured before,
the object's note refreshed after."""


class SiteBound(SiteRelink, SiteApply):
    """Capture paused past the bound, and resumed once the peer caught up."""

    def capture_paused(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Is capture paused (the outbox passed its bound; `PauseCapture`)?"""
        return txn.get(CAPTURE_PAUSED, db=self.meta) is not None

    def outbox_operations(self, txn: lmdb.Transaction[bytes]) -> int:
        """The outbox's entries, acknowledged or not (ForgetSite drops those both sites are past)."""
        return int(txn.stat(self.db["soutbox"])["entries"])

    def pause_capture(self, txn: lmdb.Transaction[bytes]) -> None:
        """Stop capturing, keeping the link: each object noted as the peer was last told. Paused
        already: nothing (a proposal repeated by a new leader)."""
        if self.peer(txn) is None:
            raise FsError(errno.ENOENT, "not linked to any site")
        if self.capture_paused(txn):
            return
        txn.put(CAPTURE_PAUSED, b"", db=self.meta)
        for key, value in scan(txn, self.db["sinos"], b""):
            self._note(txn, bytes(key), bytes(value))

    def resume_capture(self, txn: lmdb.Transaction[bytes], now_ns: int) -> int:
        """Capture what changed here while paused (relink.py's difference capture), and capture
        every command from now on. Returns the number of operations that puts in the outbox; 0
        and nothing done when not paused (a proposal repeated)."""
        if self.peer(txn) is None:
            raise FsError(errno.ENOENT, "not linked to any site")
        if not self.capture_paused(txn):
            return 0
        before = self.outbox_operations(txn)
        txn.delete(CAPTURE_PAUSED, db=self.meta)
        self.relink(txn, now_ns)
        return self.outbox_operations(txn) - before

    def keep_paused_notes(self, txn: lmdb.Transaction[bytes]) -> bool:
        """Unlinking while paused: the notes stay as they are (they say what the peer was told,
        not what the namespace holds now), and the pause ends with the link. Was it paused?"""
        if not self.capture_paused(txn):
            return False
        txn.delete(CAPTURE_PAUSED, db=self.meta)
        return True

    def _apply_one(self, txn: lmdb.Transaction[bytes], op: o.Operation, extents_of: dict[Stamp, Any],
                   now_ns: int) -> int:
        """While paused: a local change of the object, not captured yet, is captured before the
        peer's operation meets it, and after it applied the object's note says what both hold.
        A move, or an operation on an object whose names changed here, ends the pause first (what
        changed here is captured, as at `ResumeCapture`): a move re-shows whole name groups and
        judges the files below a directory, against names the tables no longer match."""
        if not isinstance(op, _MEETS) or not self.capture_paused(txn):
            return super()._apply_one(txn, op, extents_of, now_ns)
        if isinstance(op, o.Moved) or self._renamed_here(txn, op.object):
            txn.delete(CAPTURE_PAUSED, db=self.meta)
            self.relink(txn, now_ns)  # the node running the link pauses again if still past the bound
            return super()._apply_one(txn, op, extents_of, now_ns)
        self._capture_uncaptured(txn, op.object)
        conflicts = super()._apply_one(txn, op, extents_of, now_ns)
        self._refresh_note(txn, op.object)
        return conflicts

    def content_moved_on(self, txn: lmdb.Transaction[bytes], obj: bytes, ino: int) -> bool:
        """While paused: was `obj`'s file written since its note (since its last captured content
        version)? Then that version's bytes are gone from the file: it ships as `Superseded`, and
        the resume sends the content the file holds (link.py, `shipping`)."""
        if not self.capture_paused(txn):
            return False
        noted = txn.get(KEPT_MAP + obj, db=self.meta)
        inode = self.ns.get_inode(txn, ino)
        return noted is not None and inode is not None and self._as_kept(txn, inode)[KEPT_HEAD:] != bytes(noted)[KEPT_HEAD:]

    def _renamed_here(self, txn: lmdb.Transaction[bytes], obj: bytes) -> bool:
        """Is an entry of `obj` no longer where the tables show it (renamed or deleted here)?"""
        ino = self._ino(txn, obj)
        for key, _ in scan(txn, self.db["sobjents"], obj):
            shown = self._shown(txn, bytes(key[len(obj):]))
            if shown is not None and self.ns.lookup(txn, *shown) != ino:
                return True
        return False

    def _refresh_note(self, txn: lmdb.Transaction[bytes], obj: bytes) -> None:
        """`obj`'s note says what it holds now: what the peer holds too, after its operation."""
        ino = self._ino(txn, obj)
        if ino is not None:
            self._note(txn, ino.to_bytes(8, "big"), obj)

    def _capture_uncaptured(self, txn: lmdb.Transaction[bytes], obj: bytes) -> None:
        ino = self._ino(txn, obj)
        inode = None if ino is None else self.ns.get_inode(txn, ino)
        noted = txn.get(KEPT_MAP + obj, db=self.meta)
        if inode is not None and noted is not None:
            self._relink_registers(txn, obj, inode, bytes(noted), inode.ctime_ns)

    def _note(self, txn: lmdb.Transaction[bytes], ino_key: bytes, obj: bytes) -> None:
        inode = self.ns.get_inode(txn, int.from_bytes(ino_key, "big"))
        if inode is not None:
            txn.put(KEPT_MAP + obj, self._as_kept(txn, inode), db=self.meta)
