"""The CSI Controller service (csi-spec-v1.12.md, "Controller Service RPC") over the storage
node pool.

Owns mapping every Controller RPC onto the storage nodes' management API: argument checks,
placement (topology, then the most available capacity), idempotency across nodes (a name is
looked up on every node before anything is created), tenant quotas (csi.quota), the
per-volume in-flight guard (ABORTED), and the translation between CSI objects and storage node
objects. Volume and snapshot ids carry their storage node (`NODE:vol-...`, docs/csi-driver.md),
so the controller keeps no state of its own: a restarted controller knows everything again.

What a CSI volume was created as (block or mount, single or multi node) is kept in the storage
node volume's labels, so publish and ValidateVolumeCapabilities can check it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2, wrappers_pb2
from prometheus_client import CollectorRegistry

from storage_node.v1 import storage_node_pb2 as sn

from .config import Config
from .errors import (
    Aborted,
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    StorageNodeError,
    Unavailable,
    rpc,
)
from .identity import NODE_TOPOLOGY_KEY
from .kube import KubeClient, KubeError
from .luks import CTX_ENCRYPTED
from .quota import DEFAULT_TENANT, TenantQuotas, human, parse_quantity
from .storage_nodes import StorageNodeClient, StorageNodes
from .v1 import csi_pb2 as pb
from .v1 import csi_pb2_grpc as pb_grpc

log = logging.getLogger("csi.controller")

BLOCK = 4096
MAX_SIZE = 1 << 46  # the storage node's largest volume, 64 TiB
DEFAULT_SIZE = 1 << 30  # no capacity range: 1 GiB (the spec leaves it to the plugin)
MAX_NAME = 128
# How long CreateVolume waits for a clone that the storage node fills in the background; past
# it the call answers ABORTED ("operation pending") and the provisioner's retry waits again.
READY_WAIT = 20.0
DISCOVERY_INTERVAL = 15.0

PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PV_NAME = "csi.storage.k8s.io/pv/name"
# Parameters from the StorageClass, and from a VolumeAttributesClass (ControllerModifyVolume).
IOPS = "iops"
BANDWIDTH = "bandwidth"
QOS_PARAMETERS = (IOPS, BANDWIDTH)
# StorageClass only: LUKS2 on the node (docs/csi-node.md, "Encrypted volumes"). Remembered as
# the volume's label ENCRYPTED_LABEL and handed to NodeStage in volume_context.
ENCRYPTED = "encrypted"
# "false": the storage node writes zeroes as data (for volumes preallocated on purpose); by
# default all-zero writes become holes (docs/storage-node.md, "Thin writes"). Creation only.
ZERO_DETECTION = "zeroDetection"
CREATE_PARAMETERS = (*QOS_PARAMETERS, ENCRYPTED, ZERO_DETECTION)
# Bound of a QoS value's text: a quantity like "1.5Gi" needs few characters (millions of digits
# made decimal arithmetic overflow); parse_quantity bounds the number to int64.
QOS_QUANTITY_CHARS = 32
# Keys the CO adds on its own (csi-provisioner: secrets references, fstype, extra metadata).
CO_PREFIX = "csi.storage.k8s.io/"

# Storage node volume labels that remember what the CSI volume was created as.
ACCESS_TYPE = "nbd.csi.dev/access-type"
MULTI_NODE = "nbd.csi.dev/multi-node"
ENCRYPTED_LABEL = CTX_ENCRYPTED
# publish_context and volume_context keys (docs/csi-driver.md).
CTX_HOST = "nbd.csi.dev/host"
CTX_PORT = "nbd.csi.dev/port"
CTX_EXPORT = "nbd.csi.dev/export"
CTX_READONLY = "nbd.csi.dev/readonly"
CTX_STORAGE_NODE = "nbd.csi.dev/storage-node"
CTX_TENANT = "nbd.csi.dev/tenant"

Mode = pb.VolumeCapability.AccessMode.Mode
MULTI_NODE_MODES = {
    Mode.MULTI_NODE_READER_ONLY,
    Mode.MULTI_NODE_SINGLE_WRITER,
    Mode.MULTI_NODE_MULTI_WRITER,
}
READER_MODES = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
# A filesystem mounted on two nodes that can both write is corrupted: multi-node writers are
# for raw block only (KubeVirt live migration), as DESIGN.md decides.
MOUNT_REFUSED = {Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER}

_Cap = pb.ControllerServiceCapability.RPC.Type
CAPABILITIES = [
    pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=t))
    for t in (
        _Cap.CREATE_DELETE_VOLUME,
        _Cap.PUBLISH_UNPUBLISH_VOLUME,
        _Cap.LIST_VOLUMES,
        _Cap.GET_CAPACITY,
        _Cap.CREATE_DELETE_SNAPSHOT,
        _Cap.LIST_SNAPSHOTS,
        _Cap.CLONE_VOLUME,
        _Cap.PUBLISH_READONLY,
        _Cap.EXPAND_VOLUME,
        _Cap.LIST_VOLUMES_PUBLISHED_NODES,
        _Cap.VOLUME_CONDITION,
        _Cap.GET_VOLUME,
        _Cap.SINGLE_NODE_MULTI_WRITER,
        _Cap.MODIFY_VOLUME,
        _Cap.GET_SNAPSHOT,
    )
]

_LOCAL_ID = {"vol": re.compile(r"^vol-[0-9a-f]{16}$"), "snap": re.compile(r"^snap-[0-9a-f]{16}$")}


# -- small checks and conversions ------------------------------------------------------------


def require(value: Any, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required")


def check_name(name: str, what: str) -> str:
    """Check a CSI name and return the name the storage node keeps for it.

    CSI names are up to 128 bytes of any Unicode but control characters (csi-spec, "Size
    Limits" and CreateVolumeRequest.name); the storage node takes printable names without
    spaces. Names it takes are kept as they are, so they show in its metrics; any other is
    kept as a digest of itself, which maps each name to one storage node name."""
    require(name, what)
    if len(name.encode()) > MAX_NAME:
        raise InvalidArgument(f"{what} is {len(name.encode())} bytes; at most {MAX_NAME} allowed")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidArgument(f"{what} must not contain control characters, got {name!r}")
    if name.isprintable() and not any(c.isspace() for c in name) and not name.startswith("~"):
        return name
    return "~" + hashlib.sha256(name.encode()).hexdigest()


@dataclass(frozen=True)
class Access:
    """What a set of volume capabilities asks for."""

    block: bool
    multi_node: bool

    @classmethod
    def of(cls, capabilities: Sequence[pb.VolumeCapability]) -> Access:
        kinds = {check_capability(c) for c in capabilities}
        if len(kinds) > 1:
            raise InvalidArgument("volume_capabilities mix block and mount access types")
        multi = any(c.access_mode.mode in MULTI_NODE_MODES for c in capabilities)
        return cls(block=kinds.pop() == "block", multi_node=multi)

    @classmethod
    def of_volume(cls, volume: sn.Volume) -> Access:
        labels = volume.labels
        return cls(labels.get(ACCESS_TYPE) == "block", labels.get(MULTI_NODE) == "true")

    def labels(self) -> dict[str, str]:
        return {
            ACCESS_TYPE: "block" if self.block else "mount",
            MULTI_NODE: "true" if self.multi_node else "false",
        }

    def allows(self, capability: pb.VolumeCapability) -> str:
        """Why this volume cannot serve `capability`, or "" when it can."""
        kind = check_capability(capability)
        if (kind == "block") != self.block:
            return f"the volume was created for {'block' if self.block else 'mount'} access"
        if capability.access_mode.mode in MULTI_NODE_MODES and not self.multi_node:
            return "the volume was created for one node only"
        return ""


def check_capability(capability: pb.VolumeCapability) -> str:
    """'block' or 'mount'; INVALID_ARGUMENT for capabilities no volume here can have."""
    kind = capability.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument("a volume capability needs an access_type (block or mount)")
    mode = capability.access_mode.mode
    if mode == Mode.UNKNOWN or mode not in Mode.values():
        raise InvalidArgument("a volume capability needs an access_mode")
    if kind == "mount":
        if mode in MOUNT_REFUSED:
            raise InvalidArgument(
                f"access mode {Mode.Name(mode)} is for block volumes only: a filesystem "
                "written from two nodes is corrupted"
            )
        fs_type = capability.mount.fs_type
        if fs_type not in ("", "ext4", "xfs"):
            raise InvalidArgument(f"fs_type {fs_type!r} is not supported (ext4 or xfs)")
    return kind


def size_for(capacity: pb.CapacityRange | None, source_size: int = 0, current: int = 0) -> int:
    """The size to create (or grow to): the required bytes rounded up to 4 KiB, at least the
    source's size, never past limit_bytes (csi-spec, CapacityRange)."""
    required = capacity.required_bytes if capacity is not None else 0
    limit = capacity.limit_bytes if capacity is not None else 0
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} is more than limit_bytes {limit}")
    size = -(-max(required, source_size, current) // BLOCK) * BLOCK
    if not required and not source_size and not current:
        size = min(DEFAULT_SIZE, limit // BLOCK * BLOCK) if limit else DEFAULT_SIZE
    if size > MAX_SIZE:
        raise OutOfRange(f"{size} bytes is more than the largest volume, {human(MAX_SIZE)}")
    if size == 0 or (limit and size > limit):
        raise OutOfRange(
            f"no size in 4 KiB steps fits between {required} and {limit} bytes"
            + (f" and holds the source's {source_size} bytes" if source_size else "")
        )
    return size


def qos_parameters(parameters: dict[str, str], base: sn.Qos | None = None) -> sn.Qos:
    """`iops` and `bandwidth` from StorageClass or VolumeAttributesClass parameters."""
    qos = sn.Qos()
    if base is not None:
        qos.CopyFrom(base)
    if IOPS in parameters:
        qos.iops = qos_quantity(parameters[IOPS], IOPS)
    if BANDWIDTH in parameters:
        qos.bytes_per_second = qos_quantity(parameters[BANDWIDTH], BANDWIDTH)
    return qos


def qos_quantity(value: str, key: str) -> int:
    """A QoS parameter: a quantity in ASCII digits, at most QOS_QUANTITY_CHARS long and at most
    2^63-1 (what the storage node stores; parse_quantity checks it), else INVALID_ARGUMENT
    naming the key."""
    if len(value) > QOS_QUANTITY_CHARS:
        raise InvalidArgument(
            f"{key}: a quantity has at most {QOS_QUANTITY_CHARS} characters, got {len(value)}"
        )
    try:
        return parse_quantity(value, key)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def zero_detection(parameters: dict[str, str]) -> bool:
    """The `zeroDetection` StorageClass parameter: "true" (the default) or "false"."""
    value = parameters.get(ZERO_DETECTION, "true")
    if value.lower() not in ("true", "false"):
        shown = value if len(value) <= 64 else value[:61] + "..."
        raise InvalidArgument(f'{ZERO_DETECTION} must be "true" or "false", got {shown!r}')
    return value.lower() == "true"


def key_list(keys: list[str]) -> str:
    """Parameter keys for an error message, each cut short: a message must stay small enough
    for the status trailer whatever the request held."""
    shown = [k if len(k) <= 64 else k[:61] + "..." for k in sorted(keys)[:8]]
    return ", ".join(shown) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def encrypted_parameter(parameters: Mapping[str, str]) -> bool:
    value = parameters.get(ENCRYPTED, "false")
    if value not in ("true", "false"):
        raise InvalidArgument(f"parameter {ENCRYPTED} {value[:32]!r} is not true or false")
    return value == "true"


def check_mutable(parameters: dict[str, str]) -> dict[str, str]:
    unknown = [k for k in parameters if k not in QOS_PARAMETERS]
    if unknown:
        raise InvalidArgument(
            f"mutable parameters {key_list(unknown)} are not supported "
            f"(supported: {', '.join(QOS_PARAMETERS)})"
        )
    qos_parameters(parameters)  # every value checked before anything changes
    return parameters


def split_id(value: str, kind: str) -> tuple[str, str] | None:
    """(storage node id, local id), or None when `value` cannot name anything of ours."""
    node_id, sep, local = value.partition(":")
    if not sep or not node_id or not _LOCAL_ID[kind].match(local):
        return None
    return node_id, local


@dataclass(frozen=True)
class NodeId:
    """A node id as the node plugin reports it (docs/csi-driver.md): `NAME@ADDRESS`, or
    `NAME@ADDRESS;max-volumes=N` when the node limits how many volumes it attaches. The
    name alone identifies the node: attachments made under an older form of its id (before
    the limit was added, or before its address changed) are still the node's."""

    name: str
    address: str
    max_volumes: int = 0  # 0: the node did not say

    @classmethod
    def parse(cls, value: str) -> NodeId | None:
        head, _, options = value.partition(";")
        name, sep, address = head.rpartition("@")
        if not sep or not name:
            return None
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return None
        max_volumes = 0
        if options:
            key, _, number = options.partition("=")
            if key != "max-volumes" or not number.isdigit() or int(number) < 1:
                return None
            max_volumes = int(number)
        return cls(name, address, max_volumes)


def node_name(node_id: str) -> str:
    """The node's name in any form of node id (the whole string if it has no `@`)."""
    head = node_id.partition(";")[0]
    name, sep, _ = head.rpartition("@")
    return name if sep else head


# A refusal for room (the tenant's quota, checked here or by the storage node's fence, or the
# storage node's own capacity) must be a final error for the sidecars, else it means "still in
# progress" and they retry the same request until it passes, after the user changed their mind:
# - csi-resizer (pkg/util IsFinalError) treats CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE,
#   RESOURCE_EXHAUSTED and ABORTED as in progress: the PVC stays ControllerResizeInProgress at
#   the refused size and grows to it once the quota allows, even after the request was lowered.
#   INVALID_ARGUMENT, OUT_OF_RANGE and NOT_FOUND are final *and* infeasible
#   (IsResizeInfeasibleError): the PVC becomes ControllerResizeInfeasible, and with
#   RecoverVolumeExpansionFailure the resizer then expands to whatever the PVC asks now, so a
#   lowered request is what is retried. Hence OUT_OF_RANGE ("Unsupported capacity").
# - csi-snapshotter (isCSIFinalError: the same five codes are not final) keeps the content's
#   "volumesnapshot-being-created" annotation after a non-final error and keeps calling
#   CreateSnapshot; while that annotation is there it never deletes the content, so a deleted
#   VolumeSnapshot's create is retried until it succeeds and the snapshot outlives its owner.
#   After a final error the annotation is removed; a content without a snapshot handle is then
#   deleted without any DeleteSnapshot call. Hence FAILED_PRECONDITION, although the spec's
#   table lists RESOURCE_EXHAUSTED for "not enough space" (docs/csi-driver.md).
EXPANSION_REFUSED = "lower the requested size, or raise the quota and ask again"
SNAPSHOT_REFUSED = "nothing was created; delete snapshots or raise the quota, then ask again"


def _final_refusal(exc: CsiError, final: type[CsiError], advice: str) -> CsiError:
    """`exc` itself, or `final` with its message when it is a refusal for room."""
    if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return exc
    return final(f"{exc}; {advice}")


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class InFlight:
    """Keys of calls in progress; a second call on the same key fails fast with ABORTED
    (csi-spec: "Operation pending for volume"), never waits behind a global lock."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    @contextlib.contextmanager
    def guard(self, key: str) -> Iterator[None]:
        if key in self._keys:
            raise Aborted(f"an operation on {key} is already in progress; retry")
        self._keys.add(key)
        try:
            yield
        finally:
            self._keys.discard(key)


# -- the service ------------------------------------------------------------------------------


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, nodes: StorageNodes, quotas: TenantQuotas) -> None:
        self.nodes = nodes
        self.quotas = quotas
        self._node_locks: dict[str, asyncio.Lock] = {}
        self.inflight = InFlight()

    # -- lookups ---------------------------------------------------------------------------

    def _node(self, node_id: str, what: str) -> StorageNodeClient | None:
        node = self.nodes.get(node_id)
        if node is None and self.nodes.discovered:
            # Found through a Service: a node missing now may come back with its volumes.
            raise Unavailable(f"{what} is on storage node {node_id}, which is not in service")
        return node

    async def _find(self, csi_id: str, kind: str) -> tuple[StorageNodeClient, Any] | None:
        """The storage node and its object for a CSI volume ("vol") or snapshot ("snap") id,
        or None when the id names nothing (malformed, unknown node, gone)."""
        parts = split_id(csi_id, kind)
        if parts is None:
            return None
        node = self._node(parts[0], csi_id)
        if node is None:
            return None
        request: Any
        if kind == "vol":
            method, request = "GetVolume", sn.GetVolumeRequest(volume_id=parts[1])
        else:
            method, request = "GetSnapshot", sn.GetSnapshotRequest(snapshot_id=parts[1])
        try:
            return node, await node.call(method, request)
        except StorageNodeError as exc:
            if exc.node_code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def _volume(self, volume_id: str) -> tuple[StorageNodeClient, sn.Volume] | None:
        return await self._find(volume_id, "vol")

    async def _existing_volume(self, volume_id: str) -> tuple[StorageNodeClient, sn.Volume]:
        found = await self._volume(volume_id)
        if found is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return found

    async def _snapshot(self, snapshot_id: str) -> tuple[StorageNodeClient, sn.Snapshot] | None:
        return await self._find(snapshot_id, "snap")

    async def _by_name(self, method: str, name: str) -> tuple[StorageNodeClient, Any] | None:
        request_type = {
            "ListVolumes": sn.ListVolumesRequest,
            "ListSnapshots": sn.ListSnapshotsRequest,
        }
        field = "volumes" if method == "ListVolumes" else "snapshots"
        found = await self.nodes.every(
            lambda n: n.call(method, request_type[method](name=name)), f"look up {name!r}"
        )
        hits = [(node, getattr(reply, field)[0]) for node, reply in found if getattr(reply, field)]
        if len(hits) > 1:
            nodes = ", ".join(n.id for n, _ in hits)
            raise FailedPrecondition(f"{name!r} exists on several storage nodes ({nodes})")
        return hits[0] if hits else None

    # -- volumes ---------------------------------------------------------------------------

    def _csi_volume(
        self, node: StorageNodeClient, v: sn.Volume, topology: dict[str, str]
    ) -> pb.Volume:
        volume = pb.Volume(
            capacity_bytes=v.size_bytes,
            volume_id=f"{node.id}:{v.id}",
            volume_context={CTX_STORAGE_NODE: node.id, CTX_TENANT: v.tenant},
        )
        if v.labels.get(ENCRYPTED_LABEL) == "true":
            volume.volume_context[CTX_ENCRYPTED] = "true"
        source = v.source.WhichOneof("source")
        if source == "snapshot_id":
            volume.content_source.snapshot.snapshot_id = f"{node.id}:{v.source.snapshot_id}"
        elif source == "volume_id":
            volume.content_source.volume.volume_id = f"{node.id}:{v.source.volume_id}"
        if topology:
            volume.accessible_topology.append(pb.Topology(segments=topology))
        return volume

    @rpc
    async def CreateVolume(
        self, request: pb.CreateVolumeRequest, context: Any
    ) -> pb.CreateVolumeResponse:
        name = check_name(request.name, "name")
        require(request.volume_capabilities, "volume_capabilities")
        access = Access.of(request.volume_capabilities)
        parameters = dict(request.parameters)
        unknown = [
            k for k in parameters if k not in CREATE_PARAMETERS and not k.startswith(CO_PREFIX)
        ]
        if unknown:
            raise InvalidArgument(
                f"unknown parameters {key_list(unknown)} (known: {', '.join(CREATE_PARAMETERS)})"
            )
        thin = zero_detection(parameters)
        # A VolumeAttributesClass's parameters take precedence over the StorageClass's
        # (csi-spec, CreateVolumeRequest.mutable_parameters).
        qos = qos_parameters({**parameters, **check_mutable(dict(request.mutable_parameters))})
        tenant = parameters.get(PVC_NAMESPACE) or DEFAULT_TENANT
        labels = {k: v for k, v in parameters.items() if k in (PVC_NAMESPACE, PVC_NAME, PV_NAME)}
        labels.update(access.labels())
        if encrypted_parameter(parameters):
            labels[ENCRYPTED_LABEL] = "true"
        capacity = request.capacity_range if request.HasField("capacity_range") else None

        with self.inflight.guard(f"volume name {request.name}"):
            source_node, source, source_size = await self._content_source(request, tenant)
            existing = await self._by_name("ListVolumes", name)
            if existing is not None:
                node, volume = existing
                self._check_same_volume(
                    request, node, volume, access, tenant, source, capacity, qos, thin
                )
                volume = await self._wait_ready(node, volume)
                return pb.CreateVolumeResponse(
                    volume=self._csi_volume(node, volume, await node.topology())
                )

            size = size_for(capacity, source_size)
            node = source_node or await self._place(size, request.accessibility_requirements)
            if source_node is not None:
                await self._check_topology(node, request.accessibility_requirements)
            async with self.quotas.admit(
                tenant,
                node,
                capacity_bytes=size,
                volumes=1,
                what=f"volume {request.name!r}",
            ):
                volume = await node.call(
                    "CreateVolume",
                    sn.CreateVolumeRequest(
                        name=name,
                        tenant=tenant,
                        size_bytes=size,
                        source=source,
                        qos=qos,
                        labels=labels,
                        zero_detection_disabled=not thin,
                    ),
                )
            log.info(
                "volume %s:%s (%s, tenant %s, %d bytes) created",
                node.id,
                volume.id,
                request.name,
                tenant,
                size,
            )
            volume = await self._wait_ready(node, volume)
            return pb.CreateVolumeResponse(
                volume=self._csi_volume(node, volume, await node.topology())
            )

    async def _content_source(
        self, request: pb.CreateVolumeRequest, tenant: str
    ) -> tuple[StorageNodeClient | None, sn.VolumeSource | None, int]:
        if not request.HasField("volume_content_source"):
            return None, None, 0
        kind = request.volume_content_source.WhichOneof("type")
        if kind == "snapshot":
            sid = request.volume_content_source.snapshot.snapshot_id
            require(sid, "volume_content_source.snapshot.snapshot_id")
            found_snap = await self._snapshot(sid)
            if found_snap is None:
                raise NotFound(f"source snapshot {sid} does not exist")
            node, snap = found_snap
            if snap.tenant != tenant:
                raise InvalidArgument(f"source snapshot {sid} belongs to another tenant")
            return node, sn.VolumeSource(snapshot_id=snap.id), snap.size_bytes
        if kind == "volume":
            vid = request.volume_content_source.volume.volume_id
            require(vid, "volume_content_source.volume.volume_id")
            found_vol = await self._volume(vid)
            if found_vol is None:
                raise NotFound(f"source volume {vid} does not exist")
            node, vol = found_vol
            if vol.tenant != tenant:
                raise InvalidArgument(f"source volume {vid} belongs to another tenant")
            return node, sn.VolumeSource(volume_id=vol.id), vol.size_bytes
        raise InvalidArgument("volume_content_source needs a snapshot or a volume")

    @staticmethod
    def _check_same_volume(
        request: pb.CreateVolumeRequest,
        node: StorageNodeClient,
        volume: sn.Volume,
        access: Access,
        tenant: str,
        source: sn.VolumeSource | None,
        capacity: pb.CapacityRange | None,
        qos: sn.Qos,
        thin: bool = True,
    ) -> None:
        """A retried CreateVolume gets the volume it made; another request under the same
        name gets ALREADY_EXISTS (csi-spec, CreateVolume errors)."""
        want_source = source if source is not None else sn.VolumeSource()
        differences = []
        if volume.tenant != tenant:
            differences.append(f"tenant {volume.tenant!r}")
        if Access.of_volume(volume) != access:
            differences.append("other access type or modes")
        if volume.source != want_source:
            differences.append("another content source")
        if volume.qos != qos:
            differences.append(f"QoS {volume.qos.iops} IOPS, {volume.qos.bytes_per_second} B/s")
        encrypted = volume.labels.get(ENCRYPTED_LABEL) == "true"
        if encrypted != encrypted_parameter(request.parameters):
            differences.append("encryption" if encrypted else "no encryption")
        if volume.zero_detection_disabled == thin:
            differences.append(f"{ZERO_DETECTION} {str(not thin).lower()}")
        required = capacity.required_bytes if capacity is not None else 0
        limit = capacity.limit_bytes if capacity is not None else 0
        if volume.size_bytes < required or (limit and volume.size_bytes > limit):
            differences.append(f"{volume.size_bytes} bytes")
        if differences:
            raise AlreadyExists(
                f"volume {request.name!r} already exists ({node.id}:{volume.id}) with "
                + ", ".join(differences)
            )

    async def _wait_ready(self, node: StorageNodeClient, volume: sn.Volume) -> sn.Volume:
        deadline = time.monotonic() + READY_WAIT
        while volume.state == sn.VOLUME_STATE_CREATING and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            volume = await node.call("GetVolume", sn.GetVolumeRequest(volume_id=volume.id))
        if volume.state == sn.VOLUME_STATE_CREATING:
            raise Aborted(f"volume {volume.name!r} is still being filled from its source; retry")
        if volume.state == sn.VOLUME_STATE_FAILED:
            raise FailedPrecondition(
                f"volume {volume.name!r} could not be filled from its source ({volume.error}); "
                "delete it and create it again"
            )
        return volume

    async def _matches(self, node: StorageNodeClient, topologies: Sequence[pb.Topology]) -> bool:
        if not topologies:
            return True
        segments = await node.topology()
        # NODE_TOPOLOGY_KEY only names the consuming node, whom every storage node serves.
        return any(
            all(segments.get(k) == v for k, v in t.segments.items() if k != NODE_TOPOLOGY_KEY)
            for t in topologies
        )

    async def _check_topology(
        self, node: StorageNodeClient, requirement: pb.TopologyRequirement
    ) -> None:
        if not await self._matches(node, requirement.requisite):
            raise ResourceExhausted(
                f"the source is on storage node {node.id}, outside the requisite topology"
            )

    async def _place(self, size: int, requirement: pb.TopologyRequirement) -> StorageNodeClient:
        """The node with the most available capacity among those in the requisite topology,
        the preferred topologies first (csi-spec, TopologyRequirement)."""
        capacities = await self.nodes.every(
            lambda n: n.call("GetCapacity", sn.GetCapacityRequest()), "place the volume"
        )
        candidates = []
        for node, capacity in capacities:
            if not await self._matches(node, requirement.requisite):
                continue
            preferred = 0
            for rank, topology in enumerate(requirement.preferred):
                if await self._matches(node, [topology]):
                    preferred = len(requirement.preferred) - rank
                    break
            candidates.append((preferred, capacity.available_bytes, node))
        if not candidates:
            raise ResourceExhausted("no storage node is in the requested topology")
        fitting = [c for c in candidates if c[1] >= size]
        if not fitting:
            most = max(c[1] for c in candidates)
            raise ResourceExhausted(
                f"no storage node has {human(size)} available (the most is {human(most)})"
            )
        fitting.sort(key=lambda c: (c[0], c[1]), reverse=True)
        return fitting[0][2]

    @rpc
    async def DeleteVolume(
        self, request: pb.DeleteVolumeRequest, context: Any
    ) -> pb.DeleteVolumeResponse:
        require(request.volume_id, "volume_id")
        with self.inflight.guard(request.volume_id):
            found = await self._volume(request.volume_id)
            if found is None:
                return pb.DeleteVolumeResponse()  # already gone: OK (csi-spec, DeleteVolume)
            node, volume = found
            try:
                await node.call("DeleteVolume", sn.DeleteVolumeRequest(volume_id=volume.id))
            except StorageNodeError as exc:
                if exc.node_code != grpc.StatusCode.NOT_FOUND:
                    raise
            log.info("volume %s deleted", request.volume_id)
        await self.quotas.report(volume.tenant)
        return pb.DeleteVolumeResponse()

    # -- publishing ------------------------------------------------------------------------

    @rpc
    async def ControllerPublishVolume(
        self, request: pb.ControllerPublishVolumeRequest, context: Any
    ) -> pb.ControllerPublishVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.node_id, "node_id")
        require(request.HasField("volume_capability"), "volume_capability")
        check_capability(request.volume_capability)
        target = NodeId.parse(request.node_id)
        if target is None:
            raise NotFound(f"node {request.node_id!r} does not exist (node ids are NAME@ADDRESS)")
        with self.inflight.guard(request.volume_id):
            node, volume = await self._existing_volume(request.volume_id)
            why = Access.of_volume(volume).allows(request.volume_capability)
            if why:
                raise InvalidArgument(f"volume {request.volume_id} cannot be published so: {why}")
            mode = request.volume_capability.access_mode.mode
            # One publish per node at a time while its attachments are counted, so two
            # concurrent publishes cannot both take the last slot.
            async with self._node_locks.setdefault(target.name, asyncio.Lock()):
                if target.max_volumes:
                    await self._check_attach_limit(target, f"{node.id}:{volume.id}")
                attachment = await node.call(
                    "Publish",
                    sn.PublishRequest(
                        volume_id=volume.id,
                        node_id=request.node_id,
                        node_address=target.address,
                        readonly=request.readonly or mode in READER_MODES,
                        multi_node=mode in MULTI_NODE_MODES,
                    ),
                )
        return pb.ControllerPublishVolumeResponse(
            publish_context={
                CTX_HOST: attachment.nbd_host,
                CTX_PORT: str(attachment.nbd_port),
                CTX_EXPORT: attachment.export_name,
                CTX_READONLY: "true" if attachment.readonly else "false",
            }
        )

    async def _check_attach_limit(self, target: NodeId, volume_id: str) -> None:
        """RESOURCE_EXHAUSTED when the node has `max_volumes` other volumes attached, counted
        on every storage node (csi-spec, ControllerPublishVolume: "Max volumes attached").
        A storage node that does not answer is left out of the count with a warning: its
        volumes cannot be staged meanwhile, and refusing every publish during its outage would
        stop VMs whose volumes are elsewhere (the scheduler enforces the limit too)."""
        nodes = list(self.nodes)
        replies = await asyncio.gather(
            *(n.call("ListAttachments", sn.ListAttachmentsRequest()) for n in nodes),
            return_exceptions=True,
        )
        attached: set[str] = set()
        for node, reply in zip(nodes, replies, strict=True):
            if isinstance(reply, StorageNodeError):
                log.warning("attach limit of %s: %s not counted: %s", target.name, node.id, reply)
                continue
            if isinstance(reply, BaseException):
                raise reply
            attached.update(
                f"{node.id}:{a.volume_id}"
                for a in reply.attachments
                if node_name(a.node_id) == target.name
            )
        attached.discard(volume_id)  # published again (idempotent), or already there
        if len(attached) >= target.max_volumes:
            raise ResourceExhausted(
                f"node {target.name} has {len(attached)} volumes attached, its limit is "
                f"{target.max_volumes}"
            )

    @rpc
    async def ControllerUnpublishVolume(
        self, request: pb.ControllerUnpublishVolumeRequest, context: Any
    ) -> pb.ControllerUnpublishVolumeResponse:
        require(request.volume_id, "volume_id")
        with self.inflight.guard(request.volume_id):
            found = await self._volume(request.volume_id)
            if found is None:
                # Gone volumes are unpublished everywhere: OK, so the attacher can finish.
                return pb.ControllerUnpublishVolumeResponse()
            node, volume = found
            reply = await node.call(
                "ListAttachments", sn.ListAttachmentsRequest(volume_id=volume.id)
            )
            node_ids = [a.node_id for a in reply.attachments]
            if request.node_id:
                # The node's attachments under any form of its id (NodeId): one made before
                # its plugin reported the limit, or before its address changed, is still its.
                # A node id of no valid form names no node: nothing is attached to it.
                target = NodeId.parse(request.node_id)
                node_ids = [n for n in node_ids if target and node_name(n) == target.name]
            # else: no node: unpublish from every node (csi-spec, ControllerUnpublishVolume)
            for node_id in node_ids:
                await node.call(
                    "Unpublish", sn.UnpublishRequest(volume_id=volume.id, node_id=node_id)
                )
        return pb.ControllerUnpublishVolumeResponse()

    @rpc
    async def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest, context: Any
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        require(request.volume_id, "volume_id")
        require(request.volume_capabilities, "volume_capabilities")
        _, volume = await self._existing_volume(request.volume_id)
        access = Access.of_volume(volume)
        for capability in request.volume_capabilities:
            try:
                why = access.allows(capability)
            except InvalidArgument as exc:
                why = str(exc)
            if why:
                return pb.ValidateVolumeCapabilitiesResponse(message=why)
        unknown = [
            k
            for k in request.parameters
            if k not in CREATE_PARAMETERS and not k.startswith(CO_PREFIX)
        ]
        if unknown:
            return pb.ValidateVolumeCapabilitiesResponse(
                message=f"unknown parameters {key_list(unknown)}"
            )
        return pb.ValidateVolumeCapabilitiesResponse(
            confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
                mutable_parameters=request.mutable_parameters,
            )
        )

    # -- listing ---------------------------------------------------------------------------

    async def _pages(
        self,
        token: str,
        max_entries: int,
        fetch: Callable[[StorageNodeClient, str, int], Awaitable[tuple[list[Any], str]]],
    ) -> tuple[list[tuple[StorageNodeClient, Any]], str]:
        """Walk the nodes in id order, each one's own pages, up to `max_entries` items.
        The token is `NODE:NODE_PAGE_TOKEN`; a bad one is ABORTED (csi-spec, ListVolumes)."""
        if max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        nodes = list(self.nodes)
        start, page = 0, ""
        if token:
            node_id, sep, page = token.partition(":")
            ids = [n.id for n in nodes]
            if not sep or node_id not in ids:
                raise Aborted(f"starting_token {token!r} is not valid; start again")
            start = ids.index(node_id)
        items: list[tuple[StorageNodeClient, Any]] = []
        for index in range(start, len(nodes)):
            node = nodes[index]
            while True:
                want = max_entries - len(items) if max_entries else 0
                try:
                    rows, page = await fetch(node, page, want)
                except StorageNodeError as exc:
                    if exc.node_code == grpc.StatusCode.INVALID_ARGUMENT:
                        raise Aborted(
                            f"starting_token {token!r} is not valid; start again"
                        ) from None
                    raise
                items += [(node, r) for r in rows]
                if max_entries and len(items) >= max_entries:
                    if page:
                        return items, f"{node.id}:{page}"
                    if index + 1 < len(nodes):
                        return items, f"{nodes[index + 1].id}:"
                    return items, ""
                if not page:
                    break
            page = ""
        return items, ""

    @rpc
    async def ListVolumes(
        self, request: pb.ListVolumesRequest, context: Any
    ) -> pb.ListVolumesResponse:
        async def fetch(node: StorageNodeClient, page: str, size: int) -> tuple[list[Any], str]:
            reply = await node.call(
                "ListVolumes", sn.ListVolumesRequest(page_size=size, page_token=page)
            )
            return list(reply.volumes), reply.next_page_token

        items, next_token = await self._pages(request.starting_token, request.max_entries, fetch)
        published: dict[str, dict[str, list[str]]] = {}
        for node in {n.id: n for n, _ in items}.values():
            reply = await node.call("ListAttachments", sn.ListAttachmentsRequest())
            for a in reply.attachments:
                published.setdefault(node.id, {}).setdefault(a.volume_id, []).append(a.node_id)
        entries = []
        for node, volume in items:
            entries.append(
                pb.ListVolumesResponse.Entry(
                    volume=self._csi_volume(node, volume, await node.topology()),
                    status=pb.ListVolumesResponse.VolumeStatus(
                        published_node_ids=published.get(node.id, {}).get(volume.id, []),
                        volume_condition=condition(volume),
                    ),
                )
            )
        return pb.ListVolumesResponse(entries=entries, next_token=next_token)

    @rpc
    async def ControllerGetVolume(
        self, request: pb.ControllerGetVolumeRequest, context: Any
    ) -> pb.ControllerGetVolumeResponse:
        require(request.volume_id, "volume_id")
        node, volume = await self._existing_volume(request.volume_id)
        reply = await node.call("ListAttachments", sn.ListAttachmentsRequest(volume_id=volume.id))
        return pb.ControllerGetVolumeResponse(
            volume=self._csi_volume(node, volume, await node.topology()),
            status=pb.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=[a.node_id for a in reply.attachments],
                volume_condition=condition(volume),
            ),
        )

    @rpc
    async def GetCapacity(
        self, request: pb.GetCapacityRequest, context: Any
    ) -> pb.GetCapacityResponse:
        for capability in request.volume_capabilities:
            check_capability(capability)
        topologies = (
            [request.accessible_topology] if request.HasField("accessible_topology") else []
        )
        capacities = await self.nodes.every(
            lambda n: n.call("GetCapacity", sn.GetCapacityRequest()), "read capacity"
        )
        available = [c.available_bytes for n, c in capacities if await self._matches(n, topologies)]
        return pb.GetCapacityResponse(
            available_capacity=sum(available),
            maximum_volume_size=wrappers_pb2.Int64Value(value=max(available, default=0)),
            minimum_volume_size=wrappers_pb2.Int64Value(value=BLOCK),
        )

    @rpc
    async def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: Any
    ) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(capabilities=CAPABILITIES)

    # -- snapshots -------------------------------------------------------------------------

    @staticmethod
    def _csi_snapshot(node: StorageNodeClient, s: sn.Snapshot) -> pb.Snapshot:
        return pb.Snapshot(
            size_bytes=s.size_bytes,
            snapshot_id=f"{node.id}:{s.id}",
            source_volume_id=f"{node.id}:{s.volume_id}",
            creation_time=timestamp(s.created_at),
            ready_to_use=s.ready,
            group_snapshot_id=s.group_id,
        )

    @rpc
    async def CreateSnapshot(
        self, request: pb.CreateSnapshotRequest, context: Any
    ) -> pb.CreateSnapshotResponse:
        name = check_name(request.name, "name")
        require(request.source_volume_id, "source_volume_id")
        with self.inflight.guard(f"snapshot name {request.name}"):
            existing = await self._by_name("ListSnapshots", name)
            if existing is not None:
                node, snap = existing
                if f"{node.id}:{snap.volume_id}" != request.source_volume_id:
                    raise AlreadyExists(
                        f"snapshot {request.name!r} already exists for volume "
                        f"{node.id}:{snap.volume_id}"
                    )
                return pb.CreateSnapshotResponse(snapshot=self._csi_snapshot(node, snap))
            node, volume = await self._existing_volume(request.source_volume_id)
            try:
                async with self.quotas.admit(
                    volume.tenant,
                    node,
                    capacity_bytes=volume.size_bytes,
                    snapshots=1,
                    what=f"snapshot {request.name!r}",
                ):
                    snap = await node.call(
                        "CreateSnapshot",
                        sn.CreateSnapshotRequest(name=name, volume_id=volume.id),
                    )
            except CsiError as exc:
                raise _final_refusal(exc, FailedPrecondition, SNAPSHOT_REFUSED) from None
            log.info("snapshot %s:%s of %s created", node.id, snap.id, request.source_volume_id)
            return pb.CreateSnapshotResponse(snapshot=self._csi_snapshot(node, snap))

    @rpc
    async def DeleteSnapshot(
        self, request: pb.DeleteSnapshotRequest, context: Any
    ) -> pb.DeleteSnapshotResponse:
        require(request.snapshot_id, "snapshot_id")
        with self.inflight.guard(request.snapshot_id):
            found = await self._snapshot(request.snapshot_id)
            if found is None:
                return pb.DeleteSnapshotResponse()  # already gone: OK
            node, snap = found
            if snap.group_id:
                # "Snapshot is part of a group" (DeleteSnapshot errors): members go together.
                raise InvalidArgument(
                    f"snapshot {request.snapshot_id} is a member of group snapshot "
                    f"{snap.group_id}; delete the group (DeleteVolumeGroupSnapshot)"
                )
            try:
                await node.call("DeleteSnapshot", sn.DeleteSnapshotRequest(snapshot_id=snap.id))
            except StorageNodeError as exc:
                if exc.node_code != grpc.StatusCode.NOT_FOUND:
                    raise
        await self.quotas.report(snap.tenant)
        return pb.DeleteSnapshotResponse()

    @rpc
    async def ListSnapshots(
        self, request: pb.ListSnapshotsRequest, context: Any
    ) -> pb.ListSnapshotsResponse:
        if request.snapshot_id:
            # One snapshot, or none: an unknown id is an empty list (csi-spec, ListSnapshots).
            found = await self._snapshot(request.snapshot_id)
            if found is None or (
                request.source_volume_id
                and f"{found[0].id}:{found[1].volume_id}" != request.source_volume_id
            ):
                return pb.ListSnapshotsResponse()
            entry = pb.ListSnapshotsResponse.Entry(snapshot=self._csi_snapshot(*found))
            return pb.ListSnapshotsResponse(entries=[entry])
        volume_filter = ""
        only: StorageNodeClient | None = None
        if request.source_volume_id:
            parts = split_id(request.source_volume_id, "vol")
            only = self._node(parts[0], request.source_volume_id) if parts else None
            if parts is None or only is None:
                return pb.ListSnapshotsResponse()
            volume_filter = parts[1]

        async def fetch(node: StorageNodeClient, page: str, size: int) -> tuple[list[Any], str]:
            if only is not None and node.id != only.id:
                return [], ""
            reply = await node.call(
                "ListSnapshots",
                sn.ListSnapshotsRequest(volume_id=volume_filter, page_size=size, page_token=page),
            )
            return list(reply.snapshots), reply.next_page_token

        items, next_token = await self._pages(request.starting_token, request.max_entries, fetch)
        entries = [
            pb.ListSnapshotsResponse.Entry(snapshot=self._csi_snapshot(n, s)) for n, s in items
        ]
        return pb.ListSnapshotsResponse(entries=entries, next_token=next_token)

    @rpc
    async def GetSnapshot(
        self, request: pb.GetSnapshotRequest, context: Any
    ) -> pb.GetSnapshotResponse:
        require(request.snapshot_id, "snapshot_id")
        found = await self._snapshot(request.snapshot_id)
        if found is None:
            raise NotFound(f"snapshot {request.snapshot_id} does not exist")
        return pb.GetSnapshotResponse(snapshot=self._csi_snapshot(*found))

    # -- changing volumes ------------------------------------------------------------------

    @rpc
    async def ControllerExpandVolume(
        self, request: pb.ControllerExpandVolumeRequest, context: Any
    ) -> pb.ControllerExpandVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.HasField("capacity_range"), "capacity_range")
        if request.HasField("volume_capability"):
            check_capability(request.volume_capability)
        with self.inflight.guard(request.volume_id):
            node, volume = await self._existing_volume(request.volume_id)
            if request.HasField("volume_capability"):
                why = Access.of_volume(volume).allows(request.volume_capability)
                if why:
                    raise InvalidArgument(f"volume {request.volume_id}: {why}")
            size = size_for(request.capacity_range, current=volume.size_bytes)
            if size > volume.size_bytes:
                grow = size - volume.size_bytes
                try:
                    async with self.quotas.admit(
                        volume.tenant,
                        node,
                        capacity_bytes=grow,
                        what=f"growing volume {request.volume_id}",
                    ):
                        volume = await node.call(
                            "ExpandVolume",
                            sn.ExpandVolumeRequest(volume_id=volume.id, size_bytes=size),
                        )
                except CsiError as exc:
                    raise _final_refusal(exc, OutOfRange, EXPANSION_REFUSED) from None
                log.info("volume %s grown to %d bytes", request.volume_id, size)
        # The node plugin refreshes the device size and grows a filesystem: needed for both
        # access types, since a block device's size is the kernel's copy of the NBD size.
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=volume.size_bytes, node_expansion_required=True
        )

    @rpc
    async def ControllerModifyVolume(
        self, request: pb.ControllerModifyVolumeRequest, context: Any
    ) -> pb.ControllerModifyVolumeResponse:
        require(request.volume_id, "volume_id")
        require(request.mutable_parameters, "mutable_parameters")
        parameters = check_mutable(dict(request.mutable_parameters))
        with self.inflight.guard(request.volume_id):
            node, volume = await self._existing_volume(request.volume_id)
            qos = qos_parameters(parameters, volume.qos)
            if qos != volume.qos:
                await node.call(
                    "SetVolumeQos", sn.SetVolumeQosRequest(volume_id=volume.id, qos=qos)
                )
                log.info(
                    "volume %s QoS now %d IOPS, %d B/s",
                    request.volume_id,
                    qos.iops,
                    qos.bytes_per_second,
                )
        return pb.ControllerModifyVolumeResponse()


def condition(volume: sn.Volume) -> pb.VolumeCondition:
    if volume.state == sn.VOLUME_STATE_FAILED:
        return pb.VolumeCondition(
            abnormal=True, message=f"filling from its source failed: {volume.error}"
        )
    if volume.state == sn.VOLUME_STATE_CREATING:
        return pb.VolumeCondition(abnormal=False, message="being filled from its source")
    return pb.VolumeCondition(abnormal=False, message="ready")


# -- lifecycle --------------------------------------------------------------------------------


class ControllerService:
    """The servicer plus its background work: storage node discovery and quota reports."""

    def __init__(
        self,
        config: Config,
        nodes: StorageNodes,
        kube: KubeClient | None,
        registry: CollectorRegistry,
    ) -> None:
        self.config = config
        self.nodes = nodes
        self.kube = kube
        self.quotas = TenantQuotas(kube, nodes, registry)
        self.servicer = ControllerServicer(nodes, self.quotas)
        from .group_controller import GroupControllerServicer

        self.group_servicer = GroupControllerServicer(self.servicer, registry)
        self._tasks: list[asyncio.Task[None]] = []

    async def _discover_forever(self) -> None:
        assert self.kube is not None
        namespace, service = self.config.kube.storage_node_service.split("/")
        while True:
            try:
                targets = await self.kube.service_endpoints(namespace, service, "api")
                await self.nodes.discover(targets)
            except KubeError as exc:
                log.warning("storage nodes not discovered: %s", exc)
            await asyncio.sleep(DISCOVERY_INTERVAL)

    def start(self) -> None:
        if self.kube is not None and self.config.kube.storage_node_service:
            self._tasks.append(asyncio.create_task(self._discover_forever()))
        if self.kube is not None:
            self._tasks.append(asyncio.create_task(self.quotas.run()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.quotas.close()
        if self.kube is not None:
            self.kube.close()


async def start(
    config: Config, nodes: StorageNodes, registry: CollectorRegistry
) -> ControllerService:
    service = ControllerService(config, nodes, KubeClient.from_options(config.kube), registry)
    service.start()
    return service
