"""The state a member's coherence keeps (cluster/coherence.py: `ClusterCoherence`, built from this
and the parts in coherence_applied.py and coherence_handover.py), and the few steps all of them
take: waking the writers that wait for a lease to change hands, queueing a hand-over, and ending a
new file's freshness (docs/delegations.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable

import trio

from awsomefsd.fs.coherence import FlushFile, HoldsInode
from awsomefsd.fuse.invalidate import MOUNTED, Invalidator
from awsomefsd.meta.client import MetaClient

log = logging.getLogger(__name__)

MAX_TOLD_ABSENT = 4096
"""Answers "no such name" given the kernel for long that are remembered one by one; past that,
any name may be cached as absent until the next drop."""


class CoherenceBase:
    """What this member holds, who waits for what, and the counters `status` and the metrics show."""

    def __init__(self, node_id: int, meta: MetaClient, invalidator: Invalidator, epoch: Callable[[], int], *,
                 flush: FlushFile | None = None,
                 lose_file: Callable[[int, str], None] | None = None,
                 holds: HoldsInode = lambda _ino: False,
                 kernel_may_cache: HoldsInode = lambda _ino: True,
                 wait_lease: Callable[[], Awaitable[None]] | None = None,
                 read_barrier: Callable[..., Awaitable[object]] | None = None,
                 lease_valid: Callable[[], bool] = lambda: False,
                 strict: bool = False, held_names_s: float = 0.0,
                 forget_names: Callable[[], bool] = MOUNTED.forget_names) -> None:
        self.node_id = node_id
        self.strict = strict
        self.meta = meta
        self.invalidator = invalidator
        self.epoch = epoch
        """This node's liveness-lease epoch, now."""
        self.flush = flush
        """`async flush(ino)`: this node's buffered data of the file to the device and the log."""
        self.holds = holds
        self.kernel_may_cache = kernel_may_cache
        """May the kernel cache anything of this inode (`Handles.kernel_may_cache`)? Invalidations of
        an inode it may not are never sent."""
        self.lose_file = lose_file
        """`lose_file(ino, reason)`: drop the file's buffered bytes; its descriptors report EIO."""
        self.expiries = 0  # times the cluster expired this node's liveness lease (ExpireNode applied)
        """Does anything on this node still reach this inode (a handle, a recent lookup)?"""
        self.wait_lease = wait_lease
        """Until this node's liveness lease is renewed (a writer that finds its epoch expired,
        after a pause, waits for the new one instead of failing at once)."""
        self.read_barrier = read_barrier
        """`async read_barrier(timeout_s=...)`: apply everything committed before the call
        (ReadIndex); without it `catch_up` only drains the invalidations."""
        self.lease_valid = lease_valid
        """Is this node's liveness lease valid now, by its own conservative count (the device's
        write fence is open)? Only then does no other node hold what it believes it holds: the
        cluster expires a node's leases only once its liveness lease has lapsed. False by default:
        nothing skips a catch-up on its strength."""
        self.held_names_s = 0.0 if strict else held_names_s
        """How long the kernel may cache a name in a directory this node holds (`name_timeout_s`)."""
        self.forget_names = forget_names
        """Make the kernel look up again every name it caches (FUSE_NOTIFY_INC_EPOCH); False: cannot."""
        self._names_forgettable: bool | None = None  # unknown until the first name cached for long
        self._long_names: set[int] = set()  # directories whose names went out for long since the last drop
        self.names_forgotten = 0
        self._orphans: set[int] = set()  # unlinked inodes to look at: release those we do not hold
        self._orphans_wake = trio.Event()
        self._maybe_deleted: set[int] = set()  # held or fresh inodes a ReleaseOrphans may have deleted
        self.orphans_released = 0
        self.orphan_releases = 0  # ReleaseOrphans commands proposed
        self.held: set[int] = set()
        self._acquired_at: dict[int, float] = {}  # inode -> when we got its lease (trio clock)
        self._waiting: dict[int, dict[int, int]] = {}  # inode -> {waiting node: its epoch}, first come first
        self._requested_at: dict[int, float] = {}  # inode -> our last request (trio clock)
        self._releasing: set[int] = set()  # hand-over under way: new writes here wait
        self._handing: set[int] = set()  # hand-over task scheduled or running
        self._writers: dict[int, int] = {}  # inode -> writes in progress under its lease
        self._delegated: set[int] = set()  # directories whose delegation this node asked for
        self._asking: set[int] = set()  # directories whose delegation a background task asks for (`ask_for_turn`)
        self._sent_at: dict[int, float] = {}  # directory -> when this node last sent a create to its holder
        self._told_absent: set[tuple[int, bytes]] = set()  # "no such name" told the kernel for long since the last drop
        self._told_absent_unknown = False  # more than MAX_TOLD_ABSENT were: any may be cached
        self._looked_only: set[int] = set()  # delegations taken for a look, nothing changed under them since
        self._awaiting_change: set[int] = set()  # taken by a lookup that found nothing, no change yet (`looking`)
        self._listed: set[int] = set()  # directories the kernel keeps a current listing of (`keep_listing`)
        self._fresh: dict[int, int] = {}  # file created ahead -> its directory (`fresh`)
        self._fresh_in: dict[int, set[int]] = {}  # directory -> the fresh files created in it
        self._touched: dict[int, float] = {}  # inode -> when the last change under its lease ended
        self._idle: dict[int, trio.Event] = {}  # set when an inode's last write in progress ends
        self._stale_data: set[int] = set()
        # inodes opened since this daemon started: a daemon before it (a hand-over, a crash) may
        # have marked one stale and not told the kernel at an open yet, and its marks are gone
        self._opened: set[int] = set()
        self._all_stale = False
        self._changed: dict[int, trio.Event] = {}  # set when an inode's lease changes hands
        self._to_release: trio.MemorySendChannel[int]
        self._release_queue: trio.MemoryReceiveChannel[int]
        self._to_release, self._release_queue = trio.open_memory_channel(4096)
        self._nursery: trio.Nursery | None = None
        self.catch_ups = 0
        self.opens_held = 0
        """Opens that needed no catch-up: the file's write lease was this node's (`opening`)."""
        self.stale_reads = 0
        self.cut_off = False  # the last catch-up ran out of budget and none succeeded since (catch_up)
        self.leases_acquired = 0
        self.leases_released = 0
        self.lease_waits = 0
        self.lease_timeouts = 0
        self.handover_failures = 0
        self.delegations_returned = 0
        self.delegation_refusals = 0
        """Changes of ours the log refused because another node held a directory's delegation."""
        self.lease_wait_s = 0.0  # total time writes waited for a lease
        self.lease_wait_max_s = 0.0

    def reload(self) -> None:
        """Rebuild what this node holds from the state (start, snapshot install, expiry). The
        queues are forgotten (commands were skipped): waiters repeat their requests."""
        self.held = set(self.meta.leases_of(self.node_id))
        self.names_leaving()  # some may be gone (a snapshot skipped their release, an expiry)
        self._acquired_at = {ino: -math.inf for ino in self.held}
        self._looked_only.clear()
        self._awaiting_change.clear()
        self._listed.clear()  # a snapshot may have changed any directory unseen
        self._fresh.clear()
        self._fresh_in.clear()
        self._waiting.clear()
        for ino in list(self._changed):
            self._wake(ino)

    def name_timeout_s(self, directory: int) -> float | None:
        """How long the kernel may cache a name it is told now in `directory` (an entry, or "no such
        name"); None: the mount's own (short) timeout.

        Long only in a directory whose delegation this node holds and is not handing over: no other
        node changes its entries meanwhile (the state machine refuses them). A hand-over makes the
        kernel look every cached name up again before its release (`names_leaving`). After an
        idle give-back the directory's names stay long, those cached and those answered since,
        until this node applies another node's grant of the directory or change to it
        (`names_changed_elsewhere`), as attributes follow others' changes (with the replication
        lag): a lookup answers from what this node applied anyway. A node that cannot hand over
        (paused, cut off) loses its delegations without a word (`ExpireNode`) and drops its names
        when it applies that: until then it serves what it has, as it does its cached attributes
        and pages. Only where the kernel can
        be told to drop every name at once without waiting for anything (Linux 6.16 and later):
        an entry invalidation waits for the directory's pending requests, and a daemon killed
        during that wait can never exit (docs/coherence.md, mechanism 2)."""
        if not self.held_names_s or directory in self._releasing:
            return None
        if directory not in self.held and directory not in self._long_names:
            return None  # given back long ago (or never held): another node may change it unseen
        if self._names_forgettable is None:
            self._names_forgettable = self.forget_names()  # no name is cached for long yet: harmless
        if not self._names_forgettable:
            return None
        self._long_names.add(directory)
        return self.held_names_s

    def _no_longer_a_look(self, ino: int) -> None:
        """A change runs under the delegation (or it goes): it is no longer one taken for a look,
        nor one waiting for the change a lookup that found nothing announced (`looking`)."""
        self._looked_only.discard(ino)
        self._awaiting_change.discard(ino)

    def absent_timeout_s(self, directory: int, name: bytes) -> float | None:
        seconds = self.name_timeout_s(directory)
        if seconds is not None and not self._told_absent_unknown:
            if len(self._told_absent) >= MAX_TOLD_ABSENT:
                self._told_absent_unknown = True
                self._told_absent.clear()
            else:
                self._told_absent.add((directory, name))
        return seconds

    def names_leaving(self) -> None:
        """A directory delegation is leaving this node (a hand-over, an expiry, a snapshot, a
        stop): the kernel looks up again every name it caches before using it, so none it was
        told for long outlives the delegation (a moment later another node may change the
        directory). A hand-over calls it as the delegation stops counting as held (new answers
        are short from then on) and again once its release is applied (an answer computed just
        before may have reached the kernel after the first call)."""
        self._long_names.clear()
        self._told_absent.clear()
        self._told_absent_unknown = False
        if self._names_forgettable and self.forget_names():
            self.names_forgotten += 1

    def names_changed_elsewhere(self, directories: Iterable[int]) -> None:
        """Another node was granted these directories or changed their entries (applied here):
        if this node's kernel caches names in one of them for long, it drops every name."""
        if self._long_names and not self._long_names.isdisjoint(directories):
            self.names_leaving()

    def published(self, ino: int) -> None:
        """The file is now reachable another way (a link, a rename into another directory): its
        mappings wait for the log from now on."""
        directory = self._fresh.pop(ino, None)
        if directory is not None:
            self._fresh_in[directory].discard(ino)

    def _unfresh_directories(self, dirs: set[int]) -> None:
        """These directories' delegations begin to move: what was created in them is no longer fresh."""
        for directory in dirs:
            for ino in self._fresh_in.pop(directory, ()):
                self._fresh.pop(ino, None)

    def _hand_over_later(self, ino: int) -> None:
        try:
            self._to_release.send_nowait(ino)
        except trio.WouldBlock:
            log.warning("hand-over queue full; inode %d's lease is handed over on the next request", ino)

    def _wake(self, ino: int) -> None:
        event = self._changed.pop(ino, None)
        if event is not None:
            event.set()
