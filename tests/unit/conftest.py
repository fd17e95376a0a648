"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

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


@pytest.fixture
async def running(core: Core) -> AsyncIterator[Core]:
    """The core with its background flusher and compactor (FileData.run) going."""
    async with trio.open_nursery() as nursery:
        await nursery.start(core.data.run)
        yield core
        nursery.cancel_scope.cancel()
