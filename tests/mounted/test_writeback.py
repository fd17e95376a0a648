"""The writeback cache ([mount] writeback_cache): what the kernel still holds is not lost.

With the writeback cache a write() leaves its bytes in the kernel's page cache; the daemon gets
them when the kernel writes back. A stop must make the kernel send them first (docs/fuse-transport.md,
"Writeback cache"): after it nobody would receive them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
