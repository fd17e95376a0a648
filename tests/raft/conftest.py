"""Raft test options: `--raft-seed N` replays one simulation seed of the core; `--raft-seeds N` sets
how many seeds the default simulation test runs; `--driver-seed N` replays one seed of the driver
simulation (`--driver-seconds S` runs it longer); `--raft-rewrite` regenerates the expected output
of the scripted scenarios (review the diff before keeping it)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--raft-seed", type=int, default=None, help="replay this one simulation seed")
    parser.addoption("--raft-seeds", type=int, default=None, help="number of seeds for the default run")
    parser.addoption("--driver-seed", type=int, default=None, help="replay this one driver simulation seed")
    parser.addoption("--driver-seconds", type=float, default=None, help="virtual seconds per driver seed")
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


@pytest.fixture
def driver_seed(request: pytest.FixtureRequest) -> int | None:
    return request.config.getoption("--driver-seed")


@pytest.fixture
def driver_seconds(request: pytest.FixtureRequest) -> float | None:
    return request.config.getoption("--driver-seconds")
