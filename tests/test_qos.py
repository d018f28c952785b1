"""QoS limits on real NBD traffic: per volume, per tenant, across worker processes, live.

A rate limit is behaviour that shows up as time, so these tests assert only lower bounds
("N operations under a limit of R per second cannot finish in less than about N/R seconds"),
which no slow machine can break; they never assert that anything is fast.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage_node.qos import BURST_SECONDS
from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import ApiNode, api_node
from tests.support.rawnbd import RawClient

READ, WRITE = 0, 1
MiB = 1 << 20


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ApiNode]:
    with api_node(tmp_path / "node", workers=2) as n:
        yield n


def attach(node: ApiNode, name: str, tenant: str) -> tuple[str, RawClient]:
    vol = node.api.create_volume(name, 64 * MiB, tenant)
    uri = node.api.publish(vol.id).export_name
    return vol.id, RawClient(node.nbd_port).connect(uri)


def reads(client: RawClient, count: int, length: int = 4096) -> float:
    start = time.monotonic()
    for i in range(count):
        assert client.call(READ, i, (i * length) % (32 * MiB), length).error == 0
    return time.monotonic() - start


def min_seconds(count: float, rate: float) -> float:
    """The least time `count` units can take at `rate` per second after the allowed burst,
    with 10 % slack for clock granularity."""
    return max(count - rate * BURST_SECONDS, 0) / rate * 0.9


def test_volume_iops_limit(node: ApiNode) -> None:
    vid, client = attach(node, "limited", "t1")
    node.api.SetVolumeQos(pb.SetVolumeQosRequest(volume_id=vid, qos=pb.Qos(iops=200)))
    assert reads(client, 200) >= min_seconds(200, 200)


def test_volume_bandwidth_limit(node: ApiNode) -> None:
    vid, client = attach(node, "slow", "t1")
    node.api.SetVolumeQos(
        pb.SetVolumeQosRequest(volume_id=vid, qos=pb.Qos(bytes_per_second=4 * MiB))
    )
    data = os.urandom(MiB)
    start = time.monotonic()
    for i in range(8):
        assert client.call(WRITE, i, i * MiB, MiB, payload=data).error == 0
    assert time.monotonic() - start >= min_seconds(8 * MiB, 4 * MiB)
    assert client.call(READ, 99, 0, MiB).data == data


def test_tenant_limit_holds_across_volumes_and_workers(node: ApiNode) -> None:
    """Two volumes of one tenant, connections on both worker processes, one ceiling."""
    clients = [attach(node, f"v{i}", "shared")[1] for i in range(2)]
    node.api.SetTenantLimits(
        pb.SetTenantLimitsRequest(name="shared", limits=pb.TenantLimits(qos=pb.Qos(iops=200)))
    )
    elapsed: list[float] = []
    threads = [threading.Thread(target=lambda c=c: elapsed.append(reads(c, 100))) for c in clients]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(elapsed) == 2
    assert time.monotonic() - start >= min_seconds(200, 200)


def test_limits_change_live_and_other_tenants_are_not_limited(node: ApiNode) -> None:
    vid, limited = attach(node, "live", "t1")
    _, free = attach(node, "free", "t2")
    reads(limited, 20)  # unlimited at first: just works
    node.api.SetVolumeQos(pb.SetVolumeQosRequest(volume_id=vid, qos=pb.Qos(iops=100)))
    assert reads(limited, 60) >= min_seconds(60, 100)  # the open connection is limited now
    assert reads(free, 200) >= 0  # another tenant's volume has no limit to wait for
    node.api.SetVolumeQos(pb.SetVolumeQosRequest(volume_id=vid, qos=pb.Qos()))
    reads(limited, 50)  # and lifting the limit keeps the connection working


def test_limits_survive_a_restart(node: ApiNode) -> None:
    vid, client = attach(node, "kept", "t1")
    node.api.SetVolumeQos(pb.SetVolumeQosRequest(volume_id=vid, qos=pb.Qos(iops=100)))
    client.close()
    node.restart()
    uri = node.api.ListAttachments(pb.ListAttachmentsRequest(volume_id=vid)).attachments[0]
    client = RawClient(node.nbd_port).connect(uri.export_name)
    assert reads(client, 60) >= min_seconds(60, 100)


def test_admission_reports_waits_for_metrics(tmp_path: Path) -> None:
    from storage_node.qos import Limit, SharedBuckets, VolumeQos

    waits: list[float] = []
    buckets = SharedBuckets(tmp_path / "qos.shm", create=True)
    qos = VolumeQos("t", buckets, Limit(slot=3, iops=100), None, on_throttle=waits.append)
    delays = [qos.admit(READ, 4096) for _ in range(20)]
    # 100 IOPS with a 50 ms burst: the first 5 pass, then each waits 10 ms more.
    assert delays[:5] == [0.0] * 5
    assert all(b > a for a, b in itertools.pairwise(delays[5:]))
    assert waits == [d for d in delays if d > 0]
    buckets.close()
