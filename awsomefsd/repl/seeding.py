"""Proposing the initial sync's walk (issue 47, meta/sites/seeding.py): while directories are left
to walk, the node running the link proposes `SeedSite`, a slice of `SEED_SLICE` entries at a time,
as a background command, and waits while the other site has not applied half the outbox's bound,
so that the walk never pauses capture (bound.py) and what it sends stays bounded.

Apart because, like folding, it is a proposal loop of its own: it runs whether or not the link is
up, and stops with the walk; a kill of this node leaves the walk in the log, where the next run
(or the next leader) takes it up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from awsomefsd.meta import commands as c
from awsomefsd.meta.client import MetaClient
from awsomefsd.meta.errors import FsError
from awsomefsd.repl.endpoint import LinkState

log = logging.getLogger(__name__)

SEED_SLICE = 256
"""Entries one SeedSite looks at at most: at ~100-200 us an entry (bench/seed_cost.py), a slice
holds the state machine some 25-50 ms, as a fold of 512 captures does."""
SEED_POLL_S = 0.05
"""How often a walk left waiting (the outbox at half its bound, another member running the link)
looks again while commands apply. With no walk, the loop sleeps until a command applies."""


class Seeding:
    """Proposing SeedSite, a job of `SiteService`."""

    meta: MetaClient
    elsewhere: Callable[[], str | None]
    state: LinkState
    outbox_max_operations: int

    async def _seed_walk(self) -> None:
        """Seed while this node runs the link and the walk has directories left."""
        while True:
            looked_at = self.meta.applied_index
            await trio.sleep(SEED_POLL_S)
            if self.meta.site_seeding() is None:  # no walk: none starts before a command (LinkSite) applies
                await self.meta.applied_past(looked_at)
            if self.elsewhere() is not None or self.meta.site_seeding() is None or not self._may_seed() \
                    or self.meta.site_capture_paused():  # the resume seeds what is left (bound.py)
                continue
            try:
                while self._may_seed() and self.meta.site_seeding() is not None:
                    if await self.meta.propose(c.SeedSite(SEED_SLICE, time.time_ns()), hurry=False) == 0:
                        break  # capture paused (bound.py): the resume seeds what is left
                    await trio.sleep(0)  # let the link, the fold and the requests run between slices
            except FsError as exc:  # a cluster changing leader: the next round tries again
                log.debug("seeding the initial sync: %s", exc)

    def _may_seed(self) -> bool:
        """Is the outbox below half its bound, counting what the other site has not applied (the
        walk leaves the other half to local writes, and never pauses capture by itself)?"""
        bound = self.outbox_max_operations
        if not bound or self.meta.site_outbox_operations() < bound // 2:  # one LMDB stat: the common case
            return True
        return self.meta.site_pending(self.state.peer_applied) < bound // 2  # counts what is acknowledged
