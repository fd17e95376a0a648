"""Folding what a linked site captured later (issue 47): while captures wait (meta/sites/pending.py),
the node running the link proposes `FoldCapture`, so that the outbox, which the shipper reads,
holds them a few milliseconds after their commands, in batches of up to `MAX_FOLD` records.

Apart because it is the one proposal the link makes for the write path rather than for the
other site: it runs whether or not the link is up, so what waits for a fold stays small.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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
"""How often the node running the link looks for captures to fold (one read of an LMDB page).
What a write waits before it can ship; the shipper looks at the outbox every 50 ms."""


class Folding:
    """Proposing FoldCapture, a job of `SiteService`."""

    meta: MetaClient
    elsewhere: Callable[[], str | None]

    async def _fold_captures(self) -> None:
        """Fold while this node runs the link (a cluster's leader) and captures wait. A fold is a
        background command (`hurry=False`): on a leader whose own writes are acknowledged ahead
        of the log, it rides the batch being gathered instead of sending it at once, which every
        20 ms cut short the gathering of the writes it folds (as orphan releases did: note 87)."""
        while True:
            await trio.sleep(FOLD_POLL_S)
            if self.elsewhere() is not None or not self.meta.site_unfolded():
                continue
            try:
                while await self.meta.propose(c.FoldCapture(MAX_FOLD), hurry=False) >= MAX_FOLD:
                    await trio.sleep(0)  # more wait: fold on, letting other tasks run between
            except FsError as exc:  # a cluster changing leader: the next round tries again
                log.debug("folding captures: %s", exc)
