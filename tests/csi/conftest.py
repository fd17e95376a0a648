"""Fixtures for the CSI tests: a real CSI endpoint on a real unix socket, driven over real gRPC.

`volume_service` is the single place that chooses the backend, parametrized by `csi_backend`:

- "fake": the directory-backed stand-in (tests/csi/fake_backend.py) served in this process; fast,
  and it has a fault-injection hook (`healthy`).
- "daemon": the real thing, a separate `awsomefsd dev --csi-socket` process (one per session,
  started on first use) with its FUSE mount; CoreVolumes (awsomefsd/daemon/volumes.py) behind the same
  servicers. Each test gets a clean slate: its volumes and snapshots are deleted afterwards.

Every test using `csi_endpoint` runs against both, except those marked `fake_only` (they rely on
the fake's fault injection or its thick-provisioning arithmetic) or `daemon_only`
(test_daemon_e2e.py: quota, copy-on-write, restarts — what only the real core does). The tests use only the
`VolumeService` protocol's path and capacity methods (plus `total_bytes` and the fake's `healthy`).

The gRPC stubs are blocking, and the fake's handlers run on this same trio loop, so the client side
always calls through `trio.to_thread` (`Csi.call`); calling a stub directly would deadlock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from awsomefsd.csi import mounts
from awsomefsd.csi.generated import csi_pb2, csi_pb2_grpc
from awsomefsd.csi.server import serve_csi
from tests.csi.daemon_backend import DaemonVolumes, RunningDaemon, delete_everything, start_daemon
from tests.csi.fake_backend import DirectoryVolumes

NODE_ID = "node-a"
CLIENT_TIMEOUT_S = 30.0
MiB = 1 << 20


def mount_capability(
    mode: int = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = ()
) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
    cap.mount.mount_flags.extend(flags)
    return cap


def block_capability() -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        )
    )
    cap.block.SetInParent()
    return cap


@dataclass
class Csi:
    """Stubs for the three services plus helpers that keep blocking gRPC off the trio loop."""

    channel: grpc.Channel
    socket_path: Path
    volumes: Any  # the VolumeService under test
    workdir: Path  # scratch space for staging and target paths

    def __post_init__(self) -> None:
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    async def call(self, method: Callable[..., Any], request: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: method(request, timeout=CLIENT_TIMEOUT_S))

    async def fails(self, code: grpc.StatusCode, method: Callable[..., Any], request: Any) -> str:
        """Assert the call fails with `code`; the error's details (message) for further checks."""
        with pytest.raises(grpc.RpcError) as info:
            await self.call(method, request)
        assert info.value.code() == code, (info.value.code(), info.value.details())
        return info.value.details() or ""

    async def create(self, name: str, size_bytes: int = 16 * MiB, **fields: Any) -> csi_pb2.Volume:
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size_bytes),
            volume_capabilities=[mount_capability()],
            **fields,
        )
        return (await self.call(self.controller.CreateVolume, request)).volume

    def publish_request(
        self, volume_id: str, target: Path, **fields: Any
    ) -> csi_pb2.NodePublishVolumeRequest:
        fields.setdefault("volume_capability", mount_capability())
        fields.setdefault("staging_target_path", str(self.workdir / "staging" / volume_id))
        return csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=str(target), **fields)


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root) + "/"
    return [m.mount_point for m in mounts.mount_table() if m.mount_point.startswith(prefix)]


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """Scratch space; any bind mount a failed test left below it is removed afterwards."""
    yield tmp_path
    for mount_point in reversed(_mounts_below(tmp_path)):
        with contextlib.suppress(OSError):
            mounts.unmount(mount_point)
    assert _mounts_below(tmp_path) == []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fake_only: runs only against the in-process fake backend (say why in a comment)"
    )
    config.addinivalue_line("markers", "daemon_only: runs only against the real daemon")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each endpoint test against both backends, unless it is marked for one of them."""
    if "csi_backend" in metafunc.fixturenames:
        backends = ["fake", "daemon"]
        if metafunc.definition.get_closest_marker("fake_only") is not None:
            backends = ["fake"]
        elif metafunc.definition.get_closest_marker("daemon_only") is not None:
            backends = ["daemon"]
        metafunc.parametrize("csi_backend", backends, indirect=True)


@pytest.fixture
def csi_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def awsomefsd_daemon() -> Iterator[RunningDaemon]:
    """One real daemon for the session (started on first use), stopped and removed at the end."""
    with start_daemon(node_id=NODE_ID) as running:
        yield running


@pytest.fixture
def volume_service(csi_backend: str, workdir: Path, request: pytest.FixtureRequest) -> Any:
    """THE backend choice for every CSI test (see the module docstring)."""
    if csi_backend == "daemon":
        running: RunningDaemon = request.getfixturevalue("awsomefsd_daemon")
        return DaemonVolumes(running)
    return DirectoryVolumes(workdir / "fs")


@pytest.fixture
async def csi_endpoint(nursery: trio.Nursery, volume_service: Any, workdir: Path) -> AsyncIterator[Csi]:
    """A served CSI endpoint and a connected client; the fake's server stops with the test's
    nursery, the daemon's volumes and snapshots are deleted after the test."""
    if isinstance(volume_service, DaemonVolumes):
        socket_path = volume_service.daemon.socket
    else:
        socket_path = workdir / "csi.sock"
        await nursery.start(serve_csi, volume_service, socket_path, NODE_ID)
    channel = grpc.insecure_channel("unix://" + os.fspath(socket_path))
    csi = Csi(channel=channel, socket_path=socket_path, volumes=volume_service, workdir=workdir)
    try:
        yield csi
    finally:
        try:
            if isinstance(volume_service, DaemonVolumes):
                with trio.fail_after(CLIENT_TIMEOUT_S):
                    await trio.to_thread.run_sync(delete_everything, csi.controller, CLIENT_TIMEOUT_S)
        finally:
            channel.close()
