"""A starting daemon runs without the cyclic garbage collector, and has it back once it serves
(awsomefsd/priority.py): a daemon left without it would keep every reference cycle it ever made."""

from __future__ import annotations

import gc

from awsomefsd import priority


def test_the_start_runs_without_the_collector_and_serving_with_it() -> None:
    assert gc.isenabled()
    try:
        priority.raise_for_start()
        assert not gc.isenabled()
        priority.raise_for_start()  # asked again (a successor): still one start to give back
        priority.restore()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0, "what the start loaded is left out of later collections"
    finally:
        priority.restore()
        gc.unfreeze()
        gc.enable()
