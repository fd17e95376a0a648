"""The recall policy (fs/recall.py): tiered data read in `recall_reads` different minutes comes back;
one pass over everything does not recall it."""

from __future__ import annotations

from awsomefsd.fs.recall import MAX_TRACKED_FILES, RecallPolicy
from tests.unit.test_progress import Clock


def test_reads_in_two_different_minutes_recall_a_file_once() -> None:
    clock, recalled = Clock(), []
    policy = RecallPolicy(recalled.append, recall_reads=2, clock=clock)
    for _ in range(500):  # a sequential read of a big file: one minute
        policy.noted(7)
    assert recalled == []
    clock.now += 61
    policy.noted(7)
    assert recalled == [7]
    policy.noted(7)
    assert recalled == [7], "counted afresh after a recall"


def test_zero_never_recalls_and_the_tracked_files_are_bounded() -> None:
    clock, recalled = Clock(), []
    never = RecallPolicy(recalled.append, recall_reads=0, clock=clock)
    for minute in range(5):
        clock.now += 60 * minute
        never.noted(1)
    assert recalled == []
    policy = RecallPolicy(recalled.append, recall_reads=3, clock=clock)
    for ino in range(MAX_TRACKED_FILES + 10):
        policy.noted(ino)
    assert len(policy._minutes) == MAX_TRACKED_FILES
    clock.now += 60
    policy.noted(0)  # forgotten (the oldest): counts from one again
    assert recalled == []
