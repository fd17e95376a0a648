"""O_DIRECT writers of one file (a database's page writes, fio's jobs): the kernel lets them reach
the daemon side by side, every block lands where it was written, and such a file can still be
mapped shared.

Side by side is seen in the kernel's own FUSE tracepoints (fuse_request_send and
fuse_request_end, in a trace instance of the test's own): before FOPEN_PARALLEL_DIRECT_WRITES the
kernel held each direct write on the file's inode lock until the daemon answered it, so no two
WRITEs of one file were ever in flight at once.
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import random
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BLOCK = 4096
BLOCKS = 512
THREADS = 16
TRACING = Path("/sys/kernel/tracing")
SENT = re.compile(r"fuse_request_send: connection (\d+) req (\d+) opcode 16 ")
ENDED = re.compile(r"fuse_request_end: connection (\d+) req (\d+) ")
SIDE_BY_SIDE = (os.environ.get("AWSOMEFS_MOUNT__TRANSPORT", "kernel") == "kernel"
                and os.environ.get("AWSOMEFS_MOUNT__WRITEBACK_CACHE", "false").lower() in ("false", "0", "no", ""))
"""Our transport without the writeback cache (where the mount runs with the defaults) answers an
O_DIRECT open for writes side by side; pyfuse3 does not, and under the cache the kernel's direct
path would not keep the mtime (handlers.py `_open_out`)."""


@pytest.fixture
def fuse_trace() -> Iterator[Path]:
    """A trace instance of our own with the fuse request events on (tracefs mounted if needed)."""
    if not (TRACING / "instances").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=False, capture_output=True)
    if not (TRACING / "instances").is_dir():
        pytest.skip("no tracefs here (the kernel's FUSE tracepoints)")
    instance = TRACING / "instances" / f"awsomefs-test-{uuid.uuid4().hex[:8]}"
    instance.mkdir()
    try:
        if not (instance / "events" / "fuse").is_dir():
            pytest.skip("this kernel has no FUSE tracepoints")
        (instance / "buffer_size_kb").write_text("16384")
        for event in ("fuse_request_send", "fuse_request_end"):
            (instance / "events" / "fuse" / event / "enable").write_text("1")
        yield instance
    finally:
        for event in ("fuse_request_send", "fuse_request_end"):
            (instance / "events" / "fuse" / event / "enable").write_text("0")
        instance.rmdir()


def _write_blocks(path: Path, blocks: list[int], seed: int) -> dict[int, bytes]:
    """O_DIRECT writes of `blocks` (4 KiB each, random order and bytes); what each block holds."""
    rng = random.Random(seed)
    buf = mmap.mmap(-1, BLOCK)
    written = {}
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for block in rng.sample(blocks, len(blocks)):
            buf[:] = rng.randbytes(BLOCK)
            assert os.pwritev(fd, [buf], block * BLOCK) == BLOCK
            written[block] = bytes(buf)
    finally:
        os.close(fd)
    return written


def _most_writes_in_flight(trace: str, connection: int) -> int:
    """The most WRITEs of `connection` sent to the daemon and not yet answered at one time."""
    in_flight: set[str] = set()
    most = 0
    for line in trace.splitlines():
        if (sent := SENT.search(line)) and int(sent.group(1)) == connection:
            in_flight.add(sent.group(2))
            most = max(most, len(in_flight))
        elif (ended := ENDED.search(line)) and int(ended.group(1)) == connection:
            in_flight.discard(ended.group(2))
    return most


def test_direct_writers_of_one_file_are_served_side_by_side_and_keep_every_block(
        mnt: Path, fuse_trace: Path) -> None:
    f = mnt / "pages"
    f.write_bytes(bytes(BLOCKS * BLOCK))  # written within the file: no write extends it
    mine = [list(range(t, BLOCKS, THREADS)) for t in range(THREADS)]
    seed = random.randrange(1 << 30)
    (fuse_trace / "tracing_on").write_text("1")
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        parts = list(pool.map(lambda t: _write_blocks(f, mine[t], seed + t), range(THREADS)))
    (fuse_trace / "tracing_on").write_text("0")
    model = {block: data for part in parts for block, data in part.items()}
    assert len(model) == BLOCKS
    expected = b"".join(model[b] for b in range(BLOCKS))
    assert f.read_bytes() == expected, f"seed {seed}"
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    try:
        back = mmap.mmap(-1, BLOCKS * BLOCK)
        assert os.preadv(fd, [back], 0) == BLOCKS * BLOCK and back[:] == expected, f"seed {seed}"
    finally:
        os.close(fd)
    dev = os.stat(mnt).st_dev
    most = _most_writes_in_flight((fuse_trace / "trace").read_text(), os.major(dev) << 20 | os.minor(dev))
    if SIDE_BY_SIDE:
        assert most > 1, f"{THREADS} direct writers of one file never had two WRITEs in flight (seed {seed})"


def test_a_file_open_for_direct_io_can_still_be_mapped_shared(mnt: Path) -> None:
    """A handle that bypasses the page cache (FOPEN_DIRECT_IO) refuses a shared mapping (ENODEV)
    unless the kernel lets it (FUSE_DIRECT_IO_ALLOW_MMAP): an O_DIRECT descriptor mapped as on
    ext4."""
    f = mnt / "mapped"
    f.write_bytes(b"\0" * BLOCK)
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        with mmap.mmap(fd, BLOCK, mmap.MAP_SHARED) as mapped:
            mapped[:5] = b"hello"
            mapped.flush()
    finally:
        os.close(fd)
    assert f.read_bytes()[:5] == b"hello"
    shutil.copy(f, mnt / "copy")  # an ordinary reader sees it too
    assert (mnt / "copy").read_bytes()[:5] == b"hello"
