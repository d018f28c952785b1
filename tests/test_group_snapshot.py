"""Group snapshots on one storage node (docs/storage-node-api.md, "Group snapshots").

Against a real storage node with an NBD worker process: the three steps (prepare, hold,
commit) and what each promises. A write sent while the group is held waits until the commit
releases it, and is in no member's copy; a held group whose commit never comes is released
and discarded by the node itself when its lease runs out (the test waits for the held write
to be answered, then finds the group gone, its rows and files removed, and the volume free
for another snapshot); the table of refusals, each of which leaves nothing behind.
"""

from __future__ import annotations

import select
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import ApiNode, poll, start_api_node
from tests.support.rawnbd import RawClient

MiB = 1 << 20
BLOCK = 4096
WRITE = 1
GROUP = "grp-00000000000000a1"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiNode]:
    n = start_api_node(tmp_path_factory.mktemp("groups"), workers=1, node_id="sn-groups")
    try:
        yield n
    finally:
        n.stop()


def group_id(n: int) -> str:
    return f"grp-{n:016x}"


def members(gid: str, *volume_ids: str) -> list[pb.GroupMember]:
    return [pb.GroupMember(name=f"{gid}.{v}", volume_id=v) for v in volume_ids]


def expect(call: Callable[[Any], Any], request: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    error: Any = info.value
    assert error.code() == code, (error.code(), error.details())
    return str(error.details())


def group_rows(node: ApiNode, gid: str) -> list[pb.Snapshot]:
    return list(node.api.ListSnapshots(pb.ListSnapshotsRequest(group_id=gid)).snapshots)


def leftovers(node: ApiNode) -> list[Path]:
    tmp = list(node.data_dir.rglob("*.tmp"))
    maps = node.data_dir / "copy-maps"
    return tmp + (list(maps.iterdir()) if maps.is_dir() else [])


def block(tag: int) -> bytes:
    return bytes([tag]) * BLOCK


def test_a_write_sent_while_held_waits_for_the_commit_and_is_in_no_copy(node: ApiNode) -> None:
    api = node.api
    a = api.create_volume("held-a", 4 * MiB)
    b = api.create_volume("held-b", 4 * MiB)
    att = api.publish(a.id)
    client = RawClient(node.nbd_port, timeout=120).connect(att.export_name)
    try:
        assert client.call(WRITE, 1, 0, BLOCK, payload=block(1)).error == 0
        gid = group_id(0x10)
        prepared = api.PrepareGroupSnapshot(
            pb.PrepareGroupSnapshotRequest(group_id=gid, members=members(gid, a.id, b.id))
        )
        assert prepared.state == pb.GROUP_STATE_PREPARED
        assert {s.volume_id for s in prepared.snapshots} == {a.id, b.id}
        assert not any(s.ready for s in prepared.snapshots)
        # Written after prepare, before the hold: in the copy (the hold catches up).
        assert client.call(WRITE, 2, BLOCK, BLOCK, payload=block(2)).error == 0
        held = api.HoldGroupSnapshot(pb.HoldGroupSnapshotRequest(group_id=gid, lease_seconds=120))
        assert held.state == pb.GROUP_STATE_HELD
        client.send(WRITE, 3, 2 * BLOCK, BLOCK, payload=block(3))
        # Not answered while held (a negative check: it cannot fail by slowness).
        assert select.select([client.sock], [], [], 0.5)[0] == []
        committed = api.CommitGroupSnapshot(pb.CommitGroupSnapshotRequest(group_id=gid))
        assert client.reply().error == 0  # released by the commit
    finally:
        client.close()
    assert committed.state == pb.GROUP_STATE_COMMITTED
    assert committed.held_seconds > 0
    snaps = {s.volume_id: s for s in committed.snapshots}
    assert all(s.ready and s.group_id == gid for s in snaps.values())
    image = (node.data_dir / "snapshots" / f"{snaps[a.id].id}.img").read_bytes()
    assert image[:BLOCK] == block(1)
    assert image[BLOCK : 2 * BLOCK] == block(2)
    assert image[2 * BLOCK : 3 * BLOCK] == bytes(BLOCK), "a write of the hold is in the copy"
    assert {s.id for s in group_rows(node, gid)} == {s.id for s in snaps.values()}
    # Retried steps answer the same; deleting removes every member, twice is fine.
    again = api.CommitGroupSnapshot(pb.CommitGroupSnapshotRequest(group_id=gid))
    assert {s.id for s in again.snapshots} == {s.id for s in snaps.values()}
    api.DeleteGroupSnapshot(pb.DeleteGroupSnapshotRequest(group_id=gid))
    api.DeleteGroupSnapshot(pb.DeleteGroupSnapshotRequest(group_id=gid))
    assert group_rows(node, gid) == []
    assert leftovers(node) == []
    api.unpublish(a.id)


def test_a_held_group_whose_commit_never_comes_is_released_and_discarded(node: ApiNode) -> None:
    api = node.api
    vol = api.create_volume("lease", 4 * MiB)
    att = api.publish(vol.id)
    client = RawClient(node.nbd_port, timeout=120).connect(att.export_name)
    gid = group_id(0x20)
    try:
        api.PrepareGroupSnapshot(
            pb.PrepareGroupSnapshotRequest(group_id=gid, members=members(gid, vol.id))
        )
        api.HoldGroupSnapshot(pb.HoldGroupSnapshotRequest(group_id=gid, lease_seconds=1))
        # The phase 2 that never comes: the write is answered once the node gives up.
        client.send(WRITE, 7, 0, BLOCK, payload=block(7))
        assert client.reply().error == 0
    finally:
        client.close()
    details = expect(
        api.CommitGroupSnapshot,
        pb.CommitGroupSnapshotRequest(group_id=gid),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "lease" in details, details
    assert group_rows(node, gid) == []
    assert [
        s for s in api.ListSnapshots(pb.ListSnapshotsRequest()).snapshots if s.name.startswith(gid)
    ] == []
    assert leftovers(node) == []
    assert "lease of 1.0 s expired" in node.log_text()
    # The volume is free again: an ordinary snapshot goes through.
    snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name="after-lease", volume_id=vol.id))
    assert snap.ready
    api.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.id))
    api.unpublish(vol.id)


def test_a_prepared_group_never_held_is_discarded(node: ApiNode) -> None:
    api = node.api
    vol = api.create_volume("lease-prepared", 4 * MiB)
    gid = group_id(0x21)
    api.PrepareGroupSnapshot(
        pb.PrepareGroupSnapshotRequest(
            group_id=gid, members=members(gid, vol.id), lease_seconds=0.2
        )
    )
    # Holding waits for nothing: the node discards the group on its own.
    poll(lambda: group_rows(node, gid), lambda rows: rows == [], 60, "group not discarded")
    expect(
        api.HoldGroupSnapshot,
        pb.HoldGroupSnapshotRequest(group_id=gid),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert leftovers(node) == []


def test_refusals_leave_nothing(node: ApiNode) -> None:
    api = node.api
    a = api.create_volume("refuse-a", MiB)
    other = api.create_volume("refuse-other-tenant", MiB, tenant="tenant-b")
    missing = "vol-00000000000000ff"
    cases = [
        ("bad group id", "grp-1", members(group_id(1), a.id), grpc.StatusCode.INVALID_ARGUMENT),
        ("no members", group_id(2), [], grpc.StatusCode.INVALID_ARGUMENT),
        (
            "a volume twice",
            group_id(3),
            [pb.GroupMember(name="x1", volume_id=a.id), pb.GroupMember(name="x2", volume_id=a.id)],
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "unknown volume",
            group_id(4),
            members(group_id(4), a.id, missing),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "two tenants",
            group_id(5),
            members(group_id(5), a.id, other.id),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ]
    for what, gid, group_members, code in cases:
        request = pb.PrepareGroupSnapshotRequest(group_id=gid, members=group_members)
        expect(api.PrepareGroupSnapshot, request, code)
        if gid.startswith("grp-") and len(gid) == 20:
            assert group_rows(node, gid) == [], what
    expect(
        api.HoldGroupSnapshot,
        pb.HoldGroupSnapshotRequest(group_id=group_id(6)),
        grpc.StatusCode.NOT_FOUND,
    )
    # The tenant's snapshot limit counts every member: two do not fit in one.
    api.SetTenantLimits(
        pb.SetTenantLimitsRequest(name="tenant-c", limits=pb.TenantLimits(snapshots=1))
    )
    c1 = api.create_volume("refuse-c1", MiB, tenant="tenant-c")
    c2 = api.create_volume("refuse-c2", MiB, tenant="tenant-c")
    gid = group_id(7)
    expect(
        api.PrepareGroupSnapshot,
        pb.PrepareGroupSnapshotRequest(group_id=gid, members=members(gid, c1.id, c2.id)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert group_rows(node, gid) == []
    assert api.GetTenant(pb.GetTenantRequest(name="tenant-c")).usage.snapshots == 0
    assert leftovers(node) == []
