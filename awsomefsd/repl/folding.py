"""Folding what a linked site captured later (issue 47): while captures wait (meta/sites/pending.py),
the node running the link proposes `FoldCapture`, so that the outbox, which the shipper reads,
holds them a few milliseconds after their commands, in batches of up to `MAX_FOLD` records.

Apart because it is the one proposal the link makes for the write path rather than for the
other site: it runs whether or not the link is up, so what waits for a fold stays small.

A fold waits while local writes go on capturing (the newest record waiting moved since the last
look), FOLD_DELAY_MAX_S at most: folded as they came, every 20 ms, in batches of tens, the folds
and the small pushes they fed (a proposal, a transaction and a round trip each) took the
daemon's one core from the writes: an untar on a linked site took 2.8x its time unlinked
(bench/site_bench.py). Folded in batches of hundreds, 1.8x (design note 117).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError

log = logging.getLogger(__name__)

MAX_FOLD = 512
"""Records one FoldCapture folds at most (another follows at once while more wait): at 35-70 us
a create (bench/capture_cost.py), a fold holds the state machine 18-36 ms at most, so a local
request never waits behind a long one."""
FOLD_POLL_S = 0.02
"""How often the node running the link looks for captures to fold (one read of an LMDB page)
while commands apply: what a write waits before it can ship once writes stop (the shipper looks
at the outbox every 50 ms). With nothing waiting, the loop sleeps until a command applies."""
FOLD_DELAY_MAX_S = 0.25
"""How long captures may wait for a fold while writes keep coming: a steady writer's folds come
this far apart (each of hundreds of records, not tens), and its operations' lag grows by about
as much. Measured (design note 117): 1 s kept a burst of 2,000 creates free of folds (0.87x an
unlinked site's rate, against 0.61x at 0.25 s) but put a steady writer's lag at p99 2.8 s, over
issue 47's 2 s; an untar, seconds long, gained as much at either."""


class Folding:
    """Proposing FoldCapture, a job of `SiteService`."""

    meta: MetaClient
    elsewhere: Callable[[], str | None]

    async def _fold_captures(self) -> None:
        """Fold while this node runs the link (a cluster's leader) and captures wait. A fold is a
        background command (`hurry=False`): on a leader whose own writes are acknowledged ahead
        of the log, it rides the batch being gathered instead of sending it at once, which every
        20 ms cut short the gathering of the writes it folds (as orphan releases did: note 87)."""
        waiting = FoldWait()
        while True:
            looked_at = self.meta.applied_index
            await trio.sleep(FOLD_POLL_S)
            if waiting.since is None:  # nothing waited at the last look: none will before a command applies
                await self.meta.applied_past(looked_at)
            if self.elsewhere() is not None or not waiting.due(self.meta.site_newest_unfolded(), trio.current_time()):
                continue
            try:
                while await self.meta.propose(c.FoldCapture(MAX_FOLD), hurry=False) >= MAX_FOLD:
                    await trio.sleep(0)  # more wait: fold on, letting other tasks run between
            except FsError as exc:  # a cluster changing leader: the next round tries again
                log.debug("folding captures: %s", exc)
            waiting = FoldWait()


@dataclass
class FoldWait:
    """When to fold what waits: once the newest record waiting stands still for a look (writes
    paused), or FOLD_DELAY_MAX_S after the first look that found any."""

    newest: int | None = None
    since: float | None = None

    def due(self, newest: int | None, now: float) -> bool:
        if newest is None:
            self.newest = self.since = None
            return False
        if self.since is None:
            self.since = now
        elif newest == self.newest or now - self.since >= FOLD_DELAY_MAX_S:
            return True
        self.newest = newest
        return False
