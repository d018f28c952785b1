"""The CSI Identity service (csi-spec-v1.12.md, "Identity Service RPC").

Owns GetPluginInfo, GetPluginCapabilities and Probe. Readiness is delegated to a `Readiness`
object (csi.storage_nodes.StorageNodes in the program): the plugin is ready when every storage
node it was given answers its management API.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Protocol

from google.protobuf import wrappers_pb2

from .errors import rpc
from .v1 import csi_pb2 as pb
from .v1 import csi_pb2_grpc as pb_grpc

_Service = pb.PluginCapability.Service
_Expansion = pb.PluginCapability.VolumeExpansion

# The plugin "as a whole", as deployed: a controller and node plugins. The spec says every
# instance of one version SHALL report the same set, "regardless of ... which RPCs an instance
# is serving" (GetPluginCapabilities), so a node-mode instance reports CONTROLLER_SERVICE too.
# - VOLUME_ACCESSIBILITY_CONSTRAINTS: a volume lives on one storage node; topology tells the
#   CO where it can be reached from.
# - VolumeExpansion ONLINE: volumes grow while attached (the VM sees the new NBD size).
# - GROUP_CONTROLLER_SERVICE: crash-consistent group snapshots (csi/group_controller.py).
CAPABILITIES = (
    pb.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
    pb.PluginCapability(service=_Service(type=_Service.GROUP_CONTROLLER_SERVICE)),
    pb.PluginCapability(service=_Service(type=_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
    pb.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)),
)


# The topology key every node plugin reports when it was given no `--topology`: the CO needs
# a segment from each node (the capability above is advertised), and this one names only the
# node. Placement ignores it (csi/controller.py): every storage node is reachable from every
# node over the network, so it constrains nothing.
NODE_TOPOLOGY_KEY = "topology.nbd.csi.dev/node"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def node_topology_value(node_name: str) -> str:
    """The node's name as a topology value (a label value: at most 63 characters of
    [A-Za-z0-9._-]); a name that is not one is replaced by a stable digest of it."""
    if _LABEL_VALUE.match(node_name):
        return node_name
    return "node-" + hashlib.sha256(node_name.encode()).hexdigest()[:32]


class Readiness(Protocol):
    async def ready(self) -> bool: ...


class AlwaysReady:
    async def ready(self) -> bool:
        return True


class IdentityServicer(pb_grpc.IdentityServicer):
    def __init__(self, name: str, vendor_version: str, readiness: Readiness) -> None:
        self.name = name
        self.vendor_version = vendor_version
        self.readiness = readiness

    @rpc
    async def GetPluginInfo(
        self, request: pb.GetPluginInfoRequest, context: Any
    ) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=self.name, vendor_version=self.vendor_version)

    @rpc
    async def GetPluginCapabilities(
        self, request: pb.GetPluginCapabilitiesRequest, context: Any
    ) -> pb.GetPluginCapabilitiesResponse:
        return pb.GetPluginCapabilitiesResponse(capabilities=CAPABILITIES)

    @rpc
    async def Probe(self, request: pb.ProbeRequest, context: Any) -> pb.ProbeResponse:
        # A storage node that does not answer makes the plugin not ready; the call itself
        # succeeds, since the plugin is healthy and only waits for its dependency (spec,
        # ProbeResponse, case 2). The reason is in the log (StorageNodes.ready).
        ready = await self.readiness.ready()
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))
