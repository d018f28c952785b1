"""The management API over gRPC (proto/storage_node/v1/storage_node.proto).

Owns the translation between protobuf messages and storage_node.volumes.VolumeService calls,
the bearer-token check, and the one place where domain errors become gRPC statuses (`_rpc`).
Servicer methods only convert: every rule lives in the service.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from .errors import InvalidArgument, StorageError, status_mapper
from .groups import GroupSnapshots
from .store import AttachmentRow, GoldenImageRow, SnapshotRow, TenantLimits, VolumeRow
from .v1 import storage_node_pb2 as pb
from .v1 import storage_node_pb2_grpc as pb_grpc
from .volumes import NodeSettings, VolumeService

log = logging.getLogger("storage_node.api")

_STATES = {
    "creating": pb.VOLUME_STATE_CREATING,
    "ready": pb.VOLUME_STATE_READY,
    "deleting": pb.VOLUME_STATE_DELETING,
    "failed": pb.VOLUME_STATE_FAILED,
}
_GROUP_STATES = {
    "prepared": pb.GROUP_STATE_PREPARED,
    "held": pb.GROUP_STATE_HELD,
    "committed": pb.GROUP_STATE_COMMITTED,
}
_FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: "",
    pb.IMAGE_FORMAT_RAW: "raw",
    pb.IMAGE_FORMAT_QCOW2: "qcow2",
}


_rpc = status_mapper(StorageError, log)

# A List reply is cut at this many bytes as well as at page_size, so it always fits gRPC's
# default 4 MiB message limit (with room for the envelope); the next page starts after the
# last item sent. One item alone is always sent: labels are bounded far below this.
PAGE_BYTES = 3 * 1024 * 1024
_ITEM_OVERHEAD = 8  # field tag and length prefix of a repeated message


def cut_by_bytes(items: list[Any], token: str) -> tuple[list[Any], str]:
    """The longest prefix of `items` within PAGE_BYTES, and the token of the page after it."""
    total = 0
    for i, item in enumerate(items):
        total += item.ByteSize() + _ITEM_OVERHEAD
        if i and total > PAGE_BYTES:
            return items[:i], items[i - 1].id
    return items, token


def volume_pb(v: VolumeRow) -> pb.Volume:
    source = pb.VolumeSource()
    if v.source_kind:
        setattr(source, f"{v.source_kind}_id", v.source_id)
    return pb.Volume(
        id=v.id,
        name=v.name,
        tenant=v.tenant,
        size_bytes=v.size,
        state=_STATES[v.state],
        source=source,
        qos=pb.Qos(iops=v.qos_iops, bytes_per_second=v.qos_bps),
        labels=v.labels,
        created_at=v.created_at,
        error=v.error,
        zero_detection_disabled=not v.zero_detection,
    )


def snapshot_pb(s: SnapshotRow) -> pb.Snapshot:
    return pb.Snapshot(
        id=s.id,
        name=s.name,
        volume_id=s.volume_id,
        tenant=s.tenant,
        size_bytes=s.size,
        ready=s.ready,
        created_at=s.created_at,
        group_id=s.group_id,
    )


def image_pb(i: GoldenImageRow) -> pb.Image:
    return pb.Image(
        id=i.id,
        name=i.name,
        size_bytes=i.size,
        ready=i.ready,
        created_at=i.created_at,
        error=i.error,
    )


def group_pb(group_id: str, state: str, rows: list[SnapshotRow], held: float = 0.0) -> Any:
    return pb.GroupSnapshot(
        group_id=group_id,
        state=_GROUP_STATES[state],
        snapshots=[snapshot_pb(s) for s in rows],
        held_seconds=held,
    )


class ManagementServicer(pb_grpc.StorageNodeServicer):
    def __init__(
        self,
        service: VolumeService,
        settings: NodeSettings,
        version: str,
        groups: GroupSnapshots | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.version = version
        self.groups = groups if groups is not None else GroupSnapshots(service)

    def _attachment_pb(self, a: AttachmentRow) -> pb.Attachment:
        host, port = self.settings.nbd_host, self.settings.nbd_port
        return pb.Attachment(
            volume_id=a.volume_id,
            node_id=a.node_id,
            node_address=a.node_address,
            readonly=a.readonly,
            nbd_host=host,
            nbd_port=port,
            export_name=a.export_name,
            uri=f"nbd://{host}:{port}/{a.export_name}",
        )

    @_rpc
    async def GetNodeInfo(self, request: Any, context: Any) -> pb.NodeInfo:
        s = self.settings
        return pb.NodeInfo(
            node_id=s.node_id,
            topology=s.topology,
            nbd_host=s.nbd_host,
            nbd_port=s.nbd_port,
            version=self.version,
        )

    @_rpc
    async def GetCapacity(self, request: Any, context: Any) -> pb.Capacity:
        c = await self.service.capacity()
        return pb.Capacity(
            total_bytes=c.total,
            free_bytes=c.free,
            provisioned_bytes=c.provisioned,
            allocated_bytes=c.allocated,
            overcommit_ratio=c.overcommit_ratio,
            available_bytes=c.available,
        )

    @_rpc
    async def CreateVolume(self, request: pb.CreateVolumeRequest, context: Any) -> pb.Volume:
        which = request.source.WhichOneof("source") if request.HasField("source") else None
        source = (which.removesuffix("_id"), getattr(request.source, which)) if which else None
        row = await self.service.create_volume(
            request.name,
            request.tenant,
            request.size_bytes,
            source,
            (request.qos.iops, request.qos.bytes_per_second),
            dict(request.labels),
            zero_detection=not request.zero_detection_disabled,
        )
        return volume_pb(row)

    @_rpc
    async def GetVolume(self, request: pb.GetVolumeRequest, context: Any) -> pb.Volume:
        return volume_pb(await self.service.get_volume(request.volume_id))

    @_rpc
    async def ListVolumes(
        self, request: pb.ListVolumesRequest, context: Any
    ) -> pb.ListVolumesResponse:
        rows, token = await self.service.list_volumes(
            request.tenant, request.page_size, request.page_token, request.name
        )
        volumes, token = cut_by_bytes([volume_pb(v) for v in rows], token)
        return pb.ListVolumesResponse(volumes=volumes, next_page_token=token)

    @_rpc
    async def DeleteVolume(
        self, request: pb.DeleteVolumeRequest, context: Any
    ) -> pb.DeleteVolumeResponse:
        await self.service.delete_volume(request.volume_id)
        return pb.DeleteVolumeResponse()

    @_rpc
    async def ExpandVolume(self, request: pb.ExpandVolumeRequest, context: Any) -> pb.Volume:
        return volume_pb(await self.service.expand_volume(request.volume_id, request.size_bytes))

    @_rpc
    async def SetVolumeQos(self, request: pb.SetVolumeQosRequest, context: Any) -> pb.Volume:
        row = await self.service.set_volume_qos(
            request.volume_id, request.qos.iops, request.qos.bytes_per_second
        )
        return volume_pb(row)

    @_rpc
    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: Any) -> pb.Snapshot:
        return snapshot_pb(await self.service.create_snapshot(request.name, request.volume_id))

    @_rpc
    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context: Any) -> pb.Snapshot:
        return snapshot_pb(await self.service.get_snapshot(request.snapshot_id))

    @_rpc
    async def ListSnapshots(
        self, request: pb.ListSnapshotsRequest, context: Any
    ) -> pb.ListSnapshotsResponse:
        rows, token = await self.service.list_snapshots(
            request.tenant,
            request.volume_id,
            request.page_size,
            request.page_token,
            request.name,
            request.group_id,
        )
        snapshots, token = cut_by_bytes([snapshot_pb(s) for s in rows], token)
        return pb.ListSnapshotsResponse(snapshots=snapshots, next_page_token=token)

    @_rpc
    async def DeleteSnapshot(
        self, request: pb.DeleteSnapshotRequest, context: Any
    ) -> pb.DeleteSnapshotResponse:
        await self.service.delete_snapshot(request.snapshot_id)
        return pb.DeleteSnapshotResponse()

    @_rpc
    async def PrepareGroupSnapshot(
        self, request: pb.PrepareGroupSnapshotRequest, context: Any
    ) -> pb.GroupSnapshot:
        members = [(m.name, m.volume_id) for m in request.members]
        state, rows = await self.groups.prepare(request.group_id, members, request.lease_seconds)
        return group_pb(request.group_id, state, rows)

    @_rpc
    async def HoldGroupSnapshot(
        self, request: pb.HoldGroupSnapshotRequest, context: Any
    ) -> pb.GroupSnapshot:
        state, rows = await self.groups.hold(request.group_id, request.lease_seconds)
        return group_pb(request.group_id, state, rows)

    @_rpc
    async def CommitGroupSnapshot(
        self, request: pb.CommitGroupSnapshotRequest, context: Any
    ) -> pb.GroupSnapshot:
        state, rows, held = await self.groups.commit(request.group_id)
        return group_pb(request.group_id, state, rows, held)

    @_rpc
    async def DeleteGroupSnapshot(
        self, request: pb.DeleteGroupSnapshotRequest, context: Any
    ) -> pb.DeleteGroupSnapshotResponse:
        await self.groups.delete(request.group_id)
        return pb.DeleteGroupSnapshotResponse()

    @_rpc
    async def ImportImage(self, request: pb.ImportImageRequest, context: Any) -> pb.Image:
        if request.format not in _FORMATS:
            raise InvalidArgument(f"unknown image format {request.format}")
        row = await self.service.import_image(request.name, request.path, _FORMATS[request.format])
        return image_pb(row)

    @_rpc
    async def GetImage(self, request: pb.GetImageRequest, context: Any) -> pb.Image:
        return image_pb(await self.service.get_image(request.image_id))

    @_rpc
    async def ListImages(self, request: Any, context: Any) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=[image_pb(i) for i in await self.service.list_images()])

    @_rpc
    async def DeleteImage(
        self, request: pb.DeleteImageRequest, context: Any
    ) -> pb.DeleteImageResponse:
        await self.service.delete_image(request.image_id)
        return pb.DeleteImageResponse()

    @_rpc
    async def Publish(self, request: pb.PublishRequest, context: Any) -> pb.Attachment:
        row = await self.service.publish(
            request.volume_id,
            request.node_id,
            request.node_address,
            request.readonly,
            request.multi_node,
        )
        return self._attachment_pb(row)

    @_rpc
    async def Unpublish(self, request: pb.UnpublishRequest, context: Any) -> pb.UnpublishResponse:
        await self.service.unpublish(request.volume_id, request.node_id)
        return pb.UnpublishResponse()

    @_rpc
    async def ListAttachments(
        self, request: pb.ListAttachmentsRequest, context: Any
    ) -> pb.ListAttachmentsResponse:
        rows = await self.service.attachments(request.volume_id)
        return pb.ListAttachmentsResponse(attachments=[self._attachment_pb(a) for a in rows])

    async def _tenant_pb(self, name: str) -> pb.Tenant:
        limits, usage, allocated = await self.service.tenant(name)
        return pb.Tenant(
            name=name,
            limits=pb.TenantLimits(
                capacity_bytes=limits.capacity_bytes,
                volumes=limits.volumes,
                snapshots=limits.snapshots,
                qos=pb.Qos(iops=limits.qos_iops, bytes_per_second=limits.qos_bps),
            ),
            usage=pb.TenantUsage(
                provisioned_bytes=usage.provisioned_bytes,
                allocated_bytes=allocated,
                volumes=usage.volumes,
                snapshots=usage.snapshots,
            ),
        )

    @_rpc
    async def GetTenant(self, request: pb.GetTenantRequest, context: Any) -> pb.Tenant:
        return await self._tenant_pb(request.name)

    @_rpc
    async def ListTenants(self, request: Any, context: Any) -> pb.ListTenantsResponse:
        return pb.ListTenantsResponse(
            tenants=[await self._tenant_pb(t) for t in await self.service.tenants()]
        )

    @_rpc
    async def SetTenantLimits(self, request: pb.SetTenantLimitsRequest, context: Any) -> pb.Tenant:
        lim = request.limits
        await self.service.set_tenant_limits(
            request.name,
            TenantLimits(
                lim.capacity_bytes,
                lim.volumes,
                lim.snapshots,
                lim.qos.iops,
                lim.qos.bytes_per_second,
            ),
        )
        return await self._tenant_pb(request.name)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every call must carry `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token in 'authorization' metadata",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(details)
        return self._deny


def make_server(
    servicer: ManagementServicer, token: str, address: str, tls: tuple[bytes, bytes] | None
) -> tuple[grpc.aio.Server, int]:
    # No SO_REUSEPORT: a second node on the same address must fail, not share the port.
    server = grpc.aio.server(interceptors=[TokenAuth(token)], options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_StorageNodeServicer_to_server(servicer, server)
    if tls is not None:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    return server, port
