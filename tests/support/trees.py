"""A source-like tree for the tests that run real programs (tar, cp -a, rsync -a) on a mount and
compare the result with the same program's on ext4."""

from __future__ import annotations

import os
import random
from pathlib import Path


def make_source_tree(root: Path, files: int, seed: int) -> None:
    """Nested directories, sizes from 0 to over 1 MiB, modes, symlinks, hard links, and times
    spread over years with nanoseconds, under `root` (which exists)."""
    rng = random.Random(seed)
    dirs = [root]
    for i in range(files // 20):
        d = rng.choice(dirs) / f"d{i}"
        d.mkdir()
        dirs.append(d)
    os.chmod(dirs[1], 0o2775)
    made = []
    for i in range(files):
        path = rng.choice(dirs) / f"f{i}.c"
        size = rng.choice([0, 1, 100, 4095, 4096, 4097, 30_000, rng.randrange(1 << 20, 3 << 20)])
        path.write_bytes(rng.randbytes(size))
        os.chmod(path, rng.choice([0o644, 0o600, 0o755, 0o444]))
        t = rng.randrange(300_000_000, 1_700_000_000) * 10**9 + rng.randrange(10**9)
        os.utime(path, ns=(t, t))
        made.append(path)
    for i in range(10):
        link = rng.choice(dirs) / f"link{i}"
        link.symlink_to(f"target-{i}")
        t = rng.randrange(300_000_000, 1_700_000_000) * 10**9 + rng.randrange(10**9)
        os.utime(link, ns=(t, t), follow_symlinks=False)  # rsync skips times equal to the second
        os.link(made[i], rng.choice(dirs) / f"hard{i}")
    for d in reversed(dirs):
        t = rng.randrange(300_000_000, 1_700_000_000) * 10**9
        os.utime(d, ns=(t, t))
