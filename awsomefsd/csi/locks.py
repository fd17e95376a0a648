"""Per-key serialisation of CSI operations (one volume name, one target path, ...).

The CO usually sends one call per volume at a time, but after a restart it may race itself. Rather
than answer ABORTED, the servicers queue calls on the same key, which keeps retries idempotent and
cheap. Entries exist only while someone holds or waits for them, and the number of distinct keys
in use is bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import trio

from awsomefsd.rpc.bridge import RpcAbort

MAX_KEYS = 1024


class KeyedLock:
    """A trio.Lock per key, created on demand and dropped when unused."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}
        self._max_keys = max_keys

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            if len(self._locks) >= self._max_keys:
                raise RpcAbort(grpc.StatusCode.ABORTED, "too many operations in progress; retry later")
            entry = (trio.Lock(), 0)
        lock, users = entry
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock_now, users_now = self._locks[key]
            assert lock_now is lock and users_now >= 1
            if users_now == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users_now - 1)

    def __len__(self) -> int:
        return len(self._locks)
