"""Test-wide options and the tiers' plumbing (README "Test tiers"; scripts/test.sh runs them).

- `--slow` also runs the tests marked slow (the long tier does).
- The run seed (tests/support/seeds.py): drawn fresh unless AWSOMEFS_SEED is set, exported before
  pytest-xdist starts its workers (they must collect the same seed parameters), shown in the header.
- pytest-xdist groups: with `--dist loadgroup` each test is a unit of work of its own, except that
  the tests of a module that uses a module-scoped fixture (a daemon started once for the module)
  stay together on one worker, so that the fixture starts once.
- `--budget S`: a default-tier test whose setup, call or teardown takes longer than S seconds (or
  than its own `@pytest.mark.budget(S)`) is listed in an "over budget" section; past twice its
  budget the run fails. Tests marked slow have no budget: they belong to the long tier.
"""

from __future__ import annotations

import pytest
import trio.testing

from tests.support import seeds

SYSTEM = ("tests/mounted/", "tests/cluster/", "tests/packaging/", "tests/csi/", "tests/tier/test_tiering_mounted.py",
          "tests/repl/test_sites_cluster.py", "tests/repl/test_wan.py",
          "tests/repl/test_sites_daemons.py", "tests/repl/test_sites_random.py",
          "tests/test_bench_smoke.py")
"""Paths of tests that start daemons, mounts or namespaces: marked `system`, which --fast leaves out."""

_over_budget: list[tuple[str, str, float, float]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption("--budget", type=float, default=None, metavar="S",
                     help="time budget in seconds per test phase (default tier); twice over fails the run")


def pytest_configure(config: pytest.Config) -> None:
    seeds.run_seed()  # draws and exports AWSOMEFS_SEED before xdist's workers start


def pytest_report_header(config: pytest.Config) -> str:
    return (f"run seed: {seeds.RUN_SEED_VAR}={seeds.run_seed()} (fresh each run; set it to replay "
            f"this run's seeds){' long tier' if seeds.long_run() else ''}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if _uses_a_module_fixture(item) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(path))
        if path.startswith(SYSTEM) or item.get_closest_marker("mounted") or item.get_closest_marker("netns"):
            item.add_marker(pytest.mark.system)
    if config.getoption("--slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(d.scope in ("module", "package", "class") for defs in info.name2fixturedefs.values() for d in defs)


def _budget(item: pytest.Item) -> float | None:
    default = item.config.getoption("--budget")
    if default is None or item.get_closest_marker("slow") is not None:
        return None
    mark = item.get_closest_marker("budget")
    return float(mark.args[0]) if mark is not None else default


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    budget = _budget(item)
    if budget is not None and report.duration > budget:
        report.user_properties.append(("over_budget", (report.when, report.duration, budget)))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Runs where the results are gathered (xdist's controller too): collect the over-budget phases."""
    for key, value in report.user_properties:
        if key == "over_budget":
            when, duration, budget = value
            _over_budget.append((report.nodeid, when, duration, budget))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if not _over_budget:
        return
    terminalreporter.section("over budget (mark it slow, make it faster, or give it @pytest.mark.budget)",
                             sep="!", red=True, bold=True)
    for nodeid, when, duration, budget in sorted(_over_budget, key=lambda o: -o[2]):
        verdict = "FAILS THE RUN" if duration > 2 * budget else "warning"
        terminalreporter.line(f"{duration:7.1f} s {when:8} budget {budget:.0f} s  {verdict}  {nodeid}",
                              red=duration > 2 * budget, yellow=duration <= 2 * budget)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller judges the budgets
    if exitstatus == 0 and any(duration > 2 * budget for _, _, duration, budget in _over_budget):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    import trio.testing

    return trio.testing.MockClock(autojump_threshold=0)
