"""Crash-consistent group snapshots through the CSI GroupController (docs/csi-driver.md,
"Group snapshots").

Against two real storage nodes and a real controller process. The proof: one writer sends a
numbered record stream over NBD to three volumes on the two storage nodes (record N to
volume N mod 3, each acknowledged before N+1 is sent) until the test stops it; meanwhile the
test takes a group snapshot of the three. Every member is restored with CreateVolume from its
snapshot, and the restored set must be a prefix of the stream: records 0..K-1 and nothing
else (no record present whose predecessor is missing). The group's hold, as the controller's
metric and the nodes' replies report it, is printed.

Then the calls' contract: idempotency by name, the spec's error tables (each refusal leaves
no snapshot behind), members deletable only with their group, and Get and Delete after a
controller restart.
"""

from __future__ import annotations

import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi.group_controller import group_id_for
from csi.v1 import csi_pb2 as pb
from storage_node.v1 import storage_node_pb2 as sn
from tests.support.rawnbd import RawClient
from tests.support.servers import free_port

from .controller_fixtures import (
    CALL_TIMEOUT,
    MiB,
    Pool,
    expect_error,
    in_zone,
    start_pool,
    stop_pool,
    unique_name,
)
from .plugin import start_plugin, storage_args

Code = grpc.StatusCode
SIZE = 16 * MiB
RECORD = 4096
BLOCKS = SIZE // RECORD
MAGIC = 0x6752_5053_6752_5053
WRITE = 1
WRITER_NODE = "writer@127.0.0.1"  # the NBD peer address of RawClient


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, metrics_port: int) -> Iterator[Pool]:
    p = start_pool(
        tmp_path_factory.mktemp("group-pool"), "--metrics-listen", f"127.0.0.1:{metrics_port}"
    )
    try:
        yield p
    finally:
        stop_pool(p)


def record(n: int) -> bytes:
    head = struct.pack(">QQ", MAGIC, n)
    return head + bytes([n % 251]) * (RECORD - len(head))


@dataclass
class StreamWriter:
    """Record N to volume N mod len(clients) at block N // len(clients), one at a time."""

    clients: list[RawClient]
    stop: threading.Event = field(default_factory=threading.Event)
    sent: list[float] = field(default_factory=list)
    acked: list[float] = field(default_factory=list)
    error: BaseException | None = None
    progress: threading.Condition = field(default_factory=threading.Condition)

    @property
    def capacity(self) -> int:
        return BLOCKS * len(self.clients)

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set() and n < self.capacity:
                client = self.clients[n % len(self.clients)]
                self.sent.append(time.monotonic())
                reply = client.call(
                    WRITE, n, (n // len(self.clients)) * RECORD, RECORD, payload=record(n)
                )
                assert reply.error == 0, reply.error
                self.acked.append(time.monotonic())
                n += 1
                with self.progress:
                    self.progress.notify_all()
        except BaseException as exc:
            self.error = exc
        with self.progress:
            self.progress.notify_all()

    def wait_for(self, n: int) -> None:
        with self.progress:
            self.progress.wait_for(
                lambda: len(self.acked) >= n or self.error or len(self.acked) >= self.capacity,
                120,
            )
        assert self.error is None, self.error
        assert len(self.acked) >= n, "the writer stopped early"


def records_in(image: bytes, index: int, members: int) -> set[int]:
    """The record numbers in one restored volume; any other block must be empty."""
    found: set[int] = set()
    for b in range(BLOCKS):
        chunk = image[b * RECORD : (b + 1) * RECORD]
        magic, n = struct.unpack_from(">QQ", chunk)
        if magic == MAGIC:
            assert n == b * members + index, f"record {n} in the wrong place (block {b})"
            assert chunk == record(n), f"record {n} torn"
            found.add(n)
        else:
            assert chunk == bytes(RECORD), f"volume {index} block {b}: neither empty nor a record"
    return found


def image_of(pool: Pool, volume_id: str) -> bytes:
    node, local = pool.node_of(volume_id)
    return (node.data_dir / "volumes" / f"{local}.img").read_bytes()


def restore(pool: Pool, snapshot_id: str) -> pb.Volume:
    source = pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
    )
    name = unique_name("restored")
    for _ in range(30):  # ABORTED while the copy runs: the provisioner's retry
        try:
            return pool.create(name, SIZE, volume_content_source=source)
        except grpc.RpcError as exc:
            if exc.code() != Code.ABORTED:
                raise
    raise AssertionError(f"{snapshot_id} was never restored")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def group_request(name: str, *volume_ids: str) -> pb.CreateVolumeGroupSnapshotRequest:
    return pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=list(volume_ids))


def test_the_group_of_three_volumes_on_two_nodes_is_one_instant(
    pool: Pool, metrics_port: int
) -> None:
    zones = ("zone-a", "zone-a", "zone-b")
    volumes = [pool.create(size=SIZE, accessibility_requirements=in_zone(z)) for z in zones]
    assert {v.volume_id.partition(":")[0] for v in volumes} == {"sn-a", "sn-b"}
    clients = []
    for v in volumes:
        ctx = pool.publish(v.volume_id, WRITER_NODE)
        port = int(ctx["nbd.csi.dev/port"])
        clients.append(RawClient(port, timeout=120).connect(ctx["nbd.csi.dev/export"]))
    writer = StreamWriter(clients)
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    try:
        writer.wait_for(300)  # in full swing
        start = time.monotonic()
        reply = pool.plugin.group.CreateVolumeGroupSnapshot(
            group_request(unique_name("vm-disks"), *(v.volume_id for v in volumes)),
            timeout=CALL_TIMEOUT,
        )
        end = time.monotonic()
        writer.wait_for(len(writer.acked) + 300)  # and it keeps going after
    finally:
        writer.stop.set()
        thread.join(120)
        for c in clients:
            c.close()
    assert writer.error is None, writer.error
    group = reply.group_snapshot
    assert group.ready_to_use and group.group_snapshot_id.startswith("grp-")
    by_source = {s.source_volume_id: s for s in group.snapshots}
    assert set(by_source) == {v.volume_id for v in volumes}
    assert all(s.group_snapshot_id == group.group_snapshot_id for s in group.snapshots)

    present: set[int] = set()
    for i, v in enumerate(volumes):
        restored = restore(pool, by_source[v.volume_id].snapshot_id)
        present |= records_in(image_of(pool, restored.volume_id), i, len(volumes))
    k = len(present)
    missing = sorted(set(range(k)) - present)
    assert not missing, f"records present after a missing one: first missing {missing[:5]}"
    acked_before = sum(1 for a in writer.acked if a < start)
    sent_before_end = sum(1 for s in writer.sent if s < end)
    assert acked_before <= k <= sent_before_end, (acked_before, k, sent_before_end)
    assert k < writer.capacity
    held_sum = metric(metrics_port, "nbdcsi_group_snapshot_hold_seconds_sum")
    held_count = metric(metrics_port, "nbdcsi_group_snapshot_hold_seconds_count")
    assert held_count >= 1
    nodes_said = [
        line.split("held at most", 1)[1]
        for line in pool.plugin.log_text().splitlines()
        if group.group_snapshot_id in line and "held at most" in line
    ]
    print(
        f"group snapshot: call {1000 * (end - start):.0f} ms; restored set = records 0..{k - 1} "
        f"(a prefix); {sum(1 for a in writer.acked if start <= a <= end)} writes acknowledged "
        f"during the call; nbdcsi_group_snapshot_hold_seconds sum {held_sum * 1000:.0f} ms over "
        f"{held_count:.0f} group(s); controller log: held at most{nodes_said[-1]}"
    )
    for v in volumes:
        pool.unpublish(v.volume_id, WRITER_NODE)


def test_group_snapshot_calls_follow_the_spec(pool: Pool, tmp_path: Path) -> None:
    group = pool.plugin.group
    caps = group.GroupControllerGetCapabilities(
        pb.GroupControllerGetCapabilitiesRequest(), timeout=CALL_TIMEOUT
    )
    assert [c.rpc.type for c in caps.capabilities] == [
        pb.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]
    plugin_caps = pool.plugin.identity.GetPluginCapabilities(
        pb.GetPluginCapabilitiesRequest(), timeout=CALL_TIMEOUT
    )
    assert pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in [
        c.service.type for c in plugin_caps.capabilities
    ]

    a = pool.create(accessibility_requirements=in_zone("zone-a"))
    b = pool.create(accessibility_requirements=in_zone("zone-b"))
    c = pool.create(accessibility_requirements=in_zone("zone-b"))
    name = unique_name("group")
    first = group.CreateVolumeGroupSnapshot(
        group_request(name, a.volume_id, b.volume_id), timeout=CALL_TIMEOUT
    ).group_snapshot
    # Idempotent by name: the same group again (the order of the ids does not matter).
    again = group.CreateVolumeGroupSnapshot(
        group_request(name, b.volume_id, a.volume_id), timeout=CALL_TIMEOUT
    ).group_snapshot
    assert again.group_snapshot_id == first.group_snapshot_id
    assert {s.snapshot_id for s in again.snapshots} == {s.snapshot_id for s in first.snapshots}
    gid = first.group_snapshot_id
    ids = [s.snapshot_id for s in first.snapshots]

    def members_of(group_id: str) -> list[sn.Snapshot]:
        return [
            s
            for node in pool.nodes.values()
            for s in node.api.ListSnapshots(sn.ListSnapshotsRequest(group_id=group_id)).snapshots
        ]

    def snapshots_of(*volume_ids: str) -> list[sn.Snapshot]:
        found: list[sn.Snapshot] = []
        for volume_id in volume_ids:
            node, local = pool.node_of(volume_id)
            found += node.api.ListSnapshots(sn.ListSnapshotsRequest(volume_id=local)).snapshots
        return found

    create = group.CreateVolumeGroupSnapshot
    missing = "sn-a:vol-00000000000000ff"
    other_tenant = pool.create(
        parameters={"csi.storage.k8s.io/pvc/namespace": "team-other"},
        accessibility_requirements=in_zone("zone-b"),
    )
    cases = [
        ("other sources", group_request(name, a.volume_id, c.volume_id), Code.ALREADY_EXISTS),
        ("no name", group_request("", a.volume_id), Code.INVALID_ARGUMENT),
        ("no sources", group_request(unique_name("group")), Code.INVALID_ARGUMENT),
        (
            "a volume twice",
            group_request(unique_name("group"), a.volume_id, a.volume_id),
            Code.INVALID_ARGUMENT,
        ),
        (
            "unknown parameter",
            pb.CreateVolumeGroupSnapshotRequest(
                name=unique_name("group"), source_volume_ids=[c.volume_id], parameters={"x": "1"}
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "missing volume",
            group_request(unique_name("group"), c.volume_id, missing),
            Code.NOT_FOUND,
        ),
        (
            "two tenants",
            group_request(unique_name("group"), c.volume_id, other_tenant.volume_id),
            Code.FAILED_PRECONDITION,
        ),
    ]
    for what, request, code in cases:
        expect_error(create, request, code)
        assert snapshots_of(c.volume_id, other_tenant.volume_id) == [], what

    get = group.GetVolumeGroupSnapshot
    got = get(
        pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid, snapshot_ids=ids),
        timeout=CALL_TIMEOUT,
    ).group_snapshot
    assert got.ready_to_use and {s.snapshot_id for s in got.snapshots} == set(ids)
    expect_error(
        get,
        pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid, snapshot_ids=ids[:1]),
        Code.INVALID_ARGUMENT,
    )
    for unknown in ("grp-00000000000000ff", "not-a-group"):
        expect_error(
            get, pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=unknown), Code.NOT_FOUND
        )
    expect_error(get, pb.GetVolumeGroupSnapshotRequest(), Code.INVALID_ARGUMENT)

    # A member is an ordinary snapshot to restore from, but goes only with its group.
    restored = pool.create(
        volume_content_source=pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=ids[0])
        )
    )
    assert restored.content_source.snapshot.snapshot_id == ids[0]
    expect_error(
        pool.controller.DeleteSnapshot,
        pb.DeleteSnapshotRequest(snapshot_id=ids[0]),
        Code.INVALID_ARGUMENT,
    )
    listed = pool.controller.ListSnapshots(
        pb.ListSnapshotsRequest(snapshot_id=ids[0]), timeout=CALL_TIMEOUT
    )
    assert listed.entries[0].snapshot.group_snapshot_id == gid

    # Known after a restart: nothing about groups is kept in the controller.
    pool.plugin.stop()
    args = storage_args(
        [(node_id, node.api_port) for node_id, node in pool.nodes.items()],
        pool.nodes["sn-a"].data_dir / "api-token",
    )
    pool.plugin = start_plugin(tmp_path / "restarted", "--mode", "controller", *args)
    got = pool.plugin.group.GetVolumeGroupSnapshot(
        pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid, snapshot_ids=ids),
        timeout=CALL_TIMEOUT,
    ).group_snapshot
    assert {s.snapshot_id for s in got.snapshots} == set(ids)

    delete = pool.plugin.group.DeleteVolumeGroupSnapshot
    expect_error(
        delete,
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid, snapshot_ids=ids[:1]),
        Code.INVALID_ARGUMENT,
    )
    whole = pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid, snapshot_ids=ids)
    delete(whole, timeout=CALL_TIMEOUT)
    delete(whole, timeout=CALL_TIMEOUT)  # already gone: OK
    assert members_of(gid) == []
    expect_error(
        pool.plugin.group.GetVolumeGroupSnapshot,
        pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid, snapshot_ids=ids),
        Code.NOT_FOUND,
    )
    # The restored volume outlives the group it came from.
    assert pool.sn_volume(restored.volume_id).state == sn.VOLUME_STATE_READY


def test_an_unfinished_attempt_is_removed_and_the_group_cut_again(pool: Pool) -> None:
    """What a controller that crashed between the steps leaves: members prepared on one
    node and never held. The retried CreateVolumeGroupSnapshot cuts the whole group."""
    a = pool.create(accessibility_requirements=in_zone("zone-a"))
    b = pool.create(accessibility_requirements=in_zone("zone-b"))
    name = unique_name("group")
    gid = group_id_for(name)
    node, local = pool.node_of(a.volume_id)
    node.api.PrepareGroupSnapshot(
        sn.PrepareGroupSnapshotRequest(
            group_id=gid,
            members=[sn.GroupMember(name=f"{gid}.1-of-2", volume_id=local)],
            lease_seconds=300,
        )
    )
    group = pool.plugin.group.CreateVolumeGroupSnapshot(
        group_request(name, a.volume_id, b.volume_id), timeout=CALL_TIMEOUT
    ).group_snapshot
    assert group.group_snapshot_id == gid and group.ready_to_use
    assert {s.source_volume_id for s in group.snapshots} == {a.volume_id, b.volume_id}
    pool.plugin.group.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid), timeout=CALL_TIMEOUT
    )
