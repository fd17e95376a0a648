"""Punched holes and blocks shared by copy_file_range, across a restart and through fsck.

The block map edits (meta/ranges.py) change reference counts and free space: after a mix of
clones, punches, overwrites and an unlink, the daemon is stopped and `awsomefsd fsck` must find
nothing (no block both free and mapped, none shared without a reference, none leaked), and the
files must read back the same after the restart.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, run_cli
from tests.support.fsx import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

pytestmark = pytest.mark.mounted
MiB = 1 << 20
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _fsck_is_clean(daemon: Daemon) -> None:
    assert daemon.stop() == 0, daemon.logs()
    fsck = run_cli("fsck", "--state", str(daemon.state))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def _copy(src: Path, dst: Path, length: int, off_in: int, off_out: int) -> None:
    with open(src, "rb") as s, open(dst, "r+b") as d:
        done = 0
        while done < length:
            n = os.copy_file_range(s.fileno(), d.fileno(), length - done, off_in + done, off_out + done)
            assert n > 0
            done += n
        os.fsync(d.fileno())


def test_clones_and_holes_survive_a_restart_and_fsck_finds_nothing() -> None:
    if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3":
        pytest.skip("pyfuse3 has no fallocate or copy_file_range handler (the kernel copies there)")
    rng = random.Random(3)
    base = Path(tempfile.mkdtemp(prefix="awsomefs-sharing-", dir="/var/tmp"))
    daemon = Daemon(base / "state", base / "mnt", size="1G")
    try:
        daemon.start()
        a, b = daemon.mount / "a", daemon.mount / "b"
        model_a = bytearray(rng.randbytes(6 * MiB + 777))
        a.write_bytes(model_a)
        b.write_bytes(b"")
        _copy(a, b, len(model_a), 0, 0)  # all of a shared by b
        model_b = bytearray(model_a)
        with open(a, "r+b") as f:
            fallocate(f.fileno(), PUNCH, MiB + 100, 2 * MiB)  # a punches blocks b still maps
            os.fsync(f.fileno())
        model_a[MiB + 100:3 * MiB + 100] = bytes(2 * MiB)
        _copy(b, a, MiB, 4 * MiB, 5 * MiB)  # b's blocks back into a, over a's own
        model_a[5 * MiB:6 * MiB] = model_b[4 * MiB:5 * MiB]
        with open(b, "r+b") as f:
            f.seek(4 * MiB + 4096)
            f.write(b"x" * 10_000)  # copy-on-write: a keeps the old bytes
        model_b[4 * MiB + 4096:4 * MiB + 14_096] = b"x" * 10_000
        assert a.read_bytes() == model_a and b.read_bytes() == model_b
        _fsck_is_clean(daemon)
        daemon.start()
        assert a.read_bytes() == model_a and b.read_bytes() == model_b
        a.unlink()
        _fsck_is_clean(daemon)
        daemon.start()
        assert b.read_bytes() == model_b
        b.unlink()
        _fsck_is_clean(daemon)
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)
