"""The interfaces between the filesystem layer and a cluster's coherence (awsomefsd/cluster/).

`Coherence` is what a cluster adds to the single-node operations; the filesystem layer calls it
and never knows how it is done (docs/coherence.md states the contract of each hook). In the other
direction the cluster reaches this node's files only through the two callables below, which the
composition root (awsomefsd/daemon/member.py) hands it at construction: `FileData.flush` and
`Handles.holds`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

FlushFile = Callable[[int], Awaitable[None]]
"""`await flush(ino)`: this node's buffered data of the file to the device, its mapping to the log."""
HoldsInode = Callable[[int], bool]
"""`holds(ino)`: does anything on this node still reach the inode (a handle, a kernel reference to
a directory, a lookup answered moments ago)?"""


class Coherence(Protocol):
    """What a cluster adds to the single-node operations (awsomefsd/cluster/coherence.py)."""

    async def catch_up(self, *, drain: bool = True) -> None:
        """Return once this node has applied everything committed before the call and, with
        `drain`, the kernel caches that made stale are invalidated. Lookups pass drain=False: the
        kernel holds an entry invalidation of a directory until a lookup in it is answered."""
        ...

    async def opening(self, ino: int) -> None:
        """Close-to-open, before an open of `ino`: return once this node has applied every close
        made elsewhere before the call (a `catch_up`), or knows that no other node can have
        written the file since it last applied the log (it holds the write lease); the kernel
        caches such closes made stale are invalidated either way."""
        ...

    def opens_at_once(self, ino: int) -> bool:
        """Would `opening(ino)` return at once, without even a checkpoint (this node holds the
        file's write lease and its own liveness lease, and no kernel invalidation is pending)? A
        transport then serves the OPEN without a task of its own."""
        ...

    def writing(self, ino: int) -> AbstractAsyncContextManager[None]:
        """Hold the file's write lease for the whole of a write or truncate: entered once this
        node holds it; the lease is not handed to another node until every such block is left."""
        ...

    def changing(self, dirs: Iterable[int]) -> AbstractAsyncContextManager[bool]:
        """Hold the delegation of each directory for a whole namespace change in them; entered once
        this node holds them all. True: the change may run ahead of the log (MetaClient.run_ahead);
        False: it goes through the log in its turn (docs/delegations.md)."""
        ...

    def holds_now(self, inodes: Iterable[int]) -> bool:
        """Would `changing(inodes)`, `holding` and `writing` of each, and a look in a directory
        among them, enter without waiting (and a change run ahead)? This node holds every one of
        these delegations or write leases, none is being handed over, and the node is not
        strict. A transport then serves the request without a task of its own."""
        ...

    def taking(self, dirs: Iterable[int]) -> AbstractAsyncContextManager[None]:
        """Hold these directories' delegations for the block, in any coherence mode: a change the
        state machine refused because another node holds one (`Delegated`) goes again inside."""
        ...

    def holding(self, ino: int) -> AbstractAsyncContextManager[bool]:
        """True while this node holds the inode's write lease (or directory's delegation), which
        it then keeps until the block is left; never asks for it. A change to the inode's
        attributes may run ahead of the log only then."""
        ...

    @property
    def node_id(self) -> int:
        """This member's id: a file it creates ahead of the log takes its write lease with it."""
        ...

    def created_ahead(self, ino: int, parent: int, *, is_dir: bool) -> None:
        """A file or directory was just created ahead of the log in `parent`, with this node's
        write lease or delegation; until another node can reach a file, its data mappings may run
        ahead as well."""
        ...

    def published(self, ino: int) -> None:
        """The file is now reachable other than through the directory it was created in."""
        ...

    def fresh(self, ino: int) -> bool:
        """May the file's mappings and unlink run ahead of the log: `only_here`, and this node's
        liveness lease valid?"""
        ...

    def only_here(self, ino: int) -> bool:
        """Can no other node reach the file: created ahead here, reachable only through the
        directory it was created in, whose delegation has not begun to move since?"""
        ...

    async def looking(self, ino: int, *, found: int | None = None, change_next: bool = False) -> bool:
        """Before a lookup that found nothing, or a readdir: True when this node holds the
        directory's delegation (its view is complete: no catch-up needed); when another node holds
        it, its acknowledged changes are committed first (the delegation moves here). `found`: the
        inode a lookup found; a directory (a path walk, which seldom changes the directory it
        passes through) gives a delegation moved here only for the look back at once.
        `change_next`: a lookup that found nothing, which a create of the name most often
        follows: the delegation is kept a moment for it (cluster/coherence_handover.py,
        LOOKUP_TURN_S)."""
        ...

    def holder_elsewhere(self, directory: int) -> int:
        """The other member whose delegation of `directory` this node reads as committed, to which
        a create or a look that found nothing may go instead of the delegation coming here
        (design note 145); 0: none (nobody holds it, this node does or is handing it over, or
        strict mode, which runs nothing for others and asks nobody to)."""
        ...

    async def holder_to_ask(self, directory: int) -> int:
        """`holder_elsewhere`, once a hand-over of the directory by this node (if one is under
        way) has committed: the holder it went to."""
        ...

    def ask_for_turn(self, directory: int) -> None:
        """Ask for the directory's delegation without waiting for it: the creates sent to its
        holder meanwhile answer in milliseconds, and the turn comes as for any request."""
        ...

    def serves_for_another(self, directory: int) -> bool:
        """May this node change `directory` or answer a look in it for another member now: it
        holds the delegation and no hand-over of it has begun (a change entered with `changing`
        right after, with no await between, runs ahead under it)?"""
        ...

    def held_for_a_look(self, directory: int) -> bool:
        """Does this node hold the directory's delegation only because a look took it (nothing
        changed under it since)? Such a delegation makes nothing for others: it goes to a node
        that asks at once, and the node that changes the directory should have it."""
        ...

    def changed_for_another(self, directory: int, name: bytes) -> None:
        """This node made `name` in the directory for another member: a listing its kernel keeps
        is no longer current, nor an answer "no such name" it gave for that name for long."""
        ...

    def granted_epoch(self) -> int:
        """This node's liveness-lease epoch, which a create run for it by another member names
        for the new file's write lease (`MknodFor.lease_epoch`)."""
        ...

    def release_orphan(self, ino: int) -> None:
        """Nothing on this node reaches the unlinked inode any more (queued, batched)."""
        ...

    def appended(self, ino: int) -> None:
        """This node appended at the cluster's end of file, not the kernel's: its cached size is stale."""
        ...

    def keep_listing(self, ino: int) -> bool:
        """May the kernel keep the listing of this directory it has, at an OPENDIR (after the
        open's catch-up)? Only one it read from this daemon since which nothing changed the
        directory's entries other than through this node's kernel."""
        ...

    def listed(self, ino: int) -> None:
        """The kernel read this directory's listing from the start."""
        ...

    def keep_cache(self, ino: int) -> bool:
        """May the kernel keep the file's page cache at this open? No, once another node changed
        its data since the last open here (the one invalidation that cannot block the kernel)."""
        ...

    def name_timeout_s(self, directory: int) -> float | None:
        """How long the kernel may cache a name answered now in `directory` (None: the mount's
        entry timeout): long where this node holds the directory's delegation."""
        ...

    def absent_timeout_s(self, directory: int, name: bytes) -> float | None:
        """`name_timeout_s` for "no such name" answered now for `name`: this node then knows its
        kernel may hold that answer for long (a create it runs there for another member must
        make the kernel drop it: `changed_for_another`)."""
        ...

    @property
    def strict(self) -> bool:
        """Catch up before every lookup and getattr too (the kernel then caches nothing)."""
        ...
