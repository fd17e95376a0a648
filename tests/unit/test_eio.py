"""EIO reports (awsomefsd/fuse/eio.py): every EIO counted by cause; logged with node, file and reason,
once per file and cause per interval, the repeats folded into the next line."""

from __future__ import annotations

import errno
import logging
from collections import Counter

import pytest

from awsomefsd.fuse.eio import EioReporter
from awsomefsd.meta.errors import FsError


def test_each_eio_is_counted_and_each_file_and_cause_logged_once(caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    counts: Counter[str] = Counter()
    now = [100.0]
    monkeypatch.setattr("awsomefsd.fuse.eio.time.monotonic", lambda: now[0])
    report = EioReporter("node 2", lambda cause: counts.update([cause]), repeat_s=30.0)
    fenced = FsError(errno.EIO, "device writes fenced", cause="fence")
    with caplog.at_level(logging.WARNING, logger="awsomefsd.fuse.eio"):
        for _ in range(5):
            report("write", "inode 7", fenced)
        report("write", "inode 8", fenced)
        report("getattr", "inode 7", FsError(errno.EIO, "metadata unavailable", cause="stall"))
        report("read", "inode 9", FsError(errno.EIO))
        now[0] += 31
        report("fsync", "inode 7", fenced)
    assert counts == {"fence": 7, "stall": 1, "other": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "node 2: EIO to write on inode 7 (fence): device writes fenced",
        "node 2: EIO to write on inode 8 (fence): device writes fenced",
        "node 2: EIO to getattr on inode 7 (stall): metadata unavailable",
        "node 2: EIO to read on inode 9 (other): Input/output error",
        "node 2: EIO to fsync on inode 7 (fence): device writes fenced (4 more since the last report)",
    ]


def test_an_unknown_cause_is_a_bug() -> None:
    with pytest.raises(AssertionError):
        FsError(errno.EIO, "x", cause="gremlins")
