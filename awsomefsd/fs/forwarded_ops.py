"""Creates and looks in a directory another member holds, sent to that member, and those another
member sends here (fs/forwarding.py says why and how; design notes 145, 148)."""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Callable
from typing import NamedTuple

import trio

from awsomefsd.fs import forwarding as fw
from awsomefsd.fs.ops_base import OperationsBase
from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.meta.records import Inode, check_name, check_new_inode

log = logging.getLogger(__name__)

SEND_TRIES = 5
"""Holders a look or a create is sent to before it goes the usual way (each one that answered
NOT_HOLDER was handing the directory over)."""
HANDOVER_WAIT_S = 0.5
"""How long a look or a create waits for a hand-over of the directory to show before it goes the
usual way (a hand-over is a drain of the holder's pipeline and a round of the log: 30-80 ms)."""
APPLY_WAIT_S = 10.0
"""How long a create the holder made waits for this node to apply it: as long as a change
proposed here would wait for the log (a node cut off from the leader learns nothing)."""


class Sent(NamedTuple):
    """What a holder answered (fs/forwarding.py's answer)."""

    holder: int
    status: fw.Status
    error: int
    value: int
    applied: int


class ForwardedOperations(OperationsBase):
    """The requester's side (`_look_at_holder`, `_create_at_holder`) and the holder's
    (`serve_forwarded`)."""

    # -- sent to the holder -----------------------------------------------------------------------
    async def _send(self, directory: int, holder: int, kind: str,
                    request: Callable[[int], bytes]) -> Sent | None:
        """Send a look or a create (`request(seen)`) to the directory's holder (`holder`, from
        `holder_to_ask`): what the holder that answered said, or None to go the usual way (this
        node cannot send, or no holder answered). A node that no longer holds the directory answers
        NOT_HOLDER with the holder it reads (it handed the directory over) and the log index it
        applied: the request goes there next, and that holder catches up to the index first. One
        that holds it for a look only answers TAKE: the usual way takes it from there at once.
        One that names itself (or nobody) has not applied its own hand-over yet: the next holder
        is then the one this node reads once it moved."""
        if self.forward is None or self.coherence is None or not self.meta.may_propose(c.MknodFor):
            return None
        seen = self.meta.applied_index
        for _ in range(SEND_TRIES):
            if not holder or holder == self.coherence.node_id:
                return None
            try:
                status, error, value, applied = fw.decode_answer(await self.forward(holder, kind, request(seen)))
            except ConnectionError as exc:
                self.forward_counts.failed += 1
                log.debug("a %s in directory %d at node %d: %s", kind, directory, holder, exc)
                return None
            if status is fw.Status.TAKE:
                return None
            if status is not fw.Status.NOT_HOLDER:
                return Sent(holder, status, error, value, applied)
            seen = max(seen, applied)
            if value in (holder, 0):  # it has not applied its own hand-over yet: this node's view will say
                await self._holder_moves(directory, holder)
                value = await self.coherence.holder_to_ask(directory)
            holder = value
        return None

    async def _holder_moves(self, directory: int, holder: int) -> None:
        """Until this node reads another holder of the directory than `holder` (at most
        HANDOVER_WAIT_S: a hand-over is a drain and a round of the log)."""
        with trio.move_on_after(HANDOVER_WAIT_S):
            while self.meta.lease_holder(directory) == holder:
                await self.meta.applied_past(self.meta.applied_index)

    async def _look_at_holder(self, directory: int, name: bytes) -> tuple[fw.Status, int] | None:
        """Ask the directory's holder whether `name` is there: (ABSENT, 0): answer ENOENT; (FOUND,
        the inode): answer with it, applied here with every change the holder acknowledged to it
        before it answered; None: look the usual way (nobody else holds the directory, no answer,
        or this node's view has another inode at that name once applied that far)."""
        holder = 0 if self.coherence is None else await self.coherence.holder_to_ask(directory)
        if not holder:  # the common case (this node holds it, or nobody does): nothing more to read
            return None
        sent = await self._send(directory, holder, fw.LOOK, lambda seen: fw.look_request(directory, name, seen))
        if sent is None or sent.status not in (fw.Status.ABSENT, fw.Status.FOUND):
            return None
        if sent.status is fw.Status.FOUND:
            await self._apply_holders(sent.holder, sent.applied, "found the name")
            if self.meta.lookup(directory, name) != sent.value or not self.exists(sent.value):
                return None
        self.forward_counts.looks += 1
        return sent.status, sent.value

    async def _create_at_holder(self, parent: int, name: bytes, mode: int, uid: int,
                                gid: int) -> tuple[Inode | None, int]:
        """A regular file made by the directory's holder for this node: (the file, its inode
        number); (None, the number) when it must be made the usual way with the number sent
        (`Operations._make_node`'s `ino`: the holder may have made it after all); (None, 0) when
        nothing was sent."""
        coherence = self.coherence
        holder = 0 if self.forward is None or coherence is None else await coherence.holder_to_ask(parent)
        if not holder:
            return None, 0
        assert coherence is not None
        check_name(name)
        check_new_inode(mode, uid, gid, 0)
        ino = await self.new_ino()
        node, epoch = coherence.node_id, coherence.granted_epoch()
        coherence.ask_for_turn(parent)
        sent = await self._send(parent, holder, fw.CREATE,
                                lambda seen: fw.create_request(parent, name, ino, mode, uid, gid, node, epoch, seen))
        if sent is not None and sent.status is fw.Status.FAILED:
            fw.raise_failed(sent.error)
        if sent is None or sent.status is not fw.Status.DONE:
            return None, ino
        await self._apply_holders(sent.holder, sent.value, "made the file")
        self.forward_counts.creates += 1
        inode = self.meta.inode(ino)
        if inode is None:  # made and removed elsewhere since: the kernel looks the name up again
            raise FsError(errno.ESTALE, "created and removed again meanwhile")
        return self.data.with_buffered(inode), ino

    async def _apply_holders(self, holder: int, index: int, what: str) -> None:
        """Apply the log up to `index`, where the holder's change or look made for this node is."""
        with trio.move_on_after(APPLY_WAIT_S):
            await self.meta.applied_up_to(index)
        if self.meta.applied_index < index:
            raise FsError(errno.EIO, f"node {holder} {what}, and this node did not apply it in {APPLY_WAIT_S:.0f} s")

    # -- served here for another member ----------------------------------------------------------
    async def serve_forwarded(self, kind: str, request: bytes) -> bytes:
        """Another member's look or create in a directory this node holds (raises
        fw.BadRequest for one that does not decode)."""
        if kind == fw.LOOK:
            directory, name, seen = fw.decode_look(request)
            if not await self._serves_others(directory, seen):
                return self._not_holder(directory)
            found = self.meta.lookup(directory, name)
            if found is None:
                return fw.answer(fw.Status.ABSENT)
            return fw.answer(fw.Status.FOUND, value=found, applied=await self._reached_by_another(found))
        if kind == fw.CREATE:
            return await self._serve_create(*fw.decode_create(request))
        raise fw.BadRequest(f"unknown kind {kind!r}")

    async def _reached_by_another(self, ino: int) -> int:
        """Another member found `ino` here and will read it: the log index up to which it applies
        first. A fresh file (created ahead here: its data mappings and its very name may still be
        in the pipeline) is fresh no more (its mappings wait for the log from now on, and its
        unlink is no longer one only its creator could see), and everything acknowledged before
        is decided first; anything else has no change of its own ahead of the log but its
        attributes, which a member's GETATTR answers from what it applied anyway. (A name given to
        it ahead of the log, by a rename within a directory, is not at that name in the
        requester's view yet: the requester then takes the delegation.)"""
        assert self.coherence is not None
        if not self.coherence.only_here(ino):
            return self.meta.applied_index
        self.coherence.published(ino)
        return await self.meta.acknowledged_applied()

    def _not_holder(self, directory: int) -> bytes:
        if self.coherence is not None and self.coherence.held_for_a_look(directory):
            return fw.answer(fw.Status.TAKE)
        return fw.answer(fw.Status.NOT_HOLDER, value=self.meta.lease_holder(directory), applied=self.meta.applied_index)

    async def _serves_others(self, directory: int, seen: int) -> bool:
        """Does this node hold the directory for others now? When not, and the requester applied
        more of the log than this node (where it read that this node holds it), not before
        catching up that far: the grant may be on its way here. True only with no await after
        the last look, so that a change entered right after runs ahead under the delegation."""
        if self.coherence is None or not self.meta.may_propose(c.MknodFor):
            return False
        if not self.coherence.serves_for_another(directory) and self.meta.applied_index < seen:
            with trio.move_on_after(HANDOVER_WAIT_S):
                await self.meta.applied_up_to(seen)
        return self.coherence.serves_for_another(directory)

    async def _serve_create(self, directory: int, name: bytes, ino: int, mode: int, uid: int, gid: int,
                            requester: int, epoch: int, seen: int) -> bytes:
        if not stat.S_ISREG(mode):
            raise fw.BadRequest("only regular files are created for another member")
        try:
            check_name(name)
            check_new_inode(mode, uid, gid, 0)
        except FsError as exc:
            return fw.answer(fw.Status.FAILED, error=exc.errno)
        if not await self._serves_others(directory, seen):
            return self._not_holder(directory)
        assert self.coherence is not None
        async with self._changing(directory) as ahead:  # held and not moving: entered at once
            if not ahead:
                return self._not_holder(directory)
            cmd = c.MknodFor(directory, name, ino, mode, uid, gid, self._now(), cookie=c.delegated_cookie(ino),
                             lease_to=requester, lease_epoch=epoch)
            try:
                _, committed = await self.meta.run_ahead_committed(cmd)
            except FsError as exc:  # the create's own error, from this node's view (EEXIST, EDQUOT)
                return fw.answer(fw.Status.FAILED, error=exc.errno)
        self.coherence.changed_for_another(directory, name)
        try:
            index = await committed()
        except FsError as exc:  # the log refused it (this node's delegation went with its lease)
            log.info("a create for node %d in directory %d was refused: %s", requester, directory, exc)
            return self._not_holder(directory)
        self.forward_counts.served += 1
        return fw.answer(fw.Status.DONE, value=index)
