"""What a write costs a linked site in the state machine alone (issue 47): creates applied to an
unlinked site, to a linked one that captures each create in its command (the old path), and to a
linked one that records the create's facts and folds them later (FoldCapture, meta/sites/).

No daemon, no mount: a state machine on an LMDB store in a temporary directory (the harness of
tests/repl/test_sites_sm.py), `--creates` Mknod applied in one write transaction as a group
commit batches them, CPU time (process_time) per create. The modes alternate within each run, so
the machine's load weighs on all alike; the figures are medians over `--runs` runs, each run's
value beside them, and each mode's ratio to `unlinked` is the median of the runs' own ratios.
`fold` is what the FoldCapture of those creates costs afterwards, per create
(off the write, in one batch); `later+fold` their sum. The ratios are against `unlinked`: the
issue's target for the write path is `later` at most 1.05x.

`--instructions` counts instead the instructions a create executes (valgrind's cachegrind, no
cache simulated): each mode is run in a child process with and without applying its creates, and
the difference is divided by `--creates`. The count does not depend on the machine's load (on
this shared machine CPU times of one run vary by 20-40 %), at about 50 s a mode. `--source DIR`
measures another checkout's state machine with this bench (an older commit, for a before/after).

As root or any user, from the repository root:

    .venv/bin/python bench/capture_cost.py [--creates 5000] [--runs 5] [--json F] [--profile MODE]
        [--instructions] [--source DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def source_from_argv() -> Path:
    """`--source DIR`, read before anything of the package is imported."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--source" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if arg.startswith("--source="):
            return Path(arg.split("=", 1)[1]).resolve()
    return REPO


SOURCE = source_from_argv()
sys.path.insert(0, str(SOURCE))

from awsomefsd.meta import commands as c  # noqa: E402
from tests.repl.test_sites_sm import Site  # noqa: E402

MODES = ("unlinked", "at_once", "later")


def one_run(mode: str, creates: int, scratch: Path, *, apply: bool = True, fold: bool = True) -> dict[str, float]:
    """Microseconds of CPU per create for `mode` (and, for `later`, per create folded). `apply`
    False: the creates are built, not applied; `fold` False: not folded (what `--instructions`
    subtracts)."""
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        site = Site(Path(d) / "a", str(uuid.UUID(int=0xA << 120)), 10**12)
        if mode != "unlinked":
            site.apply(c.LinkSite(uuid.UUID(int=0xB << 120).bytes, site.tick()))
        if mode == "at_once":  # the old path: this build's capture in the command, as below FOLD_LEVEL
            site.sm.sites.folds_later = lambda txn: False  # type: ignore[method-assign]
        commands = [c.Mknod(1, b"f%d" % i, site.new_ino(), stat.S_IFREG | 0o644, 0, 0, site.tick())
                    for i in range(creates)]
        if not apply:
            return {}
        t0 = time.process_time()
        with site.store.env.begin(write=True) as txn:
            for command in commands:
                site.sm.apply(txn, command)
        figures = {mode: (time.process_time() - t0) / creates * 1e6}
        if mode == "later" and fold:
            t0 = time.process_time()
            with site.store.env.begin(write=True) as txn:
                folded = site.sm.apply(txn, c.FoldCapture(creates))
            assert folded == creates, (folded, creates)
            figures["fold"] = (time.process_time() - t0) / creates * 1e6
            figures["later+fold"] = figures["later"] + figures["fold"]
        if mode != "unlinked" and fold:
            outbox = site.read(lambda txn: site.sm.sites.pending_after(txn, None))
            assert outbox == 2 * creates, f"{mode}: {outbox} operations in the outbox for {creates} creates"
        return figures


def instructions(mode: str, creates: int, apply: bool, fold: bool) -> int:
    """Instructions of a child process that runs `one_run` (valgrind's cachegrind)."""
    child = [sys.executable, __file__, "--source", str(SOURCE), "--child", f"{mode},{creates},{int(apply)},{int(fold)}"]
    done = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                           *child], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    for line in done.stderr.splitlines():
        if "I   refs:" in line or "I refs:" in line:
            return int(line.split(":")[1].replace(",", ""))
    raise RuntimeError(f"no instruction count from valgrind: {done.stderr[-500:]}")


def count_instructions(creates: int) -> dict[str, float]:
    """Instructions per create of each mode's write path, and per create folded."""
    per: dict[str, float] = {}
    for mode in MODES:
        built = instructions(mode, creates, apply=False, fold=False)
        applied = instructions(mode, creates, apply=True, fold=False)
        per[mode] = (applied - built) / creates
        if mode == "later":
            per["fold"] = (instructions(mode, creates, apply=True, fold=True) - applied) / creates
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--creates", type=int, default=5000, help="creates per mode and run (default 5000)")
    parser.add_argument("--runs", type=int, default=5, help="runs, each of every mode in turn (default 5)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--profile", choices=MODES, help="profile one run of this mode instead (cProfile, top 25)")
    parser.add_argument("--instructions", action="store_true", help="count instructions per create (valgrind)")
    parser.add_argument("--source", type=Path, default=REPO, help="the checkout whose state machine runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    scratch = Path(tempfile.gettempdir())
    if args.child:
        mode, creates, apply, fold = args.child.split(",")
        one_run(mode, int(creates), scratch, apply=apply == "1", fold=fold == "1")
        return
    if args.instructions:
        per = count_instructions(args.creates)
        print(f"source {SOURCE}: instructions per create ({args.creates} creates, valgrind)")
        for name, value in per.items():
            ratio = f"  {value / per['unlinked']:.3f}x unlinked" if name != "unlinked" else ""
            print(f"  {name:<9} {value:10,.0f}{ratio}")
        if args.json:
            args.json.write_text(json.dumps({"creates": args.creates, "source": str(SOURCE), "instructions": per},
                                            indent=1))
        return
    print(f"source {SOURCE}")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(one_run, args.profile, args.creates, scratch)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    runs: dict[str, list[float]] = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.runs):
        for mode in MODES:
            for name, value in one_run(mode, args.creates, scratch).items():
                runs.setdefault(name, []).append(value)
    load_after = os.getloadavg()[0]
    medians = {name: statistics.median(values) for name, values in runs.items()}
    print(f"{args.creates} creates in one transaction, medians of {args.runs} alternating runs "
          f"(load average {load_before:.1f} before, {load_after:.1f} after)")
    # each run's own ratio, then their median: a load spike during one run weighs on its modes alike
    ratios = {name: statistics.median(v / u for v, u in zip(values, runs["unlinked"], strict=True))
              for name, values in runs.items()}
    for name, values in runs.items():
        ratio = f"  {ratios[name]:.2f}x unlinked" if name != "unlinked" else ""
        print(f"  {name:<11} {medians[name]:7.1f} us/create{ratio}   runs: {', '.join(f'{v:.1f}' for v in values)}")
    if args.json:
        args.json.write_text(json.dumps({"creates": args.creates, "runs": runs, "medians": medians, "ratios": ratios,
                                         "load": [load_before, load_after]}, indent=1))


if __name__ == "__main__":
    main()
