"""What a link's initial sync costs in the state machine alone (issue 47): a namespace of
`--entries` made directly through the state machine (directories of `--fanout` files, one file in
ten with an extended attribute), then linked, and its walk seeded by `SeedSite` slices of
`--slice` entries (meta/sites/seeding.py) until none is left; or, `--old`, seeded inside LinkSite
in one transaction as the builds before log level 20 did.

No daemon, no mount, no network: a state machine on an LMDB store in a scratch directory (the
harness of tests/repl/test_sites_sm.py). Each mode runs in a child process of its own, so that
its memory is its own; with `--runs N` the modes alternate. Reported per run: wall and CPU time per
entry seeded, the longest transaction (one SeedSite, or the whole LinkSite), the 99th percentile of
the slices, the process's anonymous memory (RssAnon: the heap, what the walk could grow) before and
at its peak while seeding, and its peak resident memory (VmHWM, which counts the LMDB pages
mapped too), and the operations the outbox then holds.

As root or any user, from the repository root:

    .venv/bin/python bench/seed_cost.py [--entries 100000] [--fanout 100] [--slice 256] [--runs 1]
        [--old] [--json F] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def memory_kib() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process, KiB."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def one_run(mode: str, entries: int, fanout: int, slice_entries: int, scratch: Path) -> dict[str, Any]:
    from awsomefsd.meta import commands as c
    from awsomefsd.meta.records import ROOT_INO
    from awsomefsd.meta.sites.seeding import SiteSeeding
    from awsomefsd.meta.state_machine import StateMachine
    from awsomefsd.meta.store import MetaStore

    with tempfile.TemporaryDirectory(dir=scratch) as d:
        store = MetaStore(Path(d), map_size_bytes=64 << 30)
        sm = StateMachine(store, delayed_free_ns=1000)
        now = 10**12

        def apply(commands: list[Any]) -> list[Any]:
            with store.env.begin(write=True) as txn:
                return [sm.apply(txn, command) for command in commands]

        with store.env.begin(write=True) as txn:
            sm.bootstrap(txn, cluster_id=str(uuid.UUID(int=0xA << 120)), device_id="d", data_extent=(256, 10_000),
                         now_ns=1)
        dirs = max(1, entries // (fanout + 1))
        ino, _end = apply([c.ReserveInodes(entries + dirs + 10)])[0]
        made = 0
        for number in range(dirs):
            directory = ino
            ino += 1
            batch: list[Any] = [c.Mknod(ROOT_INO, b"d%06d" % number, directory, stat.S_IFDIR | 0o755, 0, 0, now)]
            for f in range(fanout):
                if made + len(batch) >= entries:
                    break
                batch.append(c.Mknod(directory, b"f%04d" % f, ino, stat.S_IFREG | 0o644, 1000, 1000, now))
                if f % 10 == 0:
                    batch.append(c.SetXattr(ino, b"user.tag", b"v%d" % f, 0, now))
                ino += 1
            apply(batch)
            made += sum(1 for command in batch if isinstance(command, c.Mknod))
            if made >= entries:
                break
        if mode == "old":
            SiteSeeding.streams_seed = lambda self, txn: False  # type: ignore[method-assign]
        before = memory_kib()
        peak_anon = before["RssAnon"]
        slices: list[float] = []
        wall0, cpu0 = time.perf_counter(), time.process_time()
        t0 = time.perf_counter()
        apply([c.LinkSite(uuid.UUID(int=0xB << 120).bytes, now + 1)])
        slices.append(time.perf_counter() - t0)
        while True:
            with store.env.begin() as txn:
                if sm.sites.seeding(txn) is None:
                    break
            t0 = time.perf_counter()
            apply([c.SeedSite(slice_entries, now + 2)])
            slices.append(time.perf_counter() - t0)
            if len(slices) % 16 == 0:
                peak_anon = max(peak_anon, memory_kib()["RssAnon"])
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        after = memory_kib()
        with store.env.begin() as txn:
            outbox = sm.sites.outbox_operations(txn)
        slices.sort()
        return {"mode": mode, "entries": made + dirs, "slices": len(slices), "wall_s": round(wall, 2),
                "us_per_entry": round(wall / (made + dirs) * 1e6, 1),
                "cpu_us_per_entry": round(cpu / (made + dirs) * 1e6, 1),
                "longest_txn_ms": round(slices[-1] * 1000, 1),
                "p99_txn_ms": round(slices[min(len(slices) - 1, int(len(slices) * 0.99))] * 1000, 1),
                "rss_anon_before_mib": round(before["RssAnon"] / 1024, 1),
                "rss_anon_peak_mib": round(max(peak_anon, after["RssAnon"]) / 1024, 1),
                "vm_hwm_mib": round(after["VmHWM"] / 1024, 1), "outbox_operations": outbox,
                "store_mib": round((Path(d) / "data.mdb").stat().st_size / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--fanout", type=int, default=100)
    parser.add_argument("--slice", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--old", action="store_true", help="also the one-transaction seed, alternating")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.child, args.entries, args.fanout, args.slice, args.scratch)))
        return 0
    modes = ["new", "old"] if args.old else ["new"]
    results: list[dict[str, Any]] = []
    for run in range(args.runs):
        for mode in modes:
            load = os.getloadavg()[0]
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--entries", str(args.entries),
                                   "--fanout", str(args.fanout), "--slice", str(args.slice),
                                   "--scratch", str(args.scratch)], capture_output=True, text=True, check=True)
            result = {**json.loads(done.stdout.strip().splitlines()[-1]), "run": run,
                      "load": [round(load, 1), round(os.getloadavg()[0], 1)]}
            results.append(result)
            print(json.dumps(result), flush=True)
    for mode in modes:
        mine = [r for r in results if r["mode"] == mode]
        print(f"{mode}: median {statistics.median(r['us_per_entry'] for r in mine):.1f} us/entry wall, "
              f"{statistics.median(r['cpu_us_per_entry'] for r in mine):.1f} CPU; longest transaction "
              f"{statistics.median(r['longest_txn_ms'] for r in mine):.1f} ms; RssAnon peak "
              f"{statistics.median(r['rss_anon_peak_mib'] for r in mine):.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
