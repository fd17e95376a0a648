"""CSI Identity service: who the plugin is, what it offers, and whether the node is healthy."""

from __future__ import annotations

import grpc
import trio

from awsomefsd import __version__
from awsomefsd.csi.backend import VolumeService
from awsomefsd.csi.generated import csi_pb2
from awsomefsd.rpc.bridge import RpcAbort

PLUGIN_NAME = "awsomefs.csi.io"
HEALTH_TIMEOUT_S = 5.0

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


async def mount_is_healthy(volumes: VolumeService) -> bool:
    """The core's health verdict, with a hung answer (a stuck FUSE mount) counted as unhealthy."""
    with trio.move_on_after(HEALTH_TIMEOUT_S):
        return await volumes.mount_healthy()
    return False


class IdentityServicer:
    def __init__(self, volumes: VolumeService) -> None:
        self._volumes = volumes

    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=PLUGIN_NAME, vendor_version=__version__)

    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [
            csi_pb2.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
            csi_pb2.PluginCapability(service=_Service(type=_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)),
        ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    async def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        """Ready when the node's mount answers; an error otherwise, so the liveness probe fails.

        The spec reserves `ready: false` for a healthy plugin still initialising; a broken mount
        is not that, it needs the daemon restarted, which is what a failed liveness probe does.
        """
        if not await mount_is_healthy(self._volumes):
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, "the node's AwsomeFS mount does not answer")
        response = csi_pb2.ProbeResponse()
        response.ready.value = True
        return response
