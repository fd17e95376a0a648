"""Raft test options: `--raft-seed N` replays one simulation seed; `--raft-seeds N` sets how many
seeds the default simulation test runs; `--raft-rewrite` regenerates the expected output of the
scripted scenarios (review the diff before keeping it)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--raft-seed", type=int, default=None, help="replay this one simulation seed")
    parser.addoption("--raft-seeds", type=int, default=None, help="number of seeds for the default run")
    parser.addoption(
        "--raft-rewrite",
        action="store_true",
        default=False,
        help="rewrite the expected output of testdata scripts",
    )


@pytest.fixture
def raft_seed(request: pytest.FixtureRequest) -> int | None:
    return request.config.getoption("--raft-seed")


@pytest.fixture
def raft_seed_count(request: pytest.FixtureRequest) -> int | None:
    return request.config.getoption("--raft-seeds")
