"""A kernel for an `Invalidator` in tests that run a member's coherence without a mount: it takes
every invalidation and does nothing with it."""

from __future__ import annotations


class NoKernel:
    def invalidate_inode(self, ino: int, attr_only: bool) -> None:
        pass

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        pass
