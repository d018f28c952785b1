"""Tenant quotas across the storage node pool (docs/tenant-quotas.md).

Owns reading a tenant's TenantQuota objects from Kubernetes, counting the tenant's usage on
every storage node, admitting or refusing a change that adds capacity, volumes or snapshots,
and reporting usage back: in each TenantQuota's status and as Prometheus gauges.

Why there is no race: every change that can grow a tenant's usage runs inside `admit(tenant)`,
which holds that tenant's lock from the moment usage is counted until the storage node has
made the change (the controller runs as one leader, like its sidecars). The counts come from
the storage nodes themselves, the sources of truth, so nothing here can drift after a crash.
As a second fence the target node is given the tenant's whole quota as its own tenant limit,
which it checks in the same transaction that inserts the volume: even a misbehaving second
controller cannot push one node past the quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal, DecimalException
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from storage_node.v1 import storage_node_pb2 as sn

from .errors import ResourceExhausted, StorageNodeError, Unavailable
from .kube import KubeClient, KubeError
from .storage_nodes import StorageNodeClient, StorageNodes

log = logging.getLogger("csi.quota")

DEFAULT_TENANT = "default"
REFRESH_INTERVAL = 30.0
_SUFFIX = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([kMGTPE]i?|Ki)?$")


# Limits are int64 on the storage node's API; a quantity's text is never longer than this.
MAX_QUANTITY = 2**63 - 1
MAX_QUANTITY_CHARS = 64


def parse_quantity(value: Any, what: str) -> int:
    """A Kubernetes quantity ("500Gi", "1.5G", 1024) as a whole number, rounded up."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a quantity")
    if isinstance(value, int):
        amount = Decimal(value)
    else:
        text = str(value).strip()
        # Bounded before parsing: a quantity is short, and Decimal arithmetic on thousands of
        # digits overflows its context (decimal.Overflow) instead of saying what is wrong.
        match = _QUANTITY.match(text) if len(text) <= MAX_QUANTITY_CHARS else None
        if not match:
            shown = text if len(text) <= MAX_QUANTITY_CHARS else f"{text[:MAX_QUANTITY_CHARS]}..."
            raise ValueError(f"{what}: {shown!r} is not a quantity like 100Gi, 1.5G or 4096")
        try:
            amount = Decimal(match.group(1)) * _SUFFIX[match.group(2) or ""]
        except DecimalException:
            raise ValueError(f"{what}: {text!r} is not a quantity") from None
    if amount < 0:
        raise ValueError(f"{what}: {value} is negative")
    result = int(amount.to_integral_value(rounding="ROUND_CEILING"))
    if result > MAX_QUANTITY:
        raise ValueError(f"{what}: {value} is larger than {MAX_QUANTITY} (2^63-1)")
    return result


def human(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Limits:
    """What a tenant may have; 0 means no limit."""

    capacity_bytes: int = 0
    volumes: int = 0
    snapshots: int = 0
    iops: int = 0
    bandwidth: int = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Limits:
        return cls(
            capacity_bytes=parse_quantity(spec.get("capacity", 0), "spec.capacity"),
            volumes=parse_quantity(spec.get("volumes", 0), "spec.volumes"),
            snapshots=parse_quantity(spec.get("snapshots", 0), "spec.snapshots"),
            iops=parse_quantity(spec.get("iops", 0), "spec.iops"),
            bandwidth=parse_quantity(spec.get("bandwidth", 0), "spec.bandwidth"),
        )

    def tighten(self, other: Limits) -> Limits:
        """The lowest non-zero value of each field (several objects in one namespace)."""

        def low(a: int, b: int) -> int:
            return min(a, b) if a and b else a or b

        return Limits(*(low(getattr(self, f.name), getattr(other, f.name)) for f in fields(Limits)))

    def as_pb(self) -> sn.TenantLimits:
        return sn.TenantLimits(
            capacity_bytes=self.capacity_bytes,
            volumes=self.volumes,
            snapshots=self.snapshots,
            qos=sn.Qos(iops=self.iops, bytes_per_second=self.bandwidth),
        )


@dataclass(frozen=True)
class Usage:
    capacity_bytes: int = 0
    volumes: int = 0
    snapshots: int = 0


@dataclass(frozen=True)
class Quota:
    tenant: str
    limits: Limits
    objects: tuple[dict[str, Any], ...]  # the TenantQuota objects it was read from


class TenantQuotas:
    def __init__(
        self, kube: KubeClient | None, nodes: StorageNodes, registry: CollectorRegistry
    ) -> None:
        self.kube = kube
        self.nodes = nodes
        self._locks: dict[str, asyncio.Lock] = {}
        # What each storage node was last given as a tenant's limits, by (node id, tenant);
        # a lifted limit (no quota any more) leaves the map.
        self._pushed: dict[tuple[str, str], Limits] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._limit = Gauge(
            "nbdcsi_tenant_quota_limit",
            "A tenant's quota from its TenantQuota objects (only limited resources)",
            ["tenant", "resource"],
            registry=registry,
        )
        self._used = Gauge(
            "nbdcsi_tenant_quota_used",
            "A tenant's usage summed over every storage node",
            ["tenant", "resource"],
            registry=registry,
        )

    # -- reading ---------------------------------------------------------------------------

    async def quota(self, tenant: str) -> Quota | None:
        """The tenant's quota, or None when quotas are off or the namespace declares none."""
        if self.kube is None:
            return None
        try:
            objects = await self.kube.tenant_quotas(tenant)
        except KubeError as exc:
            raise Unavailable(f"cannot read the quota of tenant {tenant!r}: {exc}") from None
        return self._quota(tenant, objects)

    @staticmethod
    def _quota(tenant: str, objects: list[dict[str, Any]]) -> Quota | None:
        limits: Limits | None = None
        for obj in objects:
            name = obj.get("metadata", {}).get("name", "?")
            try:
                found = Limits.from_spec(obj.get("spec") or {})
            except ValueError as exc:
                # An invalid object must not lift the limit: refuse until an admin fixes it.
                raise Unavailable(f"TenantQuota {tenant}/{name} is invalid: {exc}") from None
            limits = found if limits is None else limits.tighten(found)
        return None if limits is None else Quota(tenant, limits, tuple(objects))

    async def usage(self, tenant: str) -> Usage:
        """The tenant's usage on every storage node; a node that does not answer makes the
        count unknown, and a quota cannot be checked against an unknown count."""
        replies = await self.nodes.every(
            lambda n: n.call("GetTenant", sn.GetTenantRequest(name=tenant)),
            f"count the usage of tenant {tenant!r}",
        )
        total = Usage()
        for _, reply in replies:
            u = reply.usage
            total = Usage(
                total.capacity_bytes + u.provisioned_bytes,
                total.volumes + u.volumes,
                total.snapshots + u.snapshots,
            )
        return total

    # -- admitting -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(
        self,
        tenant: str,
        node: StorageNodeClient | Sequence[StorageNodeClient],
        *,
        capacity_bytes: int = 0,
        volumes: int = 0,
        snapshots: int = 0,
        what: str = "",
    ) -> AsyncIterator[None]:
        """Hold the tenant's lock while the caller adds `capacity_bytes`, `volumes` and
        `snapshots` on `node` (or several nodes: a group snapshot); refuse with
        RESOURCE_EXHAUSTED if that passes the quota."""
        targets = [node] if isinstance(node, StorageNodeClient) else list(node)
        lock = self._locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            quota = await self.quota(tenant)
            if quota is not None:
                usage = await self.usage(tenant)
                check(quota, usage, capacity_bytes, volumes, snapshots, what)
            # The fence: the node itself then refuses past the quota. Pushed every time, so a
            # node whose catalogue was replaced gets it back before it takes the change.
            for target in targets:
                if quota is not None or (target.id, tenant) in self._pushed:
                    await self._push(target, tenant, quota, force=True)
            yield
        if quota is not None:
            task = asyncio.create_task(self.report(tenant))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _push(
        self, node: StorageNodeClient, tenant: str, quota: Quota | None, force: bool = False
    ) -> None:
        """Give `node` the tenant's quota as its tenant limits (all zero: lifted), unless it
        was given the same already and `force` is false."""
        key = (node.id, tenant)
        limits = quota.limits if quota is not None else Limits()
        if not force and self._pushed.get(key, Limits()) == limits:
            return
        await node.call(
            "SetTenantLimits", sn.SetTenantLimitsRequest(name=tenant, limits=limits.as_pb())
        )
        if quota is None:
            self._pushed.pop(key, None)
        else:
            self._pushed[key] = limits

    # -- reporting -------------------------------------------------------------------------

    async def report(self, tenant: str) -> None:
        """Write the tenant's usage into its TenantQuotas' status and the gauges."""
        try:
            quota = await self.quota(tenant)
            if quota is None:
                return
            usage = await self.usage(tenant)
            await self._report(quota, usage)
        except (Unavailable, KubeError) as exc:
            log.warning("usage of tenant %s not reported: %s", tenant, exc)

    async def _report(self, quota: Quota, usage: Usage) -> None:
        for resource in ("capacity_bytes", "volumes", "snapshots", "iops", "bandwidth"):
            limit = getattr(quota.limits, resource)
            if limit:
                self._limit.labels(quota.tenant, resource).set(limit)
            else:
                with contextlib.suppress(KeyError):
                    self._limit.remove(quota.tenant, resource)
        for resource in ("capacity_bytes", "volumes", "snapshots"):
            self._used.labels(quota.tenant, resource).set(getattr(usage, resource))
        assert self.kube is not None
        used = {
            "capacity": human_quantity(usage.capacity_bytes),
            "capacityBytes": usage.capacity_bytes,
            "volumes": usage.volumes,
            "snapshots": usage.snapshots,
        }
        for obj in quota.objects:
            meta = obj.get("metadata", {})
            status = obj.get("status") or {}
            generation = meta.get("generation", 0)
            if status.get("used") == used and status.get("observedGeneration") == generation:
                continue
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            await self.kube.patch_quota_status(
                quota.tenant,
                meta["name"],
                {"used": used, "observedGeneration": generation, "updatedAt": now},
            )

    def _forget(self, tenant: str) -> None:
        for gauge in (self._limit, self._used):
            for resource in ("capacity_bytes", "volumes", "snapshots", "iops", "bandwidth"):
                with contextlib.suppress(KeyError):
                    gauge.remove(tenant, resource)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def refresh(self) -> None:
        """Every tenant with a quota: report usage, and give every storage node the limits
        (the QoS ceilings apply per node). Tenants whose quota went away are lifted."""
        if self.kube is None:
            return
        objects = await self.kube.tenant_quotas()
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for obj in objects:
            by_tenant.setdefault(obj.get("metadata", {}).get("namespace", ""), []).append(obj)
        for tenant in sorted(set(by_tenant) | {t for _, t in self._pushed}):
            lock = self._locks.setdefault(tenant, asyncio.Lock())
            async with lock:
                try:
                    quota = self._quota(tenant, by_tenant.get(tenant, []))
                    for node in self.nodes:
                        await self._push(node, tenant, quota)
                    if quota is None:
                        self._forget(tenant)
                        continue
                    await self._report(quota, await self.usage(tenant))
                except (Unavailable, StorageNodeError, KubeError) as exc:
                    log.warning("quota of tenant %s not refreshed: %s", tenant, exc)

    async def run(self, interval: float = REFRESH_INTERVAL) -> None:
        while True:
            try:
                await self.refresh()
            except KubeError as exc:
                log.warning("tenant quotas not refreshed: %s", exc)
            await asyncio.sleep(interval)


def check(
    quota: Quota, usage: Usage, capacity_bytes: int, volumes: int, snapshots: int, what: str
) -> None:
    """Raise RESOURCE_EXHAUSTED, in words an application team understands, when the request
    would take the tenant past its quota."""
    limits, tenant = quota.limits, quota.tenant
    names = ", ".join(o.get("metadata", {}).get("name", "?") for o in quota.objects)
    where = f"tenant {tenant!r} (TenantQuota {names})"
    if limits.capacity_bytes and usage.capacity_bytes + capacity_bytes > limits.capacity_bytes:
        raise ResourceExhausted(
            f"{what} needs {human(capacity_bytes)}, but {where} has used "
            f"{human(usage.capacity_bytes)} of its {human(limits.capacity_bytes)} capacity "
            f"quota ({human(max(limits.capacity_bytes - usage.capacity_bytes, 0))} left)"
        )
    if volumes and limits.volumes and usage.volumes + volumes > limits.volumes:
        raise ResourceExhausted(
            f"{what}: {where} already has {usage.volumes} of its {limits.volumes} volumes"
        )
    if snapshots and limits.snapshots and usage.snapshots + snapshots > limits.snapshots:
        raise ResourceExhausted(
            f"{what}: {where} already has {usage.snapshots} of its {limits.snapshots} snapshots"
        )


def human_quantity(n: int) -> str:
    """Bytes as the largest exact binary quantity ("120Gi"), else plain bytes."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if n and n % _SUFFIX[suffix] == 0:
            return f"{n // _SUFFIX[suffix]}{suffix}"
    return str(n)
