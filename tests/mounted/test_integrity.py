"""One node's promises that ordinary tools depend on: times follow the writes and the application,
overlayfs can use the mount as its upper layer, an inode takes xattrs up to the kernel's limit."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

RENAME_WHITEOUT = 4
AT_FDCWD = -100


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _daemon_view(path: Path) -> os.stat_result:
    """stat as the daemon answers it, not from the kernel's attribute cache: reopening the file
    after dropping the caches makes the kernel ask again."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    return os.stat(path)


def test_write_time_is_when_the_write_happened_not_when_it_was_flushed(mnt: Path) -> None:
    path = mnt / "f"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"x" * 10_000)
        after_write = time.time_ns()
        time.sleep(0.05)  # the flush below starts measurably later than the write ended
        before_flush = time.time_ns()
        assert os.fstat(fd).st_mtime_ns <= after_write, "getattr shows the buffered write's time"
        os.fsync(fd)
    finally:
        os.close(fd)
    mtime = _daemon_view(path).st_mtime_ns
    assert mtime <= after_write < before_flush, "the committed mtime is the write's, not the flush's"


def test_futimens_after_writes_survives_the_flush(mnt: Path) -> None:
    """tar, cp -p and rsync -t write, set the times on the open descriptor, then close."""
    path = mnt / "f"
    wanted = 1_000_000_000_123_456_789
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, os.urandom(300_000))
        os.utime(fd, ns=(wanted, wanted))
    finally:
        os.close(fd)
    st = _daemon_view(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (wanted, wanted)
    assert st.st_size == 300_000


def test_chmod_changes_ctime_only(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"data")
    os.utime(path, ns=(5_000_000_000, 6_000_000_000))
    before = os.stat(path)
    os.chmod(path, 0o600)
    after = _daemon_view(path)
    assert (after.st_atime_ns, after.st_mtime_ns) == (5_000_000_000, 6_000_000_000)
    assert after.st_ctime_ns >= before.st_ctime_ns and stat.S_IMODE(after.st_mode) == 0o600


def test_rename_whiteout_leaves_a_character_device(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"a")
    _renameat2(mnt / "a", mnt / "b", RENAME_WHITEOUT)
    assert (mnt / "b").read_bytes() == b"a"
    st = os.lstat(mnt / "a")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    with pytest.raises(OSError) as info:
        _renameat2(mnt / "b", mnt / "a", RENAME_WHITEOUT | 2)  # with RENAME_EXCHANGE
    assert info.value.errno == errno.EINVAL


def test_mount_is_an_overlayfs_upper_layer(mnt: Path, tmp_path: Path) -> None:
    """Containers put their writable layer on an overlay whose upper directory is on the mount."""
    lower, merged = tmp_path / "lower", tmp_path / "merged"
    lower.mkdir()
    merged.mkdir()
    (lower / "keep").write_bytes(b"lower keep")
    (lower / "gone").write_bytes(b"lower gone")
    (lower / "moved").write_bytes(b"lower moved")
    (lower / "dir").mkdir()
    (lower / "dir" / "inner").write_bytes(b"inner")
    upper, work = mnt / "upper", mnt / "work"
    upper.mkdir()
    work.mkdir()
    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                           f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                          capture_output=True, text=True)
    if done.returncode != 0 and "unknown filesystem type" in done.stderr:
        pytest.skip("no overlay filesystem in this kernel")
    assert done.returncode == 0, done.stderr
    try:
        (merged / "gone").unlink()
        (merged / "moved").rename(merged / "moved2")
        shutil.rmtree(merged / "dir")
        (merged / "new").write_bytes(b"upper new")
        (merged / "keep").write_bytes(b"changed")
        assert sorted(p.name for p in merged.iterdir()) == ["keep", "moved2", "new"]
        assert (merged / "keep").read_bytes() == b"changed"
        assert (merged / "moved2").read_bytes() == b"lower moved"
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    for name in ("gone", "moved", "dir"):  # whiteouts in the upper layer hide the lower files
        st = os.lstat(upper / name)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, name
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        assert sorted(p.name for p in merged.iterdir()) == ["keep", "moved2", "new"], "the whiteouts persist"
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_many_xattrs_on_one_inode(mnt: Path) -> None:
    """Each set reads one usage record, not every attribute; the name list has the kernel's limit."""
    path = mnt / "f"
    path.write_bytes(b"")
    count = 2000
    for i in range(count):
        os.setxattr(path, f"user.attribute-{i:05d}", b"v" * 20)
    assert len(os.listxattr(path)) == count
    assert os.getxattr(path, "user.attribute-01999") == b"v" * 20
    # the names now fill 2000 * 21 bytes of the 64 KiB listxattr buffer: fill it up
    with pytest.raises(OSError) as info:
        for i in range(count, 10 * count):
            os.setxattr(path, f"user.attribute-{i:05d}", b"")
    assert info.value.errno == errno.ENOSPC
    assert len("".join(f"{n}\0" for n in os.listxattr(path))) <= 65536
    os.removexattr(path, "user.attribute-00000")
    os.setxattr(path, "user.attribute-00000", b"again")
