"""The random file exerciser (tests/support/fsx.py) against a real daemon: several processes of
seeded random operations checked against a model, cross-process read-after-write pairs, and the
truncate-then-extend race against background compaction.

    .venv/bin/python -m pytest tests/mounted/test_fsx.py                 # short run (~20 s)
    .venv/bin/python -m pytest tests/mounted/test_fsx.py -k long --slow  # 3 minutes, more workers
    FSX_SEED=7 FSX_DURATION=60 .venv/bin/python -m pytest tests/mounted/test_fsx.py -k short

Settings are FSX_* variables (fsx.Settings): FSX_SEED, FSX_DURATION, FSX_OPS, FSX_MODEL,
FSX_TRUNC, FSX_PAIRS, FSX_ONLY=m0 (replay one worker: its op sequence depends only on the seed),
FSX_SKIP=mtime_write (count a check's violations instead of failing, to look past a known bug).
A failure prints the seed, the failing op, the last ops and the command that replays it.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from tests.support import fsx, seeds
from tests.support.daemon import Daemon

pytestmark = pytest.mark.mounted

# Each profile's seed is fresh each run (tests/support/seeds.py); a failure prints the FSX_SEED replay.
SHORT = fsx.Settings(seed=seeds.fresh_one("fsx-short"),
                     duration_s=20.0, ops=3000, model_workers=2, trunc_workers=2, pairs=1)
READ_AFTER_WRITE = fsx.Settings(seed=seeds.fresh_one("fsx-read-after-write"),
                                duration_s=15.0, ops=100_000, model_workers=0, trunc_workers=0, pairs=2, readers=3)
"""Only writer/reader pairs, many readers: the page cache against a write in flight."""
LONG = fsx.Settings(seed=seeds.fresh_one("fsx-long"),
                    duration_s=180.0, ops=100_000, model_workers=3, trunc_workers=3, pairs=2, readers=2)


def _run(profile: fsx.Settings, directory: Path, request: pytest.FixtureRequest, daemon: Daemon) -> None:
    settings = fsx.Settings.from_env(profile)
    report = fsx.run(settings, directory, fsx.replay_command(settings, profile, request.node.nodeid))
    if report.failed:
        pytest.fail(report.text() + "\ndaemon log (tail):\n" + "".join(daemon.output[-20:]), pytrace=False)
    print(report.summary())


@pytest.mark.fallback_smoke
def test_fsx_short(daemon: Daemon, mnt: Path, request: pytest.FixtureRequest) -> None:
    _run(SHORT, mnt, request, daemon)


def test_fsx_read_after_write(daemon: Daemon, mnt: Path, request: pytest.FixtureRequest) -> None:
    """Readers in other processes, buffered and O_DIRECT, never see a block older than one whose
    write had returned. (The kernel unlocks a written page before it sends the WRITE, so a READ
    of that page can reach the daemon while the WRITE is in flight: it must be answered after.)"""
    _run(READ_AFTER_WRITE, mnt, request, daemon)


@pytest.mark.slow
def test_fsx_long(daemon: Daemon, mnt: Path, request: pytest.FixtureRequest) -> None:
    _run(LONG, mnt, request, daemon)


def test_statx_helper_matches_os_stat(tmp_path: Path) -> None:
    """The ctypes statx against os.stat on an ordinary file: by path, by descriptor, and a symlink."""
    f = tmp_path / "f"
    f.write_bytes(os.urandom(12_345))
    os.chmod(f, 0o640)
    os.utime(f, ns=(1_234_567_890_123_456_789, 1_111_111_111_987_654_321))
    os.link(f, tmp_path / "g")
    os.symlink("f", tmp_path / "s")
    want = os.stat(f)
    fd = os.open(f, os.O_RDONLY)
    try:
        for got in (fsx.statx(f), fsx.statx(fd), fsx.statx(str(tmp_path / "s")), fsx.statx(f, force_sync=False)):
            assert (got.ino, got.mode, got.nlink, got.uid, got.gid, got.size, got.blocks) == (
                want.st_ino, want.st_mode, want.st_nlink, want.st_uid, want.st_gid, want.st_size, want.st_blocks)
            assert (got.atime_ns, got.mtime_ns, got.ctime_ns) == (want.st_atime_ns, want.st_mtime_ns, want.st_ctime_ns)
    finally:
        os.close(fd)
    link = fsx.statx(tmp_path / "s", follow_symlinks=False)
    assert stat.S_ISLNK(link.mode) and link.ino == os.lstat(tmp_path / "s").st_ino
    with pytest.raises(FileNotFoundError):
        fsx.statx(tmp_path / "missing")
    before = time.time_ns()
    os.utime(f)
    assert fsx.statx(f).mtime_ns >= before - 20_000_000  # filesystem timestamps are coarse


def test_block_stamps_roundtrip() -> None:
    assert fsx.parse_block(fsx.block_bytes(7, 42)) == (7, 42)
    torn = fsx.block_bytes(7, 42)[:2048] + fsx.block_bytes(7, 41)[2048:]
    assert fsx.parse_block(torn) is None
    assert fsx.parse_block(bytes(fsx.BLOCK)) is None
