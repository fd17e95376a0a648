"""The real backend for the CSI tests: a separate `awsomefsd dev --csi-socket` process.

`start_daemon` runs one daemon (sparse 2 GiB image, FUSE mount, CSI socket) below a fresh
directory in /var/tmp and always stops it and removes that directory. `DaemonVolumes` is what the
tests need beside gRPC: where the mount and a volume's directory are, and the device's size —
computed the way CoreVolumes computes them, from the outside.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awsomefsd.csi.generated import csi_pb2
from awsomefsd.daemon.volumes import VOLUMES_DIR, parse_csi_id
from awsomefsd.meta.volumes_sm import volume_dir_name
from tests.support.daemon import Daemon, is_mounted

DAEMON_SIZE = "2G"
_CLUSTER_RE = re.compile(r"cluster ([0-9a-f-]{36})")


@dataclass(frozen=True)
class RunningDaemon:
    daemon: Daemon
    base: Path
    mount: Path
    socket: Path
    cluster_id: str


@contextlib.contextmanager
def start_daemon(node_id: str, size: str = DAEMON_SIZE) -> Iterator[RunningDaemon]:
    """A running daemon serving CSI; stopped (cleanly, else killed) and its files removed after."""
    base = Path(tempfile.mkdtemp(prefix="awsomefs-csi-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    mount, socket = base / "mnt", base / "csi.sock"
    daemon = Daemon(base / "state", mount, size=size, extra=["--csi-socket", str(socket)],
                    env={"AWSOMEFS_CSI__NODE_ID": node_id})
    try:
        daemon.start()
        found = _CLUSTER_RE.search(daemon.logs())
        assert found is not None, daemon.logs()
        assert socket.exists(), "the CSI socket is listening before the mount is reported"
        yield RunningDaemon(daemon, base, mount, socket, found.group(1))
        assert daemon.stop() == 0, daemon.logs()
        assert "Traceback" not in daemon.logs(), daemon.logs()  # no error was swallowed into the log
    finally:
        daemon.stop_hard()
        if not is_mounted(mount):
            shutil.rmtree(base, ignore_errors=True)


class DaemonVolumes:
    """The test-facing side of a daemon's VolumeService: paths and sizes, no mutations."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self.daemon = daemon

    @property
    def total_bytes(self) -> int:
        """The data area, which statfs reports and CreateVolume checks against."""
        fs = os.statvfs(self.daemon.mount)
        return fs.f_blocks * fs.f_frsize

    def mount_point(self) -> str:
        return str(self.daemon.mount)

    def volume_path(self, volume_id: str) -> str:
        number = parse_csi_id(self.daemon.cluster_id, "volume", volume_id)
        assert number is not None, volume_id
        return str(self.daemon.mount / VOLUMES_DIR / volume_dir_name(number).decode())

    async def capacity(self) -> tuple[int, int]:
        fs = os.statvfs(self.daemon.mount)
        return fs.f_blocks * fs.f_frsize, fs.f_bfree * fs.f_frsize


def delete_everything(controller: Any, timeout_s: float) -> None:
    """Delete every snapshot, then every volume (blocking gRPC; call it from a worker thread)."""
    snapshots = controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=timeout_s)
    for entry in snapshots.entries:
        controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=entry.snapshot.snapshot_id), timeout=timeout_s
        )
    volumes = controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=timeout_s)
    for entry in volumes.entries:
        controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=entry.volume.volume_id), timeout=timeout_s)
