"""Mounted tests share one real daemon per module (start-up costs seconds); each test works in
its own directory on the mount."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon

_counter = itertools.count()


@contextlib.contextmanager
def running_daemon(prefix: str, env: dict[str, str] | None = None, extra: list[str] | None = None) -> Iterator[Daemon]:
    """A daemon on an 8 GiB image under /var/tmp, stopped cleanly (exit 0) and removed after.
    `extra`: more arguments for `awsomefsd dev`.

    Not under pytest's tmp dir: that is private to root, and tests act as other users too.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(base, 0o755)
    d = Daemon(base / "state", base / "mnt", size="8G", env=env, extra=extra or []).start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.logs()
        d.stop_hard()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon("awsomefs-test-") as d:
        yield d


@pytest.fixture
def mnt(daemon: Daemon) -> Path:
    """A fresh directory on the shared mount for one test."""
    path = daemon.mount / f"t{next(_counter)}"
    path.mkdir()
    os.chmod(path, 0o777)
    return path
