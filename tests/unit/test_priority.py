"""A starting daemon runs without the cyclic garbage collector, and has it back once it serves
(awsomefsd/priority.py): a daemon left without it would keep every reference cycle it ever made."""

from __future__ import annotations

import gc

import pytest

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


def test_a_member_that_serves_leaves_what_it_loaded_out_of_later_collections(capsys: pytest.CaptureFixture[str]) -> None:
    """A member starts without `raise_for_start` (awsomefsd/cli/cluster.py): once its mount
    serves, its objects are frozen all the same, and the collector still runs for what comes after."""
    from awsomefsd.cli import cluster

    gc.unfreeze()
    try:
        cluster._serving("/mnt/x")
        assert capsys.readouterr().out == "awsomefsd: mounted /mnt/x\n"
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()
    finally:
        gc.unfreeze()
