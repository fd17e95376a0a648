"""The block device: O_DIRECT on image files, the buffered fallback, aligned buffers, short reads."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.io import device as device_module
from awsomefsd.io.device import BlockDevice, BufferPool, DeviceError, aligned_buffer, create_image
from awsomefsd.io.layout import BLOCK_SIZE, MiB

IMAGE_BYTES = 4 * MiB


def _address(buf: object) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "device.img"
    create_image(path, IMAGE_BYTES)
    return path


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mount: it refuses O_DIRECT. (tmpfs accepts O_DIRECT since Linux 6.6, so it no
    longer exercises the fallback.)"""
    if os.geteuid() != 0:
        pytest.skip("mounting ramfs needs root")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_aligned_buffer_is_page_aligned_and_zeroed() -> None:
    buf = aligned_buffer(3 * BLOCK_SIZE)
    assert len(buf) == 3 * BLOCK_SIZE
    assert _address(buf) % 4096 == 0
    assert buf[:] == bytes(3 * BLOCK_SIZE)
    with pytest.raises(ValueError):
        aligned_buffer(100)
    with pytest.raises(ValueError):
        aligned_buffer(0)


def test_create_image_is_sparse_grows_and_refuses_to_shrink(tmp_path: Path) -> None:
    path = tmp_path / "img"
    create_image(path, 64 * MiB)
    st = path.stat()
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 < 1 * MiB
    create_image(path, 128 * MiB)
    assert path.stat().st_size == 128 * MiB
    with pytest.raises(DeviceError, match="refusing to shrink"):
        create_image(path, 64 * MiB)
    assert path.stat().st_size == 128 * MiB
    with pytest.raises(ValueError):
        create_image(tmp_path / "odd", 1000)


def test_image_on_this_disk_uses_o_direct(image: Path) -> None:
    with BlockDevice.open(image) as dev:
        assert dev.direct is True
        assert dev.is_block_device is False
        assert dev.size_bytes == IMAGE_BYTES
        assert dev.path == image
        assert os.O_DIRECT & fcntl.fcntl(dev._fd, fcntl.F_GETFL)


def test_aligned_round_trip_and_counters(image: Path) -> None:
    with BlockDevice.open(image) as dev:
        out = aligned_buffer(4 * BLOCK_SIZE)
        out[:] = os.urandom(4 * BLOCK_SIZE)
        dev.write_from(out, 10 * BLOCK_SIZE)
        dev.sync()
        back = aligned_buffer(4 * BLOCK_SIZE)
        dev.read_into(back, 10 * BLOCK_SIZE)
        assert back[:] == out[:]
        part = aligned_buffer(4 * BLOCK_SIZE)
        dev.read_into(memoryview(part)[: 2 * BLOCK_SIZE], 12 * BLOCK_SIZE)
        assert part[: 2 * BLOCK_SIZE] == out[2 * BLOCK_SIZE :]
        assert dev.read(11 * BLOCK_SIZE, BLOCK_SIZE) == out[BLOCK_SIZE : 2 * BLOCK_SIZE]
        assert (dev.writes, dev.bytes_written) == (1, 4 * BLOCK_SIZE)
        assert (dev.reads, dev.bytes_read) == (3, 7 * BLOCK_SIZE)
    # visible to a fresh open (and to buffered readers: O_DIRECT wrote through)
    assert image.read_bytes()[10 * BLOCK_SIZE : 14 * BLOCK_SIZE] == out[:]


def test_write_copies_python_bytes_into_an_aligned_buffer(image: Path) -> None:
    data = b"\xab" * BLOCK_SIZE
    with BlockDevice.open(image) as dev:
        dev.write(0, data)
        assert dev.read(0, BLOCK_SIZE) == data
        # an unaligned buffer is refused by O_DIRECT with a message that says why (one byte into
        # an aligned mapping: a Python bytes object is only unaligned by chance)
        backing = aligned_buffer(2 * BLOCK_SIZE)
        unaligned = memoryview(backing)[1 : 1 + BLOCK_SIZE]
        with pytest.raises(OSError, match="page aligned") as info:
            dev.write_from(unaligned, BLOCK_SIZE)
        assert info.value.errno == errno.EINVAL


def test_unaligned_offsets_and_lengths_are_caller_bugs(image: Path) -> None:
    with BlockDevice.open(image) as dev:
        buf = aligned_buffer(BLOCK_SIZE)
        with pytest.raises(AssertionError):
            dev.read_into(buf, 100)
        with pytest.raises(AssertionError):
            dev.read_into(memoryview(buf)[:512], 0)
        with pytest.raises(AssertionError):
            dev.write_from(buf, 512)


def test_read_past_the_end_is_eio(image: Path) -> None:
    with BlockDevice.open(image) as dev:
        buf = aligned_buffer(2 * BLOCK_SIZE)
        with pytest.raises(OSError) as info:
            dev.read_into(buf, IMAGE_BYTES - BLOCK_SIZE)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            dev.write_from(buf, IMAGE_BYTES)
        assert info.value.errno == errno.EIO


def test_short_read_of_a_device_that_shrank_underneath_is_eio(image: Path) -> None:
    with BlockDevice.open(image) as dev:
        os.truncate(image, IMAGE_BYTES - BLOCK_SIZE)
        buf = aligned_buffer(4 * BLOCK_SIZE)
        with pytest.raises(OSError, match="short read") as info:
            dev.read_into(buf, IMAGE_BYTES - 4 * BLOCK_SIZE)
        assert info.value.errno == errno.EIO
        dev.read_into(buf, 0)  # the rest still reads


def test_closed_device_refuses_io_and_close_is_idempotent(image: Path) -> None:
    dev = BlockDevice.open(image)
    dev.close()
    dev.close()
    assert dev.closed
    with pytest.raises(ValueError, match="closed"):
        dev.read(0, BLOCK_SIZE)


def test_not_a_file_or_block_device(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DeviceError, match="neither"):
        BlockDevice.open(fifo)
    with pytest.raises(FileNotFoundError):
        BlockDevice.open(tmp_path / "missing")


def test_shared_device_needs_direct_io(image: Path) -> None:
    with pytest.raises(DeviceError, match="shared"):
        BlockDevice.open(image, shared=True, direct=False)
    with BlockDevice.open(image, shared=True) as dev:
        assert dev.direct and dev.shared


def test_direct_false_uses_buffered_io(image: Path) -> None:
    with BlockDevice.open(image, direct=False) as dev:
        assert dev.direct is False
        dev.write_from(b"\x01" * BLOCK_SIZE, 0)  # plain bytes are fine without O_DIRECT
        dev.sync()
        assert dev.read(0, BLOCK_SIZE) == b"\x01" * BLOCK_SIZE


def test_filesystem_without_o_direct_falls_back_with_one_warning(
    ramfs: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_module, "_warned_paths", set())
    path = ramfs / "device.img"
    create_image(path, IMAGE_BYTES)
    with caplog.at_level(logging.WARNING, logger="awsomefsd.io.device"):
        with BlockDevice.open(path) as dev:
            assert dev.direct is False
            buf = aligned_buffer(BLOCK_SIZE)
            buf[:] = b"z" * BLOCK_SIZE
            dev.write_from(buf, BLOCK_SIZE)
            dev.sync()
            assert dev.read(BLOCK_SIZE, BLOCK_SIZE) == b"z" * BLOCK_SIZE
        with BlockDevice.open(path) as dev:
            assert dev.direct is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "direct I/O unavailable" in warnings[0].getMessage()


def test_shared_device_on_a_filesystem_without_o_direct_is_refused(ramfs: Path) -> None:
    path = ramfs / "device.img"
    create_image(path, IMAGE_BYTES)
    with pytest.raises(DeviceError, match="page-cached"):
        BlockDevice.open(path, shared=True)


def test_loop_block_device_size_comes_from_the_ioctl(image: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("losetup needs root")
    try:
        loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device available: {exc}")
    try:
        with BlockDevice.open(loop) as dev:
            assert dev.is_block_device
            assert dev.direct
            assert dev.size_bytes == IMAGE_BYTES
            buf = aligned_buffer(BLOCK_SIZE)
            buf[:] = b"L" * BLOCK_SIZE
            dev.write_from(buf, 0)
            dev.sync()
        with BlockDevice.open(image) as dev:
            assert dev.read(0, BLOCK_SIZE) == b"L" * BLOCK_SIZE
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_buffer_pool_reuses_and_bounds_idle_buffers() -> None:
    pool = BufferPool(2 * BLOCK_SIZE, max_buffers=2)
    a = pool.acquire()
    assert len(a) == 2 * BLOCK_SIZE and _address(a) % 4096 == 0
    pool.release(a)
    assert pool.acquire() is a
    b, c = pool.acquire(), pool.acquire()  # beyond the pool: a fresh buffer, never a wait
    assert len({id(a), id(b), id(c)}) == 3
    assert pool.outstanding_count == 3
    for buf in (a, b, c):
        pool.release(buf)
    assert pool.idle_count == 2
    assert pool.created == 3
    with pytest.raises(ValueError, match="already released"):
        pool.release(c)
    with pytest.raises(ValueError):
        pool.release(aligned_buffer(2 * BLOCK_SIZE))


def test_buffer_pool_release_tolerates_a_live_view_and_borrow_releases() -> None:
    pool = BufferPool(BLOCK_SIZE, max_buffers=1)
    with pool.borrow() as buf:
        view = memoryview(buf)[:BLOCK_SIZE]
        other = pool.acquire()
        pool.release(other)  # pool full after borrow returns: `other` is kept, `buf` then dropped
    assert view[0] == 0
    assert pool.outstanding_count == 0 and pool.idle_count == 1
    pool.close()
    assert pool.idle_count == 0
    with pytest.raises(ValueError):
        BufferPool(100, 1)
    with pytest.raises(ValueError):
        BufferPool(BLOCK_SIZE, 0)
