"""The data plane's control operations, on both sides of the control socket.

`ProcessState` is what one NBD-serving process holds (a worker, or the main process with
--workers 0): open volumes, the export registry, and the NBD server. It applies control
operations, one JSON-able dict each:

    add_volume    {volume_id, path, tenant, zero_detection}  open the volume's image
    remove_volume {volume_id}                       drop its exports and connections, close it
    add_export    {name, volume_id | path, readonly, allowed_peers, listed, description}
    remove_export {name}                            and drop its live connections at once
    resize        {volume_id}                       take the image's new size
    set_qos       {volume_id, tenant, iops, bps, slot, generation}  a volume's QoS limits
                                                    (0: unlimited), kept even before add_volume
    set_tenant_qos {tenant, iops, bps, slot, generation}  a tenant's ceiling over its volumes
    quiesce       {volume_id, flush}                hold new requests, finish in-flight, flush
    resume        {volume_id}                       run the held requests
    track         {volume_id, name, path, chunk, chunks, half}  mark changes in a live copy's map
    track_switch  {volume_id, name, half}           mark the other half of that map from now on
    untrack       {volume_id, name}                 the live copy is done

QoS slots index the shared rate-limiter file (storage_node.qos) that every process maps. A
volume's or tenant's slot is taken with its first limit and kept until the volume is removed
(tenants keep theirs). Every limit sent carries a new generation when its values or its slot
change (the same one when a limit is sent again unchanged): the first request under a new
generation starts the slot clean, so neither a changed limit nor a reused slot inherits debt.

`DataPlane` is the main process's side: it keeps the authoritative list of volumes and exports
(so a replacement worker starts with all of them), sends each operation to every worker and
waits for all of them to acknowledge it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from .backend import Backend
from .backend.file import FileBackend
from .backend.filters import ReadOnly, Stats
from .exports import Export, ExportRegistry
from .nbd.server import NbdServer
from .qos import SLOTS, Limit, SharedBuckets, VolumeQos

log = logging.getLogger("storage_node.dataplane")

Op = dict[str, Any]


class ProcessState:
    def __init__(
        self, server: NbdServer, executor: Executor, buckets: SharedBuckets | None = None
    ) -> None:
        self.server = server
        self.registry: ExportRegistry = server.registry
        self.executor = executor
        self.buckets = buckets
        self.volumes: dict[str, FileBackend] = {}
        self.stats: dict[str, Stats] = {}  # per volume, shared by its exports (metrics)
        self._own_backends: dict[str, Backend] = {}  # exports with a file of their own
        self.qos: dict[str, VolumeQos] = {}  # per volume, shared by its exports
        # Limits by volume, also for volumes not added (yet): a limit set while a volume is
        # being created (or replayed to a new process) must be there when it is added.
        self.volume_limits: dict[str, Limit] = {}
        self.tenant_limits: dict[str, Limit] = {}

    async def apply(self, op: Op) -> None:
        kind = op["op"]
        handler = getattr(self, f"_op_{kind}", None)
        if handler is None:
            raise ValueError(f"unknown data plane operation {kind!r}")
        result = handler(op)
        if asyncio.iscoroutine(result):
            await result

    def _op_add_volume(self, op: Op) -> None:
        vid, tenant = op["volume_id"], op.get("tenant", "")
        if vid not in self.volumes:
            self.volumes[vid] = FileBackend(
                op["path"], zero_detection=op.get("zero_detection", True)
            )
            self.stats[vid] = Stats(self.volumes[vid])
            self.qos[vid] = VolumeQos(
                tenant,
                self.buckets,
                self.volume_limits.get(vid),
                self.tenant_limits.get(tenant),
                on_throttle=self.stats[vid].throttled,
            )

    def _op_remove_volume(self, op: Op) -> None:
        vid = op["volume_id"]
        for export in list(self.registry):
            if export.volume_id == vid:
                self.registry.remove(export.name)
        backend = self.volumes.pop(vid, None)
        self.stats.pop(vid, None)
        self.qos.pop(vid, None)
        self.volume_limits.pop(vid, None)
        if backend is not None:
            backend.close()

    def _op_add_export(self, op: Op) -> None:
        name = op["name"]
        if self.registry.get(name) is not None:
            return  # idempotent: a replayed operation
        backend: Backend
        if op.get("volume_id"):
            backend = self.stats[op["volume_id"]]
        else:
            backend = self._own_backends[name] = FileBackend(
                op["path"], readonly=op.get("readonly", False)
            )
        if op.get("readonly"):
            backend = ReadOnly(backend)
        peers = op.get("allowed_peers")
        qos = self.qos.get(op.get("volume_id", ""))
        self.registry.add(
            Export(
                name,
                backend,
                description=op.get("description", ""),
                allowed_peers=frozenset(peers) if peers is not None else None,
                listed=op.get("listed", True),
                volume_id=op.get("volume_id", ""),
                tenant=qos.tenant if qos else "",
                qos=qos,
            )
        )

    def _op_remove_export(self, op: Op) -> None:
        self.registry.remove(op["name"])
        own = self._own_backends.pop(op["name"], None)
        if own is not None:
            own.close()

    def _op_resize(self, op: Op) -> None:
        self.volumes[op["volume_id"]].refresh()

    @staticmethod
    def _limit(op: Op) -> Limit:
        return Limit(op["slot"], op["iops"], op["bps"], op.get("generation", 0))

    def _op_set_qos(self, op: Op) -> None:
        limit = self.volume_limits[op["volume_id"]] = self._limit(op)
        qos = self.qos.get(op["volume_id"])
        if qos is not None:
            qos.set_volume_limit(limit)

    def _op_set_tenant_qos(self, op: Op) -> None:
        limit = self.tenant_limits[op["tenant"]] = self._limit(op)
        for qos in self.qos.values():
            if qos.tenant == op["tenant"]:
                qos.set_tenant_limit(limit)

    async def _op_quiesce(self, op: Op) -> None:
        vid = op["volume_id"]
        await self.server.quiesce(vid)
        backend = self.volumes.get(vid)
        if backend is not None and op.get("flush", True):
            await asyncio.get_running_loop().run_in_executor(self.executor, backend.flush)

    def _op_track(self, op: Op) -> None:
        backend = self.volumes.get(op["volume_id"])
        if backend is not None:
            backend.track(op["name"], op["path"], op["chunk"], op["chunks"], op["half"])

    def _op_track_switch(self, op: Op) -> None:
        backend = self.volumes.get(op["volume_id"])
        if backend is not None:
            backend.track_switch(op["name"], op["half"])

    def _op_untrack(self, op: Op) -> None:
        backend = self.volumes.get(op["volume_id"])
        if backend is not None:
            backend.untrack(op["name"])

    def _op_resume(self, op: Op) -> None:
        self.server.resume(op["volume_id"])

    def close(self) -> None:
        for export in list(self.registry):
            self.registry.remove(export.name)
        for backend in [*self.volumes.values(), *self._own_backends.values()]:
            backend.close()


class DataPlane:
    """Main-process side: the model of what every NBD process must hold, and broadcasting."""

    def __init__(self) -> None:
        self.volumes: dict[str, Op] = {}
        self.exports: dict[str, Op] = {}
        self.qos: dict[str, Op] = {}
        self.tenant_qos: dict[str, Op] = {}
        self.tracking: dict[str, Op] = {}  # live copies in progress, by name
        self._slots: dict[str, int] = {}
        self._free_slots = list(range(SLOTS - 1, -1, -1))
        self._generations = itertools.count(1)
        self._senders: dict[int, Callable[[Op], Awaitable[None]]] = {}
        self._lock = asyncio.Lock()

    def detach(self, key: int) -> None:
        self._senders.pop(key, None)

    def initial_ops(self) -> list[Op]:
        """What a new process must apply to be in step with the others."""
        # Limits first: an export is never served, even briefly, without its volume's limits.
        return [
            *({"op": "set_tenant_qos", **q} for q in self.tenant_qos.values()),
            *({"op": "set_qos", **q} for q in self.qos.values()),
            *({"op": "add_volume", **v} for v in self.volumes.values()),
            *({"op": "track", **t} for t in self.tracking.values()),
            *({"op": "add_export", **e} for e in self.exports.values()),
        ]

    @contextlib.asynccontextmanager
    async def joining(
        self, key: int, sender: Callable[[Op], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Bring a new NBD process in step, then add it; no operation can slip in between."""
        async with self._lock:
            for op in self.initial_ops():
                await sender(op)
            self._senders[key] = sender
            yield

    async def _broadcast(self, op: Op) -> None:
        results = await asyncio.gather(
            *(send(op) for send in list(self._senders.values())), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(f"data plane operation {op['op']} failed: {errors[0]}")

    def _slot(self, key: str) -> int:
        if key not in self._slots:
            if not self._free_slots:
                raise RuntimeError(f"no QoS slot left on this node ({SLOTS} limits in use)")
            self._slots[key] = self._free_slots.pop()
        return self._slots[key]

    def _limit_op(self, key: str, prev: Op | None, **fields: Any) -> Op:
        """A limit's operation: its slot, and a new generation unless nothing changed."""
        op = {**fields, "slot": self._slot(key)}
        same = prev is not None and all(prev[k] == op[k] for k in ("iops", "bps", "slot"))
        op["generation"] = prev["generation"] if same and prev else next(self._generations)
        return op

    def _release_slot(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free_slots.append(slot)

    async def add_volume(
        self,
        volume_id: str,
        path: str,
        tenant: str = "",
        iops: int = 0,
        bps: int = 0,
        zero_detection: bool = True,
    ) -> None:
        """Open a volume in every NBD process, with the limits it was created with (`iops`,
        `bps`); limits set for it since (SetVolumeQos while it was being created) win.
        `zero_detection`: all-zero writes become holes (storage_node.backend.file)."""
        async with self._lock:
            if (iops or bps) and volume_id not in self.qos:
                await self._set_qos(volume_id, tenant, iops, bps)
            self.volumes[volume_id] = {
                "volume_id": volume_id,
                "path": path,
                "tenant": tenant,
                "zero_detection": zero_detection,
            }
            await self._broadcast({"op": "add_volume", **self.volumes[volume_id]})

    async def remove_volume(self, volume_id: str) -> None:
        async with self._lock:
            self.volumes.pop(volume_id, None)
            self.qos.pop(volume_id, None)
            self._release_slot(f"volume {volume_id}")
            for name in [n for n, e in self.exports.items() if e.get("volume_id") == volume_id]:
                del self.exports[name]
            await self._broadcast({"op": "remove_volume", "volume_id": volume_id})

    async def add_export(self, name: str, **fields: Any) -> None:
        async with self._lock:
            self.exports[name] = {"name": name, **fields}
            await self._broadcast({"op": "add_export", **self.exports[name]})

    async def remove_export(self, name: str) -> None:
        async with self._lock:
            self.exports.pop(name, None)
            await self._broadcast({"op": "remove_export", "name": name})

    async def set_qos(self, volume_id: str, tenant: str, iops: int, bps: int) -> None:
        async with self._lock:
            await self._set_qos(volume_id, tenant, iops, bps)

    async def _set_qos(self, volume_id: str, tenant: str, iops: int, bps: int) -> None:
        self.qos[volume_id] = self._limit_op(
            f"volume {volume_id}",
            self.qos.get(volume_id),
            volume_id=volume_id,
            tenant=tenant,
            iops=iops,
            bps=bps,
        )
        await self._broadcast({"op": "set_qos", **self.qos[volume_id]})

    async def set_tenant_qos(self, tenant: str, iops: int, bps: int) -> None:
        async with self._lock:
            self.tenant_qos[tenant] = self._limit_op(
                f"tenant {tenant}", self.tenant_qos.get(tenant), tenant=tenant, iops=iops, bps=bps
            )
            await self._broadcast({"op": "set_tenant_qos", **self.tenant_qos[tenant]})

    async def resize(self, volume_id: str) -> None:
        async with self._lock:
            await self._broadcast({"op": "resize", "volume_id": volume_id})

    async def track(self, volume_id: str, name: str, path: str, chunk: int, chunks: int) -> None:
        """From when this returns, every NBD process marks the volume's changes in the map."""
        async with self._lock:
            self.tracking[name] = {
                "volume_id": volume_id,
                "name": name,
                "path": path,
                "chunk": chunk,
                "chunks": chunks,
                "half": 0,
            }
            await self._broadcast({"op": "track", **self.tracking[name]})

    async def track_switch(self, name: str, half: int) -> None:
        """From when this returns, no process marks the other half any more."""
        async with self._lock:
            t = self.tracking[name]
            t["half"] = half
            await self._broadcast(
                {"op": "track_switch", "volume_id": t["volume_id"], "name": name, "half": half}
            )

    async def untrack(self, name: str) -> None:
        async with self._lock:
            t = self.tracking.pop(name, None)
            if t is not None:
                await self._broadcast({"op": "untrack", "volume_id": t["volume_id"], "name": name})

    @contextlib.asynccontextmanager
    async def quiesced(self, volume_id: str, flush: bool = True) -> AsyncIterator[None]:
        """Inside: no request to the volume runs anywhere, and (with flush) what ran is on
        disk."""
        try:
            await self._broadcast({"op": "quiesce", "volume_id": volume_id, "flush": flush})
            yield
        finally:
            await self._broadcast({"op": "resume", "volume_id": volume_id})


class ControlChannel:
    """Request/reply over a worker's control socket: numbered operations, JSON replies."""

    def __init__(self, send: Callable[[bytes], bool]) -> None:
        self._send = send
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[None]] = {}

    async def call(self, op: Op, timeout: float = 60.0) -> None:
        request_id = next(self._ids)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            if not self._send(json.dumps({**op, "id": request_id}).encode()):
                raise ConnectionError("the worker's control socket is full or closed")
            await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request_id, None)

    def replied(self, message: Op) -> None:
        future = self._pending.get(message.get("id", -1))
        if future is None or future.done():
            return
        if message.get("error"):
            future.set_exception(RuntimeError(message["error"]))
        else:
            future.set_result(None)

    def fail_all(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(reason))
