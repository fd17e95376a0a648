"""Progress lines for long operations (awsomefsd/progress.py): shown on a terminal with amount,
percentage, rate and time left, redrawn at most a few times a second; silent when the output is
a pipe or a log. fsck --verify-data uses it."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from awsomefsd.cli.fsck import run_fsck
from awsomefsd.daemon.node import open_core
from awsomefsd.meta.records import ROOT_INO
from awsomefsd.progress import Progress
from tests.unit.test_fs_api import settings_for


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_sees_amount_rate_and_time_left_a_pipe_sees_nothing() -> None:
    clock, term = Clock(), Terminal()
    progress = Progress("verifying", 4 << 30, in_bytes=True, stream=term, clock=clock)
    clock.now += 2.0
    progress.advance(1 << 30)
    assert term.getvalue() == "\rverifying: 1.0 GiB of 4.0 GiB (25%), 512.0 MiB/s, 0:00:06 left"
    clock.now += 0.05
    progress.advance(1 << 20)
    assert term.getvalue().count("\r") == 1, "redrawn at most every REDRAW_S"
    clock.now += 1.0
    progress.advance((3 << 30) - (1 << 20) + (1 << 30))  # the total was an estimate: more came
    assert term.getvalue().rstrip().endswith("5.0 GiB of 4.0 GiB (100%), 1.6 GiB/s, 0:00:00 left")
    progress.close()
    assert term.getvalue().endswith("\r")
    pipe = io.StringIO()
    quiet = Progress("verifying", 10, stream=pipe, clock=clock)
    quiet.advance(5)
    quiet.close()
    assert pipe.getvalue() == ""


async def test_fsck_verify_data_shows_progress_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(tmp_path)
    core = open_core(settings)
    try:
        fh, _ = await core.ops.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, os.O_RDWR, 0, 0)
        await core.ops.write(fh, 0, os.urandom(3 << 20))
        await core.ops.fsync(fh, False)
        await core.ops.release(fh)
    finally:
        core.close()
    term = Terminal()
    monkeypatch.setattr("sys.stdout", term)
    assert run_fsck(settings, repair=False, verify_data=True) == 0
    out = term.getvalue()
    assert "\rverifying: " in out and "of 3.0 MiB" in out and "left" in out
    assert out.rstrip().endswith("fsck: clean") and "3 MiB verified" in out
