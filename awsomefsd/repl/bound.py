"""A bounded outbox in a running daemon (meta/sites/bound.py): the node that runs the link pauses
capture once the outbox passes `[site] outbox_max_operations`, and resumes it once the peer
acknowledged everything the outbox holds.

Apart from the shipper because it must run while the peer is away, when the shipper only retries
its connection; it reads two counters a second and proposes twice per absence.
"""

from __future__ import annotations

import logging
import time

import trio

from awsomefsd.meta import commands as c
from awsomefsd.meta.errors import FsError
from awsomefsd.repl.endpoint import Endpoint

log = logging.getLogger(__name__)

BOUND_POLL_S = 0.5
"""How often the outbox's size is read (one LMDB stat): what commits between two reads is how far
past the bound it may go."""


class OutboxBound(Endpoint):
    """Pausing and resuming capture, a job of `SiteService`."""

    async def _keep_outbox_bounded(self) -> None:
        """While linked: on the node that runs the link, pause or resume when it is time; a
        proposal that fails (a leader changing) is tried at the next look."""
        while True:
            await trio.sleep(BOUND_POLL_S)
            if self.elsewhere() is not None:
                continue
            try:
                await self.bound_outbox()
            except FsError as exc:
                log.warning("site: could not %s capture: %s", "resume" if self.meta.site_capture_paused() else "pause",
                            exc)

    async def bound_outbox(self) -> None:
        """Pause capture past the bound; resume it once the link is up and the peer acknowledged
        the whole outbox (the difference capture then sends what changed meanwhile)."""
        bound = self.outbox_max_operations
        if not self.meta.site_capture_paused():
            # What the peer applied stays until both sites forget it: only what it has not counts
            # (counted only past the bound: the entries are one LMDB stat).
            size = self.meta.site_outbox_operations()
            if bound and size > bound and self.meta.site_pending(self.state.peer_applied) > bound \
                    and self.meta.may_propose(c.PauseCapture):
                await self.meta.propose(c.PauseCapture(time.time_ns()))
                log.warning("site: the outbox holds %d operations, over its bound (%d, [site] "
                            "outbox_max_operations): capture paused until the other site applied them", size, bound)
        elif self.state.up and self.state.peer_applied is not None \
                and not self.meta.site_outbox(self.state.peer_applied, 1) and self.meta.may_propose(c.ResumeCapture):
            sent = await self.meta.propose(c.ResumeCapture(time.time_ns()))
            log.info("site: the other site applied the whole outbox: capture resumed, %d operations for what "
                     "changed here meanwhile", sent)
