"""QoS limits on real NBD traffic: per volume, per tenant, across worker processes, live.

A rate limit shows up as time, but a loaded machine only ever completes fewer requests than
a limit allows, never more. So these tests count: a closed-loop client reads until the test
stops it, and no more requests may complete in a window than the limit times the window plus
the burst (`at_most`). That a changed limit or a reused slot carries no old debt is checked
against the size of that debt: requests behind a debt of D seconds must be answered before a
timeout of D / 2 (`DEBT_S`), which any machine meets once the debt is gone. Nothing asserts
that anything is fast in absolute terms.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage_node.qos import BURST_SECONDS, SLOT, Limit, SharedBuckets, VolumeQos
from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import ApiNode, api_node, poll
from tests.support.rawnbd import RawClient
from tests.support.servers import free_port

READ, WRITE = 0, 1
MiB = 1 << 20
UNLIMITED = 1_000_000  # IOPS no test client comes near
DEBT_S = 40.0  # the debt built up in the debt tests, in seconds of the old limit


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ApiNode]:
    with api_node(tmp_path / "node", workers=2) as n:
        yield n


def volume_metric(port: int, name: str, vid: str, **labels: str) -> float:
    """One volume's sample from the node's /metrics (summed over the label sets that match)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    want = {"volume": vid, **labels}.items()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and want <= s.labels.items()
    )


def create(node: ApiNode, name: str, tenant: str, iops: int = 0, bps: int = 0) -> str:
    vol = node.api.CreateVolume(
        pb.CreateVolumeRequest(
            name=name,
            tenant=tenant,
            size_bytes=64 * MiB,
            qos=pb.Qos(iops=iops, bytes_per_second=bps),
        )
    )
    return str(vol.id)


def connect(node: ApiNode, vid: str, timeout: float = 120.0) -> RawClient:
    uri = node.api.publish(vid).export_name
    return RawClient(node.nbd_port, timeout=timeout).connect(uri)


def attach(node: ApiNode, name: str, tenant: str, iops: int = 0) -> tuple[str, RawClient]:
    vid = create(node, name, tenant, iops)
    return vid, connect(node, vid)


def set_iops(node: ApiNode, vid: str, iops: int) -> float:
    """Change a volume's limit; returns when the call came back (every worker has it)."""
    node.api.SetVolumeQos(pb.SetVolumeQosRequest(volume_id=vid, qos=pb.Qos(iops=iops)))
    return time.monotonic()


class ClosedLoop:
    """One request at a time on one connection, back to back, until `stop()`. Keeps, per
    completed request, when it was sent and when its reply arrived (client clock)."""

    def __init__(self, client: RawClient, length: int = 4096, write: bool = False) -> None:
        self.client = client
        self.length = length
        self.payload = os.urandom(length) if write else b""
        self.done: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for i in range(1 << 62):
                if self._stop.is_set():
                    return
                offset = (i * self.length) % (32 * MiB)
                sent = time.monotonic()
                if self.payload:
                    reply = self.client.call(WRITE, i, offset, self.length, payload=self.payload)
                else:
                    reply = self.client.call(READ, i, offset, self.length)
                assert reply.error == 0, reply
                self.done.append((sent, time.monotonic()))
        except BaseException as exc:
            self.error = exc

    def wait_for(self, count: int, since: float = 0.0, timeout: float = 120.0) -> None:
        """Until `count` requests sent at or after `since` completed (the timeout is a bound)."""
        poll(
            lambda: len(self.since(since)) if self.error is None else -1,
            lambda n: n >= count or n < 0,
            timeout,
            f"{count} requests completed",
        )
        assert self.error is None, self.error

    def since(self, start: float) -> list[tuple[float, float]]:
        return [d for d in self.done if d[0] >= start]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert self.error is None, self.error


def at_most(done: list[tuple[float, float]], rate: float, units: float = 1) -> float:
    """What a limit of `rate` (per second) lets through in the window from the first request's
    sending to the last reply: rate x window plus the burst, with 5 % and two requests of slack
    for timer granularity. The count of what completed must not exceed it."""
    window = done[-1][1] - done[0][0]
    return rate * (window + BURST_SECONDS) * 1.05 + 2 * units


def pipeline(client: RawClient, count: int, first_cookie: int = 1000) -> list[int]:
    """Send `count` reads at once (without waiting for replies); returns their cookies."""
    cookies = list(range(first_cookie, first_cookie + count))
    for c in cookies:
        client.send(READ, c, (c * 4096) % (32 * MiB), 4096)
    return cookies


def collect(client: RawClient, cookies: list[int], deadline: float | None = None) -> None:
    """Read the replies to `cookies`, in any order; all of them by `deadline` (monotonic)
    if one is given, else each within the client's timeout."""
    left = set(cookies)
    while left:
        if deadline is not None:
            client.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        reply = client.reply(4096)
        assert reply.error == 0, reply
        left.remove(reply.cookie)


def before_the_debt() -> float:
    """A deadline for what must not wait out a debt of DEBT_S seconds: half of it from now."""
    return time.monotonic() + DEBT_S / 2


# -- limits given at creation, and changed live --------------------------------------------


def test_limit_given_at_creation_applies_from_the_first_request(node: ApiNode) -> None:
    """CreateVolume with `qos` (what the CSI controller sends for a StorageClass's `iops`):
    the limit holds from the first I/O, not only after a restart of the node."""
    vid, client = attach(node, "created-limited", "t1", iops=20)
    vol = node.api.GetVolume(pb.GetVolumeRequest(volume_id=vid))
    assert vol.qos.iops == 20
    loop = ClosedLoop(client)
    loop.wait_for(30)
    loop.stop()
    assert len(loop.done) <= at_most(loop.done, 20)


def test_a_limit_set_while_the_volume_is_filled_wins(node: ApiNode) -> None:
    """A clone of a snapshot is filled in the background: SetVolumeQos right after
    CreateVolume (while it may still be filling) wins over the limit it was created with,
    whether or not the fill has finished by then."""
    source = create(node, "source", "t1")
    snap = node.api.CreateSnapshot(pb.CreateSnapshotRequest(name="snap", volume_id=source))
    vol = node.api.CreateVolume(
        pb.CreateVolumeRequest(
            name="clone",
            tenant="t1",
            size_bytes=64 * MiB,
            source=pb.VolumeSource(snapshot_id=snap.id),
            qos=pb.Qos(iops=UNLIMITED),
        )
    )
    set_iops(node, vol.id, 20)
    assert node.api.wait_volume(vol.id).state == pb.VOLUME_STATE_READY
    loop = ClosedLoop(connect(node, vol.id))
    loop.wait_for(30)
    loop.stop()
    assert len(loop.done) <= at_most(loop.done, 20)


def test_limit_changes_both_ways_under_load(node: ApiNode) -> None:
    """A closed-loop reader keeps going while the limit is lowered, raised and lifted; after
    each change, what completes stays within the new limit."""
    vid, client = attach(node, "tiers", "t1", iops=100)
    loop = ClosedLoop(client)
    loop.wait_for(40)
    assert len(loop.done) <= at_most(loop.done, 100)
    lowered = set_iops(node, vid, 10)
    loop.wait_for(12, since=lowered)
    slow = loop.since(lowered)
    assert len(slow) <= at_most(slow, 10)
    raised = set_iops(node, vid, 50)
    loop.wait_for(30, since=raised)
    fast = loop.since(raised)
    assert len(fast) <= at_most(fast, 50)
    lifted = set_iops(node, vid, 0)
    loop.wait_for(50, since=lifted)  # unlimited again: the connection just keeps working
    loop.stop()


def test_raising_a_limit_drops_the_debt_of_queued_requests(node: ApiNode) -> None:
    """Requests queued under a low limit are a debt of DEBT_S seconds. Raised limit: the
    queued requests and the next one go at the new rate, not after the old debt."""
    vid, client = attach(node, "in-debt", "t1")
    set_iops(node, vid, 2)
    cookies = pipeline(client, int(DEBT_S * 2))
    collect(client, cookies[:1])  # the node has the queue
    set_iops(node, vid, UNLIMITED)
    deadline = before_the_debt()
    collect(client, cookies[1:], deadline)
    client.send(READ, 2, 0, 4096)
    collect(client, [2], deadline)
    other = connect(node, vid)  # a new connection, maybe on the other worker
    other.send(READ, 3, 0, 4096)
    collect(other, [3], deadline)


def test_raising_a_tenant_limit_drops_its_debt(node: ApiNode) -> None:
    _, client = attach(node, "tenant-debt", "indebted")

    def tenant_iops(iops: int) -> None:
        node.api.SetTenantLimits(
            pb.SetTenantLimitsRequest(
                name="indebted", limits=pb.TenantLimits(qos=pb.Qos(iops=iops))
            )
        )

    tenant_iops(2)
    cookies = pipeline(client, int(DEBT_S * 2))
    collect(client, cookies[:1])
    tenant_iops(UNLIMITED)
    deadline = before_the_debt()
    collect(client, cookies[1:], deadline)
    client.send(READ, 2, 0, 4096)
    collect(client, [2], deadline)


def test_a_freed_slot_starts_clean_for_the_next_volume(node: ApiNode) -> None:
    """A volume deleted while deep in debt leaves none of it to the volume that gets its slot
    next (another tenant's); that volume's own limit still holds."""
    vid, client = attach(node, "doomed", "t1")
    set_iops(node, vid, 2)
    cookies = pipeline(client, int(DEBT_S * 2))
    collect(client, cookies[:1])
    node.api.unpublish(vid)
    assert client.is_closed()
    node.api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    vid, fresh = attach(node, "next-tenant", "t2")
    set_iops(node, vid, 100)
    fresh.send(READ, 1, 0, 4096)
    collect(fresh, [1], before_the_debt())
    fresh.sock.settimeout(120)
    loop = ClosedLoop(fresh)
    loop.wait_for(30)
    loop.stop()
    assert len(loop.done) <= at_most(loop.done, 100)


# -- what the limits cover ------------------------------------------------------------------


def test_volume_bandwidth_limit(node: ApiNode) -> None:
    vid, client = attach(node, "slow", "t1")
    node.api.SetVolumeQos(
        pb.SetVolumeQosRequest(volume_id=vid, qos=pb.Qos(bytes_per_second=4 * MiB))
    )
    loop = ClosedLoop(client, length=MiB, write=True)
    loop.wait_for(8)
    loop.stop()
    assert len(loop.done) * MiB <= at_most(loop.done, 4 * MiB, units=MiB)
    assert client.call(READ, 99, 0, MiB).data == loop.payload


def test_tenant_limit_holds_across_volumes_and_workers(node: ApiNode) -> None:
    """Two volumes of one tenant, connections on both worker processes, one ceiling."""
    clients = [attach(node, f"v{i}", "shared")[1] for i in range(2)]
    node.api.SetTenantLimits(
        pb.SetTenantLimitsRequest(name="shared", limits=pb.TenantLimits(qos=pb.Qos(iops=100)))
    )
    start = time.monotonic()
    loops = [ClosedLoop(c) for c in clients]
    for loop in loops:
        loop.wait_for(30)
    for loop in loops:
        loop.stop()
    done = sorted(d for loop in loops for d in loop.done)
    assert done[0][0] >= start
    assert len(done) <= at_most([done[0], max(done, key=lambda d: d[1])], 100)


def test_other_tenants_are_not_limited(tmp_path: Path) -> None:
    """A limited volume's neighbour (another tenant) has nothing to wait for: the node reports
    no time held for it, while the limited one, read at the same time, was held."""
    port = free_port()
    with api_node(
        tmp_path / "node", workers=2, extra_args=["--metrics-listen", f"127.0.0.1:{port}"]
    ) as node:
        limited_id, limited = attach(node, "limited", "t1", iops=5)
        free_id, free = attach(node, "free", "t2")
        slow, fast = ClosedLoop(limited), ClosedLoop(free)
        fast.wait_for(200)
        slow.wait_for(3)
        slow.stop()
        fast.stop()
        assert len(slow.done) <= at_most(slow.done, 5)
        held = "nbdcsi_volume_throttled_seconds_total"
        reads = "nbdcsi_volume_requests_total"
        # Workers report their counters about once a second: wait until both volumes' reads
        # are all there, then the free one must show no time held.
        poll(
            lambda: (
                volume_metric(port, reads, free_id, op="read"),
                volume_metric(port, reads, limited_id, op="read"),
                volume_metric(port, held, limited_id),
            ),
            lambda v: v[0] >= len(fast.done) and v[1] >= len(slow.done) and v[2] > 0,
            60,
            "the reads in the metrics",
        )
        assert volume_metric(port, held, free_id) == 0


def test_limits_survive_a_restart(node: ApiNode) -> None:
    vid, client = attach(node, "kept", "t1")
    set_iops(node, vid, 50)
    client.close()
    node.restart()
    uri = node.api.ListAttachments(pb.ListAttachmentsRequest(volume_id=vid)).attachments[0]
    loop = ClosedLoop(RawClient(node.nbd_port, timeout=120).connect(uri.export_name))
    loop.wait_for(30)
    loop.stop()
    assert len(loop.done) <= at_most(loop.done, 50)


# -- the limiter itself: the waits it reports ------------------------------------------------


def wait(qos: VolumeQos) -> float:
    """Admit one 4 KiB read; the seconds the limiter says it must wait."""
    hold = qos.admit(READ, 4096)
    return hold.wait if hold is not None else 0.0


@pytest.fixture
def buckets(tmp_path: Path) -> Iterator[SharedBuckets]:
    b = SharedBuckets(tmp_path / "qos.shm", create=True)
    yield b
    b.close()


def test_admission_waits_grow_by_the_cost(buckets: SharedBuckets) -> None:
    """On the bucket itself, with the clock given: at 100 IOPS and a 50 ms burst the first 6
    requests at one instant pass (one, then 50 ms of the rate), then each waits 10 ms more."""
    waits = [buckets.reserve(3, 1, 100.0, 100, 1, 0, 4096) for _ in range(20)]
    assert waits[:6] == [0.0] * 6
    assert waits[6:] == pytest.approx([0.01 * k for k in range(1, 15)])


def test_a_request_under_a_low_limit_does_not_wait(buckets: SharedBuckets) -> None:
    """At 5 IOPS the burst (50 ms of the rate) is less than one request; a volume that stays
    within its limit must still not be held: only the request right behind it waits."""
    assert buckets.reserve(4, 1, 100.0, 5, 1, 0, 0) == 0.0
    assert buckets.reserve(4, 1, 100.0, 5, 1, 0, 0) == pytest.approx(0.2 - BURST_SECONDS)
    assert buckets.reserve(4, 1, 101.0, 5, 1, 0, 0) == 0.0  # idle again: no wait


def test_a_new_limit_starts_without_the_old_debt(buckets: SharedBuckets) -> None:
    """The limiter's own answer: after 40 requests at 2 IOPS the next waits ~20 s; under the
    raised limit (a new generation) the next one waits nothing; a process still on the old
    generation adds no debt to the new one."""
    waits = [buckets.reserve(7, 1, 100.0, 2, 1, 0, 0) for _ in range(41)]
    assert waits[-1] == pytest.approx(20 - BURST_SECONDS)
    assert buckets.reserve(7, 2, 100.0, UNLIMITED, 1, 0, 0) == 0.0
    assert buckets.reserve(7, 1, 100.0, 2, 1, 0, 0) == 0.0  # a worker not yet told
    assert buckets.reserve(7, 2, 100.0, UNLIMITED, 1, 0, 0) == 0.0
    # The same through a volume's limits, as the NBD server admits.
    qos = VolumeQos("t", buckets, Limit(slot=8, iops=2, generation=1), None)
    assert [wait(qos) for _ in range(41)][-1] > 10
    qos.set_volume_limit(Limit(slot=8, iops=UNLIMITED, generation=2))
    assert wait(qos) == 0.0


def test_a_reused_slot_starts_clean(buckets: SharedBuckets) -> None:
    deleted = VolumeQos("t1", buckets, Limit(slot=9, iops=2, generation=4), None)
    for _ in range(40):
        wait(deleted)
    reused = VolumeQos("t2", buckets, Limit(slot=9, iops=2, generation=5), None)
    assert wait(reused) == 0.0
    assert wait(reused) <= 0.5  # its own debt only


def test_a_change_takes_over_the_waiting_requests(buckets: SharedBuckets) -> None:
    """Requests waiting when a limit changes are charged under the new one at once: raising
    the volume's limit leaves them waiting only for the tenant's, whose debt is not charged
    twice; raising the tenant's then lets them all go, in arrival order. The same limit sent
    again changes nothing. `on_throttle` (the metric) hears each request's time held."""
    heard: list[float] = []
    volume, tenant = Limit(slot=1, iops=1, generation=1), Limit(slot=2, iops=1, generation=2)
    qos = VolumeQos("t", buckets, volume, tenant, heard.append)
    ran: list[int] = []
    done = asyncio.Event()

    def run(i: int) -> None:
        ran.append(i)
        if len(ran) == 3:
            done.set()

    async def main() -> None:
        assert qos.admit(READ, 4096) is None
        holds = [qos.admit(READ, 4096) for _ in range(2)]  # 0.95 s and 1.95 s on both
        for i, hold in enumerate(holds):
            assert hold is not None
            hold.start(functools.partial(run, i))
        qos.set_volume_limit(volume)  # the same: nothing
        qos.set_volume_limit(Limit(slot=1, iops=UNLIMITED, generation=3))
        third = qos.admit(READ, 4096)
        assert third is not None
        third.start(lambda: run(2))
        # Four charges on the tenant's bucket at 1 IOPS: the third waits about 2.95 s
        # (charged again with the volume's change, it would be about 4.95 s).
        assert third.wait < 3.95
        qos.set_tenant_limit(Limit(slot=2, iops=UNLIMITED, generation=4))
        await asyncio.wait_for(done.wait(), 30)

    asyncio.run(main())
    assert ran == [0, 1, 2]
    assert len(heard) == 3 and all(h >= 0 for h in heard)


def test_a_wait_that_runs_out_runs_its_request(buckets: SharedBuckets) -> None:
    heard: list[float] = []
    qos = VolumeQos("t", buckets, Limit(slot=5, iops=100, generation=1), None, heard.append)

    async def main() -> None:
        last = [qos.admit(READ, 4096) for _ in range(50)][-1]  # about 0.44 s behind
        assert last is not None
        done = asyncio.Event()
        last.start(done.set)
        await asyncio.wait_for(done.wait(), 30)

    asyncio.run(main())
    assert len(heard) == 1 and heard[0] > 0


class CountingBuckets(SharedBuckets):
    """The real slots file; counts the round trips to it (each one a lock and an unlock)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, create=True)
        self.calls = 0

    def reserve(
        self,
        slot: int,
        generation: int,
        now: float,
        ops_rate: int,
        ops: int,
        byte_rate: int,
        nbytes: int,
    ) -> float:
        self.calls += 1
        return super().reserve(slot, generation, now, ops_rate, ops, byte_rate, nbytes)


def test_admission_takes_budget_in_chunks(tmp_path: Path) -> None:
    """Far under its limit, a volume's requests are admitted from budget taken a chunk at a
    time: one round trip to the shared slot for a thousand requests, not one each. A changed
    limit drops what is left: the next request takes a chunk under the new generation."""
    buckets = CountingBuckets(tmp_path / "qos.shm")
    qos = VolumeQos("t", buckets, Limit(slot=3, iops=10_000_000, bps=100 * 10**9, generation=1))
    assert all(qos.admit(READ, 4096) is None for _ in range(1000))
    assert buckets.calls == 1
    qos.set_volume_limit(Limit(slot=3, iops=10_000_000, bps=100 * 10**9, generation=2))
    assert qos.admit(READ, 4096) is None
    assert buckets.calls == 2
    assert SLOT.unpack_from(buckets.map, 3 * SLOT.size)[2] == 2
    # No limit: the slots file is not touched at all.
    free = VolumeQos("t", buckets, None, None)
    assert all(free.admit(READ, 4096) is None for _ in range(100))
    assert buckets.calls == 2
    buckets.close()


def test_chunks_of_two_processes_stay_within_the_limit(tmp_path: Path) -> None:
    """Two processes' views of one volume at 1000 IOPS (chunks of 5): of 400 requests at
    once, only the burst (50 ms of the rate, plus one) and at most a chunk per process, plus
    what the rate adds while the loop runs, pass without waiting; the rest wait in order."""
    path = tmp_path / "qos.shm"
    first = SharedBuckets(path, create=True)
    second = SharedBuckets(path)
    limit = Limit(slot=4, iops=1000, generation=1)
    views = [VolumeQos("t", first, limit), VolumeQos("t", second, limit)]
    holds = [views[i % 2].admit(READ, 4096) for i in range(400)]
    passed = sum(h is None for h in holds)
    assert 40 <= passed <= 51 + 2 * 5 + 20
    waits = [h.wait for h in holds if h is not None]
    assert max(waits) > 0.3  # 400 requests at 1000 IOPS: the last ones wait for the rate
    first.close()
    second.close()


def test_limited_follows_the_limits(buckets: SharedBuckets) -> None:
    """`limited` (read per request by the server) follows every change of either limit."""
    qos = VolumeQos("t", buckets, None, None)
    assert not qos.limited
    qos.set_tenant_limit(Limit(slot=6, iops=10, generation=1))
    assert qos.limited
    qos.set_tenant_limit(Limit(slot=6, generation=2))  # no rate: no limit
    assert not qos.limited
    qos.set_volume_limit(Limit(slot=7, bps=MiB, generation=3))
    assert qos.limited
    qos.set_volume_limit(None)
    assert not qos.limited
    assert VolumeQos("t", None, Limit(slot=7, iops=5, generation=4)).limited is False
