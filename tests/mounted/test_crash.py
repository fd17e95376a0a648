"""kill -9 of the daemon in the middle of a write-heavy workload, again and again.

After every crash and restart: every byte acknowledged by fsync is there; no file holds garbage or
another file's data (every block is one of that file's versions at that offset, or a hole); the
stale mount left by the crash is cleared by the next start; fsck finds nothing but leaked space.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import seeds
from tests.support.crash_writer import BLOCK, block_bytes, file_size
from tests.support.daemon import Daemon, run_cli, wait_for

pytestmark = pytest.mark.mounted
WRITER = Path(__file__).resolve().parents[1] / "support" / "crash_writer.py"


def read_acks(path: Path) -> dict[int, int]:
    acked: dict[int, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            i, v = map(int, line.split())
            acked[i] = max(v, acked.get(i, -1))
    return acked


def verify(mount: Path, acked: dict[int, int], max_version: dict[int, int]) -> int:
    """Check every file on the mount; returns how many acknowledged files were verified."""
    verified = 0
    for entry in os.scandir(mount):
        if not entry.name.startswith("f"):
            continue
        i = int(entry.name[1:])
        data = Path(entry.path).read_bytes()
        size = file_size(i)
        assert len(data) <= size or i not in acked, f"f{i}: grew past its size"
        low = acked.get(i, 0)
        allowed = range(low, max_version.get(i, low) + 2)
        for b in range(0, -(-len(data) // BLOCK)):
            chunk = data[b * BLOCK : (b + 1) * BLOCK]
            if i not in acked and chunk == bytes(len(chunk)):
                continue  # never acknowledged: unflushed blocks may be holes
            assert any(chunk == block_bytes(i, v, b)[: len(chunk)] for v in allowed), (
                f"f{i} block {b}: not a version in {list(allowed)} of this file (garbage or foreign data)")
        if i in acked:
            assert len(data) == size, f"f{i}: acknowledged with {size} bytes, found {len(data)}"
            verified += 1
    for i in acked:
        assert (mount / f"f{i}").exists(), f"f{i} was acknowledged by fsync and is gone"
    return verified


def crash_cycles(cycles: int, seed: int, env: dict[str, str] | None = None) -> None:
    print(f"crash cycles: seed {seed}")  # fresh each run (tests/support/seeds.py)
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="awsomefs-crash-", dir="/var/tmp"))
    ack_log = base / "acks"
    daemon = Daemon(base / "state", base / "mnt", size="2G", env=env)
    max_version: dict[int, int] = {}
    try:
        first = 0
        for cycle in range(cycles):
            daemon.start()
            acked = read_acks(ack_log)
            verify(daemon.mount, acked, max_version)
            writer = subprocess.Popen([sys.executable, str(WRITER), str(daemon.mount), str(ack_log),
                                       str(seed * 1000 + cycle), str(first)], stderr=subprocess.DEVNULL)
            before = len(read_acks(ack_log))
            wait_for(lambda before=before: len(read_acks(ack_log)) > before + 3, 60, "the writer to make progress")
            time.sleep(rng.uniform(0.0, 0.5))  # crash at a random point of the workload, not a wait
            daemon.kill()
            writer.wait(60)
            acked = read_acks(ack_log)
            for i, v in acked.items():
                max_version[i] = max(max_version.get(i, 0), v)
            first = max(acked, default=0) + 1000
            daemon.start()  # must clear the stale mount the crash left
            assert verify(daemon.mount, acked, max_version) == len(acked)
            assert daemon.stop() == 0, daemon.logs()
            fsck = run_cli("fsck", "--state", str(daemon.state))
            assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


def test_kill_9_under_write_load() -> None:
    crash_cycles(cycles=3, seed=seeds.fresh_one("crash"))


def test_kill_9_under_write_load_on_the_raft_log() -> None:
    """The same crash cycles with the metadata on the Raft engine (one-member group)."""
    crash_cycles(cycles=3, seed=seeds.fresh_one("crash-raft"), env={"AWSOMEFS_META__LOG": "raft"})


@pytest.mark.slow
def test_kill_9_under_write_load_many_times() -> None:
    crash_cycles(cycles=20, seed=seeds.fresh_one("crash-many"))
