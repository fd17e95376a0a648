"""A local create while the initial sync runs (issue 47): two single-node sites in network
namespaces behind the WAN proxy (tests/support/sites.py), site a holding `--files` files in
directories of 100; one create at a time on a's mount is timed for `--window` seconds unlinked
(the baseline), then `site link` and the same loop for as long as a's walk has directories left
(and at most `--max-s`). Reported: the creates' latency (p50, p99, longest) in both phases, how
long the walk took, and the load average (other work on this shared machine weighs on both).

As root, from the repository root:

    .venv/bin/python bench/seed_latency.py [--files 30000] [--window 10] [--max-s 300] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.sites import link, two_sites  # noqa: E402


def creates(directory: Path, until: Any, prefix: str) -> list[float]:
    """Create files one at a time in `directory` while `until()` is true; each one's seconds."""
    directory.mkdir(exist_ok=True)
    took, i = [], 0
    while until():
        t0 = time.perf_counter()
        fd = os.open(directory / f"{prefix}{i}", os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
        took.append(time.perf_counter() - t0)
        i += 1
    return took


def summary(took: list[float]) -> dict[str, float]:
    ordered = sorted(took)
    return {"creates": len(ordered), "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2), "max_ms": round(ordered[-1] * 1000, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=30_000)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--max-s", type=float, default=300.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/work" if Path("/work").is_dir() else None) as root, \
            two_sites(Path(root), size="4G") as (a, b, _wan):
        for d in range(0, args.files, 100):
            (a.mount / f"d{d // 100:05}").mkdir()
            for f in range(min(100, args.files - d)):
                os.close(os.open(a.mount / f"d{d // 100:05}" / f"f{f:03}", os.O_CREAT | os.O_WRONLY, 0o644))
        subprocess.run(["sync"], check=False)
        load0 = os.getloadavg()[0]
        end = time.monotonic() + args.window
        unlinked = creates(a.mount / "probe-unlinked", lambda: time.monotonic() < end, "u")
        link(a, b)
        started = time.monotonic()
        walking, calls = [True], [0]

        def still() -> bool:
            calls[0] += 1
            if time.monotonic() - started > args.max_s:
                return False
            if calls[0] % 50 == 0:  # one status call (a CLI process) per 50 creates, between them
                walking[0] = a.status().get("seeding") is not None
            return walking[0]

        took = creates(a.mount / "probe-syncing", still, "s")
        walk_s = time.monotonic() - started
        result = {"files": args.files, "unlinked": summary(unlinked), "during_sync": summary(took),
                  "walk_s": round(walk_s, 1), "load": [round(load0, 1), round(os.getloadavg()[0], 1)]}
        print(json.dumps(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
