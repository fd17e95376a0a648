from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from awsomefsd.tier.sigv4 import Credentials
from awsomefsd.tier.store import ObjectStore
from tests.support.s3 import TEST_KEY_ID, TEST_SECRET, FaultProxy, S3Server, fault_proxy, s3_server
from tests.support.tiering import Node, tier_settings, tiered_node


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    pytest.importorskip("moto", reason="the S3 test server needs moto (scripts/install.sh test)")
    with s3_server() as server:
        yield server


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    with fault_proxy(s3.endpoint) as running:
        yield running


def make_store(endpoint: str, bucket: str, **kwargs: object) -> ObjectStore:
    return ObjectStore(endpoint, bucket, Credentials(TEST_KEY_ID, TEST_SECRET), prefix="cluster-a/", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def node(tmp_path: Path, proxy: FaultProxy, s3: S3Server) -> AsyncIterator[Node]:
    """Without caches: every read of tiered data goes to the store."""
    async with tiered_node(tier_settings(tmp_path, proxy.endpoint, s3.bucket, memory_cache_bytes=0,
                                         cache_bytes=0)) as running:
        yield running
