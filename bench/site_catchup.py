"""What a two-sided catch-up costs the receiving state machine (issue 47): both sites of a link
make changes while the link is cut, then each applies the other's operations in pushes of
`--batch` operations, as the receiver does (one `ApplyRemote` per push).

This is the state machine alone (two LMDB stores in one process, tests/repl/test_sites_sm.py's
`Site`), without the wire, staging or the daemons: the part of a catch-up that runs on the
receiving site's event loop, and that grew quadratically with what both sites did. Prints, per
direction, the operations applied, seconds, operations per second and the slowest push (what
a local request waits behind at most on a single node). `--source DIR` imports `awsomefsd` and
the harness from another checkout (an older commit, for a before/after in one run).

    .venv/bin/python bench/site_catchup.py --creates 500,2000,10000 --renames 0,0.1
    .venv/bin/python bench/site_catchup.py --creates 1000 --source /work/old-checkout
"""

from __future__ import annotations

import argparse
import importlib
import random
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT_INO = 1


def make_changes(site: Any, c: Any, count: int, rename_share: float, rng: random.Random, tag: str) -> None:
    """`count` changes in the root: creates of empty files, and renames of them (`rename_share`)."""
    names: list[bytes] = []
    for i in range(count):
        now = site.tick()
        if names and rng.random() < rename_share:
            old = names.pop(rng.randrange(len(names)))
            names.append(f"{tag}-renamed-{i}".encode())
            site.apply(c.Rename(ROOT_INO, old, ROOT_INO, names[-1], 0, now))
        else:
            names.append(f"{tag}-{i}".encode())
            site.apply(c.Mknod(ROOT_INO, names[-1], site.new_ino(), stat.S_IFREG | 0o644, 0, 0, now))


def apply_everything(src: Any, dst: Any, c: Any, ops: Any, batch: int) -> tuple[int, float, float]:
    """Apply at `dst` all `src` has that `dst` has not: (operations, seconds, slowest push)."""
    pending = src.outbox_after(dst.applied_from_peer())
    slowest, started = 0.0, time.perf_counter()
    for at in range(0, len(pending), batch):
        raws = [src.read(lambda txn, raw=raw: src.sm.sites.shipping(txn, raw))[0] for _, raw in pending[at:at + batch]]
        counts = tuple(0 for raw in raws if isinstance(ops.decode(raw), ops.ContentSet))  # empty files: no bytes
        after = dst.applied_from_peer()
        push_started = time.perf_counter()
        dst.apply(c.ApplyRemote(src.id, b"" if after is None else after.pack(), tuple(raws), (), counts, dst.tick()))
        slowest = max(slowest, time.perf_counter() - push_started)
    return len(pending), time.perf_counter() - started, slowest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", default="500,2000", help="changes per site while cut, comma-separated")
    parser.add_argument("--renames", default="0,0.1", help="share of the changes that are renames, comma-separated")
    parser.add_argument("--batch", type=int, default=512, help="operations per push ([site] batch_operations)")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.source))
    harness = importlib.import_module("tests.repl.test_sites_sm")
    c = importlib.import_module("awsomefsd.meta.commands")
    ops = importlib.import_module("awsomefsd.crdt.ops")
    print(f"source {args.source}; push of {args.batch} operations")
    print(f"{'changes/site':>12} {'renames':>7} {'direction':>9} {'ops':>7} {'seconds':>8} {'ops/s':>8} {'slowest push ms':>15}")
    for count in (int(n) for n in args.creates.split(",")):
        for share in (float(s) for s in args.renames.split(",")):
            with tempfile.TemporaryDirectory() as scratch:
                a, b = harness.linked_pair(Path(scratch))
                rng = random.Random(count)
                make_changes(a, c, count, share, rng, "a")
                make_changes(b, c, count, share, rng, "b")
                for name, src, dst in (("a->b", a, b), ("b->a", b, a)):
                    applied, seconds, slowest = apply_everything(src, dst, c, ops, args.batch)
                    print(f"{count:>12} {share:>7} {name:>9} {applied:>7} {seconds:>8.2f} {applied / seconds:>8.0f} "
                          f"{slowest * 1000:>15.0f}", flush=True)
                if a.snapshot() != b.snapshot():
                    print("the sites differ after the catch-up", file=sys.stderr)
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
