#!/usr/bin/env python3
"""What the state machine's apply costs per create and unlink, in process (issue 40).

Applies N Mknod, then N Unlink, then N Purge (a closed file's unlink was two commands) and, on a
build that has it, N Mknod again ("remake") and N UnlinkClosed (the two in one command) to a fresh
MetaStore/StateMachine, then N random 4 KiB overwrites of a 16 MiB file as a flush commits them
("overwrite": WriteData commands of OVERWRITES_PER_COMMAND single-block extents side by side on
the device; the figure is per extent), each phase in one LMDB transaction, and prints the CPU µs per command
(process time: on a loaded machine wall time also counts the other processes' turns). With
`--src DIR ...` it runs the same workload once per source tree (a checkout's root: e.g. an old
build unpacked by `git archive`), in turn, `--rounds` times, and prints the medians, so an old
and a new build are compared in one run on a loaded machine. `--profile` prints cProfile's top
functions of one round instead.

    .venv/bin/python bench/apply_cost.py [--count 10000] [--rounds 5] [--src /old/tree --src .] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERWRITES_PER_COMMAND = 64
FILE_BLOCKS = 4096


def _overwrites(c: object, Extent: type, ino: int, count: int, first_dev: int) -> list[object]:
    """The file laid out in 1 MiB extents, then `count` random single-block overwrites in WriteData
    commands of OVERWRITES_PER_COMMAND (file order, fresh device blocks side by side)."""
    import random
    rng = random.Random(7)
    layout = tuple(Extent(b, first_dev + b, 256, bytes(4 * 256)) for b in range(0, FILE_BLOCKS, 256))
    cmds = [c.WriteData(ino, layout, FILE_BLOCKS * 4096, 60_000_000)]  # type: ignore[attr-defined]
    dev = first_dev + FILE_BLOCKS
    for n in range(count // OVERWRITES_PER_COMMAND):
        blocks = sorted(rng.sample(range(FILE_BLOCKS), OVERWRITES_PER_COMMAND))
        extents = tuple(Extent(b, dev + i, 1, bytes(4)) for i, b in enumerate(blocks))
        dev += OVERWRITES_PER_COMMAND
        cmds.append(c.WriteData(ino, extents, FILE_BLOCKS * 4096, 60_000_001 + n))  # type: ignore[attr-defined]
    return cmds


def one_round(count: int, profile: bool) -> dict[str, float]:
    """µs per command of each phase, on a fresh store (the sources are those on sys.path)."""
    from awsomefsd.meta import commands as c
    from awsomefsd.meta.records import ROOT_INO, Extent
    from awsomefsd.meta.state_machine import StateMachine
    from awsomefsd.meta.store import MetaStore

    tmp = Path(tempfile.mkdtemp(prefix="apply-cost-"))
    try:
        store = MetaStore(tmp / "meta")
        sm = StateMachine(store, delayed_free_ns=1000)
        with store.env.begin(write=True) as txn:
            sm.bootstrap(txn, cluster_id="00000000-0000-0000-0000-000000000001", device_id="d",
                         data_extent=(256, 4 * count + 4 * FILE_BLOCKS), now_ns=1)
            start, _ = sm.apply(txn, c.ReserveInodes(2 * count + 1))
            big = start + 2 * count
            sm.apply(txn, c.Mknod(ROOT_INO, b"big", big, stat.S_IFREG | 0o644, 0, 0, 5))
        names = [b"f%d" % i for i in range(count)]
        mode = stat.S_IFREG | 0o644
        phases = {
            "mknod": [c.Mknod(ROOT_INO, names[i], start + i, mode, 0, 0, 10 + i) for i in range(count)],
            "unlink": [c.Unlink(ROOT_INO, names[i], False, 20_000_000 + i) for i in range(count)],
            "purge": [c.Purge(start + i, 30_000_000 + i) for i in range(count)],
        }
        if hasattr(c, "UnlinkClosed"):  # a build with it: a closed file's unlink as one command
            phases["remake"] = [c.Mknod(ROOT_INO, names[i], start + count + i, mode, 0, 0, 40_000_000 + i)
                                for i in range(count)]
            phases["unlink_closed"] = [c.UnlinkClosed(ROOT_INO, names[i], False, 50_000_000 + i, ino=start + count + i)
                                       for i in range(count)]
        overwrites = _overwrites(c, Extent, big, count, 256 + 2 * FILE_BLOCKS)
        with store.env.begin(write=True) as txn:
            sm.apply(txn, overwrites[0])  # the layout: not timed
        phases["overwrite"] = overwrites[1:]
        per = {"overwrite": OVERWRITES_PER_COMMAND}
        result: dict[str, float] = {}
        profiler = cProfile.Profile() if profile else None
        for phase, cmds in phases.items():
            with store.env.begin(write=True) as txn:
                apply = sm.apply
                if profiler:
                    profiler.enable()
                began = time.process_time()
                for cmd in cmds:
                    apply(txn, cmd)
                result[phase] = (time.process_time() - began) / (len(cmds) * per.get(phase, 1)) * 1e6
                if profiler:
                    profiler.disable()
        if profiler:
            pstats.Stats(profiler, stream=sys.stderr).sort_stats(os.environ.get("APPLY_COST_SORT", "tottime")).print_stats(30)
        store.env.close()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--src", action="append", default=[], help="a source tree to measure (repeatable)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one round, for --src
    args = parser.parse_args()
    if args.json or not args.src:
        if not args.json and not args.profile:
            print(json.dumps(one_round(args.count, False)))
            return
        print(json.dumps(one_round(args.count, args.profile)))
        return
    figures: dict[str, dict[str, list[float]]] = {src: {} for src in args.src}
    for _ in range(args.rounds):
        for src in args.src:  # in turn: the machine's load moves alike for each
            env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
            out = subprocess.run([sys.executable, __file__, "--json", "--count", str(args.count)],
                                 env=env, cwd=src, check=True, capture_output=True, text=True).stdout
            for phase, value in json.loads(out).items():
                figures[src].setdefault(phase, []).append(value)
    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f}; "
          f"µs per command, median (min-max) of {args.rounds}, {args.count} commands per phase")
    for src, phases in figures.items():
        cells = [f"{p} {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" for p, v in phases.items()]
        print(f"{src}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
