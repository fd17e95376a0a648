"""The blocks a member's requests hold a lease or delegation in: `writing`, `holding`, `taking` and
`changing` of ClusterCoherence (cluster/coherence.py), as plain context-manager classes.

Every write, attribute change and namespace change of a member enters one. As generator-based
context managers (`contextlib.asynccontextmanager`, `changing` entering `taking`) a namespace
change spent ~2.9 µs entering and leaving them, against ~0.8 µs as classes (measured here; a
member's unlink spent a fifth of its request inside them, issue 42). The rules stay
ClusterCoherence's: these classes only enter and leave, calling its `_acquire` and keeping its
counts of writers, looks and touches.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from awsomefsd.meta.errors import FsError

if TYPE_CHECKING:
    from awsomefsd.cluster.coherence import ClusterCoherence


class _Delegations:
    """Take and hold directories' delegations for the block, in inode order, and leave them
    touched (`ClusterCoherence.taking`; `look`: for a look alone)."""

    __slots__ = ("_coherence", "_dirs", "_entered", "_look")

    def __init__(self, coherence: ClusterCoherence, dirs: Iterable[int], *, look: bool = False) -> None:
        self._coherence = coherence
        self._dirs = dirs
        self._look = look
        self._entered: list[int] = []

    async def _take(self) -> None:
        co = self._coherence
        entered = self._entered
        try:
            for ino in sorted(set(self._dirs)):
                already = ino in co.held and ino not in co._releasing
                await co._acquire(ino)
                co._writers[ino] = co._writers.get(ino, 0) + 1
                entered.append(ino)
                if not self._look:
                    co._no_longer_a_look(ino)
                elif not already:
                    co._looked_only.add(ino)
        except BaseException:
            self._leave()  # what was taken before the failure (a cancel, a lease wait given up)
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._leave()

    def _leave(self) -> None:
        co = self._coherence
        now = trio.current_time()
        for ino in self._entered:
            co._writer_done(ino)
            co._touched[ino] = now
            co._delegated.add(ino)
        self._entered = []


class Taking(_Delegations):
    """`ClusterCoherence.taking`: the block's value is None."""

    __slots__ = ()

    async def __aenter__(self) -> None:
        await self._take()


class Changing(_Delegations):
    """`ClusterCoherence.changing` outside strict mode: the block's value is True (the change may
    run ahead of the log)."""

    __slots__ = ()

    async def __aenter__(self) -> bool:
        await self._take()
        return True


class Writing:
    """Hold a file's write lease across a whole write (`ClusterCoherence.writing`): a write that
    completed while this node's liveness lease expired fails with EIO, its file reported lost."""

    __slots__ = ("_coherence", "_expiries", "_ino")

    def __init__(self, coherence: ClusterCoherence, ino: int) -> None:
        self._coherence = coherence
        self._ino = ino
        self._expiries = 0

    async def __aenter__(self) -> None:
        co = self._coherence
        await co._acquire(self._ino)
        self._expiries = co.expiries
        co._writers[self._ino] = co._writers.get(self._ino, 0) + 1

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        co, ino = self._coherence, self._ino
        co._writer_done(ino)
        if exc_type is None and co.expiries != self._expiries:
            reason = f"node {co.node_id}'s lease expired during a write to inode {ino}"
            if co.lose_file is not None:
                co.lose_file(ino, reason)
            raise FsError(errno.EIO, reason, cause="lease")


class Holding:
    """True while this node holds the inode's lease, kept until the block is left; never asks for
    it (`ClusterCoherence.holding`)."""

    __slots__ = ("_coherence", "_held", "_ino")

    def __init__(self, coherence: ClusterCoherence, ino: int) -> None:
        self._coherence = coherence
        self._ino = ino
        self._held = False

    async def __aenter__(self) -> bool:
        co, ino = self._coherence, self._ino
        if ino not in co.held or ino in co._releasing:
            return False
        co._writers[ino] = co._writers.get(ino, 0) + 1
        co._no_longer_a_look(ino)
        self._held = True
        return True

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._held:
            return
        co, ino = self._coherence, self._ino
        self._held = False
        co._writer_done(ino)
        if ino in co._delegated:
            co._touched[ino] = trio.current_time()
