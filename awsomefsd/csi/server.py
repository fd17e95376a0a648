"""The CSI endpoint the daemon runs: Identity, Controller and Node on one unix socket.

`serve_csi` is a long-lived trio service for the daemon's nursery:

    await nursery.start(serve_csi, volume_service, settings.csi.socket, node_id)

It returns only when cancelled; the socket (mode 0600) is removed on the way out. Each node runs
all three services: Kubernetes' controller sidecars (provisioner, resizer, snapshotter) elect one
leader among the DaemonSet's pods, and every node's kubelet talks to its local Node service.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import trio

from awsomefsd.csi.backend import VolumeService
from awsomefsd.csi.controller import ControllerServicer
from awsomefsd.csi.generated import csi_pb2_grpc
from awsomefsd.csi.identity import IdentityServicer
from awsomefsd.csi.node import NodeServicer
from awsomefsd.rpc.bridge import Binding, BridgeLimits, serve_grpc

TOPOLOGY_KEY = "topology.awsomefs.csi.io/cluster"
DEFAULT_CLUSTER = "awsomefs"
# The CO serialises calls per volume, so a handful in flight is plenty; mount calls are slow-ish.
CSI_LIMITS = BridgeLimits(max_workers=8, max_concurrent_rpcs=64, max_inflight=16, max_call_s=120.0)


async def serve_csi(
    volume_service: VolumeService,
    socket_path: Path,
    node_id: str,
    *,
    cluster: str = DEFAULT_CLUSTER,
    topology_segments: Mapping[str, str] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve CSI on `socket_path` until cancelled; `task_status.started("unix://...")` once listening.

    `node_id` is what NodeGetInfo reports (the node name). Volumes and nodes carry the topology
    segment `topology.awsomefs.csi.io/cluster=<cluster>`, so a Kubernetes cluster spanning several
    AwsomeFS clusters (or nodes without the shared device) schedules pods where the volume is.
    """
    segments = dict(topology_segments) if topology_segments is not None else {TOPOLOGY_KEY: cluster}
    bindings = [
        Binding(csi_pb2_grpc.add_IdentityServicer_to_server, IdentityServicer(volume_service)),
        Binding(csi_pb2_grpc.add_ControllerServicer_to_server, ControllerServicer(volume_service, segments)),
        Binding(csi_pb2_grpc.add_NodeServicer_to_server, NodeServicer(volume_service, node_id, segments)),
    ]
    address = "unix://" + str(Path(socket_path).absolute())
    await serve_grpc(bindings, address, limits=CSI_LIMITS, task_status=task_status)
