"""Conformance of the Identity and Controller services to csi-spec-v1.12.md, as a CO sees them.

Owns the Controller RPCs the plugin advertises, each checked against the spec's text and its
"Errors" table: argument errors, idempotency, "already done is OK", and the status codes. The
plugin is a real `python -m csi --mode controller` process in front of two real storage nodes
on loopback (tests/csi/controller_fixtures.py); results are also checked on the storage nodes
through their management API.

Where the spec leaves a choice, these tests assume the following (the controller must match):

- Names: any Unicode string of at most 128 bytes without the spec's banned control characters
  (spaces and non-ASCII included); longer or with a banned character: INVALID_ARGUMENT.
- Capacity: sizes are multiples of 4 KiB. No capacity_range: a default size (any positive
  multiple of 4 KiB). required_bytes is rounded up to 4 KiB, never past limit_bytes; only
  limit_bytes: a size at most limit_bytes. limit < required, or no multiple of 4 KiB between
  them, or more than a storage node can ever hold (64 TiB): OUT_OF_RANGE ("Unsupported
  capacity_range"). Allowed but more than any node has free: RESOURCE_EXHAUSTED. Negative:
  INVALID_ARGUMENT. From a source without capacity_range: the source's size; smaller than the
  source: OUT_OF_RANGE (the spec's own example); larger: supported.
- Access: every mode works with block. With mount, MULTI_NODE_SINGLE_WRITER and
  MULTI_NODE_MULTI_WRITER are unsupported (DESIGN.md: multi-node writers for volumeMode Block
  only; a filesystem written from two nodes is corrupted); MULTI_NODE_READER_ONLY is allowed.
  Unsupported, or without access type, or with mode UNKNOWN: INVALID_ARGUMENT in
  CreateVolume, ControllerPublishVolume, ControllerExpandVolume ("Exceeds capabilities") and
  GetCapacity (Error Scheme, "Invalid or unsupported field"). A volume remembers what it was
  created as: ValidateVolumeCapabilities does not confirm mount for a block volume (nor the
  reverse), nor a multi-node mode for a volume created single-node.
- Parameters: `iops` and `bandwidth` (bytes per second), both Kubernetes quantities, in
  parameters or mutable_parameters (the latter win, and count for idempotency like the
  former); `zeroDetection` ("true" or "false", creation only); other keys are
  INVALID_ARGUMENT except the CO's own `csi.storage.k8s.io/*`. The tenant is
  `csi.storage.k8s.io/pvc/namespace`, else `default`.
- Ids: a volume or snapshot id that is malformed or names an unknown storage node is treated
  as "does not exist": OK for Delete*, NOT_FOUND elsewhere. A node id not of the form
  NAME@ADDRESS is a node that does not exist: NOT_FOUND in ControllerPublishVolume; OK in
  ControllerUnpublishVolume (nothing can be attached to it).
- ControllerUnpublishVolume of an unknown volume, or of a node it is not attached to: OK.
- A reader-only access mode (SINGLE_NODE_READER_ONLY, MULTI_NODE_READER_ONLY) is published
  read-only even when `readonly` is false.
- DeleteVolume of a published volume: FAILED_PRECONDITION ("Volume in use"). Deleting a
  volume leaves its snapshots usable (they are independent).
- CreateSnapshot of an unknown source volume: NOT_FOUND (the table has no row for it; the
  general "does not exist" code). Snapshots are ready_to_use at once.
- ListSnapshots with an unknown snapshot_id or source_volume_id: an empty list, no error.
  A malformed starting_token: ABORTED; a negative max_entries: INVALID_ARGUMENT.
- ControllerExpandVolume to a size the volume already has or exceeds: OK with the current
  size ("SHOULD reply 0 OK"); node_expansion_required is true for mount capabilities.
- ControllerModifyVolume: mutable_parameters is REQUIRED (a map: at least one entry), so
  empty is INVALID_ARGUMENT; only the given keys change.
- GetCapacity: a topology selects the storage nodes of that zone (an unknown zone: 0);
  supported capabilities do not change the answer.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from csi.identity import NODE_TOPOLOGY_KEY
from csi.v1 import csi_pb2 as pb
from storage_node.v1 import storage_node_pb2 as sn

from .controller_fixtures import (
    BLOCK,
    BLOCK_RWX,
    CALL_TIMEOUT,
    MOUNT,
    STORAGE_NODES,
    ZONE,
    GiB,
    MiB,
    Mode,
    Pool,
    capability,
    expect_error,
    in_zone,
    start_pool,
    stop_pool,
    unique_name,
    zone,
)

Code = grpc.StatusCode
Cap = pb.ControllerServiceCapability.RPC
TiB = 1 << 40

NODE_1 = "worker-1@127.0.0.2"
NODE_2 = "worker-2@127.0.0.3"
NODE_3 = "worker-3@127.0.0.4"
UNKNOWN_VOLUME = "sn-a:vol-00000000deadbeef"  # plausible, on a known storage node
UNKNOWN_NODE_VOLUME = "sn-z:vol-00000000deadbeef"  # a storage node nobody configured
MALFORMED_ID = "not-an-id"
UNKNOWN_SNAPSHOT = "sn-a:snap-00000000deadbeef"
PUBLISH_CONTEXT_KEYS = {
    "nbd.csi.dev/host",
    "nbd.csi.dev/port",
    "nbd.csi.dev/export",
    "nbd.csi.dev/readonly",
}
MULTI_NODE_MODES = (
    Mode.MULTI_NODE_READER_ONLY,
    Mode.MULTI_NODE_SINGLE_WRITER,
    Mode.MULTI_NODE_MULTI_WRITER,
)
SINGLE_NODE_MODES = (
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
)
MOUNT_RWX = capability("mount", Mode.MULTI_NODE_MULTI_WRITER, "ext4")
READ_ONLY = capability("block", Mode.SINGLE_NODE_READER_ONLY)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    p = start_pool(tmp_path_factory.mktemp("pool"))
    try:
        yield p
    finally:
        stop_pool(p)


def mode_name(mode: int) -> str:
    return pb.VolumeCapability.AccessMode.Mode.Name(mode)


def exact(size: int) -> pb.CapacityRange:
    return pb.CapacityRange(required_bytes=size, limit_bytes=size)


# -- Identity ---------------------------------------------------------------------------------


def test_get_plugin_info(pool: Pool) -> None:
    reply = pool.plugin.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=CALL_TIMEOUT)
    assert reply.name == "nbd.csi.dev"
    assert reply.vendor_version, "vendor_version is REQUIRED"


def test_probe_ready_with_both_storage_nodes(pool: Pool) -> None:
    assert pool.plugin.probe() is True


def test_controller_capabilities_exact(pool: Pool) -> None:
    reply = pool.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest(), timeout=CALL_TIMEOUT
    )
    got = [c.rpc.type for c in reply.capabilities]
    assert len(got) == len(set(got)), f"duplicate capabilities: {got}"
    assert {Cap.Type.Name(t) for t in got} == {
        "CREATE_DELETE_VOLUME",
        "PUBLISH_UNPUBLISH_VOLUME",
        "LIST_VOLUMES",
        "GET_CAPACITY",
        "CREATE_DELETE_SNAPSHOT",
        "LIST_SNAPSHOTS",
        "CLONE_VOLUME",
        "PUBLISH_READONLY",
        "EXPAND_VOLUME",
        "LIST_VOLUMES_PUBLISHED_NODES",
        "VOLUME_CONDITION",
        "GET_VOLUME",
        "SINGLE_NODE_MULTI_WRITER",
        "MODIFY_VOLUME",
        "GET_SNAPSHOT",
    }


def test_plugin_capabilities_consistent_with_controller(pool: Pool) -> None:
    """Spec, Volume.accessible_topology: "A plugin that returns this field MUST also set the
    VOLUME_ACCESSIBILITY_CONSTRAINTS plugin capability"; EXPAND_VOLUME goes with a
    VolumeExpansion plugin capability (ONLINE: ControllerExpandVolume while published)."""
    reply = pool.plugin.identity.GetPluginCapabilities(
        pb.GetPluginCapabilitiesRequest(), timeout=CALL_TIMEOUT
    )
    services = {c.service.type for c in reply.capabilities if c.HasField("service")}
    expansion = {
        c.volume_expansion.type for c in reply.capabilities if c.HasField("volume_expansion")
    }
    Service = pb.PluginCapability.Service
    assert Service.CONTROLLER_SERVICE in services
    assert Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in services
    assert expansion == {pb.PluginCapability.VolumeExpansion.ONLINE}


# -- error tables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Existing:
    """Objects the error cases refer to; error cases never change them."""

    name: str  # of `volume`
    volume: pb.Volume  # block, SINGLE_NODE_WRITER, 1 MiB, on sn-a
    other: pb.Volume  # 1 MiB on sn-b
    snapshot_name: str
    snapshot: pb.Snapshot  # of `volume`


@pytest.fixture(scope="module")
def existing(pool: Pool) -> Existing:
    name = unique_name()
    volume = pool.create(name, MiB, accessibility_requirements=in_zone("zone-a"))
    other = pool.create(size=MiB, accessibility_requirements=in_zone("zone-b"))
    snapshot_name = unique_name("snap")
    snapshot = pool.snapshot(volume.volume_id, snapshot_name)
    return Existing(name, volume, other, snapshot_name, snapshot)


@dataclass(frozen=True)
class ErrorCase:
    rpc: str
    request: Callable[[Existing], Any]
    code: grpc.StatusCode
    spec: str  # the spec's table row (or rule) this case follows


def case(case_id: str, rpc: str, request: Callable[..., Any], code: Code, spec: str) -> Any:
    return pytest.param(ErrorCase(rpc, request, code, spec), id=f"{rpc}/{case_id}")


MISSING = "Error Scheme: Missing required field"
INVALID = "Error Scheme: Invalid or unsupported field in the request"
CV = pb.CreateVolumeRequest
PUB = pb.ControllerPublishVolumeRequest


def cv(name: str = "", caps: tuple[pb.VolumeCapability, ...] = (BLOCK,), **kw: Any) -> Any:
    return CV(name=name or unique_name(), volume_capabilities=list(caps), **kw)


def from_snapshot(snapshot_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
    )


def from_volume(volume_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=volume_id))


ERROR_CASES = [
    # CreateVolume ----------------------------------------------------------------------------
    case("missing-name", "CreateVolume", lambda e: CV(volume_capabilities=[BLOCK]), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("missing-capabilities", "CreateVolume", lambda e: CV(name=unique_name()), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("capability-without-access-type", "CreateVolume",
         lambda e: cv(caps=(pb.VolumeCapability(access_mode=BLOCK.access_mode),)),
         Code.INVALID_ARGUMENT, "VolumeCapability: one of block or mount MUST be specified"),
    case("capability-mode-unknown", "CreateVolume",
         lambda e: cv(caps=(capability("block", Mode.UNKNOWN),)),
         Code.INVALID_ARGUMENT, "AccessMode.mode is REQUIRED"),
    *[
        case(f"mount-{mode_name(m)}", "CreateVolume",
             lambda e, m=m: cv(caps=(capability("mount", m, "ext4"),)),
             Code.INVALID_ARGUMENT, INVALID + " (multi-node attach: block only)")
        for m in (Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER)
    ],
    case("name-129-bytes", "CreateVolume", lambda e: cv(name="n" * 129),
         Code.INVALID_ARGUMENT, "Size Limits: string 128 bytes"),
    case("name-129-bytes-utf8", "CreateVolume", lambda e: cv(name="é" * 64 + "x"),
         Code.INVALID_ARGUMENT, "Size Limits: string 128 bytes (bytes, not characters)"),
    case("name-banned-character", "CreateVolume", lambda e: cv(name=unique_name() + "\x01"),
         Code.INVALID_ARGUMENT, "CreateVolumeRequest.name: banned characters U+0000-U+0008..."),
    case("required-negative", "CreateVolume",
         lambda e: cv(capacity_range=pb.CapacityRange(required_bytes=-4096)),
         Code.INVALID_ARGUMENT, "CapacityRange: MUST NOT be negative"),
    case("limit-negative", "CreateVolume",
         lambda e: cv(capacity_range=pb.CapacityRange(limit_bytes=-4096)),
         Code.INVALID_ARGUMENT, "CapacityRange: MUST NOT be negative"),
    case("limit-below-required", "CreateVolume",
         lambda e: cv(capacity_range=pb.CapacityRange(required_bytes=2 * MiB, limit_bytes=MiB)),
         Code.OUT_OF_RANGE, "Unsupported capacity_range"),
    case("no-4k-size-in-range", "CreateVolume", lambda e: cv(capacity_range=exact(10000)),
         Code.OUT_OF_RANGE, "Unsupported capacity_range (sizes are multiples of 4 KiB)"),
    case("beyond-largest-volume", "CreateVolume",
         lambda e: cv(capacity_range=pb.CapacityRange(required_bytes=1 << 62)),
         Code.OUT_OF_RANGE, "Unsupported capacity_range (a node holds at most 64 TiB)"),
    case("beyond-free-capacity", "CreateVolume",
         lambda e: cv(capacity_range=pb.CapacityRange(required_bytes=32 * TiB)),
         Code.RESOURCE_EXHAUSTED, "Unable to provision in accessible_topology (no room)"),
    case("requisite-unknown-zone", "CreateVolume",
         lambda e: cv(accessibility_requirements=pb.TopologyRequirement(requisite=[zone("nowhere")])),  # noqa: E501
         Code.RESOURCE_EXHAUSTED, "Unable to provision in accessible_topology"),
    case("source-snapshot-missing", "CreateVolume",
         lambda e: cv(volume_content_source=from_snapshot(UNKNOWN_SNAPSHOT)),
         Code.NOT_FOUND, "Source does not exist"),
    case("source-snapshot-malformed", "CreateVolume",
         lambda e: cv(volume_content_source=from_snapshot(MALFORMED_ID)),
         Code.NOT_FOUND, "Source does not exist"),
    case("source-volume-missing", "CreateVolume",
         lambda e: cv(volume_content_source=from_volume(UNKNOWN_VOLUME)),
         Code.NOT_FOUND, "Source does not exist"),
    case("source-volume-unknown-storage-node", "CreateVolume",
         lambda e: cv(volume_content_source=from_volume(UNKNOWN_NODE_VOLUME)),
         Code.NOT_FOUND, "Source does not exist"),
    case("smaller-than-source-snapshot", "CreateVolume",
         lambda e: cv(capacity_range=exact(MiB // 2), volume_content_source=from_snapshot(e.snapshot.snapshot_id)),  # noqa: E501
         Code.OUT_OF_RANGE, "Unsupported capacity_range: smaller than the source snapshot"),
    *[
        case(f"parameter-{key}={value}", "CreateVolume",
             lambda e, key=key, value=value: cv(parameters={key: value}),
             Code.INVALID_ARGUMENT, INVALID)
        for key, value in [("iops", "fast"), ("iops", "-1"),
                           ("bandwidth", "lots"), ("bandwidth", "-1Mi"), ("colour", "blue"),
                           ("encrypted", "yes"), ("encrypted", "True"), ("encrypted", ""),
                           ("zeroDetection", "no"), ("zeroDetection", "")]
    ],
    case("mutable-parameter-iops=fast", "CreateVolume",
         lambda e: cv(mutable_parameters={"iops": "fast"}), Code.INVALID_ARGUMENT, INVALID),
    case("same-name-other-capacity", "CreateVolume",
         lambda e: cv(name=e.name, capacity_range=exact(2 * MiB)),
         Code.ALREADY_EXISTS, "Volume already exists but is incompatible (capacity_range)"),
    case("same-name-other-parameters", "CreateVolume",
         lambda e: cv(name=e.name, capacity_range=exact(MiB), parameters={"iops": "100"}),
         Code.ALREADY_EXISTS, "Volume already exists but is incompatible (parameters)"),
    case("same-name-other-zero-detection", "CreateVolume",
         lambda e: cv(name=e.name, capacity_range=exact(MiB), parameters={"zeroDetection": "false"}),  # noqa: E501
         Code.ALREADY_EXISTS, "Volume already exists but is incompatible (parameters)"),
    case("same-name-other-source", "CreateVolume",
         lambda e: cv(name=e.name, capacity_range=exact(MiB), volume_content_source=from_snapshot(e.snapshot.snapshot_id)),  # noqa: E501
         Code.ALREADY_EXISTS, "Volume already exists but is incompatible (volume_content_source)"),
    case("same-name-other-encryption", "CreateVolume",
         lambda e: cv(name=e.name, capacity_range=exact(MiB), parameters={"encrypted": "true"}),
         Code.ALREADY_EXISTS, "Volume already exists but is incompatible (parameters)"),
    case("same-name-other-tenant", "CreateVolume",
         lambda e: cv(name=e.name, capacity_range=exact(MiB), parameters={"csi.storage.k8s.io/pvc/namespace": "elsewhere"}),  # noqa: E501
         Code.ALREADY_EXISTS, "Volume already exists but is incompatible (parameters)"),
    # DeleteVolume ----------------------------------------------------------------------------
    case("missing-id", "DeleteVolume", lambda e: pb.DeleteVolumeRequest(), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    # ControllerPublishVolume -----------------------------------------------------------------
    case("missing-volume-id", "ControllerPublishVolume",
         lambda e: PUB(node_id=NODE_1, volume_capability=BLOCK), Code.INVALID_ARGUMENT, MISSING),
    case("missing-node-id", "ControllerPublishVolume",
         lambda e: PUB(volume_id=e.volume.volume_id, volume_capability=BLOCK), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("missing-capability", "ControllerPublishVolume",
         lambda e: PUB(volume_id=e.volume.volume_id, node_id=NODE_1), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("capability-mount-multi-writer", "ControllerPublishVolume",
         lambda e: PUB(volume_id=e.volume.volume_id, node_id=NODE_1, volume_capability=MOUNT_RWX),
         Code.INVALID_ARGUMENT, INVALID + " (multi-node attach: block only)"),
    case("capability-mount-on-block-volume", "ControllerPublishVolume",
         lambda e: PUB(volume_id=e.volume.volume_id, node_id=NODE_1, volume_capability=MOUNT),
         Code.INVALID_ARGUMENT, INVALID + " (the volume was created for block)"),
    case("capability-multi-node-on-single-node-volume", "ControllerPublishVolume",
         lambda e: PUB(volume_id=e.volume.volume_id, node_id=NODE_1, volume_capability=BLOCK_RWX),
         Code.INVALID_ARGUMENT, INVALID + " (the volume was created single-node)"),
    *[
        case(f"volume-{label}", "ControllerPublishVolume",
             lambda e, vid=vid: PUB(volume_id=vid, node_id=NODE_1, volume_capability=BLOCK),
             Code.NOT_FOUND, "Volume does not exist")
        for label, vid in [("unknown", UNKNOWN_VOLUME), ("unknown-storage-node", UNKNOWN_NODE_VOLUME), ("malformed", MALFORMED_ID)]  # noqa: E501
    ],
    *[
        case(f"node-id-{label}", "ControllerPublishVolume",
             lambda e, nid=nid: PUB(volume_id=e.volume.volume_id, node_id=nid, volume_capability=BLOCK),  # noqa: E501
             Code.NOT_FOUND, "Node does not exist (node ids are NAME@ADDRESS)")
        for label, nid in [("without-address", "worker-1"), ("empty-address", "worker-1@"),
                           ("empty-name", "@127.0.0.2"), ("address-not-ip", "worker-1@not an ip")]
    ],
    # ControllerUnpublishVolume ---------------------------------------------------------------
    case("missing-volume-id", "ControllerUnpublishVolume",
         lambda e: pb.ControllerUnpublishVolumeRequest(node_id=NODE_1), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    # ValidateVolumeCapabilities --------------------------------------------------------------
    case("missing-volume-id", "ValidateVolumeCapabilities",
         lambda e: pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[BLOCK]), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("missing-capabilities", "ValidateVolumeCapabilities",
         lambda e: pb.ValidateVolumeCapabilitiesRequest(volume_id=e.volume.volume_id), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    *[
        case(f"volume-{label}", "ValidateVolumeCapabilities",
             lambda e, vid=vid: pb.ValidateVolumeCapabilitiesRequest(volume_id=vid, volume_capabilities=[BLOCK]),  # noqa: E501
             Code.NOT_FOUND, "Volume does not exist")
        for label, vid in [("unknown", UNKNOWN_VOLUME), ("unknown-storage-node", UNKNOWN_NODE_VOLUME), ("malformed", MALFORMED_ID)]  # noqa: E501
    ],
    # ListVolumes -----------------------------------------------------------------------------
    case("starting-token-invalid", "ListVolumes",
         lambda e: pb.ListVolumesRequest(starting_token="not-a-token"), Code.ABORTED, "Invalid starting_token"),  # noqa: E501
    case("max-entries-negative", "ListVolumes",
         lambda e: pb.ListVolumesRequest(max_entries=-1), Code.INVALID_ARGUMENT, "max_entries MUST NOT be negative"),  # noqa: E501
    # ControllerGetVolume ---------------------------------------------------------------------
    case("missing-id", "ControllerGetVolume", lambda e: pb.ControllerGetVolumeRequest(), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    *[
        case(f"volume-{label}", "ControllerGetVolume",
             lambda e, vid=vid: pb.ControllerGetVolumeRequest(volume_id=vid), Code.NOT_FOUND, "Volume does not exist")  # noqa: E501
        for label, vid in [("unknown", UNKNOWN_VOLUME), ("unknown-storage-node", UNKNOWN_NODE_VOLUME), ("malformed", MALFORMED_ID)]  # noqa: E501
    ],
    # ControllerModifyVolume ------------------------------------------------------------------
    case("missing-id", "ControllerModifyVolume",
         lambda e: pb.ControllerModifyVolumeRequest(mutable_parameters={"iops": "10"}), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("missing-parameters", "ControllerModifyVolume",
         lambda e: pb.ControllerModifyVolumeRequest(volume_id=e.volume.volume_id), Code.INVALID_ARGUMENT, MISSING + " (a REQUIRED map)"),  # noqa: E501
    case("volume-unknown", "ControllerModifyVolume",
         lambda e: pb.ControllerModifyVolumeRequest(volume_id=UNKNOWN_VOLUME, mutable_parameters={"iops": "10"}),  # noqa: E501
         Code.NOT_FOUND, "Volume does not exist"),
    *[
        case(f"parameter-{key}={value}", "ControllerModifyVolume",
             lambda e, key=key, value=value: pb.ControllerModifyVolumeRequest(volume_id=e.volume.volume_id, mutable_parameters={key: value}),  # noqa: E501
             Code.INVALID_ARGUMENT, "Parameters not supported")
        for key, value in [("iops", "fast"), ("iops", "-5"), ("bandwidth", "lots"), ("colour", "blue")]  # noqa: E501
    ],
    # ControllerExpandVolume ------------------------------------------------------------------
    case("missing-id", "ControllerExpandVolume",
         lambda e: pb.ControllerExpandVolumeRequest(capacity_range=exact(2 * MiB)), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("missing-capacity-range", "ControllerExpandVolume",
         lambda e: pb.ControllerExpandVolumeRequest(volume_id=e.volume.volume_id), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("volume-unknown", "ControllerExpandVolume",
         lambda e: pb.ControllerExpandVolumeRequest(volume_id=UNKNOWN_VOLUME, capacity_range=exact(2 * MiB)),  # noqa: E501
         Code.NOT_FOUND, "Volume does not exist"),
    case("limit-below-required", "ControllerExpandVolume",
         lambda e: pb.ControllerExpandVolumeRequest(volume_id=e.volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=4 * MiB, limit_bytes=2 * MiB)),  # noqa: E501
         Code.OUT_OF_RANGE, "Unsupported capacity_range"),
    case("beyond-largest-volume", "ControllerExpandVolume",
         lambda e: pb.ControllerExpandVolumeRequest(volume_id=e.volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=1 << 62)),  # noqa: E501
         Code.OUT_OF_RANGE, "Unsupported capacity_range"),
    case("capability-mount-on-block-volume", "ControllerExpandVolume",
         lambda e: pb.ControllerExpandVolumeRequest(volume_id=e.volume.volume_id, capacity_range=exact(2 * MiB), volume_capability=MOUNT),  # noqa: E501
         Code.INVALID_ARGUMENT, "Exceeds capabilities (the volume was created for block)"),
    case("capability-mount-multi-writer", "ControllerExpandVolume",
         lambda e: pb.ControllerExpandVolumeRequest(volume_id=e.volume.volume_id, capacity_range=exact(2 * MiB), volume_capability=MOUNT_RWX),  # noqa: E501
         Code.INVALID_ARGUMENT, "Exceeds capabilities"),
    # CreateSnapshot --------------------------------------------------------------------------
    case("missing-name", "CreateSnapshot",
         lambda e: pb.CreateSnapshotRequest(source_volume_id=e.volume.volume_id), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("missing-source", "CreateSnapshot",
         lambda e: pb.CreateSnapshotRequest(name=unique_name("snap")), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("name-129-bytes", "CreateSnapshot",
         lambda e: pb.CreateSnapshotRequest(name="s" * 129, source_volume_id=e.volume.volume_id),
         Code.INVALID_ARGUMENT, "Size Limits: string 128 bytes"),
    *[
        case(f"source-{label}", "CreateSnapshot",
             lambda e, vid=vid: pb.CreateSnapshotRequest(name=unique_name("snap"), source_volume_id=vid),  # noqa: E501
             Code.NOT_FOUND, "(no row) the source volume does not exist")
        for label, vid in [("unknown", UNKNOWN_VOLUME), ("unknown-storage-node", UNKNOWN_NODE_VOLUME), ("malformed", MALFORMED_ID)]  # noqa: E501
    ],
    case("same-name-other-source", "CreateSnapshot",
         lambda e: pb.CreateSnapshotRequest(name=e.snapshot_name, source_volume_id=e.other.volume_id),  # noqa: E501
         Code.ALREADY_EXISTS, "Snapshot already exists but is incompatible"),
    # DeleteSnapshot / ListSnapshots / GetSnapshot --------------------------------------------
    case("missing-id", "DeleteSnapshot", lambda e: pb.DeleteSnapshotRequest(), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    case("starting-token-invalid", "ListSnapshots",
         lambda e: pb.ListSnapshotsRequest(starting_token="not-a-token"), Code.ABORTED, "Invalid starting_token"),  # noqa: E501
    case("max-entries-negative", "ListSnapshots",
         lambda e: pb.ListSnapshotsRequest(max_entries=-1), Code.INVALID_ARGUMENT, "max_entries MUST NOT be negative"),  # noqa: E501
    case("missing-id", "GetSnapshot", lambda e: pb.GetSnapshotRequest(), Code.INVALID_ARGUMENT, MISSING),  # noqa: E501
    *[
        case(f"snapshot-{label}", "GetSnapshot",
             lambda e, sid=sid: pb.GetSnapshotRequest(snapshot_id=sid), Code.NOT_FOUND, "Snapshot does not exist")  # noqa: E501
        for label, sid in [("unknown", UNKNOWN_SNAPSHOT), ("malformed", MALFORMED_ID)]
    ],
]  # fmt: skip


@pytest.mark.parametrize("error_case", ERROR_CASES)
def test_error(pool: Pool, existing: Existing, error_case: ErrorCase) -> None:
    request = error_case.request(existing)
    try:
        expect_error(getattr(pool.controller, error_case.rpc), request, error_case.code)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (spec: {error_case.spec})") from None


def test_error_cases_leave_the_existing_objects_alone(pool: Pool, existing: Existing) -> None:
    """Runs after the table: failed calls changed nothing (ModifyVolume: "The SP MUST NOT have
    applied any modification to the volume as part of this specific call")."""
    volume = pool.sn_volume(existing.volume.volume_id)
    assert volume.size_bytes == MiB
    assert (volume.qos.iops, volume.qos.bytes_per_second) == (0, 0)
    assert pool.sn_attachments(existing.volume.volume_id) == []
    snapshot = get_snapshot(pool, existing.snapshot.snapshot_id)
    assert snapshot.source_volume_id == existing.volume.volume_id


# -- CreateVolume -----------------------------------------------------------------------------

SIZE_CASES = [
    # (capacity_range or None, predicate on the size, what the spec or our choice says)
    pytest.param(None, lambda s: s > 0 and s % 4096 == 0, id="no-range-default-size"),
    pytest.param(pb.CapacityRange(), lambda s: s > 0 and s % 4096 == 0, id="zero-range-is-unset"),
    pytest.param(pb.CapacityRange(required_bytes=10000), lambda s: s == 12288, id="required-rounded-up"),  # noqa: E501
    pytest.param(exact(MiB), lambda s: s == MiB, id="exact"),
    pytest.param(pb.CapacityRange(required_bytes=10000, limit_bytes=16384), lambda s: s == 12288, id="rounded-within-limit"),  # noqa: E501
    pytest.param(pb.CapacityRange(limit_bytes=8192), lambda s: 0 < s <= 8192 and s % 4096 == 0, id="limit-only"),  # noqa: E501
    pytest.param(pb.CapacityRange(limit_bytes=10000), lambda s: 0 < s <= 10000 and s % 4096 == 0, id="limit-only-not-4k"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(("capacity_range", "ok"), SIZE_CASES)
def test_create_volume_size(
    pool: Pool, capacity_range: pb.CapacityRange | None, ok: Callable[[int], bool]
) -> None:
    request = cv(capacity_range=capacity_range)
    volume = pool.controller.CreateVolume(request, timeout=CALL_TIMEOUT).volume
    assert ok(volume.capacity_bytes), volume.capacity_bytes
    assert pool.sn_volume(volume.volume_id).size_bytes == volume.capacity_bytes


def check_volume(pool: Pool, volume: pb.Volume, tenant: str = "default") -> None:
    """What every returned Volume carries (docs/csi-driver.md contracts)."""
    storage_node, _, local_id = volume.volume_id.partition(":")
    assert storage_node in pool.nodes and local_id.startswith("vol-"), volume.volume_id
    assert volume.volume_context["nbd.csi.dev/storage-node"] == storage_node
    assert volume.volume_context["nbd.csi.dev/tenant"] == tenant
    zone_of = dict(STORAGE_NODES)[storage_node]
    assert [dict(t.segments) for t in volume.accessible_topology] == [{ZONE: zone_of}]
    assert pool.sn_volume(volume.volume_id).tenant == tenant


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(lambda: unique_name(), id="plain"),
        pytest.param(lambda: unique_name().ljust(128, "x"), id="128-characters"),
        pytest.param(lambda: ("é" * 48) + unique_name(), id="128-bytes-utf8"),
        pytest.param(lambda: f"pvc with spaces / and: ü {uuid.uuid4().hex}", id="spaces-unicode"),
    ],
)
def test_create_volume_idempotent(pool: Pool, name: Callable[[], str]) -> None:
    """Spec: the same name with compatible arguments MUST reply 0 OK with the same volume."""
    request = cv(name=name(), capacity_range=exact(MiB))
    assert len(request.name.encode()) <= 128
    first = pool.controller.CreateVolume(request, timeout=CALL_TIMEOUT).volume
    again = pool.controller.CreateVolume(request, timeout=CALL_TIMEOUT).volume
    assert again == first
    check_volume(pool, first)
    # A range the existing volume still satisfies is compatible too.
    wider = cv(
        name=request.name, capacity_range=pb.CapacityRange(required_bytes=MiB, limit_bytes=2 * MiB)
    )
    assert (
        pool.controller.CreateVolume(wider, timeout=CALL_TIMEOUT).volume.volume_id
        == first.volume_id
    )


ACCESS_CASES = [
    *[pytest.param(capability("block", m), id=f"block-{mode_name(m)}") for m in (*SINGLE_NODE_MODES, *MULTI_NODE_MODES)],  # noqa: E501
    *[pytest.param(capability("mount", m, "ext4"), id=f"mount-ext4-{mode_name(m)}") for m in (*SINGLE_NODE_MODES, Mode.MULTI_NODE_READER_ONLY)],  # noqa: E501
    pytest.param(capability("mount", Mode.SINGLE_NODE_WRITER, "xfs"), id="mount-xfs"),
    pytest.param(capability("mount", Mode.SINGLE_NODE_WRITER, ""), id="mount-default-fs"),
]  # fmt: skip


@pytest.mark.parametrize("cap", ACCESS_CASES)
def test_create_volume_access_types(pool: Pool, cap: pb.VolumeCapability) -> None:
    volume = pool.create(size=MiB, cap=cap)
    check_volume(pool, volume)
    reply = pool.controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id, volume_capabilities=[cap]),
        timeout=CALL_TIMEOUT,
    )
    assert list(reply.confirmed.volume_capabilities) == [cap], reply.message


def test_create_volume_with_several_capabilities(pool: Pool) -> None:
    request = cv(caps=(BLOCK, BLOCK_RWX, capability("block", Mode.MULTI_NODE_READER_ONLY)))
    check_volume(pool, pool.controller.CreateVolume(request, timeout=CALL_TIMEOUT).volume)


def test_create_volume_tenant_from_pvc_namespace(pool: Pool) -> None:
    """docs/tenant-quotas.md: the tenant is csi.storage.k8s.io/pvc/namespace (provisioner's
    --extra-create-metadata); the other keys that flag adds are accepted."""
    parameters = {
        "csi.storage.k8s.io/pvc/namespace": "team-x",
        "csi.storage.k8s.io/pvc/name": "disk-0",
        "csi.storage.k8s.io/pv/name": "pvc-0123",
    }
    volume = pool.create(size=MiB, parameters=parameters)
    check_volume(pool, volume, tenant="team-x")


@pytest.mark.parametrize("zone_name", ["zone-a", "zone-b"])
def test_create_volume_in_requested_zone(pool: Pool, zone_name: str) -> None:
    volume = pool.create(size=MiB, accessibility_requirements=in_zone(zone_name))
    assert [dict(t.segments) for t in volume.accessible_topology] == [{ZONE: zone_name}]
    assert volume.volume_id.startswith(f"sn-{zone_name[-1]}:")


def test_create_volume_qos_parameters(pool: Pool) -> None:
    """`iops` and `bandwidth` reach the storage node; mutable_parameters take precedence
    (spec: "Values specified in mutable_parameters MUST take precedence")."""
    volume = pool.create(
        size=MiB,
        parameters={"iops": "1000", "bandwidth": "10Mi"},
        mutable_parameters={"iops": "2000"},
    )
    qos = pool.sn_volume(volume.volume_id).qos
    assert (qos.iops, qos.bytes_per_second) == (2000, 10 * MiB)


def test_create_volume_encrypted_parameter(pool: Pool) -> None:
    """`encrypted: "true"` is remembered by the storage node (a label) and reaches NodeStage
    in volume_context; "false" or no parameter gives a plain volume (docs/csi-node.md)."""
    encrypted = pool.create(size=MiB, parameters={"encrypted": "true"})
    assert encrypted.volume_context["nbd.csi.dev/encrypted"] == "true"
    assert pool.sn_volume(encrypted.volume_id).labels["nbd.csi.dev/encrypted"] == "true"
    for parameters in ({"encrypted": "false"}, {}):
        plain = pool.create(size=MiB, parameters=parameters)
        assert "nbd.csi.dev/encrypted" not in plain.volume_context
    listed = {
        e.volume.volume_id: e.volume
        for e in pool.controller.ListVolumes(pb.ListVolumesRequest(), timeout=CALL_TIMEOUT).entries
    }
    assert listed[encrypted.volume_id].volume_context["nbd.csi.dev/encrypted"] == "true"


def test_create_volume_zero_detection_parameter(pool: Pool) -> None:
    """`zeroDetection: "false"` reaches the storage node; absent or "true" leaves it on
    (docs/csi-driver.md, docs/storage-node.md "Thin writes")."""
    off = pool.create(size=MiB, parameters={"zeroDetection": "false"})
    assert pool.sn_volume(off.volume_id).zero_detection_disabled
    for parameters in ({}, {"zeroDetection": "true"}):
        on = pool.create(size=MiB, parameters=parameters)
        assert not pool.sn_volume(on.volume_id).zero_detection_disabled


def test_create_volume_from_snapshot(pool: Pool, existing: Existing) -> None:
    source = from_snapshot(existing.snapshot.snapshot_id)
    same = pool.controller.CreateVolume(
        cv(volume_content_source=source), timeout=CALL_TIMEOUT
    ).volume
    assert same.content_source == source
    assert same.capacity_bytes == existing.snapshot.size_bytes, "no range: the source's size"
    larger = pool.create(size=2 * MiB, volume_content_source=source)
    assert larger.capacity_bytes == 2 * MiB and larger.content_source == source
    # A volume made from a snapshot lives where the snapshot is.
    assert same.volume_id.split(":")[0] == existing.snapshot.snapshot_id.split(":")[0]


def test_create_volume_from_volume(pool: Pool, existing: Existing) -> None:
    source = from_volume(existing.other.volume_id)
    name = unique_name()
    clone = pool.create(name, MiB, volume_content_source=source)
    assert clone.content_source == source
    assert clone.volume_id.split(":")[0] == "sn-b"
    assert pool.create(name, MiB, volume_content_source=source).volume_id == clone.volume_id


# -- DeleteVolume -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "volume_id",
    [
        pytest.param(UNKNOWN_VOLUME, id="unknown"),
        pytest.param(UNKNOWN_NODE_VOLUME, id="unknown-storage-node"),
        pytest.param(MALFORMED_ID, id="malformed"),
    ],
)
def test_delete_volume_that_does_not_exist_is_ok(pool: Pool, volume_id: str) -> None:
    """Spec: "If a volume corresponding to the specified volume_id does not exist ... the
    Plugin MUST reply 0 OK"."""
    pool.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=CALL_TIMEOUT)


def test_delete_volume_twice(pool: Pool) -> None:
    volume = pool.create()
    for _ in range(2):
        pool.controller.DeleteVolume(
            pb.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=CALL_TIMEOUT
        )
    with pytest.raises(grpc.RpcError) as exc_info:
        pool.sn_volume(volume.volume_id)
    assert exc_info.value.code() == Code.NOT_FOUND
    expect_error(
        pool.controller.ControllerGetVolume,
        pb.ControllerGetVolumeRequest(volume_id=volume.volume_id),
        Code.NOT_FOUND,
    )
    assert volume.volume_id not in list_volume_ids(pool)


def test_delete_published_volume_fails_until_unpublished(pool: Pool) -> None:
    """DeleteVolume Errors, "Volume in use": FAILED_PRECONDITION; nothing altered."""
    volume = pool.create()
    pool.publish(volume.volume_id, NODE_1)
    expect_error(
        pool.controller.DeleteVolume,
        pb.DeleteVolumeRequest(volume_id=volume.volume_id),
        Code.FAILED_PRECONDITION,
    )
    assert len(pool.sn_attachments(volume.volume_id)) == 1
    pool.unpublish(volume.volume_id, NODE_1)
    pool.controller.DeleteVolume(
        pb.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=CALL_TIMEOUT
    )


def test_snapshots_outlive_their_volume(pool: Pool) -> None:
    """Spec, DeleteVolume: if the plugin deletes volumes without affecting their snapshots,
    "these snapshots MUST still be fully operational and acceptable as sources for new
    volumes as well as appear on ListSnapshot calls once the volume has been deleted"."""
    volume = pool.create()
    snapshot = pool.snapshot(volume.volume_id)
    pool.controller.DeleteVolume(
        pb.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=CALL_TIMEOUT
    )
    listed = list_snapshots(pool, pb.ListSnapshotsRequest(snapshot_id=snapshot.snapshot_id))
    assert [s.snapshot_id for s in listed] == [snapshot.snapshot_id]
    restored = pool.create(size=MiB, volume_content_source=from_snapshot(snapshot.snapshot_id))
    assert restored.capacity_bytes == MiB


# -- ControllerPublishVolume / ControllerUnpublishVolume --------------------------------------


def test_publish_context(pool: Pool) -> None:
    """docs/csi-driver.md: host, port, export and readonly; the attachment is bound to the
    address part of the node id."""
    volume = pool.create(accessibility_requirements=in_zone("zone-b"))
    context = pool.publish(volume.volume_id, NODE_1)
    assert set(context) == PUBLISH_CONTEXT_KEYS
    assert context["nbd.csi.dev/host"] == "127.0.0.1"
    assert context["nbd.csi.dev/port"] == str(pool.nodes["sn-b"].nbd_port)
    assert context["nbd.csi.dev/readonly"] == "false"
    [attachment] = pool.sn_attachments(volume.volume_id)
    assert attachment.node_address == "127.0.0.2"
    assert attachment.export_name == context["nbd.csi.dev/export"]
    assert not attachment.readonly
    # Spec: already published to this node, compatible: 0 OK, the same context (cacheable).
    assert pool.publish(volume.volume_id, NODE_1) == context


def test_publish_readonly(pool: Pool) -> None:
    volume = pool.create()
    context = pool.publish(volume.volume_id, NODE_1, readonly=True)
    assert context["nbd.csi.dev/readonly"] == "true"
    assert [a.readonly for a in pool.sn_attachments(volume.volume_id)] == [True]
    # ControllerPublishVolume Errors, "Volume published but is incompatible" (readonly flag).
    expect_error(
        pool.controller.ControllerPublishVolume,
        PUB(volume_id=volume.volume_id, node_id=NODE_1, volume_capability=BLOCK, readonly=False),
        Code.ALREADY_EXISTS,
    )


def test_publish_reader_only_mode_is_readonly(pool: Pool) -> None:
    """A reader-only access mode never gets a writable attachment, whatever `readonly` says."""
    volume = pool.create()
    context = pool.publish(volume.volume_id, NODE_1, cap=READ_ONLY, readonly=False)
    assert context["nbd.csi.dev/readonly"] == "true"
    assert [a.readonly for a in pool.sn_attachments(volume.volume_id)] == [True]


def test_publish_single_node_volume_to_second_node(pool: Pool) -> None:
    """ControllerPublishVolume Errors, "Volume published to another node": FAILED_PRECONDITION,
    and the message SHOULD name the node it is published at."""
    volume = pool.create()
    pool.publish(volume.volume_id, NODE_1)
    error: Any = expect_error(
        pool.controller.ControllerPublishVolume,
        PUB(volume_id=volume.volume_id, node_id=NODE_2, volume_capability=BLOCK),
        Code.FAILED_PRECONDITION,
    )
    assert "worker-1" in error.details()
    # Once unpublished from the first node, the second one may have it.
    pool.unpublish(volume.volume_id, NODE_1)
    pool.publish(volume.volume_id, NODE_2)
    assert [a.node_address for a in pool.sn_attachments(volume.volume_id)] == ["127.0.0.3"]


def test_publish_multi_node_block_volume_to_two_nodes(pool: Pool) -> None:
    """KubeVirt live migration (DESIGN.md): RWX block attached to two nodes at once."""
    volume = pool.create(cap=BLOCK_RWX)
    first = pool.publish(volume.volume_id, NODE_1, cap=BLOCK_RWX)
    second = pool.publish(volume.volume_id, NODE_2, cap=BLOCK_RWX)
    assert first["nbd.csi.dev/export"] != second["nbd.csi.dev/export"], "one credential per node"
    assert sorted(a.node_address for a in pool.sn_attachments(volume.volume_id)) == [
        "127.0.0.2",
        "127.0.0.3",
    ]
    assert sorted(get_volume(pool, volume.volume_id).status.published_node_ids) == [NODE_1, NODE_2]
    [entry] = [e for e in list_volumes(pool) if e.volume.volume_id == volume.volume_id]
    assert sorted(entry.status.published_node_ids) == [NODE_1, NODE_2]
    # Unpublish without node_id: "the SP MUST unpublish the volume from all nodes".
    pool.unpublish(volume.volume_id)
    assert pool.sn_attachments(volume.volume_id) == []
    assert list(get_volume(pool, volume.volume_id).status.published_node_ids) == []


def test_attach_limit_in_the_node_id_is_enforced(pool: Pool) -> None:
    """ControllerPublishVolume Errors, "Max volumes attached": RESOURCE_EXHAUSTED. The node
    plugin reports its limit in its id (NAME@ADDRESS;max-volumes=N, docs/csi-driver.md); the
    controller counts the node's attachments on every storage node (issue 13)."""
    name = unique_name("limited")
    node_id = f"{name}@127.0.0.9;max-volumes=4"
    volumes = [pool.create(accessibility_requirements=in_zone("zone-a")) for _ in range(2)]
    volumes += [pool.create(accessibility_requirements=in_zone("zone-b")) for _ in range(3)]
    for volume in volumes[:4]:
        pool.publish(volume.volume_id, node_id)
    pool.publish(volumes[0].volume_id, node_id)  # published again: idempotent, not a fifth
    fifth = PUB(volume_id=volumes[4].volume_id, node_id=node_id, volume_capability=BLOCK)
    error: Any = expect_error(
        pool.controller.ControllerPublishVolume, fifth, Code.RESOURCE_EXHAUSTED
    )
    assert "4" in error.details()
    assert pool.sn_attachments(volumes[4].volume_id) == []
    # A slot freed: the fifth fits.
    pool.unpublish(volumes[0].volume_id, node_id)
    pool.publish(volumes[4].volume_id, node_id)
    # The old form of the id (no limit) is the same node: its attachments count, and
    # unpublishing with the new form removes them.
    pool.unpublish(volumes[4].volume_id, node_id)
    pool.publish(volumes[4].volume_id, f"{name}@127.0.0.9")
    again = PUB(volume_id=volumes[0].volume_id, node_id=node_id, volume_capability=BLOCK)
    expect_error(pool.controller.ControllerPublishVolume, again, Code.RESOURCE_EXHAUSTED)
    pool.unpublish(volumes[4].volume_id, node_id)
    assert pool.sn_attachments(volumes[4].volume_id) == []
    pool.publish(volumes[0].volume_id, node_id)
    # A malformed limit is not a node id of ours.
    for bad in (f"{name}@127.0.0.9;max-volumes=0", f"{name}@127.0.0.9;limit=4"):
        request = PUB(volume_id=volumes[4].volume_id, node_id=bad, volume_capability=BLOCK)
        expect_error(pool.controller.ControllerPublishVolume, request, Code.NOT_FOUND)
    pool.unpublish(volumes[0].volume_id)
    for volume in volumes:
        pool.unpublish(volume.volume_id)
        assert pool.sn_attachments(volume.volume_id) == []


def test_concurrent_publishes_cannot_pass_the_attach_limit(pool: Pool) -> None:
    """Publishes to one node are counted one at a time: of 6 at once with room for 2, exactly
    2 succeed and the others are RESOURCE_EXHAUSTED (or ABORTED, never OK)."""
    node_id = f"{unique_name('race')}@127.0.0.9;max-volumes=2"
    volumes = [pool.create() for _ in range(6)]
    futures = [
        pool.controller.ControllerPublishVolume.future(
            PUB(volume_id=v.volume_id, node_id=node_id, volume_capability=BLOCK),
            timeout=CALL_TIMEOUT,
        )
        for v in volumes
    ]
    codes = [outcome(f)[0] for f in futures]
    assert codes.count(Code.OK) == 2, codes
    assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}, codes
    attached = [v for v in volumes if pool.sn_attachments(v.volume_id)]
    assert len(attached) == 2
    for volume in attached:
        pool.unpublish(volume.volume_id)


def test_create_volume_for_a_node_that_reports_only_its_node_segment(pool: Pool) -> None:
    """A node plugin without --topology reports topology.nbd.csi.dev/node=NAME (the plugin
    advertises VOLUME_ACCESSIBILITY_CONSTRAINTS); every storage node serves every node, so
    that key never narrows placement, while a zone next to it still does (issue 13)."""
    only_node = pb.Topology(segments={NODE_TOPOLOGY_KEY: "worker-1"})
    volume = pool.create(
        accessibility_requirements=pb.TopologyRequirement(
            requisite=[only_node], preferred=[only_node]
        )
    )
    assert volume.volume_id.partition(":")[0] in pool.nodes
    with_zone = pb.Topology(segments={NODE_TOPOLOGY_KEY: "worker-1", ZONE: "zone-b"})
    volume = pool.create(accessibility_requirements=pb.TopologyRequirement(requisite=[with_zone]))
    assert volume.volume_id.startswith("sn-b:")
    assert [dict(t.segments) for t in volume.accessible_topology] == [{ZONE: "zone-b"}]


def test_unpublish_is_idempotent(pool: Pool) -> None:
    """Spec: "If the volume corresponding to the volume_id is not attached to the node
    corresponding to the node_id, the Plugin MUST reply 0 OK"; a volume or node that cannot be
    found, "can be safely regarded as ControllerUnpublished": SHOULD return 0 OK."""
    volume = pool.create()
    pool.publish(volume.volume_id, NODE_1)
    pool.unpublish(volume.volume_id, NODE_1)
    assert pool.sn_attachments(volume.volume_id) == []
    pool.unpublish(volume.volume_id, NODE_1)  # twice
    pool.unpublish(volume.volume_id, NODE_3)  # never attached there
    pool.unpublish(volume.volume_id, "worker-1")  # not NAME@ADDRESS: nothing can be attached
    for volume_id in (UNKNOWN_VOLUME, UNKNOWN_NODE_VOLUME, MALFORMED_ID):
        pool.unpublish(volume_id, NODE_1)


def test_unpublish_revokes_the_credential(pool: Pool) -> None:
    volume = pool.create()
    before = pool.publish(volume.volume_id, NODE_1)["nbd.csi.dev/export"]
    pool.unpublish(volume.volume_id, NODE_1)
    after = pool.publish(volume.volume_id, NODE_1)["nbd.csi.dev/export"]
    assert after != before


# -- ValidateVolumeCapabilities ---------------------------------------------------------------


@pytest.mark.parametrize(
    "caps",
    [
        pytest.param([BLOCK, MOUNT_RWX], id="mount-multi-writer"),
        pytest.param([MOUNT], id="mount-on-a-block-volume"),
        pytest.param([BLOCK, BLOCK_RWX], id="multi-node-on-a-single-node-volume"),
    ],
)
def test_validate_unsupported_capability_is_not_confirmed(
    pool: Pool, existing: Existing, caps: list[pb.VolumeCapability]
) -> None:
    """Spec: "SHALL return confirmed only if all the volume capabilities specified in the
    request are supported"; otherwise `confirmed` empty and a message for the CO."""
    reply = pool.controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=existing.volume.volume_id, volume_capabilities=caps
        ),
        timeout=CALL_TIMEOUT,
    )
    assert not reply.HasField("confirmed")
    assert reply.message


def test_validate_with_volume_context(pool: Pool, existing: Existing) -> None:
    reply = pool.controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=existing.volume.volume_id,
            volume_context=existing.volume.volume_context,
            volume_capabilities=[BLOCK, READ_ONLY],
        ),
        timeout=CALL_TIMEOUT,
    )
    assert list(reply.confirmed.volume_capabilities) == [BLOCK, READ_ONLY], reply.message


# -- ListVolumes ------------------------------------------------------------------------------


def list_volumes(pool: Pool, max_entries: int = 0) -> list[pb.ListVolumesResponse.Entry]:
    """Every page until next_token is empty (bounded), checking each page's size."""
    entries: list[pb.ListVolumesResponse.Entry] = []
    token = ""
    for _ in range(10_000):
        reply = pool.controller.ListVolumes(
            pb.ListVolumesRequest(max_entries=max_entries, starting_token=token),
            timeout=CALL_TIMEOUT,
        )
        if max_entries:
            assert len(reply.entries) <= max_entries, "MUST NOT return more than max_entries"
        entries += reply.entries
        token = reply.next_token
        if not token:
            return entries
    raise AssertionError("ListVolumes never ended")


def list_volume_ids(pool: Pool) -> list[str]:
    return [e.volume.volume_id for e in list_volumes(pool)]


def test_list_volumes_paging_across_storage_nodes(pool: Pool) -> None:
    ours = {
        pool.create(accessibility_requirements=in_zone(z)).volume_id
        for z in ("zone-a", "zone-b", "zone-a", "zone-b", "zone-a")
    }
    everything = list_volume_ids(pool)
    assert len(everything) == len(set(everything)), "a volume listed twice"
    assert ours <= set(everything)
    for max_entries in (1, 2, 3):
        paged = [e.volume.volume_id for e in list_volumes(pool, max_entries)]
        assert sorted(paged) == sorted(everything), f"max_entries={max_entries}"


def test_list_volumes_entries(pool: Pool) -> None:
    """LIST_VOLUMES_PUBLISHED_NODES: status MUST be specified; VOLUME_CONDITION: the
    condition MUST be specified."""
    volume = pool.create()
    pool.publish(volume.volume_id, NODE_3)
    [entry] = [e for e in list_volumes(pool) if e.volume.volume_id == volume.volume_id]
    assert entry.volume == volume
    assert list(entry.status.published_node_ids) == [NODE_3]
    assert entry.status.HasField("volume_condition")
    assert not entry.status.volume_condition.abnormal


# -- GetCapacity ------------------------------------------------------------------------------


def capacity(pool: Pool, **kw: Any) -> int:
    reply = pool.controller.GetCapacity(pb.GetCapacityRequest(**kw), timeout=CALL_TIMEOUT)
    assert reply.available_capacity >= 0
    return int(reply.available_capacity)


def test_get_capacity(pool: Pool) -> None:
    total = capacity(pool)
    per_zone = {z: capacity(pool, accessible_topology=zone(z)) for z in ("zone-a", "zone-b")}
    assert total > 0 and all(v > 0 for v in per_zone.values())
    assert total >= max(per_zone.values())
    assert capacity(pool, accessible_topology=zone("nowhere")) == 0
    assert capacity(pool, volume_capabilities=[BLOCK]) == total
    expect_error(
        pool.controller.GetCapacity,
        pb.GetCapacityRequest(volume_capabilities=[MOUNT_RWX]),
        Code.INVALID_ARGUMENT,
    )
    # Provisioning shrinks what is left in that zone (thin: it counts promised bytes).
    pool.create(size=GiB, accessibility_requirements=in_zone("zone-a"))
    assert capacity(pool, accessible_topology=zone("zone-a")) <= per_zone["zone-a"] - GiB


# -- snapshots --------------------------------------------------------------------------------


def get_snapshot(pool: Pool, snapshot_id: str) -> pb.Snapshot:
    reply = pool.controller.GetSnapshot(
        pb.GetSnapshotRequest(snapshot_id=snapshot_id), timeout=CALL_TIMEOUT
    )
    return reply.snapshot


def list_snapshots(pool: Pool, request: pb.ListSnapshotsRequest) -> list[pb.Snapshot]:
    found: list[pb.Snapshot] = []
    for _ in range(10_000):
        reply = pool.controller.ListSnapshots(request, timeout=CALL_TIMEOUT)
        if request.max_entries:
            assert len(reply.entries) <= request.max_entries
        found += [e.snapshot for e in reply.entries]
        if not reply.next_token:
            return found
        following = pb.ListSnapshotsRequest()
        following.CopyFrom(request)
        following.starting_token = reply.next_token
        request = following
    raise AssertionError("ListSnapshots never ended")


def test_create_snapshot(pool: Pool) -> None:
    volume = pool.create(size=2 * MiB, accessibility_requirements=in_zone("zone-b"))
    name = unique_name("snap")
    snapshot = pool.snapshot(volume.volume_id, name)
    assert snapshot.snapshot_id.startswith("sn-b:snap-")
    assert snapshot.source_volume_id == volume.volume_id
    assert snapshot.size_bytes == 2 * MiB
    assert snapshot.ready_to_use
    assert snapshot.creation_time.seconds > 0
    # Idempotent: same name, same source.
    assert pool.snapshot(volume.volume_id, name) == snapshot
    assert get_snapshot(pool, snapshot.snapshot_id) == snapshot


@pytest.mark.parametrize(
    "snapshot_id",
    [
        pytest.param(UNKNOWN_SNAPSHOT, id="unknown"),
        pytest.param("sn-z:snap-00000000deadbeef", id="unknown-storage-node"),
        pytest.param(MALFORMED_ID, id="malformed"),
    ],
)
def test_delete_snapshot_that_does_not_exist_is_ok(pool: Pool, snapshot_id: str) -> None:
    """Spec: "If a snapshot corresponding to the specified snapshot_id does not exist ... the
    Plugin MUST reply 0 OK"."""
    pool.controller.DeleteSnapshot(
        pb.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=CALL_TIMEOUT
    )


def test_delete_snapshot_twice(pool: Pool) -> None:
    volume = pool.create()
    snapshot = pool.snapshot(volume.volume_id)
    for _ in range(2):
        pool.controller.DeleteSnapshot(
            pb.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id), timeout=CALL_TIMEOUT
        )
    expect_error(
        pool.controller.GetSnapshot,
        pb.GetSnapshotRequest(snapshot_id=snapshot.snapshot_id),
        Code.NOT_FOUND,
    )
    assert list_snapshots(pool, pb.ListSnapshotsRequest(snapshot_id=snapshot.snapshot_id)) == []


def test_list_snapshots_paging_and_filters(pool: Pool) -> None:
    a = pool.create(accessibility_requirements=in_zone("zone-a"))
    b = pool.create(accessibility_requirements=in_zone("zone-b"))
    of_a = {pool.snapshot(a.volume_id).snapshot_id for _ in range(2)}
    of_b = {pool.snapshot(b.volume_id).snapshot_id for _ in range(2)}
    everything = [s.snapshot_id for s in list_snapshots(pool, pb.ListSnapshotsRequest())]
    assert len(everything) == len(set(everything))
    assert of_a | of_b <= set(everything)
    for max_entries in (1, 3):
        paged = list_snapshots(pool, pb.ListSnapshotsRequest(max_entries=max_entries))
        assert sorted(s.snapshot_id for s in paged) == sorted(everything)
    by_source = list_snapshots(pool, pb.ListSnapshotsRequest(source_volume_id=a.volume_id))
    assert {s.snapshot_id for s in by_source} == of_a
    assert all(s.source_volume_id == a.volume_id for s in by_source)
    one = next(iter(of_b))
    assert [
        s.snapshot_id for s in list_snapshots(pool, pb.ListSnapshotsRequest(snapshot_id=one))
    ] == [one]
    for request in (
        pb.ListSnapshotsRequest(snapshot_id=UNKNOWN_SNAPSHOT),
        pb.ListSnapshotsRequest(snapshot_id=MALFORMED_ID),
        pb.ListSnapshotsRequest(source_volume_id=UNKNOWN_VOLUME),
        pb.ListSnapshotsRequest(source_volume_id=MALFORMED_ID),
        pb.ListSnapshotsRequest(snapshot_id=one, source_volume_id=a.volume_id),  # both must hold
    ):
        assert list_snapshots(pool, request) == [], str(request)


# -- ControllerExpandVolume -------------------------------------------------------------------


def expand(pool: Pool, volume_id: str, size: int, cap: pb.VolumeCapability | None = None) -> Any:
    request = pb.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=size)
    )
    if cap is not None:
        request.volume_capability.CopyFrom(cap)
    return pool.controller.ControllerExpandVolume(request, timeout=CALL_TIMEOUT)


def test_expand_volume(pool: Pool) -> None:
    volume = pool.create(size=MiB)
    reply = expand(pool, volume.volume_id, 2 * MiB + 1, BLOCK)
    assert reply.capacity_bytes == 2 * MiB + 4096, "rounded up to 4 KiB"
    assert pool.sn_volume(volume.volume_id).size_bytes == reply.capacity_bytes
    # Idempotent, and a smaller target is "already larger than or equal": 0 OK, size unchanged.
    for size in (2 * MiB + 1, MiB):
        assert expand(pool, volume.volume_id, size, BLOCK).capacity_bytes == reply.capacity_bytes
    assert get_volume(pool, volume.volume_id).volume.capacity_bytes == reply.capacity_bytes


def test_expand_mount_volume_needs_node_expansion(pool: Pool) -> None:
    volume = pool.create(cap=MOUNT)
    reply = expand(pool, volume.volume_id, 4 * MiB, MOUNT)
    assert reply.capacity_bytes == 4 * MiB
    assert reply.node_expansion_required, "a filesystem must grow on the node"


def test_expand_published_volume(pool: Pool) -> None:
    """VolumeExpansion ONLINE: the CO may expand while the volume is published."""
    volume = pool.create()
    pool.publish(volume.volume_id, NODE_1)
    assert expand(pool, volume.volume_id, 3 * MiB, BLOCK).capacity_bytes == 3 * MiB


# -- ControllerGetVolume ----------------------------------------------------------------------


def get_volume(pool: Pool, volume_id: str) -> pb.ControllerGetVolumeResponse:
    return pool.controller.ControllerGetVolume(
        pb.ControllerGetVolumeRequest(volume_id=volume_id), timeout=CALL_TIMEOUT
    )


def test_controller_get_volume(pool: Pool) -> None:
    volume = pool.create(accessibility_requirements=in_zone("zone-b"))
    reply = get_volume(pool, volume.volume_id)
    assert reply.volume == volume
    assert reply.HasField("status")
    assert list(reply.status.published_node_ids) == []
    assert reply.status.HasField("volume_condition"), "VOLUME_CONDITION: MUST be non-empty"
    assert not reply.status.volume_condition.abnormal
    pool.publish(volume.volume_id, NODE_2)
    assert list(get_volume(pool, volume.volume_id).status.published_node_ids) == [NODE_2]


# -- ControllerModifyVolume -------------------------------------------------------------------


def modify(pool: Pool, volume_id: str, **parameters: str) -> None:
    pool.controller.ControllerModifyVolume(
        pb.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=parameters),
        timeout=CALL_TIMEOUT,
    )


def test_modify_volume(pool: Pool) -> None:
    volume = pool.create()
    modify(pool, volume.volume_id, iops="500")
    qos = pool.sn_volume(volume.volume_id).qos
    assert (qos.iops, qos.bytes_per_second) == (500, 0)
    # Spec: "SPs MUST NOT modify volumes based on the absence of keys".
    modify(pool, volume.volume_id, bandwidth="20Mi")
    qos = pool.sn_volume(volume.volume_id).qos
    assert (qos.iops, qos.bytes_per_second) == (500, 20 * MiB)
    modify(pool, volume.volume_id, bandwidth="20Mi")  # idempotent
    # A bad value changes nothing, not even the good key next to it.
    expect_error(
        pool.controller.ControllerModifyVolume,
        pb.ControllerModifyVolumeRequest(
            volume_id=volume.volume_id, mutable_parameters={"iops": "1", "bandwidth": "lots"}
        ),
        Code.INVALID_ARGUMENT,
    )
    qos = pool.sn_volume(volume.volume_id).qos
    assert (qos.iops, qos.bytes_per_second) == (500, 20 * MiB)
    modify(pool, volume.volume_id, iops="0")  # zero: unlimited
    assert pool.sn_volume(volume.volume_id).qos.iops == 0


# -- secrets ----------------------------------------------------------------------------------


def test_credentials_and_secrets_never_logged(pool: Pool) -> None:
    """docs/csi-driver.md: the export name carries the credential, never logged; Secrets
    Requirements: secrets "MUST be treated as such (not logged, etc.)"."""
    secret = f"s3cret-{uuid.uuid4().hex}"
    volume = pool.controller.CreateVolume(
        cv(capacity_range=exact(MiB), secrets={"password": secret}), timeout=CALL_TIMEOUT
    ).volume
    request = PUB(volume_id=volume.volume_id, node_id=NODE_1, volume_capability=BLOCK,
                  secrets={"password": secret})  # fmt: skip
    context = pool.controller.ControllerPublishVolume(request, timeout=CALL_TIMEOUT).publish_context
    # Also through an error path: a second node is refused (the message names the first).
    request.node_id = NODE_2
    expect_error(pool.controller.ControllerPublishVolume, request, Code.FAILED_PRECONDITION)
    credential = context["nbd.csi.dev/export"].rsplit(".", 1)[-1]
    log = pool.plugin.log_text()
    assert context["nbd.csi.dev/export"] not in log
    assert credential not in log
    assert secret not in log
    for node in pool.nodes.values():
        assert credential not in node.log_text()


# -- concurrency ------------------------------------------------------------------------------


def storage_volume_count(pool: Pool) -> int:
    count = 0
    for node in pool.nodes.values():
        token = ""
        for _ in range(10_000):
            reply = node.api.ListVolumes(sn.ListVolumesRequest(page_token=token))
            count += len(reply.volumes)
            token = reply.next_page_token
            if not token:
                break
    return count


def outcome(future: Any) -> tuple[Code, Any]:
    """(OK, reply) or (status code, None) of a finished gRPC future."""
    error = future.exception()
    if error is None:
        return Code.OK, future.result()
    return error.code(), None


def test_concurrent_create_same_name(pool: Pool) -> None:
    """Spec, Concurrency: simultaneous calls MAY get ABORTED; never two volumes for one name."""
    for _ in range(3):
        before = storage_volume_count(pool)
        request = cv(capacity_range=exact(MiB))
        futures = [
            pool.controller.CreateVolume.future(request, timeout=CALL_TIMEOUT) for _ in range(3)
        ]
        results = [outcome(f) for f in futures]
        assert {code for code, _ in results} <= {Code.OK, Code.ABORTED}, results
        ids = {reply.volume.volume_id for code, reply in results if code == Code.OK}
        final = pool.controller.CreateVolume(request, timeout=CALL_TIMEOUT).volume.volume_id
        assert ids <= {final}, "two different volumes for one name"
        assert storage_volume_count(pool) == before + 1


def test_concurrent_publish_and_delete(pool: Pool) -> None:
    """Whatever order they run in, the outcome is consistent: a deleted volume has no
    attachment, and a volume that was published still exists with its attachment."""
    for _ in range(3):
        volume = pool.create()
        publish = pool.controller.ControllerPublishVolume.future(
            PUB(volume_id=volume.volume_id, node_id=NODE_1, volume_capability=BLOCK),
            timeout=CALL_TIMEOUT,
        )
        delete = pool.controller.DeleteVolume.future(
            pb.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=CALL_TIMEOUT
        )
        (published, _), (deleted, _) = outcome(publish), outcome(delete)
        assert published in {Code.OK, Code.ABORTED, Code.NOT_FOUND}, published
        assert deleted in {Code.OK, Code.ABORTED, Code.FAILED_PRECONDITION}, deleted
        assert not (published == Code.OK and deleted == Code.OK), "published a deleted volume"
        exists = volume.volume_id in list_volume_ids(pool)
        if deleted == Code.OK:
            assert not exists
        if published == Code.OK:
            assert exists and len(pool.sn_attachments(volume.volume_id)) == 1
            pool.unpublish(volume.volume_id, NODE_1)


def test_concurrent_expand(pool: Pool) -> None:
    volume = pool.create()
    sizes = [2 * MiB, 3 * MiB]
    barrier = threading.Barrier(len(sizes))
    results: dict[int, Code] = {}

    def call(size: int) -> None:
        barrier.wait(CALL_TIMEOUT)
        try:
            expand(pool, volume.volume_id, size)
            results[size] = Code.OK
        except grpc.RpcError as exc:
            results[size] = exc.code()

    threads = [threading.Thread(target=call, args=(s,)) for s in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT * 2)
    assert set(results.values()) <= {Code.OK, Code.ABORTED}, results
    done = [s for s, code in results.items() if code == Code.OK]
    assert done, "at least one expansion goes through"
    # Whichever ran last, an expansion never shrinks: the largest accepted size wins.
    assert pool.sn_volume(volume.volume_id).size_bytes == max(done)
