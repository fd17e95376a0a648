"""What the kernel sends us for what a program does: requests spared must stay spared, and the
ones that carry meaning must still come (issue 40: requests per file of rsync, untar, creates).

The daemon's own metrics count the requests by operation (`awsomefs_fuse_request_seconds_count`),
as an operator reads them. Each count is read after a marker request (a lookup of a name that
does not exist) is counted: requests are answered and counted in order, so every request made
before the marker is in the figures then.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.members import wait_for
from tests.support.daemon import Daemon

COUNT = re.compile(r'awsomefs_fuse_request_seconds_count\{op="(\w+)"\} ([0-9.e+]+)')
_markers = itertools.count()


class Counted:
    """A dev daemon with metrics on a free port, and its request counts."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.mount = daemon.mount
        found = re.search(r"metrics on http://[^:]+:(\d+)/", daemon.logs())
        assert found, daemon.logs()
        self.port = int(found.group(1))

    def counts(self) -> dict[str, int]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()
        return {op: int(float(n)) for op, n in COUNT.findall(text)}

    def settled(self) -> dict[str, int]:
        """The counts once every request made before this call is in them."""
        lookups = self.counts().get("lookup", 0)
        assert not (self.mount / f".marker-{next(_markers)}").exists()
        wait_for(lambda: self.counts().get("lookup", 0) > lookups, 10, "the marker's lookup")
        return self.counts()

    def during(self, action: object) -> dict[str, int]:
        """Requests by operation that `action()` made (the marker's lookup not counted)."""
        before = self.settled()
        action()  # type: ignore[operator]
        after = self.settled()
        diff = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
        diff["lookup"] -= 1
        return {op: n for op, n in diff.items() if n}


@pytest.fixture(scope="module")
def counted() -> Iterator[Counted]:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-counts-", dir="/var/tmp"))
    # Our transport, write-through, whatever the run's defaults: under the kernel's writeback
    # cache a reader's close flushes too and an unlink or rename sends the file's ctime (design
    # note 135), and libfuse (the pyfuse3 fallback) answers no OPEN with FOPEN_NOFLUSH.
    d = Daemon(base / "state", base / "mnt", size="1G", extra=["--metrics-port", "0"],
               env={"AWSOMEFS_MOUNT__WRITEBACK_CACHE": "false", "AWSOMEFS_MOUNT__TRANSPORT": "kernel"}).start()
    try:
        yield Counted(d)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.logs()
        d.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


def test_a_readers_close_sends_no_flush_and_a_writers_does(counted: Counted) -> None:
    """A read-only descriptor's close sends no FLUSH (FOPEN_NOFLUSH): nothing was written
    through it. A descriptor that can write still flushes at close: a write error is reported
    there, and its data reaches the device without an fsync."""
    work = counted.mount / "noflush"
    work.mkdir()
    data = os.urandom(10_000)

    def write_file() -> None:
        (work / "f").write_bytes(data)

    assert counted.during(write_file).get("flush") == 1

    def read_it(times: int) -> None:
        for _ in range(times):
            assert (work / "f").read_bytes() == data
            subprocess.run(["cat", str(work / "f")], stdout=subprocess.DEVNULL, check=True)

    spent = counted.during(lambda: read_it(5))
    assert "flush" not in spent, spent
    assert spent.get("release") == 10, spent  # each reader was opened and closed

    def open_read_write() -> None:
        os.close(os.open(work / "f", os.O_RDWR))
        os.close(os.open(work / "f", os.O_WRONLY | os.O_APPEND))

    assert counted.during(open_read_write).get("flush") == 2


def test_a_reader_closing_beside_a_writer_changes_nothing_the_writer_wrote(counted: Counted) -> None:
    """The writer's buffered bytes are no business of a reader's close: each reader opened and
    closed between the writes reads every byte written so far, and the file holds them all once
    the writer closed."""
    work = counted.mount / "beside"
    work.mkdir()
    path = work / "log"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        written = b""
        for i in range(20):
            line = f"line {i}\n".encode() * 50
            os.write(writer, line)
            written += line
            with open(path, "rb") as reader:  # opened and closed while the writer's bytes are buffered
                assert reader.read() == written
    finally:
        os.close(writer)
    assert path.read_bytes() == written
    subprocess.run(["sync", "-f", str(path)], check=True)
    assert os.stat(path).st_size == len(written)


def test_a_create_an_unlink_and_a_mkdir_cost_these_requests_and_no_more(counted: Counted) -> None:
    """Each request here is the kernel's (Linux 6.18, docs/fuse-transport.md "Requests per
    create"): a fresh name is looked up before it is made, even with a cached "no such file"
    for O_EXCL (fuse_atomic_open, fuse_dentry_revalidate); every change to a directory marks its
    attributes stale (fuse_dir_changed), and `default_permissions` fetches them again before the
    next walk through it (fuse_permission); a descriptor that can write is flushed at its close;
    every open is released. A request more per file fails here."""
    work = counted.mount / "counts"
    work.mkdir()
    files = 20

    def create() -> None:
        for i in range(files):
            os.close(os.open(work / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.stat(work)  # the walk after the last change: each change's GETATTR is counted

    each = {"lookup": files, "create": files, "getattr": files, "flush": files, "release": files}
    assert counted.during(create) == each

    def unlink() -> None:
        for i in range(files):
            os.unlink(work / f"f{i}")
        os.stat(work)

    assert counted.during(unlink) == {"unlink": files, "getattr": files}

    def mkdir() -> None:
        for i in range(files):
            os.mkdir(work / f"d{i}")
        os.stat(work)

    assert counted.during(mkdir) == {"lookup": files, "mkdir": files, "getattr": files}


def test_a_name_looked_up_before_it_is_made_is_not_looked_up_again(counted: Counted) -> None:
    """A single node caches "no such file" for the entry timeout (nodeid 0 with entry_valid): a
    program that stats a name before creating it (cp, rsync, make) pays one LOOKUP, not two. An
    exclusive create looks the name up again whatever is cached (the kernel trusts no cached
    negative entry for O_EXCL)."""
    work = counted.mount / "negative"
    work.mkdir()
    files = 20

    def stat_then_create(flags: int) -> None:
        for i in range(files):
            assert not (work / f"f{flags}-{i}").exists()
            os.close(os.open(work / f"f{flags}-{i}", os.O_CREAT | os.O_WRONLY | flags, 0o644))

    spent = counted.during(lambda: stat_then_create(0))
    assert spent.get("lookup") == files and spent.get("create") == files, spent  # the stat's only
    spent = counted.during(lambda: stat_then_create(os.O_EXCL))
    assert spent.get("lookup") == 2 * files and spent.get("create") == files, spent
