"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from awsomefsd.daemon.node import Core, open_core
from tests.unit.test_fs_api import settings_for


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    """A single node on a 64 MiB image and the local log (test_fs_api.settings_for), no mount.
    Modules that need another node define their own `core`."""
    core = open_core(settings_for(tmp_path))
    try:
        yield core
    finally:
        core.close()
