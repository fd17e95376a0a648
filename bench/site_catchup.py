"""What a two-sided catch-up costs the receiving state machine (issue 47): both sites of a link
make changes while the link is cut, then each applies the other's operations in pushes of
`--batch` operations, as the receiver does (one `ApplyRemote` per push).

This is the state machine alone (two LMDB stores in one process, tests/repl/test_sites_sm.py's
`Site`), without the wire, staging or the daemons: the part of a catch-up that runs on the
receiving site's event loop, and that grew quadratically with what both sites did. What each
site made is folded into its outbox before the catch-up is timed (the node running the link
folds every 20 ms: repl/folding.py), so no slice pays for a backlog of folds. A push of
`--batch` is applied as the receiver does, one `ApplyRemote` per slice (as many operations as
the receiver's `SliceSizer` says from the slices before, or `--slice`), and after each slice the receiving site makes one local
create, timed. Prints, per direction, the operations applied, seconds, operations per second,
the slowest slice and the slowest local create: a create that arrives as a slice begins waits
for it on a single node's event loop, so the worst wait is that slice plus the create
(`worst create ms`). `--source DIR` imports `awsomefsd` and the harness from another checkout
(an older commit, for a before/after in one run).

    .venv/bin/python bench/site_catchup.py --creates 500,2000,10000 --renames 0,0.1
    .venv/bin/python bench/site_catchup.py --creates 1000 --source /work/old-checkout
    .venv/bin/python bench/site_catchup.py --creates 2000 --renames 0.1 --dirs 0.02
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT_INO = 1


def make_changes(site: Any, c: Any, count: int, rename_share: float, rng: random.Random, tag: str,
                 dir_share: float = 0.0) -> None:
    """`count` changes: creates of empty files, renames of them (`rename_share`), into another
    directory too; and (`dir_share`) creates and renames of directories in the root, which the
    files are created in and moved into."""
    dirs: list[tuple[int, bytes]] = []  # (inode, name) in the root
    files: list[tuple[int, bytes]] = []  # (directory's inode, name)
    for i in range(count):
        now = site.tick()
        roll = rng.random()
        if roll < dir_share:
            if dirs and rng.random() < 0.5:
                at = rng.randrange(len(dirs))
                ino, old = dirs[at]
                dirs[at] = (ino, f"{tag}-dir-renamed-{i}".encode())
                site.apply(c.Rename(ROOT_INO, old, ROOT_INO, dirs[at][1], 0, now))
            else:
                dirs.append((site.new_ino(), f"{tag}-dir-{i}".encode()))
                site.apply(c.Mknod(ROOT_INO, dirs[-1][1], dirs[-1][0], stat.S_IFDIR | 0o755, 0, 0, now))
        elif files and roll < dir_share + rename_share:
            parent, old = files.pop(rng.randrange(len(files)))
            files.append((rng.choice([ROOT_INO, *(ino for ino, _ in dirs)]), f"{tag}-renamed-{i}".encode()))
            site.apply(c.Rename(parent, old, files[-1][0], files[-1][1], 0, now))
        else:
            files.append((rng.choice([ROOT_INO, *(ino for ino, _ in dirs)]), f"{tag}-{i}".encode()))
            site.apply(c.Mknod(files[-1][0], files[-1][1], site.new_ino(), stat.S_IFREG | 0o644, 0, 0, now))


def apply_everything(src: Any, dst: Any, c: Any, ops: Any, batch: int, slice_ops: int,
                     local_creates: bool = True, sizer: Any = None,
                     slices: list[float] | None = None) -> tuple[int, float, float, float]:
    """Apply at `dst` all `src` has that `dst` has not, in pushes of `batch` operations applied
    `slice_ops` at a time (or as many as `sizer`, the receiver's SliceSizer, says), with one
    local create at `dst` after each slice (unless not `local_creates`): (operations, seconds,
    slowest slice, worst wait of a local create: a slice and the create after it). Each
    slice's seconds go to `slices`."""
    pending = src.outbox_after(dst.applied_from_peer())
    slowest = worst = 0.0
    started = time.perf_counter()
    for at in range(0, len(pending), batch):
        raws = [src.read(lambda txn, raw=raw: src.sm.sites.shipping(txn, raw))[0] for _, raw in pending[at:at + batch]]
        for raw in raws:
            ops.keep_decoded(raw)  # the receiver decodes a push before it proposes its slices
        first = 0
        # A push's slices and the local creates between them go in one transaction, committed
        # after the push (the receiver's barrier): a single node's open batch (meta/log.py).
        with dst.store.env.begin(write=True) as txn:
            after = dst.applied_from_peer()  # (a read transaction of its own: the last push committed)
            while first < len(raws):
                part = raws[first:first + (slice_ops if sizer is None else sizer.size())]
                counts = tuple(0 for raw in part if isinstance(ops.decode_remembered(raw), ops.ContentSet))
                slice_started = time.perf_counter()
                dst.sm.apply(txn, c.ApplyRemote(src.id, b"" if after is None else after.pack(), tuple(part), (),
                                                counts, dst.tick()))
                create_started = time.perf_counter()
                after = ops.decode_remembered(part[-1]).stamp
                first += len(part)
                if sizer is not None:
                    sizer.took(len(part), create_started - slice_started)
                if slices is not None:
                    slices.append(create_started - slice_started)
                if not local_creates:
                    slowest = max(slowest, create_started - slice_started)
                    continue
                name = f"local-{dst.now}".encode()
                dst.sm.apply(txn, c.Mknod(ROOT_INO, name, dst.new_ino(), stat.S_IFREG | 0o644, 0, 0, dst.tick()))
                ended = time.perf_counter()
                slowest = max(slowest, create_started - slice_started)
                worst = max(worst, ended - slice_started)
        ops.release_decoded(raws)
    return len(pending), time.perf_counter() - started, slowest, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", default="500,2000", help="changes per site while cut, comma-separated")
    parser.add_argument("--renames", default="0,0.1", help="share of the changes that are renames, comma-separated")
    parser.add_argument("--dirs", type=float, default=0.0,
                        help="share of the changes that create or rename a directory (files go into them too)")
    parser.add_argument("--batch", type=int, default=512, help="operations per push ([site] batch_operations)")
    parser.add_argument("--slice", type=int, default=0,
                        help="operations per ApplyRemote; 0: as many as the receiver's SliceSizer says (a source "
                             "without one: 128, its APPLY_SLICE_OPS)")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.source))
    harness = importlib.import_module("tests.repl.test_sites_sm")
    c = importlib.import_module("awsomefsd.meta.commands")
    ops = importlib.import_module("awsomefsd.crdt.ops")
    sizing = None
    if not args.slice:
        try:
            sizing = importlib.import_module("awsomefsd.repl.receiver").SliceSizer
        except AttributeError:
            args.slice = 128
    slicing = f"slices of {args.slice}" if args.slice else "slices sized by the receiver's SliceSizer"
    print(f"source {args.source}; push of {args.batch} operations in {slicing}; directories {args.dirs}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'changes/site':>12} {'renames':>7} {'direction':>9} {'ops':>7} {'seconds':>8} {'ops/s':>8} "
          f"{'slowest slice ms':>16} {'worst create ms':>15} {'slices':>6} {'p50/p90/p99 slice ms':>20}")
    for count in (int(n) for n in args.creates.split(",")):
        for share in (float(s) for s in args.renames.split(",")):
            with tempfile.TemporaryDirectory() as scratch:
                a, b = harness.linked_pair(Path(scratch))
                rng = random.Random(count)
                make_changes(a, c, count, share, rng, "a", args.dirs)
                make_changes(b, c, count, share, rng, "b", args.dirs)
                for site in (a, b):  # folded as they were made, as the node running the link does every 20 ms
                    site.apply(c.FoldCapture(1 << 20))
                for name, src, dst in (("a->b", a, b), ("b->a", b, a)):
                    slices: list[float] = []
                    applied, seconds, slowest, worst = apply_everything(
                        src, dst, c, ops, args.batch, args.slice, sizer=None if sizing is None else sizing(),
                        slices=slices)
                    ms = sorted(x * 1000 for x in slices)
                    spread = "/".join(f"{ms[min(len(ms) - 1, int(q * len(ms)))]:.0f}" for q in (0.5, 0.9, 0.99))
                    print(f"{count:>12} {share:>7} {name:>9} {applied:>7} {seconds:>8.2f} {applied / seconds:>8.0f} "
                          f"{slowest * 1000:>16.0f} {worst * 1000:>15.0f} {len(ms):>6} {spread:>20}", flush=True)
                apply_everything(a, b, c, ops, args.batch, args.slice or 128, local_creates=False)  # a's local creates
                if a.snapshot() != b.snapshot():
                    print("the sites differ after the catch-up", file=sys.stderr)
                    return 1
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
