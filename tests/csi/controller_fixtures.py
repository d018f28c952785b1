"""Fixtures and helpers for the CSI Controller conformance tests.

Owns the pool the controller is tested against: two real storage nodes on loopback (`sn-a` in
zone `zone-a`, `sn-b` in zone `zone-b`, one shared API token, no NBD worker processes to save
CPU) and one real `python -m csi --mode controller` process configured with both, started
once per test module. Also the small vocabulary the tests are written in: volume capabilities
by name, unique CSI names, a helper that expects a gRPC status, and access to a CSI volume's
object on its storage node (`STORAGE_NODE_ID:VOLUME_ID`, docs/csi-driver.md).

A test module makes its own module-scoped fixture from `start_pool` and `stop_pool` (an
imported fixture would shadow the test arguments for the linters).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.v1 import csi_pb2 as pb
from storage_node.v1 import storage_node_pb2 as sn
from tests.support.api import ApiNode, start_api_node

from .plugin import Plugin, start_plugin, storage_args

CALL_TIMEOUT = 60.0
ZONE = "topology.nbd.csi.dev/zone"
STORAGE_NODES = (("sn-a", "zone-a"), ("sn-b", "zone-b"))
MiB = 1 << 20
GiB = 1 << 30

Mode = pb.VolumeCapability.AccessMode.Mode


def capability(
    access_type: str = "block", mode: int = Mode.SINGLE_NODE_WRITER, fs_type: str = ""
) -> pb.VolumeCapability:
    """A VolumeCapability: `block` or `mount` (with fs_type) and an access mode."""
    access_mode = pb.VolumeCapability.AccessMode(mode=mode)  # type: ignore[arg-type]
    if access_type == "block":
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=access_mode)
    assert access_type == "mount"
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=access_mode
    )


BLOCK = capability("block")
MOUNT = capability("mount", fs_type="ext4")
BLOCK_RWX = capability("block", Mode.MULTI_NODE_MULTI_WRITER)


def unique_name(tag: str = "vol") -> str:
    """A CSI name no other test uses (the provisioner's names look like pvc-UUID)."""
    return f"{tag}-{uuid.uuid4().hex[:16]}"


def zone(name: str) -> pb.Topology:
    return pb.Topology(segments={ZONE: name})


def in_zone(name: str) -> pb.TopologyRequirement:
    return pb.TopologyRequirement(requisite=[zone(name)], preferred=[zone(name)])


def expect_error(call: Callable[..., Any], request: Any, code: grpc.StatusCode) -> grpc.RpcError:
    """Call and require status `code`; the message must say something (Error Scheme)."""
    with pytest.raises(grpc.RpcError) as exc_info:
        call(request, timeout=CALL_TIMEOUT)
    error: Any = exc_info.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    assert error.details(), "a non-OK status must carry a human-readable message"
    return exc_info.value


@dataclass
class Pool:
    """Two storage nodes and a controller plugin in front of them."""

    nodes: dict[str, ApiNode]
    plugin: Plugin

    @property
    def controller(self) -> Any:
        return self.plugin.controller

    def node_of(self, volume_id: str) -> tuple[ApiNode, str]:
        """The storage node and its local id for a CSI volume or snapshot id."""
        node_id, _, local_id = volume_id.partition(":")
        assert node_id in self.nodes and local_id, f"not STORAGE_NODE:ID: {volume_id!r}"
        return self.nodes[node_id], local_id

    def sn_volume(self, volume_id: str) -> sn.Volume:
        node, local_id = self.node_of(volume_id)
        return node.api.GetVolume(sn.GetVolumeRequest(volume_id=local_id))

    def sn_attachments(self, volume_id: str) -> list[sn.Attachment]:
        node, local_id = self.node_of(volume_id)
        return list(
            node.api.ListAttachments(sn.ListAttachmentsRequest(volume_id=local_id)).attachments
        )

    def create(
        self,
        name: str | None = None,
        size: int = MiB,
        cap: pb.VolumeCapability = BLOCK,
        **kw: Any,
    ) -> pb.Volume:
        """CreateVolume with an exact size; returns the Volume."""
        request = pb.CreateVolumeRequest(
            name=name or unique_name(),
            capacity_range=pb.CapacityRange(required_bytes=size, limit_bytes=size),
            volume_capabilities=[cap],
            **kw,
        )
        reply = self.controller.CreateVolume(request, timeout=CALL_TIMEOUT)
        return reply.volume

    def snapshot(self, source_volume_id: str, name: str | None = None) -> pb.Snapshot:
        request = pb.CreateSnapshotRequest(
            source_volume_id=source_volume_id, name=name or unique_name("snap")
        )
        return self.controller.CreateSnapshot(request, timeout=CALL_TIMEOUT).snapshot

    def publish(
        self, volume_id: str, node_id: str, cap: pb.VolumeCapability = BLOCK, readonly: bool = False
    ) -> dict[str, str]:
        request = pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, volume_capability=cap, readonly=readonly
        )
        reply = self.controller.ControllerPublishVolume(request, timeout=CALL_TIMEOUT)
        return dict(reply.publish_context)

    def unpublish(self, volume_id: str, node_id: str = "") -> None:
        request = pb.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id)
        self.controller.ControllerUnpublishVolume(request, timeout=CALL_TIMEOUT)


def start_pool(base: Path, *plugin_args: str) -> Pool:
    """Start both storage nodes (one token) and the controller; stop them with `stop_pool`."""
    token = secrets.token_urlsafe(32)
    nodes: dict[str, ApiNode] = {}
    try:
        for node_id, node_zone in STORAGE_NODES:
            data_dir = base / node_id
            data_dir.mkdir(parents=True)
            (data_dir / "api-token").write_text(token + "\n")
            (data_dir / "api-token").chmod(0o600)
            nodes[node_id] = start_api_node(
                data_dir,
                workers=0,
                node_id=node_id,
                extra_args=["--topology", f"{ZONE}={node_zone}"],
            )
        args = storage_args(
            [(node_id, node.api_port) for node_id, node in nodes.items()],
            base / "sn-a" / "api-token",
        )
        plugin = start_plugin(base / "plugin", "--mode", "controller", *args, *plugin_args)
    except BaseException:
        for node in nodes.values():
            node.stop()
        raise
    return Pool(nodes, plugin)


def stop_pool(pool: Pool) -> None:
    pool.plugin.stop()
    for node in pool.nodes.values():
        node.stop()
