"""Which requests changing a file's data are in flight: what a READ of that file must wait for.

Kept apart from the session (fuse/kernel/session.py), which starts and ends them."""

from __future__ import annotations

import trio


class ChangesInFlight:
    """Per node id, the requests changing its data that the reader has started and not answered.

    A read waits for the changes to its file that arrived before it. The kernel counts on that:
    a buffered write copies into the page cache and unlocks the pages *before* its WRITE is sent
    (Linux since 5.10, to avoid a deadlock), so an invalidation in that window (an mtime seen to
    change, `fadvise(DONTNEED)`, reclaim) lets a reader's READ arrive while the WRITE is in
    flight. Answered with the bytes from before the write, that READ would fill the page cache
    with them for good: a read after `write()` returned would see old data. Tasks are scheduled
    in no particular order (trio shuffles each batch), so arrival order is kept here."""

    def __init__(self) -> None:
        self._pending: dict[int, list[trio.Event]] = {}

    def begin(self, nodeid: int) -> trio.Event:
        done = trio.Event()
        self._pending.setdefault(nodeid, []).append(done)
        return done

    def end(self, nodeid: int, done: trio.Event) -> None:
        done.set()
        pending = self._pending[nodeid]
        pending.remove(done)
        if not pending:
            del self._pending[nodeid]

    def any(self, nodeid: int) -> bool:
        return nodeid in self._pending

    def before(self, nodeid: int) -> tuple[trio.Event, ...]:
        """The changes in flight now: what a read arriving now waits for."""
        return tuple(self._pending.get(nodeid, ()))
