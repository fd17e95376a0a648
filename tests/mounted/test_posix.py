"""POSIX behaviour on a real FUSE mount served by a real daemon process, clause by clause."""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import fcntl
import mmap
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, wait_for
from tests.support.fsx import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate

pytestmark = [pytest.mark.mounted, pytest.mark.fallback_smoke]  # CI runs these on each fallback too
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
NOBODY = 65534


def renameat2(old: Path, new: Path, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def as_user(uid: int, gid: int, action: Callable[[], object], groups: tuple[int, ...] = ()) -> int:
    """Run `action` in a forked child with other credentials; returns the errno it failed with (0: ok).

    A fork rather than a new interpreter: the test's Python may live where that user cannot read.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            action()
        except OSError as exc:
            code = exc.errno or 255
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_write_read_truncate(mnt: Path) -> None:
    f = mnt / "f"
    data = os.urandom(3 * 1024 * 1024 + 123)
    f.write_bytes(data)
    assert f.read_bytes() == data
    assert f.stat().st_size == len(data)
    with open(f, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"hello")
        fh.truncate(5000)
    expected = data[:1000] + b"hello" + data[1005:5000]
    assert f.read_bytes() == expected
    os.truncate(f, 10000)
    assert f.read_bytes() == expected + bytes(5000), "bytes past an earlier EOF read as zeros"
    with open(f, "wb"):
        pass
    assert f.stat().st_size == 0 and f.read_bytes() == b""
    f.write_bytes(b"data")
    os.close(os.open(f, os.O_RDONLY | os.O_TRUNC))  # Linux truncates here too (the caller may write)
    assert f.stat().st_size == 0 and f.read_bytes() == b"", "as on ext4 (found by test_extreme_values)"


def test_concurrent_small_direct_reads_return_the_right_blocks(mnt: Path) -> None:
    """16 threads of 4 KiB O_DIRECT reads at random offsets: the daemon serves them concurrently
    (native AIO on the device) and every block comes back intact."""
    f = mnt / "f"
    data = os.urandom(4 * 1024 * 1024)
    with open(f, "wb") as fh:
        fh.write(data)
        os.fsync(fh.fileno())  # on the device, not in the write buffer

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        buf = mmap.mmap(-1, 4096)
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(150):
                offset = rng.randrange(len(data) // 4096) * 4096
                assert os.preadv(fd, [buf], offset) == 4096
                assert buf[:] == data[offset : offset + 4096], f"block at {offset}"
        finally:
            os.close(fd)
        return 150

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(reader, range(16))) == 16 * 150


def test_unaligned_overwrites_keep_neighbours(mnt: Path) -> None:
    f = mnt / "f"
    model = bytearray(os.urandom(50_000))
    f.write_bytes(model)
    fd = os.open(f, os.O_RDWR)
    try:
        for offset, size in ((1, 7), (4095, 2), (8190, 5000), (49_999, 10), (30_000, 1)):
            chunk = os.urandom(size)
            os.pwrite(fd, chunk, offset)
            model[offset : offset + size] = chunk
            if offset % 2:
                os.fsync(fd)
        assert os.pread(fd, 100_000, 0) == bytes(model)
    finally:
        os.close(fd)
    assert f.read_bytes() == bytes(model)


def test_sparse_file_over_4gib(mnt: Path) -> None:
    f = mnt / "sparse"
    with open(f, "wb") as fh:
        fh.seek(5 * 1024**3)
        fh.write(b"tail")
    st = f.stat()
    assert st.st_size == 5 * 1024**3 + 4
    assert st.st_blocks <= 16, "a hole allocates nothing"
    with open(f, "rb") as fh:
        fh.seek(4 * 1024**3 - 10)
        assert fh.read(20) == bytes(20)
        fh.seek(5 * 1024**3)
        assert fh.read() == b"tail"


def test_append_mode(mnt: Path) -> None:
    f = mnt / "log"
    for i in range(20):
        with open(f, "ab") as fh:
            fh.write(b"line %d\n" % i)
    assert f.read_bytes() == b"".join(b"line %d\n" % i for i in range(20))


def test_mkdir_readdir_rmdir(mnt: Path) -> None:
    d = mnt / "d"
    d.mkdir()
    names = {f"file-{i:04d}" for i in range(1500)}
    for n in names:
        (d / n).touch()
    assert set(os.listdir(d)) == names
    assert d.stat().st_nlink == 2
    (d / "sub").mkdir()
    assert d.stat().st_nlink == 3
    with pytest.raises(OSError) as info:
        d.rmdir()
    assert info.value.errno == errno.ENOTEMPTY
    for n in names:
        (d / n).unlink()
    (d / "sub").rmdir()
    d.rmdir()
    assert not d.exists()


def test_readdir_while_deleting_sees_every_survivor_once(mnt: Path) -> None:
    d = mnt / "d"
    d.mkdir()
    for i in range(600):
        (d / f"{i:04d}").touch()
    seen = []
    with os.scandir(d) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n == 100:
                for j in range(300, 400):
                    (d / f"{j:04d}").unlink()
    assert len(seen) == len(set(seen)), "no entry twice"
    assert {f"{i:04d}" for i in range(600) if not 300 <= i < 400} <= set(seen)


def test_a_long_listing_gives_each_entry_its_inode_number_and_type(mnt: Path) -> None:
    """Listings past the first reply are plain READDIRs, answered without the entries' attributes:
    `find`, `ls` and scandir trust the type they carry and stat nothing."""
    d = mnt / "d"
    d.mkdir()
    for i in range(2000):
        kind = i % 4
        path = d / f"e{i:04d}"
        if kind == 0:
            path.touch()
        elif kind == 1:
            path.mkdir()
        elif kind == 2:
            path.symlink_to("e0000")
        else:
            os.mkfifo(path)
    for _ in range(2):  # the second listing may come from the kernel's cache
        with os.scandir(d) as it:
            listed = {e.name: (e.inode(), e.is_file(follow_symlinks=False), e.is_dir(follow_symlinks=False),
                               e.is_symlink()) for e in it}
        expected = {}
        for name in (f"e{i:04d}" for i in range(2000)):
            st = os.lstat(d / name)
            expected[name] = (st.st_ino, stat.S_ISREG(st.st_mode), stat.S_ISDIR(st.st_mode),
                              stat.S_ISLNK(st.st_mode))
        assert listed == expected


def test_rename_overwrite_noreplace_exchange(mnt: Path) -> None:
    a, b = mnt / "a", mnt / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    with pytest.raises(OSError) as info:
        renameat2(a, b, RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST
    renameat2(a, b, RENAME_EXCHANGE)
    assert a.read_bytes() == b"B" and b.read_bytes() == b"A"
    os.rename(a, b)
    assert not a.exists() and b.read_bytes() == b"B"
    (mnt / "dir").mkdir()
    with pytest.raises(OSError) as info:
        os.rename(mnt / "dir", mnt / "dir" / "inside")
    assert info.value.errno == errno.EINVAL
    (mnt / "full").mkdir()
    (mnt / "full" / "x").touch()
    with pytest.raises(OSError) as info:
        os.rename(mnt / "dir", mnt / "full")
    assert info.value.errno == errno.ENOTEMPTY


def test_hard_links_and_symlinks(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"data")
    os.link(f, mnt / "g")
    assert f.stat().st_nlink == 2 and (mnt / "g").stat().st_ino == f.stat().st_ino
    f.unlink()
    assert (mnt / "g").read_bytes() == b"data" and (mnt / "g").stat().st_nlink == 1
    os.symlink("g", mnt / "link")
    assert os.readlink(mnt / "link") == "g"
    assert (mnt / "link").read_bytes() == b"data"
    assert stat.S_ISLNK(os.lstat(mnt / "link").st_mode)
    with pytest.raises(OSError) as info:
        os.link(mnt, mnt / "dirlink")
    assert info.value.errno == errno.EPERM


def test_unlinked_open_file_stays_readable(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"x" * 100_000)
    with open(f, "rb") as fh:
        f.unlink()
        assert not f.exists()
        assert fh.read() == b"x" * 100_000


def test_chmod_chown_utimens_ns(mnt: Path) -> None:
    f = mnt / "f"
    f.touch()
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(f.stat().st_mode) == 0o4751
    os.chown(f, 1234, 5678)
    st = f.stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(f, ns=(1_234_567_890_123_456_789, 1_111_111_111_222_333_444))
    st = f.stat()
    assert st.st_atime_ns == 1_234_567_890_123_456_789
    assert st.st_mtime_ns == 1_111_111_111_222_333_444
    before = f.stat().st_ctime_ns
    os.chmod(f, 0o600)
    assert f.stat().st_ctime_ns >= before


def test_mtime_advances_on_write(mnt: Path) -> None:
    f = mnt / "f"
    f.write_bytes(b"1")
    os.utime(f, ns=(0, 0))
    with open(f, "ab") as fh:
        fh.write(b"2")
    assert f.stat().st_mtime_ns > 0


def test_permissions_for_other_users(mnt: Path) -> None:
    secret = mnt / "secret"
    secret.write_bytes(b"s")
    os.chmod(secret, 0o600)
    assert as_user(NOBODY, NOBODY, secret.read_bytes) == errno.EACCES
    private = mnt / "private"
    private.mkdir(mode=0o700)
    assert as_user(NOBODY, NOBODY, (private / "x").touch) == errno.EACCES
    shared = mnt / "group"
    shared.mkdir()
    os.chown(shared, 0, 4000)
    os.chmod(shared, 0o770)
    assert as_user(NOBODY, NOBODY, lambda: (shared / "x").write_text("ok"), groups=(4000,)) == 0
    assert (shared / "x").read_text() == "ok" and (shared / "x").stat().st_uid == NOBODY


def test_search_permission_holds_through_names_the_kernel_caches(mnt: Path) -> None:
    """A walk through a directory needs search permission on it even when every name on the way
    and its attributes are cached (root has just walked there): under `default_permissions` the
    kernel checks it. A daemon checking permissions itself would never see such a walk; that is
    why each create and unlink still costs the directory's GETATTR (docs/fuse-transport.md,
    "Requests per create and unlink")."""
    walled = mnt / "walled"
    walled.mkdir(mode=0o700)
    (walled / "inner").mkdir(mode=0o755)
    f = walled / "inner" / "f"
    f.write_bytes(b"s")
    os.chmod(f, 0o644)
    for _ in range(2):
        assert f.read_bytes() == b"s" and os.stat(f).st_size == 1  # names and attributes cached
    assert as_user(NOBODY, NOBODY, f.read_bytes) == errno.EACCES
    assert as_user(NOBODY, NOBODY, lambda: os.stat(f)) == errno.EACCES
    assert as_user(NOBODY, NOBODY, lambda: (walled / "inner" / "g").touch()) == errno.EACCES
    os.chmod(walled, 0o711)  # search, but no listing
    assert as_user(NOBODY, NOBODY, f.read_bytes) == 0
    assert as_user(NOBODY, NOBODY, lambda: os.listdir(walled)) == errno.EACCES
    os.chmod(walled, 0o700)
    assert as_user(NOBODY, NOBODY, lambda: os.stat(f)) == errno.EACCES


def test_sticky_directory(mnt: Path) -> None:
    tmp = mnt / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    theirs = tmp / "theirs"
    theirs.touch()
    os.chown(theirs, 4321, 4321)
    assert as_user(NOBODY, NOBODY, theirs.unlink) == errno.EPERM
    assert theirs.exists()
    assert as_user(NOBODY, NOBODY, lambda: ((tmp / "mine").touch(), (tmp / "mine").unlink())) == 0
    assert not (tmp / "mine").exists()


def test_setgid_directory_inherits_group(mnt: Path) -> None:
    d = mnt / "sgid"
    d.mkdir()
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2775)
    (d / "f").touch()
    (d / "sub").mkdir()
    assert (d / "f").stat().st_gid == 4242
    assert (d / "sub").stat().st_gid == 4242 and (d / "sub").stat().st_mode & stat.S_ISGID


def _setid_outcomes(base: Path) -> dict[str, tuple[int, int]]:
    """What writes, truncates, O_TRUNC opens and chowns leave of set-user-ID and set-group-ID
    bits, by whom: (mode bits, errno) per case, for the same steps on any filesystem."""
    out: dict[str, tuple[int, int]] = {}
    member = 4243  # a group the acting user is in (supplementary), and the file's group
    cases: list[tuple[str, int, int, Callable[[Path], object]]] = [
        # name, mode, who acts (uid), action
        ("write by another user", 0o6777, NOBODY, lambda f: f.open("r+b").write(b"x")),
        ("write, no group execute", 0o6766, NOBODY, lambda f: f.open("r+b").write(b"x")),
        ("write by a group member, no group execute", 0o6766, NOBODY, lambda f: f.open("r+b").write(b"x")),
        ("write by root", 0o6777, 0, lambda f: f.open("r+b").write(b"x")),
        ("truncate by another user", 0o6777, NOBODY, lambda f: os.truncate(f, 1)),
        ("truncate by root", 0o6777, 0, lambda f: os.truncate(f, 1)),
        ("O_TRUNC open by another user", 0o6777, NOBODY, lambda f: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))),
        ("O_TRUNC open of an empty file", 0o6777, NOBODY, lambda f: (os.truncate(f, 0) if os.getuid() == 0 else None,
                                                                    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC)))),
        ("chown by root", 0o6755, 0, lambda f: os.chown(f, NOBODY, -1)),
        ("chgrp by root, no group execute", 0o6745, 0, lambda f: os.chown(f, -1, NOBODY)),
        ("chown to -1, -1 by root", 0o6755, 0, lambda f: os.chown(f, -1, -1)),
        ("chown to -1, -1 by root, no group execute", 0o6745, 0, lambda f: os.chown(f, -1, -1)),
        ("copy_file_range into it by another user", 0o6777, NOBODY,
         lambda f: (fd := os.open(f, os.O_RDWR), os.copy_file_range(fd, fd, 3, 0, 4096), os.close(fd))),
        ("chmod by root", 0o755, 0, lambda f: os.chmod(f, 0o4755)),
    ]
    for i, (name, mode, uid, action) in enumerate(cases):
        f = base / f"setid{i}"
        f.write_bytes(b"" if "empty" in name else b"abc")
        if "member" in name:
            os.chown(f, -1, member)
        os.chmod(f, mode)
        err = as_user(uid, uid, lambda f=f, action=action: action(f), groups=(member,)) if uid else 0
        if not uid:
            action(f)
        out[name] = (stat.S_IMODE(f.stat().st_mode), err)
    return out


def test_setid_bits_are_cleared_as_on_a_local_filesystem(mnt: Path) -> None:
    """The same steps on the mount and on a local filesystem leave the same bits (the kernel
    leaves the clearing to us under HANDLE_KILLPRIV_V2: writes, truncates, O_TRUNC opens, chowns,
    copies into the file)."""
    local = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        os.chmod(local, 0o777)
        os.chmod(mnt, 0o777)
        want = _setid_outcomes(local)
        got = _setid_outcomes(mnt)
    finally:
        shutil.rmtree(local)
    # the reference itself is what we think it is
    assert want["write by another user"][0] == 0o777 and want["write by a group member, no group execute"][0] == 0o2766
    if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3":
        # The fallback asks for no KILLPRIV: the kernel's FUSE code clears set-group-ID on a
        # write only with group execute (the rule before Linux 6.2), and a write brings no caller
        # to the daemon (docs/fuse-transport.md).
        assert got.pop("write, no group execute") == (0o2766, 0)
        want.pop("write, no group execute")
    assert got == want


def _holes_and_data(path: Path, offsets: list[int]) -> list[tuple[int, int]]:
    """(SEEK_DATA, SEEK_HOLE) from each offset: the position, or -errno."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            row = []
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                try:
                    row.append(os.lseek(fd, offset, whence))
                except OSError as exc:
                    row.append(-exc.errno)
            out.append((row[0], row[1]))
    finally:
        os.close(fd)
    return out


def test_seek_data_and_hole_as_on_ext4(mnt: Path) -> None:
    """SEEK_DATA/SEEK_HOLE on a sparse file, while its writes are buffered (the writer's descriptor
    still open: under writeback caching the kernel still holds the pages), after fsync and after a
    truncate, against the same file on ext4 (block granularity, as ext4 has it)."""
    if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3":
        pytest.skip("pyfuse3 has no lseek handler: on the fallback the kernel calls the whole file data")
    local = Path(tempfile.mkdtemp(dir="/var/tmp"))
    MiB = 1 << 20
    offsets = [0, 100, 4095, 4096, 5000, 65536, MiB - 1, MiB, MiB + 5, MiB + 4096, 2 * MiB, 3 * MiB - 1, 3 * MiB,
               4 * MiB, 5 * MiB + 1]

    def sparse(fd: int, step: int) -> None:
        if step == 0:
            os.pwrite(fd, b"a" * 4096, 0)
            os.pwrite(fd, b"b" * 10, MiB + 2)  # inside a block: the whole block is data
            os.pwrite(fd, b"c" * 8192, 2 * MiB + 4096)
            os.ftruncate(fd, 4 * MiB)
            os.pwrite(fd, b"e" * 100, 3 * MiB + 50)
        elif step == 1:
            os.fsync(fd)
        else:
            os.ftruncate(fd, 2 * MiB + 6000)
            os.pwrite(fd, b"d", 5 * MiB)

    try:
        for step in range(3):
            fds = [os.open(base / "f", os.O_RDWR | os.O_CREAT, 0o644) for base in (local, mnt)]
            try:
                for fd in fds:
                    sparse(fd, step)
                if step == 1:
                    os.fsync(os.open(local / "f", os.O_RDONLY))
                assert _holes_and_data(mnt / "f", offsets) == _holes_and_data(local / "f", offsets), f"after step {step}"
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        shutil.rmtree(local)


def test_xattrs(mnt: Path) -> None:
    f = mnt / "f"
    f.touch()
    os.setxattr(f, "user.colour", b"blue")
    assert os.getxattr(f, "user.colour") == b"blue"
    assert "user.colour" in os.listxattr(f)
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user.colour", b"red", os.XATTR_CREATE)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user.size", b"1", os.XATTR_REPLACE)
    assert info.value.errno == errno.ENODATA
    buf = ctypes.create_string_buffer(2)
    n = libc.getxattr(bytes(f), b"user.colour", buf, 2)
    assert n == -1 and ctypes.get_errno() == errno.ERANGE
    os.removexattr(f, "user.colour")
    with pytest.raises(OSError) as info:
        os.getxattr(f, "user.colour")
    assert info.value.errno == errno.ENODATA


def _acl_and_umask_outcomes(root: Path) -> dict[str, object]:
    """Modes made under umask 027, and what asking for each kind of ACL answers."""
    out: dict[str, object] = {}
    old = os.umask(0o027)
    try:
        os.close(os.open(root / "f", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(root / "d", 0o777)
        os.mkfifo(root / "p", 0o666)
        os.symlink("f", root / "l")
    finally:
        os.umask(old)
    for name in ("f", "d", "p"):
        out[f"mode {name}"] = oct(stat.S_IMODE(os.lstat(root / name).st_mode))
    for name in ("f", "d"):
        for attr in ("system.posix_acl_access", "system.posix_acl_default"):
            for _ in range(2):  # the second answer may come from the kernel's cache
                try:
                    out[f"{attr} of {name}"] = os.getxattr(root / name, attr)
                except OSError as exc:
                    out[f"{attr} of {name}"] = errno.errorcode[exc.errno]
    return out


def test_acls_and_the_umask_as_on_a_local_filesystem(mnt: Path) -> None:
    """With FUSE_POSIX_ACL the kernel keeps each file's ACL (there is none) instead of asking us at
    every `ls -l`; applications see what they saw: the umask applies, no file has an ACL."""
    local = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        want = _acl_and_umask_outcomes(local)
    finally:
        shutil.rmtree(local)
    assert want["mode f"] == "0o640" and want["mode d"] == "0o750"
    assert _acl_and_umask_outcomes(mnt) == want
    # Setting one is refused (tar, cp -p and rsync then fall back to chmod), and changes nothing.
    user_obj_rw, group_obj_r, other_r = (0x01, 6, 0), (0x04, 4, 0), (0x20, 4, 0)
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in (user_obj_rw, group_obj_r, other_r))
    with pytest.raises(OSError) as info:
        os.setxattr(mnt / "f", "system.posix_acl_access", acl)
    assert info.value.errno == errno.EOPNOTSUPP
    assert stat.S_IMODE(os.stat(mnt / "f").st_mode) == 0o640
    with pytest.raises(OSError) as info:
        os.getxattr(mnt / "f", "system.posix_acl_access")
    assert info.value.errno == errno.ENODATA


def test_fifo_and_socket_nodes(mnt: Path) -> None:
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO((mnt / "fifo").stat().st_mode)
    sock_path = mnt / "sock"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(sock_path))
        assert stat.S_ISSOCK(sock_path.stat().st_mode)
    finally:
        s.close()


def test_advisory_locks_between_processes(mnt: Path) -> None:
    f = mnt / "lock"
    f.touch()
    with open(f, "r+") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX)
        r = subprocess.run(
            [sys.executable, "-c", f"import fcntl; fh = open({str(f)!r}, 'r+'); fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)"],
            capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode != 0 and ("BlockingIOError" in r.stderr or "PermissionError" in r.stderr)
        fcntl.flock(fh, fcntl.LOCK_EX)


def test_error_numbers(mnt: Path) -> None:
    cases = [
        (lambda: (mnt / ("n" * 256)).touch(), errno.ENAMETOOLONG),
        (lambda: (mnt / "missing" / "x").touch(), errno.ENOENT),
        (lambda: os.mkdir(mnt), errno.EEXIST),
        (lambda: os.rename(mnt / "f", Path("/tmp") / "awsomefs-xdev"), errno.EXDEV),
        (lambda: os.rmdir(mnt / "f"), errno.ENOTDIR),
        (lambda: os.unlink(mnt / "d"), errno.EISDIR),
    ]
    (mnt / "f").touch()
    (mnt / "d").mkdir()
    for action, expected in cases:
        with pytest.raises(OSError) as info:
            action()
        assert info.value.errno == expected, (action, info.value)


def test_fsync_fdatasync_syncfs(mnt: Path) -> None:
    f = mnt / "f"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY)
    try:
        os.write(fd, b"x" * 10_000)
        os.fsync(fd)
        os.write(fd, b"y")
        os.fdatasync(fd)
        assert libc.syncfs(fd) == 0
    finally:
        os.close(fd)
    dfd = os.open(mnt, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_statfs_tracks_allocation(mnt: Path, daemon: Daemon) -> None:
    before = os.statvfs(mnt)
    assert before.f_bsize == 4096 and before.f_namemax == 255
    f = mnt / "big"
    with open(f, "wb") as fh:
        fh.write(b"z" * (32 << 20))
        fh.flush()
        os.fsync(fh.fileno())
    during = os.statvfs(mnt)
    used = (before.f_bfree - during.f_bfree) * during.f_frsize
    assert 31 << 20 <= used <= 34 << 20
    f.unlink()
    after = os.statvfs(mnt)
    assert after.f_bfree >= before.f_bfree - 16, "deleted space counts as free at once"


def test_posix_fallocate_extends(mnt: Path) -> None:
    f = mnt / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 100_000)
        assert os.fstat(fd).st_size == 100_000
        assert os.pread(fd, 100_000, 0) == bytes(100_000)
    finally:
        os.close(fd)


def test_fallocate_as_on_ext4(mnt: Path) -> None:
    """The default mode, KEEP_SIZE, ZERO_RANGE and PUNCH_HOLE (inside, across and past the end,
    buffered and synced data) leave the same sizes and bytes as on ext4; one request each, not
    glibc's block-by-block emulation. A punched hole frees its whole blocks and reads as a hole."""
    if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3":
        pytest.skip("pyfuse3 has no fallocate handler: the fallback answers EOPNOTSUPP (glibc emulates)")
    local = Path(tempfile.mkdtemp(dir="/var/tmp"))
    MiB = 1 << 20
    punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    steps: list[tuple[int, int, int]] = [  # mode, offset, length
        (0, 0, 100_000), (FALLOC_FL_KEEP_SIZE, 0, 3 * MiB), (0, 50_000, 10), (FALLOC_FL_ZERO_RANGE, 1000, 5000),
        (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 90_000, 50_000), (FALLOC_FL_ZERO_RANGE, 99_000, 30_000),
        (0, 2 * MiB, 4096), (punch, 3000, 2000), (punch, 20_000, 40_000), (punch, 2 * MiB - 5000, 1 * MiB),
        (punch, 8192, 4096),
    ]
    try:
        fds = [os.open(base / "f", os.O_CREAT | os.O_RDWR, 0o644) for base in (local, mnt)]
        try:
            for i, (mode, offset, length) in enumerate(steps):
                for fd in fds:
                    os.pwrite(fd, bytes([65 + i]) * 7000, i * 13_000)
                    if i % 2:
                        os.fsync(fd)
                    fallocate(fd, mode, offset, length)
                for fd in fds:  # what the daemon has: the kernel zeroes cached pages on its own
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                want, got = (os.pread(fd, 4 * MiB, 0) for fd in fds)
                assert (len(got), got == want) == (len(want), True), f"after step {i}: {mode:#x} {offset} {length}"
            with pytest.raises(OSError) as refused:
                fallocate(fds[1], 0x08, 0, 4096)  # COLLAPSE_RANGE
            assert refused.value.errno == errno.EOPNOTSUPP
            mine = fds[1]
            os.pwrite(mine, os.urandom(64 * 4096), 0)
            os.fsync(mine)
            before = os.fstat(mine).st_blocks
            fallocate(mine, punch, 4096 + 100, 32 * 4096)
            assert os.lseek(mine, 4096, os.SEEK_HOLE) == 2 * 4096, "the partial edge block keeps its data"
            assert os.lseek(mine, 2 * 4096, os.SEEK_DATA) == 33 * 4096
            assert before - os.fstat(mine).st_blocks == 31 * 8, "the 31 whole blocks are deallocated"
        finally:
            for fd in fds:
                os.close(fd)
        huge = os.open(mnt / "huge", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            with pytest.raises(OSError) as full:
                fallocate(huge, 0, 0, 1 << 50)
            assert full.value.errno in (errno.ENOSPC, errno.EFBIG) and os.fstat(huge).st_size == 0
        finally:
            os.close(huge)
    finally:
        shutil.rmtree(local)


def _copy_all(src: int, dst: int, length: int, off_in: int, off_out: int) -> int:
    """copy_file_range until done or the end of the source, as cp does; the bytes copied."""
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, off_in + done, off_out + done)
        if n == 0:
            break
        done += n
    return done


def test_copy_file_range_shares_blocks_copy_on_write(mnt: Path) -> None:
    """copy_file_range (and so cp) gives the same bytes as on ext4, at any offsets; whole blocks
    at the same place in a block are shared, not copied: the free space does not move, and a
    write to either file afterwards does not show in the other."""
    local = Path(tempfile.mkdtemp(dir="/var/tmp"))
    MiB = 1 << 20
    rng = random.Random(5)
    original = rng.randbytes(8 * MiB + 1234)
    cases = [(0, 0, len(original)), (4096 + 7, 3 * 4096 + 7, 2 * MiB), (100, 5000, 70_000),
             (8 * MiB, 0, 10_000), (len(original) + 10, 0, 10)]  # (offset in, offset out, length)
    try:
        for base in (local, mnt):
            (base / "src").write_bytes(original)
        with open(mnt / "src", "rb+") as f:
            os.fsync(f.fileno())
        free_before = os.statvfs(mnt).f_bfree
        for i, (off_in, off_out, length) in enumerate(cases):
            copied = []
            for base in (local, mnt):
                src = os.open(base / "src", os.O_RDONLY)
                dst = os.open(base / f"dst{i}", os.O_CREAT | os.O_RDWR, 0o644)
                try:
                    copied.append(_copy_all(src, dst, length, off_in, off_out))
                    os.fsync(dst)
                finally:
                    os.close(src)
                    os.close(dst)
            assert copied[0] == copied[1], f"case {i}"
            assert (local / f"dst{i}").read_bytes() == (mnt / f"dst{i}").read_bytes(), f"case {i}"
        if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") != "pyfuse3":  # no handler there: the kernel copies
            assert free_before - os.statvfs(mnt).f_bfree < 64, "8 MiB cloned without taking its space"
        with open(mnt / "dst0", "rb+") as f:
            f.seek(MiB)
            f.write(b"x" * 10_000)
        with open(mnt / "src", "rb+") as f:
            f.seek(3 * MiB)
            f.write(b"y" * 10_000)
        dst0 = (mnt / "dst0").read_bytes()
        src_now = (mnt / "src").read_bytes()
        assert dst0[MiB:MiB + 10_000] == b"x" * 10_000 and dst0[3 * MiB:3 * MiB + 10_000] == original[3 * MiB:3 * MiB + 10_000]
        assert src_now[MiB:MiB + 10_000] == original[MiB:MiB + 10_000] and src_now[3 * MiB:3 * MiB + 10_000] == b"y" * 10_000
        (mnt / "src").unlink()
        assert (mnt / "dst0").read_bytes() == dst0, "the clone keeps the blocks its source let go"
        subprocess.run(["cp", str(mnt / "dst0"), str(mnt / "by-cp")], check=True)
        assert (mnt / "by-cp").read_bytes() == dst0
    finally:
        shutil.rmtree(local)


def test_tempfile_sqlite_tar_git(mnt: Path) -> None:
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory(dir=mnt) as tmp, tempfile.NamedTemporaryFile(dir=tmp) as fh:
        fh.write(b"temp")
        fh.flush()
        assert Path(fh.name).read_bytes() == b"temp"
    db = sqlite3.connect(mnt / "db.sqlite")
    db.execute("create table t (k integer primary key, v text)")
    with db:
        db.executemany("insert into t (v) values (?)", [(f"value {i}",) for i in range(2000)])
    assert db.execute("select count(*), sum(length(v)) from t").fetchone() == (2000, sum(len(f"value {i}") for i in range(2000)))
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()
    src = mnt / "src"
    for i in range(50):
        (src / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 5}" / f"f{i}.txt").write_text(f"content {i}\n" * (i + 1))
    subprocess.run(["tar", "-C", str(mnt), "-cf", str(mnt / "src.tar"), "src"], check=True)
    (mnt / "out").mkdir()
    subprocess.run(["tar", "-C", str(mnt / "out"), "-xf", str(mnt / "src.tar")], check=True)
    subprocess.run(["diff", "-r", str(src), str(mnt / "out" / "src")], check=True)
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "-c", "safe.directory=*", "-C", str(src)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (src / "d0" / "f0.txt").write_text("changed\n")
    out = subprocess.run([*git, "status", "--porcelain"], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "M d0/f0.txt"
    subprocess.run([*git, "fsck", "--strict"], check=True, capture_output=True)


def test_fragmented_file_is_compacted(mnt: Path, daemon: Daemon) -> None:
    import lmdb

    from awsomefsd.meta.filemap import all_extents

    f = mnt / "frag"
    f.write_bytes(bytes(4 << 20))
    model = bytearray(4 << 20)
    fd = os.open(f, os.O_RDWR)
    try:
        for i in range(200):  # scattered small writes, each flushed on its own
            offset = (i * 7919 % 1024) * 4096
            chunk = bytes([i % 251 + 1]) * 4096
            os.pwrite(fd, chunk, offset)
            model[offset : offset + 4096] = chunk
            os.fsync(fd)
    finally:
        os.close(fd)
    ino = f.stat().st_ino
    mtime = f.stat().st_mtime_ns

    def extent_count() -> int:
        os.fsync(os.open(mnt, os.O_RDONLY))  # commit, so a reader outside the daemon sees it
        env = lmdb.open(str(daemon.state / "meta"), readonly=True, lock=True, max_dbs=32)
        try:
            with env.begin() as txn:
                return len(list(all_extents(txn, env.open_db(b"fmap", txn=txn, create=False), ino)))
        finally:
            env.close()

    wait_for(lambda: extent_count() <= 8, 30, "the compactor to merge the fragments")
    assert f.read_bytes() == bytes(model)
    assert f.stat().st_mtime_ns == mtime, "compaction changes no timestamps"
