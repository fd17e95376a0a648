#!/usr/bin/env python3
"""What applying the other site's operations costs the receiving state machine, per operation,
in process (issue 47: the receiver's apply bounds the link's rate).

Site a (tests/repl/test_sites_sm.py's `Site`: a real StateMachine on its own LMDB store) makes
`--files` files spread over `--dirs` directories, a share of them (`--written`) with one block of
content (a create is then three operations: the object, its name, its content); then site b
applies a's whole outbox as the receiver does: pushes of `--push` operations, each applied in
slices of 128 (one `ApplyRemote` each: the slices the receiver used before it sized them by time, `SliceSizer`), a content's blocks
given as fresh extents; a build whose receiver decodes a push once (`crdt.ops.keep_decoded`)
has each push decoded first, as its receiver does, untimed. Prints the CPU µs per operation
applied (process time: on a loaded machine wall time also counts the other processes' turns)
and checks that both sites show the same tree. No wire, staging, barrier or daemon: the floor of the receiver's apply on this core.

With `--src DIR ...` it runs the same workload once per source tree (a checkout's root, e.g.
`git worktree add /tmp/old main`), in turn, `--rounds` times, each in its own process, and
prints the medians: an old and a new build compared in one run on a loaded machine.
`--profile` prints cProfile's top functions of one round instead.

    .venv/bin/python bench/site_apply_cost.py [--files 4000] [--written 0.5] [--rounds 5]
        [--src /tmp/old --src .] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SLICE = 128


def one_round(files: int, dirs: int, written: float, push: int, profile: bool) -> dict[str, float]:
    """CPU µs per applied operation (sources: those on sys.path)."""
    from awsomefsd.crdt import ops as o
    from awsomefsd.meta import commands as c
    from awsomefsd.meta.filemap import all_extents
    from awsomefsd.meta.records import ROOT_INO, Extent
    from tests.repl.test_sites_sm import linked_pair

    rng = random.Random(files)
    with tempfile.TemporaryDirectory(prefix="site-apply-cost-") as scratch:
        a, b = linked_pair(Path(scratch))
        parents = []
        for i in range(dirs):
            ino = a.new_ino()
            a.apply(c.Mknod(ROOT_INO, b"d%d" % i, ino, stat.S_IFDIR | 0o755, 0, 0, a.tick()))
            parents.append(ino)
        for i in range(files):
            ino = a.new_ino()
            a.apply(c.Mknod(parents[i % dirs], b"f%d" % i, ino, stat.S_IFREG | 0o644, 0, 0, a.tick()))
            if rng.random() < written:
                extent = Extent(0, a.take_blocks(1), 1, rng.randbytes(4))
                a.apply(c.WriteData(ino, (extent,), 4096, a.tick()))
        pending = a.outbox_after(None)
        shipped = []  # (raw, extents) as the receiver has them: the bytes staged on b's device
        for _, raw in pending:
            sent, ino = a.read(lambda txn, raw=raw: a.sm.sites.shipping(txn, raw))
            extents: tuple[Any, ...] | None = None
            if ino is not None:
                extents = tuple(Extent(e.file_block, b.take_blocks(e.count), e.count, e.checksums)
                                for e in a.read(lambda txn, ino=ino: list(all_extents(txn, a.store.db["fmap"], ino))))
            elif isinstance(o.decode(sent), o.ContentSet):
                extents = ()
            shipped.append((sent, extents))
        keep = getattr(o, "keep_decoded", None) or getattr(o, "decode_remembered", None)  # older builds: an LRU
        profiler = cProfile.Profile() if profile else None
        cpu = wall = 0.0
        for first in range(0, len(shipped), push):
            batch = shipped[first:first + push]
            if keep is not None:  # its receiver decodes a push to check it, then applies it (not timed)
                for raw, _ in batch:
                    keep(raw)
            cpu -= time.process_time()
            wall -= time.perf_counter()
            if profiler is not None:
                profiler.enable()
            for at in range(0, len(batch), SLICE):
                part = batch[at:at + SLICE]
                after = b.applied_from_peer()
                contents = [ext for _, ext in part if ext is not None]
                b.apply(c.ApplyRemote(a.id, b"" if after is None else after.pack(), tuple(raw for raw, _ in part),
                                      tuple(e for ext in contents for e in ext), tuple(len(ext) for ext in contents),
                                      b.tick()))
            if profiler is not None:
                profiler.disable()
            cpu += time.process_time()
            wall += time.perf_counter()
            if hasattr(o, "release_decoded"):
                o.release_decoded([raw for raw, _ in batch])
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        if a.snapshot() != b.snapshot():
            raise SystemExit("site_apply_cost: the sites differ after the apply")
        return {"ops": len(shipped), "cpu_us_per_op": cpu / len(shipped) * 1e6,
                "wall_us_per_op": wall / len(shipped) * 1e6, "ops_per_cpu_s": len(shipped) / cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--dirs", type=int, default=20)
    parser.add_argument("--written", type=float, default=0.5, help="share of the files with content")
    parser.add_argument("--push", type=int, default=512, help="operations per push ([site] batch_operations)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--src", type=Path, action="append", default=[], help="source trees to alternate")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one round, as JSON
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    if args.one or args.profile or not args.src:
        if not args.src:
            sys.path.insert(0, str(here))
        if args.one or args.profile:
            figures = one_round(args.files, args.dirs, args.written, args.push, args.profile)
            print(json.dumps(figures))
            return 0
    sources = args.src or [here]
    runs: dict[Path, list[dict[str, float]]] = {src: [] for src in sources}
    for round_ in range(args.rounds):
        for src in sources if round_ % 2 == 0 else list(reversed(sources)):  # both orders
            done = subprocess.run([sys.executable, __file__, "--one", "--files", str(args.files), "--dirs",
                                   str(args.dirs), "--written", str(args.written), "--push", str(args.push)],
                                  cwd=src, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                                  capture_output=True, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            runs[src].append(figures)
            print(f"round {round_ + 1} {src}: {figures['ops']:.0f} ops, {figures['cpu_us_per_op']:.1f} µs CPU/op, "
                  f"{figures['wall_us_per_op']:.1f} µs wall/op", flush=True)
    for src, done in runs.items():
        cpu = statistics.median(r["cpu_us_per_op"] for r in done)
        best = min(r["cpu_us_per_op"] for r in done)  # the round least disturbed by other work
        print(f"{src}: median {cpu:.1f} µs CPU per operation ({1e6 / cpu:,.0f} operations per CPU second), "
              f"best {best:.1f} µs ({1e6 / best:,.0f}/s); "
              f"rounds {' / '.join(format(r['cpu_us_per_op'], '.1f') for r in done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
