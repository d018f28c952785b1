"""Tenant quotas, storage node discovery and metrics of the CSI controller.

Owns what the conformance suite does not: the controller reading TenantQuota objects and
EndpointSlices through the real `kubernetes` client from the Kubernetes API stand-in
(tests/support/kube_api.py), enforcing quotas across two real storage nodes without races (50
concurrent CreateVolume calls for one tenant), writing usage into the objects' status and into
its metrics, and keeping the attachment credential out of its log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from csi.config import from_args
from csi.kube import KubeClient
from csi.quota import TenantQuotas
from csi.storage_nodes import StorageNodes
from csi.v1 import csi_pb2 as pb
from storage_node.v1 import storage_node_pb2 as sn
from tests.support.api import poll
from tests.support.kube_api import KubeApi, endpoint_slice, tenant_quota
from tests.support.servers import free_port

from .controller_fixtures import (
    BLOCK,
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

TENANT = "team-a"
TENANT_PARAMS = {"csi.storage.k8s.io/pvc/namespace": TENANT}


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeApi]:
    with KubeApi() as api:
        yield api


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pool(
    tmp_path_factory: pytest.TempPathFactory, kube: KubeApi, metrics_port: int
) -> Iterator[Pool]:
    base = tmp_path_factory.mktemp("quota-pool")
    kubeconfig = kube.write_kubeconfig(base / "kubeconfig")
    p = start_pool(
        base,
        "--kubeconfig",
        str(kubeconfig),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
    )
    try:
        yield p
    finally:
        stop_pool(p)


def create(
    pool: Pool, tenant: str, size: int = MiB, name: str | None = None, **kw: Any
) -> pb.Volume:
    return pool.create(
        name=name, size=size, parameters={"csi.storage.k8s.io/pvc/namespace": tenant}, **kw
    )


def tenant_usage(pool: Pool, tenant: str) -> sn.TenantUsage:
    """Summed over both storage nodes, read from the nodes themselves."""
    total = sn.TenantUsage()
    for node in pool.nodes.values():
        usage = node.api.GetTenant(sn.GetTenantRequest(name=tenant)).usage
        total.provisioned_bytes += usage.provisioned_bytes
        total.volumes += usage.volumes
        total.snapshots += usage.snapshots
    return total


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_fifty_concurrent_creates_never_pass_the_quota(pool: Pool, kube: KubeApi) -> None:
    # 10 MiB of capacity, 6 volumes: the count is the tighter limit for 1 MiB volumes.
    kube.put(tenant_quota("race", capacity="10Mi", volumes=6))
    names = [unique_name() for _ in range(50)]

    def one(i: int) -> Any:
        # Half of them pinned to each storage node's zone: the quota must hold across nodes.
        zone = in_zone("zone-a" if i % 2 else "zone-b")
        try:
            return create(pool, "race", name=names[i], accessibility_requirements=zone)
        except grpc.RpcError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(50) as executor:
        results = list(executor.map(one, range(50)))
    created = [r for r in results if isinstance(r, pb.Volume)]
    refused = [r for r in results if not isinstance(r, pb.Volume)]
    assert len(created) == 6, [r.details() for r in refused][:3]
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "tenant 'race'" in error.details() and "6 of its 6 volumes" in error.details()
    assert tenant_usage(pool, "race").volumes == 6
    assert {v.volume_id.split(":")[0] for v in created} == {"sn-a", "sn-b"}


def test_capacity_quota_counts_snapshots_and_growth(pool: Pool, kube: KubeApi) -> None:
    kube.put(tenant_quota(TENANT, capacity="8Mi", snapshots=1))
    volume = create(pool, TENANT, size=3 * MiB)
    pool.snapshot(volume.volume_id)  # 3 MiB more: 6 of 8 MiB
    error = expect_error(
        pool.controller.CreateSnapshot,
        pb.CreateSnapshotRequest(name=unique_name("snap"), source_volume_id=volume.volume_id),
        SNAPSHOT_REFUSED,
    )
    # Checked in order: the capacity is the first limit a second 3 MiB snapshot passes.
    assert "capacity quota" in str(error.details()) or "snapshots" in str(error.details())
    error = expect_error(
        pool.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name=unique_name(),
            capacity_range=pb.CapacityRange(required_bytes=4 * MiB),
            volume_capabilities=[BLOCK],
            parameters=TENANT_PARAMS,
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "needs 4.0 MiB" in str(error.details()) and "6.0 MiB of its 8.0 MiB" in str(
        error.details()
    )
    assert "TenantQuota storage" in str(error.details())
    expect_error(
        pool.controller.ControllerExpandVolume,
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=6 * MiB)
        ),
        EXPANSION_REFUSED,
    )
    # Within the quota it grows.
    reply = pool.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=5 * MiB)
        ),
        timeout=CALL_TIMEOUT,
    )
    assert reply.capacity_bytes == 5 * MiB


def test_a_group_snapshot_counts_every_member_and_a_refused_one_creates_nothing(
    pool: Pool, kube: KubeApi
) -> None:
    """Each member of a group is a snapshot of the tenant's quota; a group that does not fit
    is refused whole (final for the snapshotter, like CreateSnapshot) and makes nothing."""
    kube.put(tenant_quota("groups", snapshots=3))
    volumes = [
        create(pool, "groups", accessibility_requirements=in_zone(z))
        for z in ("zone-a", "zone-b", "zone-b")
    ]
    ids = [v.volume_id for v in volumes]
    group = pool.plugin.group
    first = group.CreateVolumeGroupSnapshot(
        pb.CreateVolumeGroupSnapshotRequest(name=unique_name("group"), source_volume_ids=ids[:2]),
        timeout=CALL_TIMEOUT,
    ).group_snapshot
    assert tenant_usage(pool, "groups").snapshots == 2
    error = expect_error(
        group.CreateVolumeGroupSnapshot,
        pb.CreateVolumeGroupSnapshotRequest(name=unique_name("group"), source_volume_ids=ids),
        SNAPSHOT_REFUSED,
    )
    assert "2 of its 3 snapshots" in str(error.details()), error.details()
    assert tenant_usage(pool, "groups").snapshots == 2  # nothing of the refused group
    group.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=first.group_snapshot_id),
        timeout=CALL_TIMEOUT,
    )
    assert tenant_usage(pool, "groups").snapshots == 0


# How the sidecars classify a CreateSnapshot / ControllerExpandVolume error (external-snapshotter
# isCSIFinalError, external-resizer IsFinalError and IsResizeInfeasibleError): these codes mean
# "may still be in progress" and the request is retried as it was.
SIDECAR_NOT_FINAL = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
RESIZE_INFEASIBLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
}
EXPANSION_REFUSED = grpc.StatusCode.OUT_OF_RANGE
SNAPSHOT_REFUSED = grpc.StatusCode.FAILED_PRECONDITION


def expand(pool: Pool, volume_id: str, size: int) -> Any:
    return pool.controller.ControllerExpandVolume(
        pb.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=size)
        ),
        timeout=CALL_TIMEOUT,
    )


def test_an_over_quota_expansion_can_be_withdrawn(pool: Pool, kube: KubeApi) -> None:
    """Issue 13: the refusal is final and infeasible for csi-resizer, so with
    RecoverVolumeExpansionFailure the PVC becomes ControllerResizeInfeasible and the resizer's
    next call carries the size the user asks *now*: lowered, it is that size the volume gets,
    and raising the quota later does not bring the withdrawn size back."""
    tenant = "withdraw"
    kube.put(tenant_quota(tenant, capacity="10Mi"))
    volume = create(pool, tenant, size=2 * MiB)
    before = tenant_usage(pool, tenant)
    error = expect_error(
        pool.controller.ControllerExpandVolume,
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=40 * MiB)
        ),
        EXPANSION_REFUSED,
    )
    assert error.code() not in SIDECAR_NOT_FINAL and error.code() in RESIZE_INFEASIBLE
    assert "lower the requested size" in str(error.details())
    assert pool.sn_volume(volume.volume_id).size_bytes == 2 * MiB
    assert tenant_usage(pool, tenant) == before
    # The user lowers the request; the resizer asks for that.
    assert expand(pool, volume.volume_id, 4 * MiB).capacity_bytes == 4 * MiB
    # The quota is raised; the resizer's retries (the PVC's current size) change nothing.
    kube.put(tenant_quota(tenant, capacity="100Mi"))
    assert expand(pool, volume.volume_id, 4 * MiB).capacity_bytes == 4 * MiB
    assert pool.sn_volume(volume.volume_id).size_bytes == 4 * MiB
    # A refusal by the storage node's own fence is final too: its capacity is far smaller.
    error = expect_error(
        pool.controller.ControllerExpandVolume,
        pb.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=1 << 45)
        ),
        EXPANSION_REFUSED,
    )
    assert pool.sn_volume(volume.volume_id).size_bytes == 4 * MiB


def snapshot_names(pool: Pool, tenant: str) -> set[str]:
    """The tenant's snapshots on both storage nodes, read from the nodes themselves."""
    names: set[str] = set()
    for node in pool.nodes.values():
        reply = node.api.ListSnapshots(sn.ListSnapshotsRequest(tenant=tenant))
        names.update(s.name for s in reply.snapshots)
    return names


@pytest.mark.parametrize(
    "order",
    [
        # The snapshotter after a final error: the annotation goes, the user's deletion finds
        # no snapshot handle and makes no call; nothing retries the create.
        ("refused", "deleted", "quota raised"),
        # The quota is raised first: the retried create succeeds, the deletion then calls
        # DeleteSnapshot with the handle it got.
        ("refused", "quota raised", "retried", "deleted"),
        # Whatever the sidecar version: a create retried after the deletion gives the sidecar
        # a handle, which it deletes since its content is being deleted.
        ("refused", "deleted", "quota raised", "retried"),
        # The retry comes while the quota still refuses, then the user gives up.
        ("refused", "retried", "deleted", "quota raised"),
    ],
    ids=lambda order: "-".join(o.replace(" ", "_") for o in order),
)
def test_a_refused_snapshot_never_comes_back(
    pool: Pool, kube: KubeApi, order: tuple[str, ...]
) -> None:
    """Issue 13: a CreateSnapshot refused by the snapshot quota leaves nothing, and whatever
    the order of the sidecar's retry, the user's deletion and the quota being raised, no
    snapshot stays behind and the tenant's usage returns to what it was."""
    tenant = unique_name("snapq")
    kube.put(tenant_quota(tenant, snapshots=1))
    volume = create(pool, tenant, size=MiB)
    pool.snapshot(volume.volume_id)  # the one snapshot the quota allows
    before = tenant_usage(pool, tenant)
    name = unique_name("snap")
    request = pb.CreateSnapshotRequest(name=name, source_volume_id=volume.volume_id)
    handle = ""  # what the snapshotter knows of the snapshot (status.snapshotHandle)
    deleted = False
    for step in order:
        if step in ("refused", "retried"):
            try:
                reply = pool.controller.CreateSnapshot(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                assert exc.code() == SNAPSHOT_REFUSED, exc.details()
                assert exc.code() not in SIDECAR_NOT_FINAL
                assert "nothing was created" in str(exc.details())
                assert name not in snapshot_names(pool, tenant)
            else:
                assert step == "retried"
                handle = reply.snapshot.snapshot_id
        if step == "deleted" or (step == "retried" and deleted and handle):
            deleted = True
            if handle:  # the snapshotter deletes only what it has a handle for
                pool.controller.DeleteSnapshot(
                    pb.DeleteSnapshotRequest(snapshot_id=handle), timeout=CALL_TIMEOUT
                )
        if step == "quota raised":
            kube.put(tenant_quota(tenant, snapshots=5))
    assert deleted
    assert name not in snapshot_names(pool, tenant)
    assert tenant_usage(pool, tenant) == before


def test_usage_reaches_status_and_metrics(pool: Pool, kube: KubeApi, metrics_port: int) -> None:
    kube.put(tenant_quota("shown", capacity="1Gi", volumes=10, iops=5000))
    volumes = [create(pool, "shown", size=2 * MiB) for _ in range(2)]

    def status() -> Any:
        obj = kube.get("nbd.csi.dev/v1alpha1", "TenantQuota", "shown", "storage")
        used = (obj or {}).get("status", {}).get("used")
        return used if used and used.get("volumes") == 2 else None

    used = poll(status, lambda u: u is not None, 30, "usage in the TenantQuota status")
    assert used["capacityBytes"] == 4 * MiB and used["capacity"] == "4Mi"
    text = scrape(metrics_port)
    assert 'nbdcsi_tenant_quota_used{resource="volumes",tenant="shown"} 2.0' in text
    assert (
        'nbdcsi_tenant_quota_limit{resource="capacity_bytes",tenant="shown"} 1.073741824e+09'
        in (text)
    )
    assert 'nbdcsi_grpc_calls_total{code="OK",method="Controller/CreateVolume"}' in text
    assert "nbdcsi_grpc_call_duration_seconds_bucket" in text
    # The tenant's IOPS ceiling went to the storage node as the tenant's own limit.
    node, _ = pool.node_of(volumes[0].volume_id)
    limits = node.api.GetTenant(sn.GetTenantRequest(name="shown")).limits
    assert limits.qos.iops == 5000 and limits.volumes == 10

    for v in volumes:
        pool.controller.DeleteVolume(
            pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=CALL_TIMEOUT
        )
    poll(status, lambda u: u is None, 30, "usage back to 0 volumes")


def test_several_objects_the_lowest_value_wins(pool: Pool, kube: KubeApi) -> None:
    kube.put(tenant_quota("strict", name="a", volumes=5))
    kube.put(tenant_quota("strict", name="b", volumes=1))
    create(pool, "strict")
    error = expect_error(
        pool.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name=unique_name(),
            volume_capabilities=[BLOCK],
            capacity_range=pb.CapacityRange(required_bytes=MiB),
            parameters={"csi.storage.k8s.io/pvc/namespace": "strict"},
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert "1 of its 1 volumes" in str(error.details()) and "TenantQuota a, b" in str(
        error.details()
    )


def test_no_quota_no_limit_and_idempotent_retries_are_free(pool: Pool, kube: KubeApi) -> None:
    for _ in range(3):
        create(pool, "free")
    kube.put(tenant_quota("retry", volumes=1))
    name = unique_name()
    first = create(pool, "retry", name=name)
    # The provisioner retries with the same name: the same volume, not a quota error.
    assert create(pool, "retry", name=name).volume_id == first.volume_id


def test_an_invalid_quota_object_refuses_instead_of_lifting(pool: Pool, kube: KubeApi) -> None:
    # Written past the API server's validation (e.g. an older CRD): the controller must not
    # read it as "no limit".
    obj = tenant_quota("broken", capacity="lots")
    with kube._lock:  # put() validates against the CRD like a real server; bypass it
        kube._objects[("TenantQuota", "broken", "storage")] = {
            **obj,
            "metadata": {**obj["metadata"], "uid": "x", "resourceVersion": "1", "generation": 1},
        }
    error = expect_error(
        pool.controller.CreateVolume,
        pb.CreateVolumeRequest(
            name=unique_name(),
            volume_capabilities=[BLOCK],
            parameters={"csi.storage.k8s.io/pvc/namespace": "broken"},
        ),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert "TenantQuota broken/storage is invalid" in str(error.details())


def test_the_credential_never_reaches_the_log(pool: Pool) -> None:
    volume = create(pool, "logs")
    context = pool.publish(volume.volume_id, "node-a@127.0.0.1")
    export = context["nbd.csi.dev/export"]
    assert export and "." in export
    secret = export.split(".", 1)[1]
    assert secret not in pool.plugin.log_text()


def test_storage_nodes_found_from_a_service(tmp_path: Path, pool: Pool, kube: KubeApi) -> None:
    """--storage-node-service: the nodes come from the Service's EndpointSlices (port `api`),
    their ids from their own GetNodeInfo."""
    for node_id, node in pool.nodes.items():
        kube.put(endpoint_slice("nbd-csi", "storage", [("127.0.0.1", node.api_port)], node_id))
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    plugin = start_plugin(
        tmp_path,
        "--mode",
        "controller",
        "--kubeconfig",
        str(kubeconfig),
        "--storage-node-service",
        "nbd-csi/storage",
        "--storage-token-file",
        str(pool.nodes["sn-a"].data_dir / "api-token"),
    )
    try:
        plugin.wait_probe(True)
        reply = plugin.controller.CreateVolume(
            pb.CreateVolumeRequest(
                name=unique_name(),
                volume_capabilities=[BLOCK],
                capacity_range=pb.CapacityRange(required_bytes=MiB),
            ),
            timeout=CALL_TIMEOUT,
        )
        assert reply.volume.volume_id.split(":")[0] in ("sn-a", "sn-b")
        # A volume made by the statically configured controller is known here too.
        other = create(pool, "found")
        got = plugin.controller.ControllerGetVolume(
            pb.ControllerGetVolumeRequest(volume_id=other.volume_id), timeout=CALL_TIMEOUT
        )
        assert got.volume.volume_id == other.volume_id
    finally:
        assert plugin.stop() == 0, plugin.log_text()


def test_refresh_gives_every_node_the_quota_and_lifts_a_removed_one(
    tmp_path: Path, pool: Pool, kube: KubeApi
) -> None:
    """The periodic refresh (here called directly, in-process, on the real nodes): every
    storage node gets the tenant's quota as its limits, and all of them lose it when the
    TenantQuota goes away."""
    kube.put(tenant_quota("lifted", volumes=3, iops=100))
    config = from_args(
        [
            *storage_args(
                [(node_id, node.api_port) for node_id, node in pool.nodes.items()],
                pool.nodes["sn-a"].data_dir / "api-token",
            ),
            "--kubeconfig",
            str(kube.write_kubeconfig(tmp_path / "kubeconfig")),
        ]
    )

    def limits() -> set[tuple[int, int]]:
        return {
            (lim.volumes, lim.qos.iops)
            for lim in (
                node.api.GetTenant(sn.GetTenantRequest(name="lifted")).limits
                for node in pool.nodes.values()
            )
        }

    async def scenario() -> None:
        nodes = StorageNodes.from_config(config)
        client = KubeClient.from_options(config.kube)
        quotas = TenantQuotas(client, nodes, CollectorRegistry())
        try:
            await quotas.refresh()
            assert limits() == {(3, 100)}
            kube.delete("nbd.csi.dev/v1alpha1", "TenantQuota", "lifted", "storage")
            await quotas.refresh()
            assert limits() == {(0, 0)}
        finally:
            await quotas.close()
            await nodes.close()
            assert client is not None
            client.close()

    asyncio.run(scenario())
