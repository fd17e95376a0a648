"""What a crash of the daemon under a kept mount (kill -9, the next daemon continues the mount)
tells applications, and what `sync` covers.

A crash loses what the dead daemon acknowledged and never committed (design note 1). Applications
must hear it at their next durability point, and the kernel must stop showing what was lost:
- the atomic-replace pattern (write f.tmp, fsync it, rename it over f, fsync the directory) gets
  EIO once from the directory's fsync when the crash took the rename, and the kernel's cached
  names agree with the listing at once (stat("f") found the lost name in the dentry cache);
- `sync` sends nothing to a /dev/fuse server, so what it cannot make durable the daemon commits
  soon after the changes stop (`[data] commit_idle_ms`).

Each case is tried several times in a row on one mount (`TRIES`)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest

from tests.mounted import test_restart
from tests.mounted.test_restart import Rig
from tests.support.apps import Lines
from tests.support.daemon import Daemon, wait_for

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"),
]

TRIES = [2, pytest.param(5, marks=pytest.mark.slow)]
"""How many crashes in a row: each failure was 5 of 5 before; the default suite tries twice."""
NO_IDLE_COMMIT = {"AWSOMEFS_DATA__COMMIT_INTERVAL_MS": "60000", "AWSOMEFS_DATA__COMMIT_IDLE_MS": "0"}
"""Nothing is committed but by a durability point: the crash surely takes what followed the last."""
keeper_rig = test_restart.rig
"""A keeper holding the mount's descriptor, so the next daemon continues it."""

REPLACER = r"""
import os, sys
os.mkdir(sys.argv[1])
os.chdir(sys.argv[1])  # a working directory in the mount: "." is never looked up again
fd = os.open("f.tmp", os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b"new contents")
os.fsync(fd)  # commits the directory and f.tmp
os.close(fd)
os.rename("f.tmp", "f")
os.stat("f")  # the kernel now caches the name...
assert os.listdir(".") == ["f"]  # ...and the listing
print("renamed", flush=True)
sys.stdin.readline()  # the daemon is killed and the next one continues the mount meanwhile
errors = []
for attempt in range(2):  # the crash is reported once; the next fsync succeeds
    dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
        errors.append(0)
    except OSError as exc:
        errors.append(exc.errno)
    finally:
        os.close(dfd)
seen = "f" if os.path.exists("f") else "-"
print("done", errors, seen, ",".join(sorted(os.listdir("."))), flush=True)
"""


def crash_under(rig: Rig, daemon: Daemon, env: dict[str, str], script: str, *args: str, ready: str,
                before_kill: Callable[[list[str]], None] = lambda lines: None) -> tuple[Daemon, list[str]]:
    """Run `script` on the mount until it prints `ready`, call `before_kill` (with what it printed so
    far), kill `daemon` (-9),
    start the next one on the kept mount, let the script finish; the next daemon and the script's
    last line, split."""
    app = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT,
                           text=True, cwd="/")
    lines = Lines(app)
    wait_for(lambda: lines.has(ready) or app.poll() is not None, 30, f"the script to say {ready!r}")
    assert app.poll() is None, lines.lines
    before_kill(lines.lines)
    daemon.kill()
    following = Daemon(rig.base / "state", rig.base / "mnt", size="1G", env=env).start()
    assert "continuing the mount" in following.logs() and "crash" in following.logs(), following.logs()
    assert app.stdin is not None
    app.stdin.write("\n")
    app.stdin.flush()
    assert lines.wait(60) == 0, lines.lines  # every line read, the last one too
    return following, lines.lines[-1].split(" ", 1)[1].rsplit(" ", 2)


@pytest.mark.parametrize("tries", TRIES)
def test_a_directory_fsync_reports_the_rename_a_crash_lost(keeper_rig: Rig, tries: int) -> None:
    rig = keeper_rig
    env = {**rig.env, **NO_IDLE_COMMIT}
    shown: dict[str, str] = {}
    daemon = Daemon(rig.base / "state", rig.base / "mnt", size="1G", env=env).start()
    try:
        for i in range(tries):
            daemon, (errors, seen, listing) = crash_under(rig, daemon, env, REPLACER, str(daemon.mount / f"d{i}"),
                                                          ready="renamed")
            assert errors == f"[{errno.EIO}, 0]", f"try {i}: the directory's fsync reports the crash once: {errors}"
            assert listing == "f.tmp", f"try {i}: the crash took the rename: {listing}"
            assert seen == "-", f"try {i}: the kernel still showed the lost name f (listing: {listing})"
            shown[f"d{i}"] = listing
        assert daemon.stop() == 0, daemon.logs()
        daemon = Daemon(rig.base / "state", rig.base / "mnt", size="1G", env=rig.env).start()
        for name, listing in shown.items():
            assert ",".join(sorted(os.listdir(daemon.mount / name))) == listing, "what was shown is what is durable"
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.stop_hard()


SAME_MTIME_REPLACER = r"""
import os, sys
os.mkdir(sys.argv[1])
os.chdir(sys.argv[1])
fd = os.open("f.tmp", os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b"new contents")
os.fsync(fd)  # commits the directory and f.tmp
os.close(fd)
before = os.stat(".")
os.rename("f.tmp", "f")
# The directory's mtime back to what the crash will leave: two changes within one tick of the
# clock (as under the writeback cache, whose times are coarse) leave it so without this.
os.utime(".", ns=(before.st_atime_ns, before.st_mtime_ns))
assert os.listdir(".") == ["f"]  # the kernel keeps this listing, checked against that mtime
print("renamed", flush=True)
sys.stdin.readline()  # the daemon is killed and the next one continues the mount meanwhile
print("done - -", ",".join(sorted(os.listdir("."))), flush=True)
"""


def test_a_listing_the_crash_took_is_not_shown_though_the_mtime_came_back_equal(keeper_rig: Rig) -> None:
    """The kernel checks a listing it keeps only against the directory's mtime; after a crash
    the next daemon has it list every directory afresh once (`relist_directories`)."""
    rig = keeper_rig
    env = {**rig.env, **NO_IDLE_COMMIT}
    daemon = Daemon(rig.base / "state", rig.base / "mnt", size="1G", env=env).start()
    try:
        daemon, (_, _, listing) = crash_under(rig, daemon, env, SAME_MTIME_REPLACER, str(daemon.mount / "d"),
                                              ready="renamed")
        assert listing == "f.tmp", f"the kernel showed the listing the crash took: {listing}"
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.stop_hard()


SYNCER = r"""
import os, sys, lmdb
with open(sys.argv[1], "wb") as f:
    f.write(b"contents")
# The last change is made (the close): any commit the metadata store completes from now on has it.
committed = lmdb.open(sys.argv[2], readonly=True, lock=False, max_dbs=64).info()["last_txnid"]
os.sync()
print("synced", committed, flush=True)
sys.stdin.readline()  # the daemon is killed and the next one continues the mount meanwhile
with open(sys.argv[1], "rb") as f:
    print("done", f.read().decode(), "-", "-", flush=True)
"""


def last_commit(meta: Path) -> int:
    """The last transaction the metadata store committed (LMDB's meta page, written last)."""
    env = lmdb.open(str(meta), readonly=True, lock=False, max_dbs=64)
    try:
        return int(env.info()["last_txnid"])
    finally:
        env.close()


def committed_after(meta: Path, lines: list[str]) -> None:
    """Wait until the metadata store completed a commit after the script's last change (it printed
    the last commit it saw then)."""
    seen = int(next(line for line in lines if line.startswith("synced")).split()[1])
    wait_for(lambda: last_commit(meta) > seen, 3, "a commit after the changes stopped")


@pytest.mark.parametrize("tries", TRIES)
def test_changes_followed_by_sync_are_committed_within_the_idle_time(keeper_rig: Rig, tries: int) -> None:
    """sync(2) sends the daemon nothing (docs/fuse-transport.md): what it can do is commit soon
    after the changes stop. With the commit interval at 60 s, only that commit can make the file
    survive the kill; the test waits for it (LMDB's last committed transaction) and fails if it
    does not come within seconds."""
    rig = keeper_rig
    env = {**rig.env, "AWSOMEFS_DATA__COMMIT_INTERVAL_MS": "60000"}
    daemon = Daemon(rig.base / "state", rig.base / "mnt", size="1G", env=env).start()
    meta = rig.base / "state" / "meta"
    try:
        for i in range(tries):
            daemon, (content, *_) = crash_under(rig, daemon, env, SYNCER, str(daemon.mount / f"s{i}"), str(meta),
                                                ready="synced", before_kill=lambda lines: committed_after(meta, lines))
            assert content == "contents", f"try {i}: the file written before sync survives the crash"
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.stop_hard()
