"""What a crash of the daemon before still has to report (fs/losses.py CrashReports), and the
commit that follows a burst of changes once they stop (LocalLog's `commit_idle_ms`)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from awsomefsd.fs.losses import CrashReports
from tests.unit.test_log import mknod, open_log


def test_each_directory_from_before_the_crash_reports_once() -> None:
    reports = CrashReports()
    assert not reports.directory_lost(5) and not reports.whole_lost(), "no crash, nothing to report"
    reports.crashed()
    reports.made(1000)
    assert reports.directory_lost(5) and not reports.directory_lost(5), "once per directory"
    assert reports.directory_lost(6)
    assert not reports.directory_lost(1000) and not reports.directory_lost(2000), "made after the crash"
    assert reports.whole_lost() and not reports.whole_lost()
    reports.made(3000)
    assert not reports.directory_lost(1500), "the first number handed out after the crash stays the bound"


def test_a_hand_over_carries_what_is_left_to_report() -> None:
    before = CrashReports()
    before.crashed()
    assert before.directory_lost(5)
    after = CrashReports()
    after.restore(before.export())
    assert not after.directory_lost(5) and after.directory_lost(6) and after.whole_lost()
    quiet = CrashReports()
    quiet.restore(CrashReports().export())
    assert not quiet.directory_lost(5), "no crash before the hand-over: nothing to report"


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
