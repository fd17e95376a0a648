"""open(O_TMPFILE) on the mount, side by side with ext4 on a loop device (issue 41, "POSIX gaps
against ext4"): a file born without a name, linked later with linkat(2) or never, as real
programs use it (a process of an ordinary user, `ln -L` through /proc)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.members import wait_for
from tests.mounted.test_extreme_values import ext4_mount
from tests.support.daemon import Daemon

pytestmark = pytest.mark.mounted
PYFUSE3 = os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3"
needs_tmpfile = pytest.mark.skipif(PYFUSE3, reason="pyfuse3 has no FUSE_TMPFILE handler: EOPNOTSUPP there")

USER = 1234
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
libc = ctypes.CDLL(None, use_errno=True)


def _linkat(fd: int, path: Path) -> str:
    """linkat(AT_FDCWD, "/proc/self/fd/N", AT_FDCWD, path, AT_SYMLINK_FOLLOW): what an unprivileged
    program does (AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH). Python's os.link calls link(2), which
    does not follow the /proc link."""
    if libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, bytes(path), AT_SYMLINK_FOLLOW):
        return errno.errorcode[ctypes.get_errno()]
    return "linked"


def _seen(st: os.stat_result) -> list[object]:
    return [st.st_nlink, oct(stat.S_IMODE(st.st_mode)), stat.S_ISREG(st.st_mode), st.st_uid, st.st_gid, st.st_size]


def _story_in(root: Path) -> dict[str, object]:
    os.umask(0o022)
    out: dict[str, object] = {}
    fd = os.open(root, os.O_TMPFILE | os.O_RDWR, 0o666)
    os.write(fd, b"tmpfile " * 4096)
    out["unnamed"] = _seen(os.fstat(fd))
    out["listed"] = sorted(os.listdir(root))
    out["link"] = _linkat(fd, root / "kept")
    out["named"] = _seen(os.fstat(fd))
    out["again"] = _linkat(fd, root / "kept2")  # a second name, as for any file
    out["relinked"] = os.fstat(fd).st_nlink
    os.close(fd)
    out["content"] = (root / "kept").read_bytes() == b"tmpfile " * 4096
    out["by_path"] = _seen(os.stat(root / "kept"))
    fd = os.open(root, os.O_TMPFILE | os.O_WRONLY | os.O_EXCL, 0o600)
    os.write(fd, b"x")
    out["excl"] = _linkat(fd, root / "excl")
    os.close(fd)
    fd = os.open(root / "plain", os.O_CREAT | os.O_RDWR, 0o600)
    os.unlink(root / "plain")
    out["unlinked_open"] = _linkat(fd, root / "back")
    os.close(fd)
    out["finally"] = sorted(os.listdir(root))
    return out


@pytest.fixture(scope="module")
def ext4() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="awsomefs-ext4-", dir="/var/tmp"))
    os.chmod(base, 0o755)  # the story runs as another user
    try:
        with ext4_mount(base) as mount:
            yield mount
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _story(root: Path) -> dict[str, object]:
    """The story, told by a process of an ordinary user in a directory of its own."""
    home = root / "story"
    home.mkdir()
    os.chown(home, USER, USER)

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: a fork, as the test's Python may live where USER cannot read
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(USER)
            os.setuid(USER)
            os.write(write, json.dumps(_story_in(home)).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        told = fh.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the user's story failed"
    return json.loads(told)  # type: ignore[no-any-return]


@needs_tmpfile
def test_an_o_tmpfile_file_has_no_name_until_linkat_gives_it_one(mnt: Path, ext4: Path) -> None:
    """nlink 0 and no entry while unnamed; linkat through /proc/self/fd names it with its content,
    mode (umask applied) and owner; O_EXCL makes it unlinkable (ENOENT), as is a file unlinked
    while open: all as on ext4."""
    ours, theirs = _story(mnt), _story(ext4)
    assert ours == theirs
    assert theirs["unnamed"] == [0, "0o644", True, USER, USER, 8 * 4096], "the comparison is not vacuous"
    assert theirs["link"] == "linked" and theirs["named"][0] == 1 and theirs["relinked"] == 2
    assert theirs["excl"] == theirs["unlinked_open"] == "ENOENT"
    assert theirs["finally"] == ["kept", "kept2"]


@needs_tmpfile
def test_ln_through_proc_names_a_tmpfile_of_another_process(mnt: Path) -> None:
    """`ln -L /proc/PID/fd/N` (root: any process's descriptor) is the same linkat."""
    fd = os.open(mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"via ln")
        subprocess.run(["ln", "-L", f"/proc/{os.getpid()}/fd/{fd}", str(mnt / "via-ln")], check=True, timeout=30)
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)
    assert (mnt / "via-ln").read_bytes() == b"via ln"
    assert os.listdir(mnt) == ["via-ln"]


def _open_errno(path: Path, flags: int) -> str:
    try:
        os.close(os.open(path, flags, 0o600))
        return "opened"
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


def test_o_tmpfile_errors_are_ext4_s(mnt: Path, ext4: Path) -> None:
    """On a file: ENOTDIR; on a missing directory: ENOENT; without write access mode: EINVAL."""
    cases = [("file", os.O_TMPFILE | os.O_RDWR), ("missing", os.O_TMPFILE | os.O_RDWR), (".", os.O_TMPFILE | os.O_RDONLY)]

    def outcomes(root: Path) -> list[str]:
        home = root / "errors"
        home.mkdir()
        (home / "file").write_bytes(b"f")
        return [_open_errno(home / name, flags) for name, flags in cases]

    assert outcomes(mnt) == outcomes(ext4) == ["ENOTDIR", "ENOENT", "EINVAL"]


@needs_tmpfile
def test_closing_an_unnamed_tmpfile_gives_its_space_back(mnt: Path) -> None:
    before = os.statvfs(mnt).f_bfree
    fd = os.open(mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"s" * (16 << 20))
        os.fsync(fd)
        assert os.statvfs(mnt).f_bfree <= before - 4096, "the data took space"
    finally:
        os.close(fd)
    wait_for(lambda: os.statvfs(mnt).f_bfree >= before, 10, "the space back after the last close")


@needs_tmpfile
def test_a_crash_frees_an_unnamed_tmpfile_and_keeps_a_linked_one() -> None:
    """kill -9 with an unnamed O_TMPFILE file open (written and fsynced): the next daemon purges
    it at start (space back); one linked and fsynced before the crash keeps its name and data.
    (fsck's view of the marks: tests/unit/test_tmpfile.py.)"""
    base = Path(tempfile.mkdtemp(prefix="awsomefs-tmpfile-", dir="/var/tmp"))
    daemon = Daemon(base / "state", base / "mnt", size="1G")
    try:
        daemon.start()
        mount = daemon.mount
        before = os.statvfs(mount).f_bfree
        unnamed = os.open(mount, os.O_TMPFILE | os.O_RDWR, 0o600)
        os.write(unnamed, b"u" * (32 << 20))
        os.fsync(unnamed)
        linked = os.open(mount, os.O_TMPFILE | os.O_RDWR, 0o640)
        os.write(linked, b"L" * (1 << 20))
        subprocess.run(["ln", "-L", f"/proc/{os.getpid()}/fd/{linked}", str(mount / "linked")], check=True, timeout=30)
        os.fsync(linked)
        assert os.statvfs(mount).f_bfree <= before - (33 << 20) // 4096
        daemon.kill()
        for fd in (unnamed, linked):
            try:
                os.close(fd)
            except OSError:
                pass  # the mount died with its daemon
        daemon.start()
        assert (mount / "linked").read_bytes() == b"L" * (1 << 20)
        assert sorted(os.listdir(mount)) == [".snapshots", ".volumes", "linked"]
        wait_for(lambda: os.statvfs(mount).f_bfree >= before - (1 << 20) // 4096, 10,
                 "the unnamed file's space back after the restart")
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.fallback_smoke
@pytest.mark.skipif(not PYFUSE3, reason="the pyfuse3 fallback's answer")
def test_o_tmpfile_is_unsupported_on_the_pyfuse3_fallback(mnt: Path) -> None:
    """pyfuse3 (libfuse) answers FUSE_TMPFILE ENOSYS, which the kernel turns into EOPNOTSUPP:
    callers fall back to a named temporary file (docs/consistency.md)."""
    assert _open_errno(mnt, os.O_TMPFILE | os.O_RDWR) == errno.errorcode[errno.EOPNOTSUPP]
