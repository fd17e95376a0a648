"""Handles counts its open handles per inode (`is_open`, `open_for_writing`: asked per unlink and
per flush, so they no longer walk every handle). Random, seeded opens, closes, rebuilds after a
crash and hand-overs against the plain answer from the handles themselves."""

from __future__ import annotations

import os
import random

import pytest

from awsomefsd.fs.handles import Handles, encode_fh
from awsomefsd.meta.records import Inode
from tests.support import seeds

FLAGS = (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_APPEND, os.O_WRONLY | os.O_TRUNC)


class _Meta:
    """Stands in for the metadata client: `_rebuild` only asks whether an inode exists."""

    def inode(self, ino: int) -> Inode | None:
        return Inode(ino, 0o100644, 0, 0, 1, 0, 0, 0, 0)


def _scanned(handles: Handles, ino: int) -> tuple[bool, bool]:
    """What the index must answer, from the handles themselves."""
    mine = [h for h in handles.open.values() if h.ino == ino]
    return bool(mine), handles.adopted or any(h.flags & os.O_ACCMODE != os.O_RDONLY for h in mine)


@pytest.mark.parametrize("seed", seeds.params("handles-index", 6))
def test_the_per_inode_counts_answer_as_a_walk_of_every_handle(seed: int) -> None:
    rng = random.Random(seed)
    handles = Handles(_Meta())  # type: ignore[arg-type]
    inodes = range(2, 12)
    for step in range(3000):
        roll = rng.random()
        if roll < 0.45:
            handles.add(rng.choice(inodes), rng.choice(FLAGS), 0)
        elif roll < 0.85 and handles.open:
            handles.pop(rng.choice(list(handles.open)))
        elif roll < 0.9:
            handles.pop(rng.getrandbits(40))  # not open: nothing changes
        elif roll < 0.95:  # a planned hand-over to the next daemon
            after = Handles(_Meta())  # type: ignore[arg-type]
            after.take_over(handles.export())
            handles = after
        else:  # a crash: the next daemon rebuilds handles the kernel still uses
            used = list(handles.open)
            handles = Handles(_Meta())  # type: ignore[arg-type]
            handles.take_over(None)
            for fh in rng.sample(used, k=len(used) // 2):
                handles.require(fh)
            if rng.random() < 0.5:
                handles.adopted = False  # (the writer rule without the crash's "may be")
        for ino in inodes:
            assert (handles.is_open(ino), handles.open_for_writing(ino)) == _scanned(handles, ino), (seed, step, ino)


def test_a_rebuilt_handle_counts_once_and_closes() -> None:
    handles = Handles(_Meta())  # type: ignore[arg-type]
    handles.take_over(None)
    fh = encode_fh(9, os.O_WRONLY, 41)
    handles.require(fh)
    handles.require(fh)  # known now: not rebuilt again
    assert handles.is_open(9)
    handles.pop(fh)
    assert not handles.is_open(9)
