"""Test-wide options: `--slow` runs the checks marked slow (CI does)."""

from __future__ import annotations

import pytest
import trio.testing


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    import trio.testing

    return trio.testing.MockClock(autojump_threshold=0)
