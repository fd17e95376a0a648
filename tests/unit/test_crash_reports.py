"""What a crash of the daemon before still has to report (fs/losses.py CrashReports), and the
commit that follows a burst of changes once they stop (LocalLog's `commit_idle_ms`)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import trio
import trio.testing

from awsomefsd.fs.losses import CrashReports
from awsomefsd.meta.errors import FsError
from tests.unit.test_log import mknod, open_log


def reports(check: Callable[[], None]) -> bool:
    """Did the check raise the crash's EIO?"""
    try:
        check()
    except FsError as exc:
        assert exc.errno == errno.EIO
        return True
    return False


def directory_lost(crash: CrashReports, ino: int) -> bool:
    return reports(lambda: crash.report_directory(ino))


def whole_lost(crash: CrashReports) -> bool:
    return reports(crash.report_whole)


def test_each_directory_from_before_the_crash_reports_once() -> None:
    crash = CrashReports()
    assert not directory_lost(crash, 5) and not whole_lost(crash), "no crash, nothing to report"
    crash.crashed()
    crash.made(1000)
    assert directory_lost(crash, 5) and not directory_lost(crash, 5), "once per directory"
    assert directory_lost(crash, 6)
    assert not directory_lost(crash, 1000) and not directory_lost(crash, 2000), "made after the crash"
    assert whole_lost(crash) and not whole_lost(crash)
    crash.made(3000)
    assert not directory_lost(crash, 1500), "the first number handed out after the crash stays the bound"


def test_a_hand_over_carries_what_is_left_to_report() -> None:
    before = CrashReports()
    before.crashed()
    assert directory_lost(before, 5)
    after = CrashReports()
    after.restore(before.export())
    assert not directory_lost(after, 5) and directory_lost(after, 6) and whole_lost(after)
    quiet = CrashReports()
    quiet.restore(CrashReports().export())
    assert not directory_lost(quiet, 5), "no crash before the hand-over: nothing to report"


async def test_a_burst_is_committed_once_it_stops(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    _, _, log = open_log(tmp_path / "m", commit_interval_ms=1000, commit_idle_ms=20)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(10):  # a burst: a command every 5 ms
            await log.propose(mknod(100 + i, b"f%d" % i))
            await trio.sleep(0.005)
        end = trio.current_time()
        while log.committed_index < 10:
            await trio.sleep(0.001)
        assert trio.current_time() - end <= 0.04, "committed within twice the idle time after the last change"
        assert log.commits == 1, "one commit for the burst"
        for i in range(10, 400):  # a steady stream: committed at the interval, not more often
            await log.propose(mknod(100 + i, b"f%d" % i))
            await trio.sleep(0.005)
        assert log.commits <= 3
        nursery.cancel_scope.cancel()
