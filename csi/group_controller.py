"""The CSI GroupController service (csi-spec-v1.12.md, "Group Controller Service RPCs"):
crash-consistent snapshots of several volumes, also across storage nodes.

Owns CreateVolumeGroupSnapshot, GetVolumeGroupSnapshot and DeleteVolumeGroupSnapshot over the
storage nodes' group snapshot calls (storage_node.groups, docs/storage-node-api.md). A group
is cut in three steps, each on every storage node of the group before the next begins:
prepare (copies converge while writes go on), hold (every member's new requests wait, its
copy completes), commit (released, made durable). No member is released before every member
of every node is held, so the snapshots are of one instant relative to any stream of
dependent writes: the spec's "write-order consistency guarantee" (CreateVolumeGroupSnapshot).
A node releases a hold by itself when its lease runs out, so a controller that crashes
between the steps never leaves a volume frozen; the group then fails and nothing is kept.

The group id is `grp-` and 16 hex digits of the SHA-256 of the group's name: a retried
CreateVolumeGroupSnapshot finds what an earlier attempt made without any state here. Every
member is an ordinary snapshot on its node (`NODE:snap-...`, restorable with CreateVolume)
whose row names the group and whose name says how many members the group has
(`GRP.K-of-N`), so Get and Delete work after a restart, and a group left incomplete by a
crash is told from a complete one. Members of one group belong to one tenant; each counts as
a snapshot in the tenant's quota (csi.quota).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Histogram

from storage_node.v1 import storage_node_pb2 as sn

from .controller import (
    CO_PREFIX,
    SNAPSHOT_REFUSED,
    ControllerServicer,
    _final_refusal,
    check_name,
    key_list,
    require,
    timestamp,
)
from .errors import (
    Aborted,
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageNodeError,
    rpc,
)
from .storage_nodes import StorageNodeClient
from .v1 import csi_pb2 as pb
from .v1 import csi_pb2_grpc as pb_grpc

log = logging.getLogger("csi.group_controller")
T = TypeVar("T")

MAX_MEMBERS = 64  # the storage node's bound per node, and ours per group
# A prepared node waits, unheld, while the other nodes copy: long enough for a large volume's
# first pass on ext4. The hold lease bounds how long any member's I/O can stay held if the
# commit never comes (the longest stall a guest sees); see docs/csi-driver.md.
PREPARE_LEASE = 900.0
HOLD_LEASE = 10.0
_GROUP_ID = re.compile(r"^grp-[0-9a-f]{16}$")
_MEMBER_NAME = re.compile(r"^grp-[0-9a-f]{16}\.([0-9]+)-of-([0-9]+)$")

_Cap = pb.GroupControllerServiceCapability.RPC.Type
CAPABILITIES = [
    pb.GroupControllerServiceCapability(
        rpc=pb.GroupControllerServiceCapability.RPC(
            type=_Cap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
        )
    )
]


def group_id_for(storage_name: str) -> str:
    return "grp-" + hashlib.sha256(storage_name.encode()).hexdigest()[:16]


Members = list[tuple[StorageNodeClient, sn.Snapshot]]


def complete(members: Members) -> bool:
    """Every member the group was cut with is there and ready."""
    totals = set()
    for _, s in members:
        match = _MEMBER_NAME.match(s.name)
        totals.add(int(match.group(2)) if match else -1)
    return len(totals) == 1 and totals.pop() == len(members) and all(s.ready for _, s in members)


class GroupControllerServicer(pb_grpc.GroupControllerServicer):
    def __init__(self, controller: ControllerServicer, registry: CollectorRegistry) -> None:
        self.controller = controller
        self.nodes = controller.nodes
        self.quotas = controller.quotas
        self.inflight = controller.inflight
        self.hold_seconds = Histogram(
            "nbdcsi_group_snapshot_hold_seconds",
            "Per group snapshot: from the hold requests to the last storage node's release, "
            "an upper bound of how long any member's I/O was held",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    @rpc
    async def GroupControllerGetCapabilities(
        self, request: pb.GroupControllerGetCapabilitiesRequest, context: Any
    ) -> pb.GroupControllerGetCapabilitiesResponse:
        return pb.GroupControllerGetCapabilitiesResponse(capabilities=CAPABILITIES)

    # -- reading a group -------------------------------------------------------------------

    async def _members(self, group_id: str) -> Members:
        """Every member of the group on every storage node (a node that does not answer
        makes the call UNAVAILABLE: a group is never reported or deleted in part)."""
        replies = await self.nodes.every(
            lambda n: n.call("ListSnapshots", sn.ListSnapshotsRequest(group_id=group_id)),
            f"look up group snapshot {group_id}",
        )
        members = [(node, s) for node, reply in replies for s in reply.snapshots]
        return sorted(members, key=lambda m: m[1].name)

    def _csi_group(self, group_id: str, members: Members) -> pb.VolumeGroupSnapshot:
        return pb.VolumeGroupSnapshot(
            group_snapshot_id=group_id,
            snapshots=[self.controller._csi_snapshot(n, s) for n, s in members],
            creation_time=timestamp(max(s.created_at for _, s in members)),
            ready_to_use=complete(members),
        )

    def _check_listed(
        self, given: Sequence[str], members: Members, group_id: str, exact: bool
    ) -> None:
        """The CO's snapshot_ids against the group's members: "Snapshot list mismatch" is
        INVALID_ARGUMENT (Get and DeleteVolumeGroupSnapshot errors); `exact` false accepts a
        list that names more (a retried delete after a partial one). Nodes the list names
        must be in service, so a member is never missed because its node is away."""
        for snapshot_id in given:
            node_id = snapshot_id.partition(":")[0]
            self.controller._node(node_id, f"snapshot {snapshot_id}")
        have = {f"{n.id}:{s.id}" for n, s in members}
        if given and (have != set(given) if exact else not have <= set(given)):
            raise InvalidArgument(
                f"snapshot_ids do not match group snapshot {group_id}: it has "
                + (", ".join(sorted(have)) or "no members")
            )

    @rpc
    async def GetVolumeGroupSnapshot(
        self, request: pb.GetVolumeGroupSnapshotRequest, context: Any
    ) -> pb.GetVolumeGroupSnapshotResponse:
        require(request.group_snapshot_id, "group_snapshot_id")
        group_id = request.group_snapshot_id
        members = await self._members(group_id) if _GROUP_ID.match(group_id) else []
        if not members:
            raise NotFound(f"group snapshot {group_id} does not exist")
        self._check_listed(request.snapshot_ids, members, group_id, exact=True)
        return pb.GetVolumeGroupSnapshotResponse(group_snapshot=self._csi_group(group_id, members))

    # -- deleting --------------------------------------------------------------------------

    @rpc
    async def DeleteVolumeGroupSnapshot(
        self, request: pb.DeleteVolumeGroupSnapshotRequest, context: Any
    ) -> pb.DeleteVolumeGroupSnapshotResponse:
        require(request.group_snapshot_id, "group_snapshot_id")
        group_id = request.group_snapshot_id
        if not _GROUP_ID.match(group_id):
            return pb.DeleteVolumeGroupSnapshotResponse()  # names nothing of ours: gone
        with self.inflight.guard(group_id):
            members = await self._members(group_id)
            # A retry after a partial delete lists more than is left: only members the list
            # does not name are a mismatch.
            self._check_listed(request.snapshot_ids, members, group_id, exact=False)
            await self._delete(group_id, [n for n, _ in members])
        for tenant in {s.tenant for _, s in members}:
            await self.quotas.report(tenant)
        return pb.DeleteVolumeGroupSnapshotResponse()

    async def _delete(self, group_id: str, nodes: Sequence[StorageNodeClient]) -> None:
        by_id = {n.id: n for n in nodes}
        await _all(
            [
                n.call("DeleteGroupSnapshot", sn.DeleteGroupSnapshotRequest(group_id=group_id))
                for n in by_id.values()
            ]
        )

    # -- creating --------------------------------------------------------------------------

    @rpc
    async def CreateVolumeGroupSnapshot(
        self, request: pb.CreateVolumeGroupSnapshotRequest, context: Any
    ) -> pb.CreateVolumeGroupSnapshotResponse:
        name = check_name(request.name, "name")
        require(request.source_volume_ids, "source_volume_ids")
        sources = list(request.source_volume_ids)
        if len(set(sources)) < len(sources):
            raise InvalidArgument("source_volume_ids names a volume more than once")
        if len(sources) > MAX_MEMBERS:
            raise InvalidArgument(
                f"a group snapshot has at most {MAX_MEMBERS} volumes, got {len(sources)}"
            )
        unknown = [k for k in request.parameters if not k.startswith(CO_PREFIX)]
        if unknown:
            raise InvalidArgument(f"unknown parameters {key_list(unknown)} (none are supported)")
        group_id = group_id_for(name)
        # The name, and the id: a DeleteVolumeGroupSnapshot of it waits for this call.
        with (
            self.inflight.guard(f"group snapshot name {request.name}"),
            self.inflight.guard(group_id),
        ):
            existing = await self._members(group_id)
            if existing and complete(existing):
                have = sorted(f"{n.id}:{s.volume_id}" for n, s in existing)
                if have != sorted(sources):
                    raise AlreadyExists(
                        f"group snapshot {request.name!r} already exists ({group_id}) for "
                        f"volumes {', '.join(have)}"
                    )
                return pb.CreateVolumeGroupSnapshotResponse(
                    group_snapshot=self._csi_group(group_id, existing)
                )
            if existing:
                # What an interrupted attempt left (a crash between the steps, a node that
                # failed its commit): never a group, so removed before cutting it again.
                log.warning(
                    "group snapshot %s (%s): removing %d member(s) of an unfinished attempt",
                    group_id,
                    request.name,
                    len(existing),
                )
                await self._delete(group_id, [n for n, _ in existing])
            members = await self._cut(request.name, group_id, sources)
        return pb.CreateVolumeGroupSnapshotResponse(
            group_snapshot=self._csi_group(group_id, members)
        )

    async def _cut(self, csi_name: str, group_id: str, sources: list[str]) -> Members:
        volumes = [await self.controller._existing_volume(v) for v in sources]
        tenants = sorted({v.tenant for _, v in volumes})
        if len(tenants) > 1:
            # "Cannot snapshot multiple volumes together" (CreateVolumeGroupSnapshot errors):
            # one tenant's group must not hold another tenant's data or count in its quota.
            raise FailedPrecondition(
                f"the volumes of group snapshot {csi_name!r} belong to several tenants "
                f"({', '.join(tenants)}); a group holds one tenant's volumes"
            )
        for volume_id, (_, v) in zip(sources, volumes, strict=True):
            if v.state != sn.VOLUME_STATE_READY:
                raise FailedPrecondition(f"volume {volume_id} is not ready")
        by_node: dict[str, tuple[StorageNodeClient, list[sn.GroupMember]]] = {}
        total = len(volumes)
        for k, (node, v) in enumerate(volumes, start=1):
            member = sn.GroupMember(name=f"{group_id}.{k}-of-{total}", volume_id=v.id)
            by_node.setdefault(node.id, (node, []))[1].append(member)
        nodes = [node for node, _ in by_node.values()]
        try:
            async with self.quotas.admit(
                tenants[0],
                nodes,
                capacity_bytes=sum(v.size_bytes for _, v in volumes),
                snapshots=total,
                what=f"group snapshot {csi_name!r} ({total} snapshots)",
            ):
                return await self._steps(csi_name, group_id, by_node)
        except CsiError as exc:
            raise _final_refusal(exc, FailedPrecondition, SNAPSHOT_REFUSED) from None

    async def _steps(
        self,
        csi_name: str,
        group_id: str,
        by_node: dict[str, tuple[StorageNodeClient, list[sn.GroupMember]]],
    ) -> Members:
        nodes = [node for node, _ in by_node.values()]
        step = "prepare"
        try:
            await _all(
                [
                    node.call(
                        "PrepareGroupSnapshot",
                        sn.PrepareGroupSnapshotRequest(
                            group_id=group_id, members=members, lease_seconds=PREPARE_LEASE
                        ),
                    )
                    for node, members in by_node.values()
                ]
            )
            step = "hold"
            started = time.monotonic()
            await _all(
                [
                    node.call(
                        "HoldGroupSnapshot",
                        sn.HoldGroupSnapshotRequest(group_id=group_id, lease_seconds=HOLD_LEASE),
                    )
                    for node in nodes
                ]
            )
            # Every member of every node is held: the instant is cut. Release.
            step = "commit"
            committed = await _all(
                [
                    node.call(
                        "CommitGroupSnapshot", sn.CommitGroupSnapshotRequest(group_id=group_id)
                    )
                    for node in nodes
                ]
            )
            held = time.monotonic() - started
            self.hold_seconds.observe(held)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self._delete(group_id, nodes)
            if (
                step != "prepare"
                and isinstance(exc, StorageNodeError)
                and exc.node_code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED)
            ):
                # A hold that outlived its lease, a volume written too fast to converge:
                # transient, so ABORTED (the snapshotter retries), and nothing was kept.
                raise Aborted(
                    f"group snapshot {csi_name!r} was not cut ({exc}); nothing was kept; retry"
                ) from None
            raise
        members = [
            (node, s) for node, reply in zip(nodes, committed, strict=True) for s in reply.snapshots
        ]
        log.info(
            "group snapshot %s (%s): %d member(s) on %s, held at most %.0f ms (%s)",
            group_id,
            csi_name,
            len(members),
            ", ".join(n.id for n in nodes),
            held * 1000,
            ", ".join(
                f"{n.id} {r.held_seconds * 1000:.0f} ms"
                for n, r in zip(nodes, committed, strict=True)
            ),
        )
        return sorted(members, key=lambda m: m[1].name)


async def _all(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Run the calls at once; the first failure is raised once every call has ended (so
    nothing of this attempt is still running when the caller cleans up)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]
