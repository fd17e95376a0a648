"""The overlay's merged cursor against a model: random walks mixing every move a caller makes.

`MergedCursor` remembers the candidates of its last forward landing so that a step forward moves
only one side (design note 157); a walk that mixes seeks, exact looks, steps both ways and layers
of every kind (committed records, several pending entries, the running command's own writes,
tombstones over committed and over pending records) checks that no move leaves a stale candidate
behind. Seeded and replayable: AWSOMEFS_OVERLAY_SEED=N runs one seed.
"""

from __future__ import annotations

import bisect
import random
from pathlib import Path
from typing import Any

import lmdb
import pytest

from awsomefsd.meta.overlay import Overlay, OverlayTxn
from tests.support import seeds

STEPS = 1500


def _key(rng: random.Random) -> bytes:
    """Short keys over a small space, so seeks, hits and neighbours collide often."""
    return bytes(rng.randrange(12) for _ in range(rng.randrange(1, 3)))


def _walk(rng: random.Random, cursor: Any, model: dict[bytes, bytes]) -> None:
    """STEPS random moves of `cursor`, each checked against where the model says it stands."""
    ordered = sorted(model)
    at: int | None = None  # index into `ordered` where the cursor stands; None: unpositioned
    for step in range(STEPS):
        move = rng.choice(("set_range", "set_key", "next", "next", "next", "prev", "first", "last"))
        if move == "set_range":
            probe = _key(rng)
            i = bisect.bisect_left(ordered, probe)
            got, at = cursor.set_range(probe), (i if i < len(ordered) else None)
        elif move == "set_key":
            probe = rng.choice(ordered) if ordered and rng.random() < 0.6 else _key(rng)
            got, at = cursor.set_key(probe), (ordered.index(probe) if probe in model else None)
        elif move == "next":
            got = cursor.next()
            at = 0 if at is None and ordered else (at + 1 if at is not None and at + 1 < len(ordered) else None)
        elif move == "prev":
            got = cursor.prev()
            at = len(ordered) - 1 if at is None and ordered else (at - 1 if at is not None and at > 0 else None)
        elif move == "first":
            got, at = cursor.first(), (0 if ordered else None)
        else:
            got, at = cursor.last(), (len(ordered) - 1 if ordered else None)
        assert got == (at is not None), (step, move)
        if at is not None:
            key = ordered[at]
            assert (bytes(cursor.key()), bytes(cursor.value())) == (key, model[key]), (step, move)
        if at is not None and rng.random() < 0.05:  # iterate from here, as a listing does
            assert [(bytes(k), bytes(v)) for k, v in cursor.iternext()] == [(k, model[k]) for k in ordered[at:]]
            at = None  # past the end: unpositioned (the next step starts from the first)


def _write(rng: random.Random, view: OverlayTxn, db: Any, model: dict[bytes, bytes], count: int, *,
           deletes: float) -> None:
    """`count` random puts and deletes (a `deletes` share) through `view`, mirrored in `model`."""
    for _ in range(count):
        key = _key(rng)
        if rng.random() < deletes:
            view.delete(key, db=db)
            model.pop(key, None)
        else:
            value = bytes([rng.randrange(256)])
            view.put(key, value, db=db)
            model[key] = value


@pytest.mark.parametrize("seed", seeds.params("overlay-cursor", 4, replay_var="AWSOMEFS_OVERLAY_SEED"))
def test_merged_cursor_moves_like_the_merged_records(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    env = lmdb.open(str(tmp_path / "env"), max_dbs=2, map_size=1 << 24)
    db = env.open_db(b"t")
    model: dict[bytes, bytes] = {}
    with env.begin(write=True) as txn:
        for _ in range(rng.randrange(0, 60)):
            key, value = _key(rng), bytes([rng.randrange(256)])
            txn.put(key, value, db=db)
            model[key] = value
    overlay = Overlay()
    pending: list[int] = []
    with env.begin() as base:
        for entry in range(1, rng.randrange(2, 12)):
            scratch: dict[tuple[Any, bytes], bytes | None] = {}
            _write(rng, OverlayTxn(base, overlay, scratch), db, model, rng.randrange(1, 8), deletes=0.4)
            overlay.record(entry, scratch)
            pending.append(entry)
        _walk(rng, OverlayTxn(base, overlay).cursor(db), model)
        # the running command's own writes on top (a prediction's reads)
        running = OverlayTxn(base, overlay, {})
        _write(rng, running, db, model, rng.randrange(1, 10), deletes=0.5)
        _walk(rng, running.cursor(db), model)
