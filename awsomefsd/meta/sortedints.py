"""A sorted multiset-free list of ints kept as a list of short sorted sublists.

One flat sorted list costs a memmove of the whole list per insert or delete (about 13 us at 100,000
entries here); sublists of at most 2 * LOAD entries keep every update at a few microseconds while
lookups stay two bisects. It is the index behind FreeSpaceMap (extent starts, and extent sizes).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

LOAD = 512


class SortedInts:
    """Distinct ints in ascending order with floor/ceiling queries and ordered iteration."""

    __slots__ = ("_len", "_lists", "_maxes")

    def __init__(self) -> None:
        self._lists: list[list[int]] = []
        self._maxes: list[int] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, value: int) -> None:
        """Insert `value`, which must not be present."""
        lists, maxes = self._lists, self._maxes
        if not lists:
            lists.append([value])
            maxes.append(value)
            self._len = 1
            return
        i = bisect_left(maxes, value)
        if i == len(maxes):
            i -= 1
        sub = lists[i]
        j = bisect_left(sub, value)
        assert j == len(sub) or sub[j] != value, f"{value} already present"
        sub.insert(j, value)
        maxes[i] = sub[-1]
        self._len += 1
        if len(sub) > 2 * LOAD:
            lists.insert(i + 1, sub[LOAD:])
            del sub[LOAD:]
            maxes.insert(i, sub[-1])

    def remove(self, value: int) -> None:
        """Delete `value`, which must be present."""
        lists, maxes = self._lists, self._maxes
        i = bisect_left(maxes, value)
        assert i < len(maxes), f"{value} not present"
        sub = lists[i]
        j = bisect_left(sub, value)
        assert j < len(sub) and sub[j] == value, f"{value} not present"
        del sub[j]
        self._len -= 1
        if not sub:
            del lists[i]
            del maxes[i]
            return
        maxes[i] = sub[-1]
        if len(sub) < LOAD // 4 and len(lists) > 1:
            # Merge a thin sublist into a neighbour so the sublist count stays ~ len / LOAD.
            k = i - 1 if i > 0 else i
            lists[k].extend(lists[k + 1])
            del lists[k + 1]
            del maxes[k]
            merged = lists[k]
            maxes[k] = merged[-1]
            if len(merged) > 2 * LOAD:
                lists.insert(k + 1, merged[LOAD:])
                del merged[LOAD:]
                maxes.insert(k, merged[-1])

    def __contains__(self, value: int) -> bool:
        i = bisect_left(self._maxes, value)
        if i == len(self._maxes):
            return False
        sub = self._lists[i]
        j = bisect_left(sub, value)
        return sub[j] == value

    def floor(self, value: int) -> int | None:
        """The largest element <= value, or None."""
        maxes = self._maxes
        i = bisect_left(maxes, value)
        if i < len(maxes):
            sub = self._lists[i]
            if sub[0] <= value:
                return sub[bisect_right(sub, value) - 1]
        return maxes[i - 1] if i > 0 else None

    def ceiling(self, value: int) -> int | None:
        """The smallest element >= value, or None."""
        maxes = self._maxes
        i = bisect_left(maxes, value)
        if i == len(maxes):
            return None
        sub = self._lists[i]
        return sub[bisect_left(sub, value)]

    def last(self) -> int | None:
        return self._maxes[-1] if self._maxes else None

    def iter_from(self, value: int) -> Iterator[int]:
        """Elements >= value in ascending order (do not mutate while iterating)."""
        maxes = self._maxes
        i = bisect_left(maxes, value)
        if i == len(maxes):
            return
        sub = self._lists[i]
        yield from sub[bisect_left(sub, value) :]
        for sub in self._lists[i + 1 :]:
            yield from sub

    def iter_down_from(self, value: int) -> Iterator[int]:
        """Elements <= value in descending order (do not mutate while iterating)."""
        maxes = self._maxes
        i = bisect_left(maxes, value)
        if i < len(maxes):
            sub = self._lists[i]
            yield from reversed(sub[: bisect_right(sub, value)])
        for k in range(min(i, len(maxes)) - 1, -1, -1):
            yield from reversed(self._lists[k])

    def __iter__(self) -> Iterator[int]:
        for sub in self._lists:
            yield from sub

    def check(self) -> None:
        """Assert the structure's invariants (tests and fsck)."""
        assert len(self._lists) == len(self._maxes)
        assert sum(len(s) for s in self._lists) == self._len
        previous = None
        for sub, top in zip(self._lists, self._maxes, strict=True):
            assert sub and sub[-1] == top and len(sub) <= 2 * LOAD
            for value in sub:
                assert previous is None or previous < value
                previous = value


__all__ = ["LOAD", "SortedInts"]
