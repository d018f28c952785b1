"""Prometheus metrics of the storage node (storage_node/metrics.py, docs/metrics.md).

Three layers, each against real parts:
- the `Stats` backend wrapper over a real image file, the worker-side reporter and the
  main-side aggregator (counter resets, worker restarts, deleted volumes), in process;
- a running node (two NBD worker processes) with two volumes in two tenants, created through
  the management API and driven with exact NBD requests (tests/support/rawnbd.py): its
  /metrics output, checked sample by sample and by `promtool check metrics`, across a worker
  crash and a volume deletion;
- a real Prometheus (Debian's binary) scraping a running node every second and answering
  PromQL queries over its HTTP API after qemu-io wrote to a volume (marked slow).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from storage_node.backend.file import FileBackend
from storage_node.backend.filters import (
    BYTES,
    ERRORS,
    FIRST_BUCKET,
    LATENCY_NS,
    OPS,
    ROW,
    SNAPSHOT_LEN,
    STARTED,
    THROTTLED_NS,
    Filter,
    Stats,
)
from storage_node.exports import Export, ExportRegistry
from storage_node.files import create_sparse
from storage_node.metrics import (
    DATAGRAM_LIMIT,
    PVC_NAME,
    PVC_NAMESPACE,
    ControlSnapshot,
    NodeMetrics,
    StatsAggregator,
    StatsReporter,
    VolumeInfo,
)
from storage_node.nbd.server import NbdServer
from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import ApiNode, poll, start_api_node
from tests.support.prometheus import Prometheus
from tests.support.rawnbd import RawClient
from tests.support.servers import free_port

MiB = 1024 * 1024
# NBD request types, from shared/reference/nbd-protocol.md (not from the code under test).
NBD_READ = 0
NBD_WRITE = 1
NBD_FLUSH = 3
NBD_TRIM = 4
NBD_CACHE = 5
NBD_WRITE_ZEROES = 6
NBD_BLOCK_STATUS = 7
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def op_row(counters: list[int], op: str) -> list[int]:
    i = OPS.index(op)
    return counters[i * ROW : (i + 1) * ROW]


def finished(row: list[int]) -> int:
    return sum(row[FIRST_BUCKET:])


def counters(**ops: tuple[int, int]) -> list[int]:
    """A snapshot where each named op finished `n` requests of `nbytes` bytes in all."""
    out = [0] * SNAPSHOT_LEN
    for op, (n, nbytes) in ops.items():
        base = OPS.index(op) * ROW
        out[base + STARTED] = n
        out[base + BYTES] = nbytes
        out[base + FIRST_BUCKET] = n
    return out


# ---- the Stats wrapper ------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    create_sparse(path, 4 * MiB)
    return path


CALLS: list[tuple[str, Callable[[Stats], object], int]] = [
    ("read", lambda s: s.pread(0, 4096), 4096),
    ("write", lambda s: s.pwrite(b"x" * 8192, 4096, False), 8192),
    ("flush", lambda s: s.flush(), 0),
    ("trim", lambda s: s.trim(0, 65536, False), 65536),
    ("zero", lambda s: s.zero(65536, 4096, True, False, False), 4096),
    ("block_status", lambda s: s.extents(0, MiB), 0),
    ("cache", lambda s: s.cache(0, 4096), 4096),
]


@pytest.mark.parametrize(("op", "call", "nbytes"), CALLS, ids=[c[0] for c in CALLS])
def test_stats_counts_one_request_of_each_type(
    image: Path, op: str, call: Callable[[Stats], object], nbytes: int
) -> None:
    stats = Stats(FileBackend(str(image)))
    call(stats)
    call(stats)
    snap = stats.snapshot()
    for other in OPS:
        row = op_row(snap, other)
        if other == op:
            assert (finished(row), row[STARTED], row[BYTES], row[ERRORS]) == (2, 2, 2 * nbytes, 0)
        else:
            assert row == [0] * ROW
    stats.close()


def test_stats_counts_failures_and_reraises(image: Path) -> None:
    stats = Stats(FileBackend(str(image), readonly=True))  # O_RDONLY: writes fail (EBADF)
    with pytest.raises(OSError):
        stats.pwrite(b"x" * 512, 0, False)
    row = op_row(stats.snapshot(), "write")
    assert (row[STARTED], finished(row), row[ERRORS], row[BYTES]) == (1, 1, 1, 0)


def test_try_pread_counts_only_reads_it_served(image: Path) -> None:
    backend = FileBackend(str(image))
    stats = Stats(backend)
    data = stats.try_pread(0, 4096)  # None when the page is not cached; pread then counts it
    expected = 1 if data is not None else 0
    row = op_row(stats.snapshot(), "read")
    assert (row[STARTED], finished(row), row[BYTES]) == (expected, expected, 4096 * expected)


def test_stats_counts_reads_sent_with_sendfile(image: Path) -> None:
    backend = FileBackend(str(image))
    stats = Stats(backend)
    assert stats.sendfile_fd() == backend.sendfile_fd()
    stats.sendfile_done(MiB, 2_000_000)
    stats.sendfile_done(MiB, 3_000_000, failed=True)
    row = op_row(stats.snapshot(), "read")
    assert (row[STARTED], finished(row), row[BYTES], row[ERRORS]) == (2, 2, MiB, 1)
    assert row[LATENCY_NS] == 5_000_000
    stats.close()


class Unreadable(Filter):
    """Reads through pread fail: a READ that succeeds went out with sendfile."""

    def try_pread(self, offset: int, length: int) -> bytes | None:
        raise OSError(errno.EIO, "read through pread")

    def pread(self, offset: int, length: int) -> bytes:
        raise OSError(errno.EIO, "read through pread")


@pytest.fixture
def memory_image() -> Iterator[Path]:
    """An image on tmpfs: the server's sendfile path is for memory-backed images only."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm))
    try:
        path = folder / "vol.img"
        path.write_bytes(os.urandom(4 * MiB))
        if not FileBackend(str(path)).inline_safe:
            pytest.skip("/dev/shm is not a memory filesystem here")
        yield path
    finally:
        shutil.rmtree(folder)


def test_large_reads_through_stats_use_sendfile_and_are_counted(memory_image: Path) -> None:
    stats = Stats(Unreadable(FileBackend(str(memory_image))))
    registry = ExportRegistry()
    registry.add(Export(name="vol", backend=stats))
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(2)
    server = NbdServer(registry, executor)
    listener = loop.run_until_complete(loop.create_server(server.protocol, "127.0.0.1", 0))
    port = listener.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    expected = memory_image.read_bytes()
    try:
        client = RawClient(port).connect("vol")
        for i in range(4):
            reply = client.call(NBD_READ, cookie=i, offset=i * MiB, length=MiB)
            assert (reply.error, reply.data == expected[i * MiB : (i + 1) * MiB]) == (0, True)
        small = client.call(NBD_READ, cookie=9, offset=0, length=4096)  # not sendfile: pread
        assert small.error != 0
        client.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        listener.close()
        loop.close()
        executor.shutdown()
    row = op_row(stats.snapshot(), "read")
    assert (row[STARTED], finished(row), row[BYTES], row[ERRORS]) == (5, 5, 4 * MiB, 1)


class Gate(Filter):
    """A backend whose writes wait for a gate: lets a test see requests in flight."""

    def __init__(self, inner: FileBackend) -> None:
        super().__init__(inner)
        self.entered = threading.Semaphore(0)
        self.gate = threading.Event()

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        self.entered.release()
        assert self.gate.wait(30)
        self.inner.pwrite(data, offset, fua)


def test_stats_in_flight_and_threads(image: Path) -> None:
    gate = Gate(FileBackend(str(image)))
    stats = Stats(gate)
    threads = [
        threading.Thread(target=stats.pwrite, args=(b"y" * 4096, i * 4096, False)) for i in range(3)
    ]
    for t in threads:
        t.start()
    for _ in threads:
        assert gate.entered.acquire(timeout=30)
    row = op_row(stats.snapshot(), "write")
    assert (row[STARTED], finished(row)) == (3, 0)
    gate.gate.set()
    for t in threads:
        t.join()
    stats.pread(0, 512)  # and one on this thread: a shard of its own
    snap = stats.snapshot()
    assert (op_row(snap, "write")[STARTED], finished(op_row(snap, "write"))) == (3, 3)
    assert op_row(snap, "write")[BYTES] == 3 * 4096
    assert finished(op_row(snap, "read")) == 1


def test_throttled_seconds_add_up(image: Path) -> None:
    stats = Stats(FileBackend(str(image)))
    activity = stats.activity()
    stats.throttled(0.25)
    other = threading.Thread(target=stats.throttled, args=(0.5,))  # a shard of its own
    other.start()
    other.join()
    assert stats.snapshot()[THROTTLED_NS] == 750_000_000
    assert stats.activity() != activity


# ---- reporter and aggregator --------------------------------------------------------------------


def test_reporter_sends_changes_only_in_datagrams_under_the_limit(image: Path) -> None:
    backend = FileBackend(str(image))
    stats = {f"vol-{i:016x}": Stats(backend) for i in range(400)}
    for s in stats.values():
        s.pread(0, 512)
    reporter = StatsReporter(stats)
    datagrams = reporter.datagrams()
    assert len(datagrams) > 1
    assert all(len(d) <= DATAGRAM_LIMIT for d in datagrams)
    seen: dict[str, list[object]] = {}
    for d in datagrams:
        message = json.loads(d)
        assert message["op"] == "stats"
        seen.update(message["volumes"])
    assert set(seen) == set(stats)
    assert seen["vol-0000000000000007"] == [
        stats["vol-0000000000000007"].epoch,
        stats["vol-0000000000000007"].snapshot(),
    ]

    assert reporter.datagrams() == []  # nothing changed
    stats["vol-0000000000000003"].pwrite(b"z", 0, False)
    (only,) = reporter.datagrams()
    assert list(json.loads(only)["volumes"]) == ["vol-0000000000000003"]
    reporter.forget()  # a datagram was lost: everything again
    assert sum(len(json.loads(d)["volumes"]) for d in reporter.datagrams()) == 400


A, B = "vol-000000000000000a", "vol-000000000000000b"


def totals(agg: StatsAggregator, volume: str = A) -> tuple[int, int, int]:
    t = agg.totals()[volume]
    row = op_row(t.counters, "write")
    return finished(row), row[BYTES], t.in_flight


def test_aggregator_sums_workers() -> None:
    agg = StatsAggregator()
    agg.update(0, {A: ["e0", counters(write=(2, 200))]})
    agg.update(1, {A: ["e1", counters(write=(3, 300))], B: ["e2", counters(read=(1, 10))]})
    assert totals(agg) == (5, 500, 0)
    assert finished(op_row(agg.totals()[B].counters, "read")) == 1


RESETS = [
    # (what happens to worker 0's counters after it reported write=(5, 500), expected totals)
    ("grows", lambda a: a.update(0, {A: ["e0", counters(write=(6, 600))]}), (6, 600, 0)),
    (
        "new epoch (volume re-added)",
        lambda a: a.update(0, {A: ["e9", counters(write=(1, 100))]}),
        (6, 600, 0),
    ),
    (
        "drop in the same epoch",
        lambda a: a.update(0, {A: ["e0", counters(write=(2, 200))]}),
        (7, 700, 0),
    ),
    (
        "worker restarted",
        lambda a: (a.worker_gone(0), a.update(0, {A: ["e5", counters(write=(1, 50))]})),
        (6, 550, 0),
    ),
    ("worker gone, not yet back", lambda a: a.worker_gone(0), (5, 500, 0)),
]


@pytest.mark.parametrize(("case", "step", "expected"), RESETS, ids=[r[0] for r in RESETS])
def test_aggregator_counters_never_go_backwards(
    case: str, step: Callable[[StatsAggregator], object], expected: tuple[int, int, int]
) -> None:
    agg = StatsAggregator()
    agg.update(0, {A: ["e0", counters(write=(5, 500))]})
    step(agg)
    assert totals(agg) == expected


def test_aggregator_in_flight_comes_from_live_workers_only() -> None:
    agg = StatsAggregator()
    busy = counters(write=(1, 0))
    busy[OPS.index("write") * ROW + STARTED] = 4  # 4 started, 1 finished
    agg.update(0, {A: ["e0", busy]})
    assert totals(agg)[2] == 3
    agg.worker_gone(0)
    assert totals(agg) == (1, 0, 0)


def test_aggregator_skips_malformed_reports_and_forgets_deleted_volumes() -> None:
    agg = StatsAggregator()
    agg.update(0, {A: ["e0", [1, 2, 3]], B: "junk", "x": ["e", counters(read=(1, 1))]})
    assert set(agg.totals()) == {"x"}
    agg.retain({"y"})
    assert agg.totals() == {}


# ---- the collector, in process ------------------------------------------------------------------


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def pick(all_samples: Samples, name: str, **labels: str) -> list[float]:
    want = set(labels.items())
    return [v for (n, ls), v in all_samples.items() if n == name and want <= ls]


def one(all_samples: Samples, name: str, **labels: str) -> float:
    found = pick(all_samples, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_collector_output_on_an_injected_registry() -> None:
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    metrics.control = ControlSnapshot(
        node_id="n1",
        version="v",
        volumes=(
            VolumeInfo(A, "ns1", "ns1", "disk", 8 * MiB, 4096),
            VolumeInfo(B, "t2", "", "", MiB, 0),
        ),
        attachments=1,
        connections=(("0", 2), ("1", 0)),
    )
    reports = {A: ["e", counters(write=(3, 3 * 4096))], "vol-gone": ["e", counters()]}
    metrics.stats.update(0, reports)
    s = samples(generate_latest(registry).decode())
    a = {"volume": A, "tenant": "ns1", "pvc_namespace": "ns1", "pvc_name": "disk"}
    b = {"volume": B, "tenant": "t2", "pvc_namespace": "", "pvc_name": ""}
    assert one(s, "nbdcsi_volume_requests_total", op="write", **a) == 3
    assert one(s, "nbdcsi_volume_bytes_total", op="write", **a) == 3 * 4096
    assert one(s, "nbdcsi_volume_requests_total", op="write", **b) == 0
    assert one(s, "nbdcsi_volume_request_duration_seconds_count", op="write", **a) == 3
    # Buckets are cumulative: the 3 requests in the first bucket count in every later one.
    for le in ("2.5e-05", "0.001", "+Inf"):
        assert one(s, "nbdcsi_volume_request_duration_seconds_bucket", op="write", le=le, **a) == 3
    # Every series exists from the start (at 0), so rate() sees the first requests too.
    assert one(s, "nbdcsi_volume_request_duration_seconds_count", op="read", **a) == 0
    assert pick(s, "nbdcsi_volume_bytes_total", op="flush") == []  # no length, no bytes
    assert pick(s, "nbdcsi_volume_requests_total", volume="vol-gone") == []
    assert sum(pick(s, "nbdcsi_node_connections")) == 2
    assert one(s, "nbdcsi_node_attachments") == 1
    assert one(s, "nbdcsi_node_info", node="n1", version="v") == 1
    # Every volume has the same series: 7 request types, 5 byte types, 7 error types, ...
    assert len(pick(s, "nbdcsi_volume_requests_total", **b)) == len(OPS)


# ---- a running node -------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def scraped(port: int, done: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until done(samples): workers report once a second, the catalogue every two."""
    return poll(lambda: samples(scrape(port)), done, 30, what, step=0.2)


def worker_pids(node: ApiNode) -> list[int]:
    pid = node.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(c)
        for c in children
        if b"storage_node.worker" in Path(f"/proc/{c}/cmdline").read_bytes()
    ]


@pytest.fixture
def metrics_node(tmp_path: Path) -> Iterator[tuple[ApiNode, int]]:
    port = free_port()
    node = start_api_node(
        tmp_path / "node", workers=2, extra_args=["--metrics-listen", f"127.0.0.1:{port}"]
    )
    try:
        yield node, port
    finally:
        node.stop()


def create(node: ApiNode, name: str, tenant: str, size: int, pvc: str = "") -> pb.Volume:
    labels = {PVC_NAMESPACE: tenant, PVC_NAME: pvc} if pvc else {}
    return node.api.CreateVolume(
        pb.CreateVolumeRequest(name=name, tenant=tenant, size_bytes=size, labels=labels)
    )


def exact_io(port: int, export: str) -> None:
    """3 WRITEs (12 KiB), 2 READs, 1 each of FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS."""
    client = RawClient(port).connect(export, meta=True)
    try:
        for i in range(3):
            assert client.call(NBD_WRITE, i, i * 4096, 4096, payload=b"w" * 4096).error == 0
        assert client.call(NBD_READ, 10, 0, 8192).data == b"w" * 8192
        assert client.call(NBD_READ, 11, 0, 512).error == 0
        for typ, length in (
            (NBD_FLUSH, 0),
            (NBD_TRIM, 65536),
            (NBD_WRITE_ZEROES, 4096),
            (NBD_CACHE, 4096),
            (NBD_BLOCK_STATUS, MiB),
        ):
            assert client.call(typ, 20 + typ, 65536 if length else 0, length).error == 0
    finally:
        client.close()


def test_node_metrics_after_nbd_io(metrics_node: tuple[ApiNode, int]) -> None:
    node, port = metrics_node
    a1 = create(node, "m-a1", "tenant-a", 16 * MiB, pvc="disk-1")
    a2 = create(node, "m-a2", "tenant-a", 8 * MiB)
    b1 = create(node, "m-b1", "tenant-b", 4 * MiB, pvc="disk-b")
    att_a = node.api.publish(a1.id)
    att_b = node.api.publish(b1.id)
    exact_io(node.nbd_port, att_a.export_name)
    exact_io(node.nbd_port, att_b.export_name)
    idle = RawClient(node.nbd_port).connect(att_b.export_name)  # one open connection

    la = {"volume": a1.id, "tenant": "tenant-a", "pvc_namespace": "tenant-a", "pvc_name": "disk-1"}
    lb = {"volume": b1.id, "tenant": "tenant-b", "pvc_namespace": "tenant-b", "pvc_name": "disk-b"}

    def settled(s: Samples) -> bool:
        return (
            pick(s, "nbdcsi_volume_requests_total", op="block_status", **la) == [1]
            and pick(s, "nbdcsi_volume_requests_total", op="block_status", **lb) == [1]
            and sum(pick(s, "nbdcsi_node_connections")) == 1
            and pick(s, "nbdcsi_node_attachments") == [2]
        )

    s = scraped(port, settled, "metrics of the NBD requests")
    expected = {"read": (2, 8192 + 512), "write": (3, 3 * 4096), "flush": (1, None)}
    expected |= {"trim": (1, 65536), "zero": (1, 4096), "cache": (1, 4096)}
    expected |= {"block_status": (1, None)}
    for labels in (la, lb):
        for op, (n, nbytes) in expected.items():
            assert one(s, "nbdcsi_volume_requests_total", op=op, **labels) == n, op
            assert one(s, "nbdcsi_volume_errors_total", op=op, **labels) == 0, op
            assert one(s, "nbdcsi_volume_request_duration_seconds_count", op=op, **labels) == n
            if nbytes is not None:
                assert one(s, "nbdcsi_volume_bytes_total", op=op, **labels) == nbytes, op
        assert one(s, "nbdcsi_volume_requests_in_flight", **labels) == 0
        assert one(s, "nbdcsi_volume_throttled_seconds_total", **labels) == 0
    # The volume without PVC labels has them empty, and no traffic.
    l2 = {"volume": a2.id, "tenant": "tenant-a", "pvc_namespace": "", "pvc_name": ""}
    assert sum(pick(s, "nbdcsi_volume_requests_total", **l2)) == 0
    assert one(s, "nbdcsi_volume_size_bytes", **l2) == 8 * MiB
    assert one(s, "nbdcsi_tenant_provisioned_bytes", tenant="tenant-a") == 24 * MiB
    assert one(s, "nbdcsi_tenant_provisioned_bytes", tenant="tenant-b") == 4 * MiB
    assert one(s, "nbdcsi_tenant_volumes", tenant="tenant-a") == 2
    assert one(s, "nbdcsi_tenant_allocated_bytes", tenant="tenant-b") > 0
    assert one(s, "nbdcsi_node_volumes") == 3
    assert one(s, "nbdcsi_node_capacity_bytes") > 0
    assert one(s, "nbdcsi_node_provisioned_bytes") >= 28 * MiB
    assert pick(s, "nbdcsi_tenant_capacity_limit_bytes") == []  # unlimited: absent

    text = scrape(port)
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True
    )
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()

    # Limits show up once set.
    node.api.SetTenantLimits(
        pb.SetTenantLimitsRequest(
            name="tenant-b", limits=pb.TenantLimits(capacity_bytes=64 * MiB, volumes=5)
        )
    )
    s = scraped(
        port, lambda s: pick(s, "nbdcsi_tenant_capacity_limit_bytes") == [64 * MiB], "limits"
    )
    assert one(s, "nbdcsi_tenant_volumes_limit", tenant="tenant-b") == 5

    # Both workers crash: counters keep what they counted, then add what comes next.
    idle.close()
    old = set(worker_pids(node))
    assert len(old) == 2
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    poll(lambda: set(worker_pids(node)), lambda p: len(p) == 2 and not p & old, 30, "restart")
    s = scraped(port, lambda s: sum(pick(s, "nbdcsi_node_connections")) == 0, "no connections")
    assert one(s, "nbdcsi_volume_bytes_total", op="write", **la) == 3 * 4096
    exact_io(node.nbd_port, att_a.export_name)
    s = scraped(
        port,
        lambda s: pick(s, "nbdcsi_volume_requests_total", op="block_status", **la) == [2],
        "counts after the restart",
    )
    assert one(s, "nbdcsi_volume_requests_total", op="write", **la) == 6
    assert one(s, "nbdcsi_volume_bytes_total", op="write", **la) == 6 * 4096

    # A deleted volume leaves the output.
    node.api.unpublish(b1.id)
    node.api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=b1.id))
    s = scraped(port, lambda s: not pick(s, "nbdcsi_volume_size_bytes", volume=b1.id), "deleted")
    assert pick(s, "nbdcsi_volume_requests_total", volume=b1.id) == []
    assert one(s, "nbdcsi_node_attachments") == 1
    assert one(s, "nbdcsi_tenant_volumes", tenant="tenant-b") == 0


def test_node_without_workers_counts_its_own_requests(tmp_path: Path) -> None:
    # --workers 0: the main process serves NBD itself and takes its counters directly.
    port = free_port()
    node = start_api_node(
        tmp_path / "node", workers=0, extra_args=["--metrics-listen", f"127.0.0.1:{port}"]
    )
    try:
        vol = create(node, "w0", "tenant-w", 4 * MiB)
        exact_io(node.nbd_port, node.api.publish(vol.id).export_name)
        labels = {"volume": vol.id, "op": "write"}
        s = scraped(
            port, lambda s: pick(s, "nbdcsi_volume_requests_total", **labels) == [3], "writes"
        )
        assert one(s, "nbdcsi_volume_bytes_total", **labels) == 3 * 4096
        assert pick(s, "nbdcsi_node_connections") == [0]
    finally:
        node.stop()


# ---- a real Prometheus ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus")
def test_prometheus_scrapes_the_node_and_answers_queries(
    metrics_node: tuple[ApiNode, int], tmp_path: Path
) -> None:
    node, port = metrics_node
    v1 = create(node, "p-1", "tenant-p", 16 * MiB, pvc="vm-disk")
    v2 = create(node, "p-2", "tenant-p", 8 * MiB)
    create(node, "p-3", "tenant-q", 4 * MiB)
    att = node.api.publish(v1.id)
    node.api.publish(v2.id)

    prom = Prometheus(tmp_path, port)
    try:
        poll(prom.ready, bool, 60, "prometheus not ready", step=0.2)
        assert prom.wait_value('up{job="nbdcsi"}', lambda v: v == 1) == 1
        writes = f'nbdcsi_volume_requests_total{{volume="{v1.id}",op="write"}}'
        # The series exists (at 0) before any I/O, so a rate can see the increase.
        prom.wait_value(writes, lambda v: v == 0)

        written = 3 * MiB + 64 * 1024
        result = subprocess.run(
            [
                "qemu-io",
                "-f",
                "raw",
                f"nbd://127.0.0.1:{node.nbd_port}/{att.export_name}",
                "-c",
                "write -P 0x5a 0 3M",
                "-c",
                "write -P 0x5b 4M 64k",
                "-c",
                "read -P 0x5a 0 1M",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

        assert prom.wait_value(f"rate({writes}[30s])", lambda v: v is not None and v > 0)
        nbytes = f'nbdcsi_volume_bytes_total{{volume="{v1.id}",op="write",pvc_name="vm-disk"}}'
        assert prom.wait_value(nbytes, lambda v: v == written) == written
        assert prom.wait_value(
            'nbdcsi_tenant_provisioned_bytes{tenant="tenant-p"}', lambda v: v == 24 * MiB
        )
        assert len(prom.samples("sum by (tenant) (nbdcsi_volume_size_bytes)")) == 2
        capacity = prom.wait_value("nbdcsi_node_capacity_bytes", lambda v: v is not None)
        assert capacity is not None and capacity > 0
        assert prom.wait_value("nbdcsi_node_attachments", lambda v: v == 2) == 2
        median = prom.wait_value(
            "histogram_quantile(0.5, sum by (le) (rate("
            f'nbdcsi_volume_request_duration_seconds_bucket{{volume="{v1.id}",op="write"}}[30s])))',
            lambda v: v is not None,
        )
        assert median is not None and median > 0
    finally:
        prom.stop()
