"""The writeback cache ([mount] writeback_cache): what the kernel still holds is not lost.

With the writeback cache a write() leaves its bytes in the kernel's page cache; the daemon gets
them when the kernel writes back. A stop must make the kernel send them first (docs/fuse-transport.md,
"Writeback cache"): after it nobody would receive them. A write the daemon refuses when the
kernel writes the pages back (a full device) must reach the application at its fsync or close:
a write() that returned is either on the device or reported, never dropped unheard.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from awsomefsd.fuse.dirty_bound import kernel_dirty_limit_bytes
from tests.support.daemon import Daemon

pytestmark = pytest.mark.mounted


def test_a_stop_loses_no_page_the_kernel_still_held() -> None:
    if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3":
        pytest.skip("the writeback cache is the kernel transport's")
    base = Path(tempfile.mkdtemp(prefix="awsomefs-writeback-", dir="/var/tmp"))
    daemon = Daemon(base / "state", base / "mnt", size="1G", env={"AWSOMEFS_MOUNT__WRITEBACK_CACHE": "true"})
    payload = os.urandom(3 * 1024 * 1024 + 5)
    try:
        daemon.start()
        fd = os.open(daemon.mount / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, payload)  # in the page cache: no close, no fsync
            assert daemon.stop() == 0, daemon.logs()
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # the daemon is gone: nothing answers the close's FLUSH
        daemon.start()
        assert (daemon.mount / "f").read_bytes() == payload
        assert daemon.stop() == 0
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


WRITE_BYTES = 1 << 20
FILE_BYTES = 16 << 20


def _fill(path: Path, *, fsync_every: int | None) -> tuple[bytes, int, int | None]:
    """Write FILE_BYTES of fresh bytes to `path` in 1 MiB write()s, with an fsync after every
    `fsync_every` writes (None: only the close). Returns the bytes write() acknowledged, how many
    of them a successful fsync made durable, and the errno fsync or close reported (None: none).
    A write() that fails ends the file: what it refused was never acknowledged."""
    acknowledged = bytearray()
    durable, reported = 0, None
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        for i in range(FILE_BYTES // WRITE_BYTES):
            chunk = os.urandom(WRITE_BYTES)
            try:
                acknowledged += chunk[: os.write(fd, chunk)]
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
            if fsync_every and (i + 1) % fsync_every == 0:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    reported = exc.errno
                    break
                durable = len(acknowledged)
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            reported = reported or exc.errno
    if reported is None:
        durable = len(acknowledged)
    return bytes(acknowledged), durable, reported


def test_a_full_device_under_the_cache_reports_every_write_it_could_not_keep() -> None:
    """Files written through the writeback cache until the device is full, some with an fsync
    every 4 MiB, some only closed. After a restart (the bytes come from the device): every file
    whose fsyncs and close all succeeded holds every byte write() took, and one whose fsync or
    close failed holds at least what its last successful fsync made durable."""
    if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3":
        pytest.skip("the writeback cache is the kernel transport's")
    base = Path(tempfile.mkdtemp(prefix="awsomefs-writeback-full-", dir="/var/tmp"))
    daemon = Daemon(base / "state", base / "mnt", size="64M", env={"AWSOMEFS_MOUNT__WRITEBACK_CACHE": "true"})
    try:
        daemon.start()
        files = {}
        for i in range(6):  # 96 MiB onto a 64 MiB device
            name = f"f{i}"
            files[name] = _fill(daemon.mount / name, fsync_every=4 if i % 2 else None)
        assert daemon.stop() == 0, daemon.logs()
        daemon.start()
        for name, (acknowledged, durable, reported) in files.items():
            held = (daemon.mount / name).read_bytes()
            assert held[:durable] == acknowledged[:durable], (
                f"{name}: bytes write() took, then a successful fsync or close, are missing "
                f"({len(held)} of {len(acknowledged)} bytes held, {durable} durable, reported {reported})")
        assert any(reported or len(acknowledged) < FILE_BYTES for acknowledged, _, reported in files.values()), \
            "the device never filled"
        assert not files["f0"][2], "the first file fits"
        assert daemon.stop() == 0
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


def test_a_writer_looping_until_the_device_is_full_hears_enospc_at_write_and_loses_nothing() -> None:
    """`dd if=/dev/zero of=f bs=1M` fills a disk and stops at its first failed write(). Under
    the writeback cache the write()s land in the kernel's page cache; the daemon bounds what the
    kernel may hold by the room left (fuse/dirty_bound.py) and, near a full device, fails the
    writer's next write() with ENOSPC (fuse/kernel/refusals.py): every byte a write() took is on
    the device after a restart, and the close reports nothing. Once the file is gone the space
    serves new writes again."""
    if os.environ.get("AWSOMEFS_MOUNT__TRANSPORT") == "pyfuse3":
        pytest.skip("the writeback cache is the kernel transport's")
    base = Path(tempfile.mkdtemp(prefix="awsomefs-writeback-loop-", dir="/var/tmp"))
    daemon = Daemon(base / "state", base / "mnt", size="64M", env={"AWSOMEFS_MOUNT__WRITEBACK_CACHE": "true"})
    # far past where the kernel's first write-back comes (2.3 GiB on a machine of 24 GiB)
    limit = 2 * (kernel_dirty_limit_bytes("dirty_background") + (64 << 20))
    try:
        daemon.start()
        taken: list[bytes] = []
        written, refused = 0, None
        fd = os.open(daemon.mount / "filler", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            while written < limit:
                chunk = bytes([len(taken) % 251 + 1]) * WRITE_BYTES  # each MiB its own byte
                try:
                    n = os.write(fd, chunk)
                except OSError as exc:
                    refused = exc.errno
                    break
                taken.append(chunk[:n])
                written += n
        finally:
            os.close(fd)  # raises if a write() took bytes that were then dropped
        assert refused == errno.ENOSPC, f"write() never failed: {written >> 20} MiB taken by a 64 MiB device"
        assert written > 32 << 20, f"ENOSPC with most of the device free ({written >> 20} MiB taken)"
        assert daemon.stop() == 0, daemon.logs()
        daemon.start()
        held = (daemon.mount / "filler").read_bytes()
        assert held == b"".join(taken), f"{len(held)} bytes held of {written} taken"
        os.unlink(daemon.mount / "filler")
        payload = os.urandom(8 << 20)
        (daemon.mount / "after").write_bytes(payload)  # waits out the freed blocks' grace, then fits
        assert (daemon.mount / "after").read_bytes() == payload
        assert daemon.stop() == 0, daemon.logs()
    finally:
        daemon.stop_hard()
        shutil.rmtree(base, ignore_errors=True)
