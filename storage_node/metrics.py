"""Prometheus metrics of a storage node: what the data path counted, what the catalogue says.

Owns the way numbers travel from where they are measured to a scrape, and the metric
families themselves (every one is listed in docs/metrics.md):

- Data path. Every NBD process wraps each volume's backend in `backend.filters.Stats`. Once a
  second a worker sends the cumulative counters of the volumes that changed to the main
  process (`StatsReporter`: {"op": "stats", "volumes": {id: [epoch, counters]}}, split into
  datagrams under the control socket's 64 KiB). The main process keeps the latest numbers per
  worker and volume and sums them (`StatsAggregator`). Counters that start again from zero (a
  worker replaced after a crash, a volume re-added: a new `epoch`) are added to an offset
  first, so exported counters never go backwards.
- Control path. Every REFRESH_INTERVAL seconds a task on the main process's event loop reads
  the catalogue (through the StoreThread), capacity, attachments and connection counts into
  an immutable `ControlSnapshot`.
- Scrape. prometheus_client's HTTP server calls `NodeCollector.collect` on its own thread; it
  reads only the aggregator (under its lock) and the latest snapshot, never the event loop or
  SQLite. The registry is injected: no global registry is used.

Label cardinality is bounded by the number of volumes (labels volume, tenant, pvc_namespace,
pvc_name, and op from a fixed set) and tenants; deleted volumes leave the output with the
next refresh.
"""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from . import files
from .backend.filters import (
    BYTES,
    ERRORS,
    FIRST_BUCKET,
    LATENCY_BUCKETS,
    LATENCY_NS,
    OPS,
    ROW,
    SNAPSHOT_LEN,
    STARTED,
    THROTTLED_NS,
    Stats,
)
from .store import Store, TenantLimits, TenantUsage
from .volumes import Capacity, VolumeService

log = logging.getLogger("storage_node.metrics")

STATS_INTERVAL = 1.0  # seconds between two reports of a worker
REFRESH_INTERVAL = 2.0  # seconds between two reads of the catalogue
DATAGRAM_LIMIT = 60 * 1024  # a stats datagram stays under the control socket's 64 KiB
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"  # volume labels the CSI provisioner sets
PVC_NAME = "csi.storage.k8s.io/pvc/name"  # with --extra-create-metadata
BYTE_OPS = ("read", "write", "trim", "zero", "cache")  # request types that carry a length
VOLUME_LABELS = ("volume", "tenant", "pvc_namespace", "pvc_name")
_BUCKET_LABELS = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]


# -- worker side ------------------------------------------------------------------------------


class StatsReporter:
    """Which volumes' counters changed since the last report, ready to send."""

    def __init__(self, stats: Mapping[str, Stats], limit: int = DATAGRAM_LIMIT) -> None:
        self._stats = stats
        self._limit = limit
        self._sent: dict[str, tuple[str, int]] = {}  # volume -> (epoch, activity) reported

    def changed(self) -> dict[str, tuple[str, list[int]]]:
        """volume id -> (epoch, counters), for the volumes that changed since last time."""
        out: dict[str, tuple[str, list[int]]] = {}
        current = list(self._stats.items())
        for volume_id, stats in current:
            mark = (stats.epoch, stats.activity())
            if self._sent.get(volume_id) != mark:
                self._sent[volume_id] = mark
                out[volume_id] = (stats.epoch, stats.snapshot())
        if len(self._sent) > len(current):
            live = {volume_id for volume_id, _ in current}
            self._sent = {k: v for k, v in self._sent.items() if k in live}
        return out

    def datagrams(self) -> list[bytes]:
        """The changes as {"op": "stats", ...} messages, each under the size limit."""
        head, tail = b'{"op":"stats","volumes":{', b"}}"
        out: list[bytes] = []
        parts: list[bytes] = []
        size = len(head) + len(tail)
        for volume_id, (epoch, counters) in self.changed().items():
            entry = json.dumps({volume_id: [epoch, counters]}, separators=(",", ":")).encode()
            entry = entry[1:-1]  # "id":[...] without the braces
            if parts and size + len(entry) + 1 > self._limit:
                out.append(head + b",".join(parts) + tail)
                parts, size = [], len(head) + len(tail)
            parts.append(entry)
            size += len(entry) + 1
        if parts:
            out.append(head + b",".join(parts) + tail)
        return out

    def forget(self) -> None:
        """A report was lost: the next one carries every volume."""
        self._sent.clear()


# -- main side: the data path's numbers -------------------------------------------------------


@dataclass
class _Counters:
    """One worker's numbers for one volume: the latest report, and what earlier epochs
    counted (`base`). Lists are replaced, never changed in place, so a reader holding
    references has a consistent pair."""

    epoch: str
    last: list[int]
    base: list[int]


@dataclass(frozen=True)
class VolumeTotals:
    counters: list[int]  # laid out as Stats.snapshot
    in_flight: int


def _in_flight(counters: list[int]) -> int:
    total = 0
    for op in range(len(OPS)):
        row = counters[op * ROW : (op + 1) * ROW]
        total += max(row[STARTED] - sum(row[FIRST_BUCKET:]), 0)
    return total


class StatsAggregator:
    """The latest counters of every worker, per volume; summed on demand. Updated on the
    event loop, read by scrapes on the HTTP server's thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, str], _Counters] = {}

    def update(self, worker: int, volumes: Mapping[str, Any]) -> None:
        """Take a report: {volume id: [epoch, counters]}. Malformed entries are skipped."""
        with self._lock:
            for volume_id, item in volumes.items():
                try:
                    epoch, values = str(item[0]), [int(n) for n in item[1]]
                except (TypeError, ValueError, IndexError):
                    values = []
                if len(values) != SNAPSHOT_LEN:
                    log.error("worker %d sent malformed stats for %s", worker, volume_id)
                    continue
                key = (worker, volume_id)
                entry = self._entries.get(key)
                if entry is None:
                    self._entries[key] = _Counters(epoch, values, [0] * SNAPSHOT_LEN)
                    continue
                if epoch != entry.epoch or any(map(operator.lt, values, entry.last)):
                    # Counting started again from zero: keep what the old epoch counted.
                    entry.base = list(map(operator.add, entry.base, entry.last))
                    entry.epoch = epoch
                entry.last = values

    def worker_gone(self, worker: int) -> None:
        """A worker exited: its counts stay (as an offset), its requests are no longer in
        flight, and its replacement starts from zero."""
        with self._lock:
            for (w, _), entry in self._entries.items():
                if w == worker:
                    entry.base = list(map(operator.add, entry.base, entry.last))
                    entry.last = [0] * SNAPSHOT_LEN
                    entry.epoch = ""

    def retain(self, volume_ids: set[str]) -> None:
        """Forget volumes that no longer exist."""
        with self._lock:
            for key in [k for k in self._entries if k[1] not in volume_ids]:
                del self._entries[key]

    def totals(self) -> dict[str, VolumeTotals]:
        with self._lock:
            items = [(k[1], e.base, e.last) for k, e in self._entries.items()]
        sums: dict[str, list[int]] = {}
        in_flight: dict[str, int] = {}
        for volume_id, base, last in items:
            total = sums.get(volume_id, [0] * SNAPSHOT_LEN)
            sums[volume_id] = list(map(sum, zip(total, base, last, strict=True)))
            in_flight[volume_id] = in_flight.get(volume_id, 0) + _in_flight(last)
        return {v: VolumeTotals(c, in_flight[v]) for v, c in sums.items()}


# -- main side: the control path's numbers ----------------------------------------------------


@dataclass(frozen=True)
class VolumeInfo:
    id: str
    tenant: str
    pvc_namespace: str
    pvc_name: str
    size: int
    allocated: int

    @property
    def label_values(self) -> list[str]:
        return [self.id, self.tenant, self.pvc_namespace, self.pvc_name]


@dataclass(frozen=True)
class TenantInfo:
    name: str
    limits: TenantLimits
    usage: TenantUsage
    allocated: int


@dataclass(frozen=True)
class ControlSnapshot:
    node_id: str = ""
    version: str = ""
    volumes: tuple[VolumeInfo, ...] = ()
    tenants: tuple[TenantInfo, ...] = ()
    capacity: Capacity | None = None
    attachments: int = 0
    connections: tuple[tuple[str, int], ...] = ()  # (worker, connections)
    quarantined: tuple[int, int] = (0, 0)  # (files, bytes on disk) in DATA/quarantine


async def read_control(
    service: VolumeService, connections: Mapping[str, int], version: str
) -> ControlSnapshot:
    """Read the control-plane numbers. On the event loop: SQLite through the StoreThread,
    file sizes on the service's executor."""

    def read(s: Store) -> tuple[Any, ...]:
        tenants = s.tenants()
        return (
            [v for v in s.volumes() if v.state != "deleting"],
            [x for x in s.snapshots() if not x.deleting],
            {t: (s.tenant_limits(t), s.tenant_usage(t)) for t in tenants},
            len(s.attachments()),
        )

    volumes, snapshots, tenants, attachments = await service.store.run(read)
    paths = [v.path for v in volumes] + [x.path for x in snapshots]
    loop = asyncio.get_running_loop()
    allocated: dict[str, int] = await loop.run_in_executor(
        service.executor, lambda: {p: files.allocated_bytes(Path(p)) for p in paths}
    )
    quarantined = await loop.run_in_executor(service.executor, service.quarantined)
    tenant_allocated: dict[str, int] = {}
    for row in [*volumes, *snapshots]:
        tenant_allocated[row.tenant] = tenant_allocated.get(row.tenant, 0) + allocated[row.path]
    return ControlSnapshot(
        quarantined=quarantined,
        node_id=service.settings.node_id,
        version=version,
        volumes=tuple(
            VolumeInfo(
                v.id,
                v.tenant,
                v.labels.get(PVC_NAMESPACE, ""),
                v.labels.get(PVC_NAME, ""),
                v.size,
                allocated[v.path],
            )
            for v in volumes
        ),
        tenants=tuple(
            TenantInfo(t, limits, usage, tenant_allocated.get(t, 0))
            for t, (limits, usage) in tenants.items()
        ),
        capacity=await service.capacity(),
        attachments=attachments,
        connections=tuple(sorted(connections.items())),
    )


# -- the collector ----------------------------------------------------------------------------


class NodeCollector(Collector):
    """Yields every family at scrape time from the aggregator and the latest snapshot."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(_families(ControlSnapshot(), {}))

    def collect(self) -> Iterable[Metric]:
        return list(_families(self._metrics.control, self._metrics.stats.totals()))


def _families(control: ControlSnapshot, totals: Mapping[str, VolumeTotals]) -> Iterator[Metric]:
    yield from _volume_families(control, totals)
    yield from _tenant_families(control)
    yield from _node_families(control)


def _volume_families(
    control: ControlSnapshot, totals: Mapping[str, VolumeTotals]
) -> Iterator[Metric]:
    labels = list(VOLUME_LABELS)
    requests = CounterMetricFamily(
        "nbdcsi_volume_requests",
        "NBD requests that reached the volume's image, by request type (errors included).",
        labels=[*labels, "op"],
    )
    nbytes = CounterMetricFamily(
        "nbdcsi_volume_bytes",
        "Bytes read, written, trimmed, zeroed or cached by successful requests.",
        labels=[*labels, "op"],
    )
    errors = CounterMetricFamily(
        "nbdcsi_volume_errors",
        "NBD requests that failed in the backend, by request type.",
        labels=[*labels, "op"],
    )
    latency = HistogramMetricFamily(
        "nbdcsi_volume_request_duration_seconds",
        "Time the backend took for a request, by request type.",
        labels=[*labels, "op"],
    )
    in_flight = GaugeMetricFamily(
        "nbdcsi_volume_requests_in_flight",
        "Requests being executed by the backend right now.",
        labels=labels,
    )
    throttled = CounterMetricFamily(
        "nbdcsi_volume_throttled_seconds",
        "Time requests were held back by QoS limits (volume or tenant), summed over requests.",
        labels=labels,
    )
    size = GaugeMetricFamily(
        "nbdcsi_volume_size_bytes", "Provisioned size of the volume.", labels=labels
    )
    allocated = GaugeMetricFamily(
        "nbdcsi_volume_allocated_bytes",
        "Bytes the volume's image file occupies on disk.",
        labels=labels,
    )
    zero = VolumeTotals([0] * SNAPSHOT_LEN, 0)
    for volume in control.volumes:
        t = totals.get(volume.id, zero)
        values = volume.label_values
        for op, name in enumerate(OPS):
            row = t.counters[op * ROW : (op + 1) * ROW]
            buckets = row[FIRST_BUCKET:]
            count = sum(buckets)
            requests.add_metric([*values, name], count)
            errors.add_metric([*values, name], row[ERRORS])
            if name in BYTE_OPS:
                nbytes.add_metric([*values, name], row[BYTES])
            cumulative, running = [], 0
            for le, n in zip(_BUCKET_LABELS, buckets, strict=True):
                running += n
                cumulative.append((le, float(running)))
            latency.add_metric([*values, name], cumulative, row[LATENCY_NS] / 1e9)
        in_flight.add_metric(values, t.in_flight)
        throttled.add_metric(values, t.counters[THROTTLED_NS] / 1e9)
        size.add_metric(values, volume.size)
        allocated.add_metric(values, volume.allocated)
    yield from (requests, nbytes, errors, latency, in_flight, throttled, size, allocated)


def _tenant_families(control: ControlSnapshot) -> Iterator[Metric]:
    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=["tenant"])

    provisioned = gauge(
        "nbdcsi_tenant_provisioned_bytes",
        "Sum of the sizes of the tenant's volumes and snapshots on this node.",
    )
    allocated = gauge(
        "nbdcsi_tenant_allocated_bytes",
        "Bytes the tenant's volume and snapshot files occupy on disk.",
    )
    capacity_limit = gauge(
        "nbdcsi_tenant_capacity_limit_bytes",
        "The tenant's limit on provisioned bytes (absent: unlimited).",
    )
    volumes = gauge("nbdcsi_tenant_volumes", "The tenant's volumes on this node.")
    volumes_limit = gauge(
        "nbdcsi_tenant_volumes_limit", "The tenant's limit on volumes (absent: unlimited)."
    )
    snapshots = gauge("nbdcsi_tenant_snapshots", "The tenant's snapshots on this node.")
    snapshots_limit = gauge(
        "nbdcsi_tenant_snapshots_limit", "The tenant's limit on snapshots (absent: unlimited)."
    )
    for t in control.tenants:
        provisioned.add_metric([t.name], t.usage.provisioned_bytes)
        allocated.add_metric([t.name], t.allocated)
        volumes.add_metric([t.name], t.usage.volumes)
        snapshots.add_metric([t.name], t.usage.snapshots)
        if t.limits.capacity_bytes:
            capacity_limit.add_metric([t.name], t.limits.capacity_bytes)
        if t.limits.volumes:
            volumes_limit.add_metric([t.name], t.limits.volumes)
        if t.limits.snapshots:
            snapshots_limit.add_metric([t.name], t.limits.snapshots)
    yield from (
        provisioned,
        allocated,
        capacity_limit,
        volumes,
        volumes_limit,
        snapshots,
        snapshots_limit,
    )


def _node_families(control: ControlSnapshot) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "nbdcsi_node_info", "Always 1; labels name this storage node.", labels=["node", "version"]
    )
    if control.node_id:
        info.add_metric([control.node_id, control.version], 1)
    yield info
    for name, attr, doc in (
        ("capacity", "total", "Size of the filesystem holding the data directory."),
        ("free", "free", "Free space on that filesystem."),
        ("provisioned", "provisioned", "Sum of the sizes of all volumes, snapshots and images."),
        ("allocated", "allocated", "Bytes their files occupy on disk."),
        ("available", "available", "What volumes may still provision (overcommit included)."),
    ):
        family = GaugeMetricFamily(f"nbdcsi_node_{name}_bytes", doc)
        if control.capacity is not None:
            family.add_metric([], getattr(control.capacity, attr))
        yield family
    connections = GaugeMetricFamily(
        "nbdcsi_node_connections", "Open NBD connections, per NBD process.", labels=["worker"]
    )
    for worker, n in control.connections:
        connections.add_metric([worker], n)
    yield connections
    attachments = GaugeMetricFamily(
        "nbdcsi_node_attachments", "Volume attachments (published volume and node pairs)."
    )
    volumes = GaugeMetricFamily("nbdcsi_node_volumes", "Volumes on this node.")
    if control.node_id:
        attachments.add_metric([], control.attachments)
        volumes.add_metric([], len(control.volumes))
    yield attachments
    yield volumes
    q_files = GaugeMetricFamily(
        "nbdcsi_node_quarantined_files",
        "Files set aside in DATA/quarantine because the catalogue had no row for them.",
    )
    q_bytes = GaugeMetricFamily(
        "nbdcsi_node_quarantined_bytes", "Bytes those quarantined files occupy on disk."
    )
    if control.node_id:
        q_files.add_metric([], control.quarantined[0])
        q_bytes.add_metric([], control.quarantined[1])
    yield q_files
    yield q_bytes


# -- the whole ---------------------------------------------------------------------------------


class NodeMetrics:
    """What the main process holds for metrics: the aggregated data-path counters, the latest
    control snapshot, the collector on the injected registry, and the HTTP server."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.stats = StatsAggregator()
        self.control = ControlSnapshot()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        registry.register(NodeCollector(self))

    async def refresh(
        self, service: VolumeService, connections: Mapping[str, int], version: str
    ) -> None:
        control = await read_control(service, connections, version)
        self.control = control  # one reference swap: a scrape sees the old or the new one
        self.stats.retain({v.id for v in control.volumes})

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on a thread; returns the port (useful with port 0)."""
        self._http = start_http_server(port, host, registry=self.registry)
        return int(self._http[0].server_address[1])

    def stop(self) -> None:
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join(5)
