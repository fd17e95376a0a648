"""When the node running the link folds what a linked site captured (repl/folding.py, `FoldWait`):
not while local writes keep capturing, but once they pause, and FOLD_DELAY_MAX_S after it first
found captures waiting however busy the writes stay. The looks are driven as the folding task
makes them, every FOLD_POLL_S, with the newest record's number as the writes move it."""

from __future__ import annotations

import random

import pytest

from awsomefsd.repl.folding import FOLD_DELAY_MAX_S, FOLD_POLL_S, FoldWait
from tests.support import seeds


def first_due(newest_at_look: list[int | None]) -> float | None:
    """The time of the first look at which a fold is due (looks every FOLD_POLL_S from 0)."""
    waiting = FoldWait()
    for look, newest in enumerate(newest_at_look):
        if waiting.due(newest, look * FOLD_POLL_S):
            return look * FOLD_POLL_S
    return None


def test_nothing_waiting_is_never_due() -> None:
    assert first_due([None] * 200) is None


def test_captures_from_writes_that_stopped_fold_at_the_next_look() -> None:
    """A create, then nothing: folded one look after the one that found it (the writes paused)."""
    assert first_due([0, 0, 0]) == pytest.approx(FOLD_POLL_S)
    assert first_due([None, 3, 7, 7]) == pytest.approx(3 * FOLD_POLL_S), "folded once the newest stood still"


@pytest.mark.parametrize("seed", seeds.params("fold-wait", 3))
def test_a_steady_writer_is_folded_for_at_most_the_delay(seed: int) -> None:
    """Writes that move the newest record at every look (a steady writer, any rate): no fold
    while they run, until FOLD_DELAY_MAX_S after the first look that found one waiting."""
    rng = random.Random(seed)
    newest, looks = 0, []
    for _ in range(int(3 * FOLD_DELAY_MAX_S / FOLD_POLL_S)):
        newest += rng.randint(1, 60)
        looks.append(newest)
    due = first_due(looks)
    assert due is not None, f"seed {seed}: a steady writer's captures were never folded"
    assert FOLD_DELAY_MAX_S <= due <= FOLD_DELAY_MAX_S + FOLD_POLL_S + 1e-9, f"seed {seed}: folded at {due} s"


def test_the_delay_starts_again_after_nothing_waited() -> None:
    """Captures folded (none waits): the next ones get a whole delay again, not what was left."""
    waiting, delay = FoldWait(), FOLD_DELAY_MAX_S
    assert not waiting.due(1, 0.0)
    assert not waiting.due(2, delay / 2)
    assert not waiting.due(None, delay * 3 / 4)  # folded elsewhere (a leader before this one, say)
    assert not waiting.due(0, 4 * delay)
    assert not waiting.due(1, 4 * delay + delay / 2), "the delay runs from the first look that found these"
    assert waiting.due(2, 5 * delay)
