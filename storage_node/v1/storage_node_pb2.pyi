from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VolumeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VOLUME_STATE_UNSPECIFIED: _ClassVar[VolumeState]
    VOLUME_STATE_CREATING: _ClassVar[VolumeState]
    VOLUME_STATE_READY: _ClassVar[VolumeState]
    VOLUME_STATE_DELETING: _ClassVar[VolumeState]
    VOLUME_STATE_FAILED: _ClassVar[VolumeState]

class GroupState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_STATE_UNSPECIFIED: _ClassVar[GroupState]
    GROUP_STATE_PREPARED: _ClassVar[GroupState]
    GROUP_STATE_HELD: _ClassVar[GroupState]
    GROUP_STATE_COMMITTED: _ClassVar[GroupState]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW: _ClassVar[ImageFormat]
    IMAGE_FORMAT_QCOW2: _ClassVar[ImageFormat]
VOLUME_STATE_UNSPECIFIED: VolumeState
VOLUME_STATE_CREATING: VolumeState
VOLUME_STATE_READY: VolumeState
VOLUME_STATE_DELETING: VolumeState
VOLUME_STATE_FAILED: VolumeState
GROUP_STATE_UNSPECIFIED: GroupState
GROUP_STATE_PREPARED: GroupState
GROUP_STATE_HELD: GroupState
GROUP_STATE_COMMITTED: GroupState
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_RAW: ImageFormat
IMAGE_FORMAT_QCOW2: ImageFormat

class GetNodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "topology", "nbd_host", "nbd_port", "version")
    class TopologyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    NBD_HOST_FIELD_NUMBER: _ClassVar[int]
    NBD_PORT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    topology: _containers.ScalarMap[str, str]
    nbd_host: str
    nbd_port: int
    version: str
    def __init__(self, node_id: _Optional[str] = ..., topology: _Optional[_Mapping[str, str]] = ..., nbd_host: _Optional[str] = ..., nbd_port: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class GetCapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("total_bytes", "free_bytes", "provisioned_bytes", "allocated_bytes", "overcommit_ratio", "available_bytes")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROVISIONED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERCOMMIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    free_bytes: int
    provisioned_bytes: int
    allocated_bytes: int
    overcommit_ratio: float
    available_bytes: int
    def __init__(self, total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., provisioned_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., overcommit_ratio: _Optional[float] = ..., available_bytes: _Optional[int] = ...) -> None: ...

class Qos(_message.Message):
    __slots__ = ("iops", "bytes_per_second")
    IOPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    iops: int
    bytes_per_second: int
    def __init__(self, iops: _Optional[int] = ..., bytes_per_second: _Optional[int] = ...) -> None: ...

class VolumeSource(_message.Message):
    __slots__ = ("snapshot_id", "volume_id", "image_id")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    volume_id: str
    image_id: str
    def __init__(self, snapshot_id: _Optional[str] = ..., volume_id: _Optional[str] = ..., image_id: _Optional[str] = ...) -> None: ...

class CreateVolumeRequest(_message.Message):
    __slots__ = ("name", "tenant", "size_bytes", "source", "qos", "labels", "zero_detection_disabled")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ZERO_DETECTION_DISABLED_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    size_bytes: int
    source: VolumeSource
    qos: Qos
    labels: _containers.ScalarMap[str, str]
    zero_detection_disabled: bool
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., size_bytes: _Optional[int] = ..., source: _Optional[_Union[VolumeSource, _Mapping]] = ..., qos: _Optional[_Union[Qos, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., zero_detection_disabled: _Optional[bool] = ...) -> None: ...

class Volume(_message.Message):
    __slots__ = ("id", "name", "tenant", "size_bytes", "allocated_bytes", "state", "source", "qos", "labels", "created_at", "error", "zero_detection_disabled")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ZERO_DETECTION_DISABLED_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    tenant: str
    size_bytes: int
    allocated_bytes: int
    state: VolumeState
    source: VolumeSource
    qos: Qos
    labels: _containers.ScalarMap[str, str]
    created_at: float
    error: str
    zero_detection_disabled: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., tenant: _Optional[str] = ..., size_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., state: _Optional[_Union[VolumeState, str]] = ..., source: _Optional[_Union[VolumeSource, _Mapping]] = ..., qos: _Optional[_Union[Qos, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[float] = ..., error: _Optional[str] = ..., zero_detection_disabled: _Optional[bool] = ...) -> None: ...

class GetVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class ListVolumesRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token", "name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    name: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListVolumesResponse(_message.Message):
    __slots__ = ("volumes", "next_page_token")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    volumes: _containers.RepeatedCompositeFieldContainer[Volume]
    next_page_token: str
    def __init__(self, volumes: _Optional[_Iterable[_Union[Volume, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class DeleteVolumeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpandVolumeRequest(_message.Message):
    __slots__ = ("volume_id", "size_bytes")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    size_bytes: int
    def __init__(self, volume_id: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class SetVolumeQosRequest(_message.Message):
    __slots__ = ("volume_id", "qos")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    qos: Qos
    def __init__(self, volume_id: _Optional[str] = ..., qos: _Optional[_Union[Qos, _Mapping]] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("name", "volume_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    volume_id: str
    def __init__(self, name: _Optional[str] = ..., volume_id: _Optional[str] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("id", "name", "volume_id", "tenant", "size_bytes", "allocated_bytes", "ready", "created_at", "group_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    volume_id: str
    tenant: str
    size_bytes: int
    allocated_bytes: int
    ready: bool
    created_at: float
    group_id: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., volume_id: _Optional[str] = ..., tenant: _Optional[str] = ..., size_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., ready: _Optional[bool] = ..., created_at: _Optional[float] = ..., group_id: _Optional[str] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("tenant", "volume_id", "page_size", "page_token", "name", "group_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    volume_id: str
    page_size: int
    page_token: str
    name: str
    group_id: str
    def __init__(self, tenant: _Optional[str] = ..., volume_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., name: _Optional[str] = ..., group_id: _Optional[str] = ...) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots", "next_page_token")
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    next_page_token: str
    def __init__(self, snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("snapshot_id",)
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    def __init__(self, snapshot_id: _Optional[str] = ...) -> None: ...

class DeleteSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GroupMember(_message.Message):
    __slots__ = ("name", "volume_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    volume_id: str
    def __init__(self, name: _Optional[str] = ..., volume_id: _Optional[str] = ...) -> None: ...

class PrepareGroupSnapshotRequest(_message.Message):
    __slots__ = ("group_id", "members", "lease_seconds")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    members: _containers.RepeatedCompositeFieldContainer[GroupMember]
    lease_seconds: float
    def __init__(self, group_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[GroupMember, _Mapping]]] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class HoldGroupSnapshotRequest(_message.Message):
    __slots__ = ("group_id", "lease_seconds")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    lease_seconds: float
    def __init__(self, group_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class CommitGroupSnapshotRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class GroupSnapshot(_message.Message):
    __slots__ = ("group_id", "state", "snapshots", "held_seconds")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    HELD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    state: GroupState
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    held_seconds: float
    def __init__(self, group_id: _Optional[str] = ..., state: _Optional[_Union[GroupState, str]] = ..., snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ..., held_seconds: _Optional[float] = ...) -> None: ...

class DeleteGroupSnapshotRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class DeleteGroupSnapshotResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImportImageRequest(_message.Message):
    __slots__ = ("name", "path", "format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    format: ImageFormat
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("id", "name", "size_bytes", "allocated_bytes", "ready", "created_at", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    size_bytes: int
    allocated_bytes: int
    ready: bool
    created_at: float
    error: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., ready: _Optional[bool] = ..., created_at: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("image_id",)
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    def __init__(self, image_id: _Optional[str] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class DeleteImageRequest(_message.Message):
    __slots__ = ("image_id",)
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    def __init__(self, image_id: _Optional[str] = ...) -> None: ...

class DeleteImageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("volume_id", "node_id", "node_address", "readonly", "multi_node")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    MULTI_NODE_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    node_id: str
    node_address: str
    readonly: bool
    multi_node: bool
    def __init__(self, volume_id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_address: _Optional[str] = ..., readonly: _Optional[bool] = ..., multi_node: _Optional[bool] = ...) -> None: ...

class Attachment(_message.Message):
    __slots__ = ("volume_id", "node_id", "node_address", "readonly", "nbd_host", "nbd_port", "export_name", "uri")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    NBD_HOST_FIELD_NUMBER: _ClassVar[int]
    NBD_PORT_FIELD_NUMBER: _ClassVar[int]
    EXPORT_NAME_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    node_id: str
    node_address: str
    readonly: bool
    nbd_host: str
    nbd_port: int
    export_name: str
    uri: str
    def __init__(self, volume_id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_address: _Optional[str] = ..., readonly: _Optional[bool] = ..., nbd_host: _Optional[str] = ..., nbd_port: _Optional[int] = ..., export_name: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class UnpublishRequest(_message.Message):
    __slots__ = ("volume_id", "node_id")
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    node_id: str
    def __init__(self, volume_id: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class UnpublishResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAttachmentsRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class ListAttachmentsResponse(_message.Message):
    __slots__ = ("attachments",)
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    attachments: _containers.RepeatedCompositeFieldContainer[Attachment]
    def __init__(self, attachments: _Optional[_Iterable[_Union[Attachment, _Mapping]]] = ...) -> None: ...

class TenantLimits(_message.Message):
    __slots__ = ("capacity_bytes", "volumes", "snapshots", "qos")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    volumes: int
    snapshots: int
    qos: Qos
    def __init__(self, capacity_bytes: _Optional[int] = ..., volumes: _Optional[int] = ..., snapshots: _Optional[int] = ..., qos: _Optional[_Union[Qos, _Mapping]] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("provisioned_bytes", "allocated_bytes", "volumes", "snapshots")
    PROVISIONED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    provisioned_bytes: int
    allocated_bytes: int
    volumes: int
    snapshots: int
    def __init__(self, provisioned_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., volumes: _Optional[int] = ..., snapshots: _Optional[int] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("name", "limits", "usage")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    limits: TenantLimits
    usage: TenantUsage
    def __init__(self, name: _Optional[str] = ..., limits: _Optional[_Union[TenantLimits, _Mapping]] = ..., usage: _Optional[_Union[TenantUsage, _Mapping]] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ...) -> None: ...

class SetTenantLimitsRequest(_message.Message):
    __slots__ = ("name", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    limits: TenantLimits
    def __init__(self, name: _Optional[str] = ..., limits: _Optional[_Union[TenantLimits, _Mapping]] = ...) -> None: ...
