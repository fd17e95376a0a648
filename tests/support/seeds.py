"""Fresh seeds for the seeded random tests: each run explores a new slice, and one number replays it.

The run seed is AWSOMEFS_SEED. tests/conftest.py draws it when it is not set (and exports it, so that
pytest-xdist's workers collect the same parameters) and prints it in the run's header; setting it
again (`AWSOMEFS_SEED=N scripts/test.sh ...`) gives every test the same seeds as that run. Each test
derives its own slice from the run seed and a name, so two tests never share one by accident and
adding a test does not move another's seeds. A failing test still names the one seed that failed and
its own variable or option that replays only that seed.
"""

from __future__ import annotations

import os
import random

RUN_SEED_VAR = "AWSOMEFS_SEED"
LONG_VAR = "AWSOMEFS_LONG"
"""Set to 1 by `scripts/test.sh --long`: the seed sweeps run their full counts."""
_SPAN = 10**9


def draw_run_seed() -> int:
    """A new run seed, from the system's entropy (not from `random`, which a test may have seeded)."""
    return random.SystemRandom().randrange(1, 1 << 31)


def run_seed() -> int:
    """This run's seed: AWSOMEFS_SEED, drawn and exported by tests/conftest.py when not given."""
    text = os.environ.get(RUN_SEED_VAR)
    if text is None:
        os.environ[RUN_SEED_VAR] = str(draw_run_seed())
        text = os.environ[RUN_SEED_VAR]
    return int(text)


def long_run() -> bool:
    """True in the long tier (`scripts/test.sh --long`), where seed sweeps run in full."""
    return os.environ.get(LONG_VAR, "") not in ("", "0")


def fresh_range(name: str, count: int) -> range:
    """`count` consecutive seeds for the test or sweep `name`, starting where the run seed says.

    Consecutive, so that a slice prints short ("seeds 123456..123556") and any seed in it replays
    alone with the test's own replay option.
    """
    first = random.Random(f"{run_seed()}:{name}").randrange(1, _SPAN)
    return range(first, first + count)


def fresh(name: str, count: int) -> list[int]:
    """`fresh_range` as a list, for `pytest.mark.parametrize` (a seed per test id)."""
    return list(fresh_range(name, count))


def fresh_one(name: str) -> int:
    """One fresh seed for a test that runs a single seeded workload."""
    return fresh_range(name, 1)[0]


def describe(seeds: range) -> str:
    """The slice as a person reads it: "seeds 5..9 (5)", "seeds 5..13 step 4 (3)"."""
    if not seeds:
        return "no seeds"
    step = f" step {seeds.step}" if seeds.step != 1 else ""
    return f"seeds {seeds[0]}..{seeds[-1]}{step} ({len(seeds)})"


def failed(chosen: range, failures: list[str]) -> str:
    """A sweep's failure message: which slice, how to draw it again, then each failure."""
    head = f"{describe(chosen)}; {RUN_SEED_VAR}={run_seed()} draws the same slice again"
    return "\n\n".join([head, *failures])


def params(name: str, count: int, *, replay_var: str | None = None, fixed: tuple[int, ...] = ()) -> list[int]:
    """The seeds of a parametrized test: `fixed` ones (seeds that once found a bug) and `count`
    fresh ones; or only the seed in `replay_var` when that variable is set (to replay one)."""
    if replay_var is not None and os.environ.get(replay_var):
        return [int(os.environ[replay_var])]
    return [*fixed, *fresh(name, count)]
