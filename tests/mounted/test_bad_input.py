"""Bad input gets a clear error and loses nothing: devices that are too small, corrupt or foreign,
a full device, corrupt data blocks, and a stale mount point."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from awsomefsd.io.layout import BLOCK_SIZE
from awsomefsd.meta.filemap import all_extents
from tests.support.daemon import Daemon, run_cli, wait_for
from tests.support.fsx import fallocate

pytestmark = pytest.mark.mounted


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="awsomefs-bad-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        # a test that killed its daemon may leave the mount behind: never a mount outliving the test
        for mounted in [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                        if line.split()[1].startswith(str(path) + "/")]:
            subprocess.run(["umount", "-l", mounted], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_too_small_device_is_refused(base: Path) -> None:
    r = run_cli("format", str(base / "tiny.img"), "--size", "8M")
    assert r.returncode == 1
    assert "at least" in r.stderr and "64 MiB" in r.stderr, r.stderr


def test_foreign_cluster_needs_force(base: Path) -> None:
    img = base / "dev.img"
    assert run_cli("format", str(img), "--size", "128M").returncode == 0
    r = run_cli("format", str(img))
    assert r.returncode == 1 and "--force" in r.stderr, r.stderr
    assert run_cli("format", str(img), "--force").returncode == 0


def test_a_live_device_is_not_formatted_even_with_force(base: Path) -> None:
    """`format` of the device a running daemon uses names the cluster, says it is live and the
    process, and changes nothing; once the daemon stopped, --force formats it."""
    d = Daemon(base / "state", base / "mnt", size="256M").start()
    image = base / "state" / "device.img"
    try:
        (d.mount / "kept").write_bytes(b"still here")
        cluster = json.loads(run_cli("status", "--json", "--state", str(base / "state")).stdout)["device"]["cluster_id"]
        for args in ((), ("--force",)):
            r = run_cli("format", str(image), *args)
            assert r.returncode == 1, r.stdout + r.stderr
            line = r.stderr.strip().splitlines()[-1]
            assert "is live" in line and cluster in line and f"pid {d.proc.pid}" in line, line
            assert "Traceback" not in r.stderr
        assert (d.mount / "kept").read_bytes() == b"still here"
    finally:
        assert d.stop() == 0
    assert run_cli("format", str(image), "--force").returncode == 0


def test_metadata_of_another_cluster_is_refused(base: Path) -> None:
    d = Daemon(base / "state", base / "mnt", size="256M").start()
    assert d.stop() == 0
    r = run_cli("format", str(base / "state" / "device.img"), "--force")
    assert r.returncode == 0
    d2 = Daemon(base / "state", base / "mnt", size="256M")
    with pytest.raises(RuntimeError, match="belongs to cluster"):
        d2.start()


def test_not_a_filesystem(base: Path) -> None:
    junk = base / "junk.img"
    junk.write_bytes(os.urandom(1 << 20) * 80)
    r = run_cli("fsck", "--device", str(junk), "--state", str(base / "s"))
    assert r.returncode == 1 and "not" in r.stderr.lower() and "format" in r.stderr.lower(), r.stderr


def test_corrupt_primary_superblock_uses_copy_and_fsck_repairs(base: Path) -> None:
    d = Daemon(base / "state", base / "mnt", size="256M").start()
    (d.mount / "keep").write_bytes(b"precious")
    assert d.stop() == 0
    img = base / "state" / "device.img"
    with open(img, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff" * 50)
    d.start()
    assert (d.mount / "keep").read_bytes() == b"precious"
    assert d.stop() == 0
    r = run_cli("fsck", "--state", str(base / "state"))
    assert r.returncode == 4 and "primary superblock is damaged" in r.stdout, r.stdout + r.stderr
    r = run_cli("fsck", "--state", str(base / "state"), "--repair")
    assert r.returncode == 1, r.stdout + r.stderr
    assert run_cli("fsck", "--state", str(base / "state")).returncode == 0


def test_both_superblocks_corrupt_is_a_clear_error(base: Path) -> None:
    d = Daemon(base / "state", base / "mnt", size="256M").start()
    assert d.stop() == 0
    img = base / "state" / "device.img"
    size = img.stat().st_size
    with open(img, "r+b") as fh:
        for offset in (100, size - BLOCK_SIZE + 100):
            fh.seek(offset)
            fh.write(b"\xff" * 50)
    with pytest.raises(RuntimeError, match="both superblocks are damaged"):
        d.start()


def test_fallocated_space_stays_writable_on_a_full_device(base: Path) -> None:
    """What fallocate promises a database or a download manager: once it returned, writes into the
    range do not fail for want of space, however full the device got since. The reservation reads
    as zeros, counts in st_blocks and is a hole to SEEK_DATA, as on ext4; the writes go in place
    (st_blocks stays) and are there after a restart; fsck finds every checksum sound."""
    if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3":
        pytest.skip("pyfuse3 has no fallocate handler: glibc's posix_fallocate writes zeros instead")
    d = Daemon(base / "state", base / "mnt", size="128M").start()
    reserved = 16 << 20
    data = bytearray(os.urandom(reserved))
    try:
        fd = os.open(d.mount / "db", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fallocate(fd, 0, 0, reserved)
            st = os.fstat(fd)
            assert st.st_size == reserved and st.st_blocks * 512 == reserved
            assert os.pread(fd, BLOCK_SIZE, 5 << 20) == bytes(BLOCK_SIZE)
            with pytest.raises(OSError) as no_data:
                os.lseek(fd, 0, os.SEEK_DATA)
            assert no_data.value.errno == errno.ENXIO
            with pytest.raises(OSError) as full, open(d.mount / "filler", "wb") as fh:
                for size in [1 << 20] * 200 + [BLOCK_SIZE] * 600:
                    fh.write(b"f" * size)
                    fh.flush()
                os.fsync(fh.fileno())
            assert full.value.errno == errno.ENOSPC
            data[100:200] = b"x" * 100  # a partial block too
            for offset in range(0, reserved, 1 << 20):
                os.pwrite(fd, data[offset : offset + (1 << 20)], offset)
            os.pwrite(fd, data[100:200], 100)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, reserved, 0) == data
            assert os.fstat(fd).st_blocks == st.st_blocks, "written in place: nothing more taken"
        finally:
            os.close(fd)
    finally:
        assert d.stop() == 0
    d.start()
    try:
        assert (d.mount / "db").read_bytes() == data
    finally:
        assert d.stop() == 0
    r = run_cli("fsck", "--verify-data", "--state", str(base / "state"))
    assert r.returncode == 0, r.stdout


def test_full_device_enospc_then_space_returns(base: Path) -> None:
    d = Daemon(base / "state", base / "mnt", size="128M").start()
    try:
        keep = os.urandom(1 << 20)
        (d.mount / "keep").write_bytes(keep)
        chunk = b"f" * (1 << 20)
        with pytest.raises(OSError) as info, open(d.mount / "filler", "wb") as fh:
            for _ in range(200):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        assert info.value.errno == errno.ENOSPC
        assert (d.mount / "keep").read_bytes() == keep, "a full device corrupts nothing"
        (d.mount / "filler").unlink()
        free_after_delete = os.statvfs(d.mount).f_bfree * BLOCK_SIZE
        assert free_after_delete > 100 << 20
        again = os.urandom(64 << 20)
        (d.mount / "again").write_bytes(again)  # waits out the grace period, then fits
        assert (d.mount / "again").read_bytes() == again, "bytes written while space came back are all there"
    finally:
        assert d.stop() == 0
    r = run_cli("fsck", "--state", str(base / "state"))
    assert r.returncode == 0, r.stdout


def _extent_of(state: Path, ino: int) -> int:
    env = lmdb.open(str(state / "meta"), readonly=True, lock=True, max_dbs=32)
    try:
        with env.begin() as txn:
            fmap = env.open_db(b"fmap", txn=txn, create=False)
            extents = list(all_extents(txn, fmap, ino))
            assert extents
            return extents[0].dev_block
    finally:
        env.close()


def test_corrupt_data_block_is_eio_logged_and_counted(base: Path) -> None:
    d = Daemon(base / "state", base / "mnt", size="256M")
    d.extra = ["--metrics-port", "0"]
    d.start()
    try:
        f = d.mount / "victim"
        f.write_bytes(os.urandom(64 << 10))
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        dev_block = _extent_of(d.state, f.stat().st_ino)
        with open(d.state / "device.img", "r+b") as fh:
            fh.seek(dev_block * BLOCK_SIZE + 10)
            fh.write(b"\x00corrupt\x00")
            fh.flush()
            os.fsync(fh.fileno())
        Path("/proc/sys/vm/drop_caches").write_text("3")
        with pytest.raises(OSError) as info:
            f.read_bytes()
        assert info.value.errno == errno.EIO
        wait_for(lambda: "checksum mismatch" in d.logs(), 10, "the log line")
        port = int(re.search(r"metrics on http://127.0.0.1:(\d+)/", d.logs()).group(1))  # type: ignore[union-attr]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        failures = re.search(r"^awsomefs_checksum_failures_total (\S+)$", metrics, re.M)
        assert failures is not None and float(failures.group(1)) >= 1, "the failure is counted"
        (d.mount / "other").write_bytes(b"unaffected")
        assert (d.mount / "other").read_bytes() == b"unaffected"
    finally:
        assert d.stop() == 0
    r = run_cli("fsck", "--state", str(base / "state"), "--verify-data")
    assert r.returncode == 4 and "checksum mismatch" in r.stdout, r.stdout


def test_stale_mount_point_is_cleared_on_start(base: Path) -> None:
    d = Daemon(base / "state", base / "mnt", size="256M").start()
    (d.mount / "f").write_bytes(b"x")
    os.sync()
    d.kill()

    def stale() -> bool:
        try:
            os.statvfs(d.mount)
        except OSError as exc:
            # With read workers the connection ends with the last of them, a moment after the
            # daemon: a request queued in that moment fails as one in flight (docs/multicore.md, R6)
            if exc.errno == errno.ECONNABORTED:
                return False
            assert exc.errno == errno.ENOTCONN, exc
            return True
        raise AssertionError("the killed daemon's mount still answers")

    wait_for(stale, 10, "the mount to be stale")
    d.start()
    assert os.statvfs(d.mount).f_bsize == BLOCK_SIZE
    assert d.stop() == 0


def test_second_daemon_on_same_state_is_refused(base: Path) -> None:
    d = Daemon(base / "state", base / "mnt", size="256M").start()
    try:
        other = Daemon(base / "state", base / "mnt2", size="256M")
        with pytest.raises(RuntimeError, match="in use"):
            other.start()
        r = run_cli("fsck", "--state", str(base / "state"))
        assert r.returncode == 1 and "stop it" in r.stderr
    finally:
        assert d.stop() == 0
