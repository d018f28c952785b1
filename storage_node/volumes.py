"""The storage node's control path: volumes, snapshots, golden images, attachments, tenants.

Owns the rules of every management call and the order of its steps. The order is what makes
crashes harmless (the ceph-csi journal pattern): a row is written first (the reservation,
checked against tenant limits and node capacity in the same transaction), then the file is
made under a temporary name and renamed into place, then the row is marked ready. Deletion
marks the row, removes the file, then the row. `recover()` finishes or rolls back whatever a
crash interrupted, so after a restart every row has its file (or its volume is FAILED) and
every file in the image directories its row, and a retried call converges on the same result.

Idempotency: creates are keyed by name (same name and parameters: the same object; different
parameters: ALREADY_EXISTS); deletes by id (already gone: OK). A second call on an object
whose call is still running gets ABORTED. Errors are storage_node.errors types.

What is instant and what copies (docs/storage-node-api.md): a new empty volume is instant; a
snapshot, a clone and a volume from an image share blocks by reflink where the filesystem can
(XFS, btrfs), which is instant; elsewhere they copy the allocated data. Clones from snapshots
and images copy in a background child process at the lowest CPU and I/O priority (the volume
is CREATING until then). A snapshot, or a clone of a live volume, is one point in time
copied while writes go on, with the volume's requests held only for a last short catch-up
(`_live_copy`, files.LiveCopy).

Nothing is deleted because a row is missing: files without one are quarantined
(storage_node.quarantine), except the temporaries of interrupted copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from . import files, imports, quarantine
from .dataplane import DataPlane
from .errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from .store import (
    AttachmentRow,
    GoldenImageRow,
    SnapshotRow,
    Store,
    StoreThread,
    TenantLimits,
    TenantUsage,
    VolumeRow,
)

log = logging.getLogger("storage_node.volumes")
T = TypeVar("T")

BLOCK = 4096
MAX_VOLUME_SIZE = 1 << 46  # 64 TiB
MAX_NAME = 128
MAX_LIMIT = (1 << 63) - 1
DEFAULT_PAGE = 100
MAX_PAGE = 1000
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
GONE = "its source disappeared"
_ID = re.compile(r"^(vol|snap|img|grp)-[0-9a-f]{16}$")
COPY_MAPS = "copy-maps"  # DATA/copy-maps: dirty maps of live copies (files.LiveCopy)
# A live copy without reflink holds I/O only for its last catch-up: at most this much
# (chunks changed during the pass before), after at most this many passes.
LIVE_COPY_FINAL_BYTES = 32 << 20
LIVE_COPY_PASSES = 12


@dataclass(frozen=True)
class NodeSettings:
    node_id: str
    data_dir: Path
    nbd_host: str
    nbd_port: int
    overcommit_ratio: float = 1.0
    topology: dict[str, str] = field(default_factory=dict)
    import_dir: Path | None = None  # ImportImage reads only here; None: disabled

    @property
    def volumes_dir(self) -> Path:
        return self.data_dir / "volumes"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "golden-images"


@dataclass(frozen=True)
class Capacity:
    total: int
    free: int
    provisioned: int
    allocated: int
    overcommit_ratio: float

    @property
    def available(self) -> int:
        return max(int(self.total * self.overcommit_ratio) - self.provisioned, 0)


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def check_name(name: str, what: str = "name") -> None:
    if not name or len(name) > MAX_NAME or not name.isprintable() or any(c.isspace() for c in name):
        raise InvalidArgument(
            f"{what} must be 1 to {MAX_NAME} printable characters without spaces, got "
            f"{name[:MAX_NAME]!r}{f' ({len(name)} characters)' if len(name) > MAX_NAME else ''}"
        )


def check_tenant(tenant: str) -> None:
    if not _TENANT.match(tenant or ""):
        raise InvalidArgument(
            f"tenant must be a namespace name (letters, digits, '.', '_', '-'), got {tenant!r}"
        )


def check_id(value: str, prefix: str) -> None:
    if not _ID.match(value or "") or not value.startswith(prefix + "-"):
        raise InvalidArgument(f"{value!r} is not a {prefix} id ({prefix}-<16 hex digits>)")


def check_limits(**values: int) -> None:
    """QoS and limit fields are uint64 on the wire; SQLite keeps signed 64-bit integers."""
    for what, value in values.items():
        if value > MAX_LIMIT:
            raise InvalidArgument(f"{what} must be at most {MAX_LIMIT} (0: unlimited), got {value}")


# Labels (docs/storage-node-api.md): bounded like Kubernetes metadata, so one volume can
# never make a ListVolumes reply too big to send. Keys: a 253-character prefix, '/', a
# 63-character name at most; values hold names like a PVC's (253) with room to spare.
MAX_LABELS = 64
MAX_LABEL_KEY = 317
MAX_LABEL_VALUE = 1024
MAX_LABELS_BYTES = 16 * 1024


def check_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"a volume has at most {MAX_LABELS} labels, got {len(labels)}")
    total = 0
    for key, value in labels.items():
        if (
            not 0 < len(key) <= MAX_LABEL_KEY
            or not key.isprintable()
            or any(c.isspace() for c in key)
        ):
            raise InvalidArgument(
                f"label keys are 1 to {MAX_LABEL_KEY} printable characters without spaces, "
                f"got {key[:80]!r}{'...' if len(key) > 80 else ''}"
            )
        if len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise InvalidArgument(
                f"label {key!r}: values are at most {MAX_LABEL_VALUE} printable characters, "
                f"got {len(value)} characters"
            )
        total += len(key.encode()) + len(value.encode())
    if total > MAX_LABELS_BYTES:
        raise InvalidArgument(
            f"labels take at most {MAX_LABELS_BYTES} bytes in all (keys and values, UTF-8), "
            f"got {total}"
        )


def check_size(size: int) -> None:
    if size <= 0 or size % BLOCK or size > MAX_VOLUME_SIZE:
        raise InvalidArgument(
            f"size must be a positive multiple of {BLOCK} bytes up to {human(MAX_VOLUME_SIZE)}, "
            f"got {size}"
        )


class InFlight:
    """One call at a time per key; the second gets ABORTED (the CO retries)."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    @contextlib.contextmanager
    def guard(self, *keys: str) -> Iterator[None]:
        busy = [k for k in keys if k in self._keys]
        if busy:
            raise Aborted(f"an operation on {busy[0]} is already in progress; retry later")
        self._keys.update(keys)
        try:
            yield
        finally:
            self._keys.difference_update(keys)


class VolumeService:
    def __init__(
        self,
        store: StoreThread,
        dataplane: DataPlane,
        settings: NodeSettings,
        executor: Executor,
    ) -> None:
        self.store = store
        self.dataplane = dataplane
        self.settings = settings
        self.executor = executor
        self.inflight = InFlight()
        self._background: set[asyncio.Task[None]] = set()
        self._max_file_size = 0  # found on first use (files.max_file_size)
        for d in (settings.volumes_dir, settings.snapshots_dir, settings.images_dir):
            d.mkdir(parents=True, exist_ok=True)

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # -- capacity and limits ---------------------------------------------------------------

    async def capacity(self) -> Capacity:
        st = await self._io(os.statvfs, self.settings.data_dir)
        provisioned = await self.store.run(Store.provisioned_bytes)
        allocated = await self._io(self._allocated_total)
        return Capacity(
            total=st.f_blocks * st.f_frsize,
            free=st.f_bavail * st.f_frsize,
            provisioned=provisioned,
            allocated=allocated,
            overcommit_ratio=self.settings.overcommit_ratio,
        )

    def _allocated_total(self) -> int:
        return sum(
            files.allocated_bytes(p)
            for d in (
                self.settings.volumes_dir,
                self.settings.snapshots_dir,
                self.settings.images_dir,
            )
            for p in d.iterdir()
        )

    def _check_room(
        self,
        s: Store,
        tenant: str,
        add_bytes: int,
        add_volumes: int,
        add_snapshots: int,
        total: int,
    ) -> None:
        """Inside the reserving transaction: tenant limits, then node capacity."""
        limits = s.tenant_limits(tenant)
        usage = s.tenant_usage(tenant)
        if limits.capacity_bytes and usage.provisioned_bytes + add_bytes > limits.capacity_bytes:
            raise ResourceExhausted(
                f"tenant {tenant!r} is limited to {human(limits.capacity_bytes)}: it uses "
                f"{human(usage.provisioned_bytes)} and asked for {human(add_bytes)} more"
            )
        if add_volumes and limits.volumes and usage.volumes + add_volumes > limits.volumes:
            raise ResourceExhausted(
                f"tenant {tenant!r} is limited to {limits.volumes} volumes and has "
                f"{usage.volumes}; cannot create another"
            )
        if (
            add_snapshots
            and limits.snapshots
            and (usage.snapshots + add_snapshots > limits.snapshots)
        ):
            raise ResourceExhausted(
                f"tenant {tenant!r} is limited to {limits.snapshots} snapshots and has "
                f"{usage.snapshots}; cannot create another"
            )
        ceiling = int(total * self.settings.overcommit_ratio)
        provisioned = s.provisioned_bytes()
        if provisioned + add_bytes > ceiling:
            raise ResourceExhausted(
                f"storage node {self.settings.node_id!r} can provision {human(ceiling)} "
                f"(overcommit {self.settings.overcommit_ratio:g}); {human(provisioned)} is "
                f"provisioned and {human(add_bytes)} more was asked for"
            )

    async def _check_file_size(self, size: int, what: str) -> None:
        """OUT_OF_RANGE when the filesystem cannot hold a file of `size` (ext4 with 4 KiB
        blocks stops at 16 TiB): said before anything is reserved, never an INTERNAL later."""
        if not self._max_file_size:
            self._max_file_size = await self._io(files.max_file_size, self.settings.volumes_dir)
        if size > self._max_file_size:
            raise OutOfRange(
                f"storage node {self.settings.node_id!r} cannot hold {what} of {human(size)} "
                f"({size} bytes): the largest file its data filesystem allows is "
                f"{human(self._max_file_size)} ({self._max_file_size} bytes)"
            )

    async def _total_bytes(self) -> int:
        st = await self._io(os.statvfs, self.settings.data_dir)
        return int(st.f_blocks * st.f_frsize)

    # -- volumes ---------------------------------------------------------------------------

    async def create_volume(
        self,
        name: str,
        tenant: str,
        size: int,
        source: tuple[str, str] | None = None,
        qos: tuple[int, int] = (0, 0),
        labels: dict[str, str] | None = None,
        zero_detection: bool = True,
    ) -> VolumeRow:
        check_name(name)
        check_tenant(tenant)
        check_size(size)
        check_limits(qos_iops=qos[0], qos_bytes_per_second=qos[1])
        labels = dict(labels or {})
        check_labels(labels)
        kind, source_id = source or ("", "")
        if kind:
            if kind not in ("snapshot", "volume", "image"):
                raise InvalidArgument(f"unknown source kind {kind!r}")
            check_id(source_id, {"snapshot": "snap", "volume": "vol", "image": "img"}[kind])
        await self._check_file_size(size, "a volume")
        with self.inflight.guard(f"volume name {name}"):
            existing = await self.store.run(lambda s: s.volume_by_name(name))
            if existing is not None:
                same = (
                    existing.tenant,
                    existing.size,
                    existing.source_kind,
                    existing.source_id,
                    existing.zero_detection,
                ) == (tenant, size, kind, source_id, zero_detection)
                if not same:
                    raise AlreadyExists(
                        f"volume {name!r} exists with other parameters (tenant "
                        f"{existing.tenant!r}, {existing.size} bytes, source "
                        f"{existing.source_kind or 'none'} {existing.source_id}, zero "
                        f"detection {'on' if existing.zero_detection else 'off'})"
                    )
                return existing
            source_path = await self._source_path(kind, source_id, tenant, size)
            vid = _new_id("vol")
            row = VolumeRow(
                id=vid,
                name=name,
                tenant=tenant,
                size=size,
                state="creating",
                path=str(self.settings.volumes_dir / f"{vid}.img"),
                source_kind=kind,
                source_id=source_id,
                qos_iops=qos[0],
                qos_bps=qos[1],
                labels=labels,
                created_at=time.time(),
                zero_detection=zero_detection,
            )
            total = await self._total_bytes()

            def reserve(s: Store) -> None:
                with s.tx():
                    if s.volume_by_name(name) is not None:
                        raise Aborted(f"volume {name!r} is being created; retry")
                    # The source again, in the transaction: a delete that began since
                    # _source_path looked must not pull the file from under the fill.
                    if kind in ("snapshot", "image") and s.source_deleting(kind, source_id):
                        raise NotFound(f"{kind} {source_id} does not exist")
                    self._check_room(s, tenant, size, 1, 0, total)
                    s.insert_volume(row)

            await self.store.run(reserve)
            log.info(
                "volume %s (%s) for tenant %s: %d bytes, source %s %s",
                vid,
                name,
                tenant,
                size,
                kind or "none",
                source_id,
            )
            if kind and kind != "volume":
                self._spawn(self._fill_in_background(row, Path(source_path)))
                return row
            try:
                if kind == "volume":
                    # A live volume: one point in time, its I/O held only briefly.
                    with self.inflight.guard(source_id):
                        await self._live_copy(source_id, Path(source_path), Path(row.path), size)
                else:
                    await self._io(files.create_sparse, Path(row.path), size)
                return await self._ready(row)
            except Exception as exc:
                # Undo the reservation: no row is left "creating" with nobody to finish it
                # (a retry would get it back forever, and DeleteVolume ABORTED).
                await self._undo_volume(row)
                no_space = self._no_space(exc, f"volume {name!r}")
                if no_space is None:
                    raise
                raise no_space from exc

    async def _live_copy(
        self, volume_id: str, src: Path, dst: Path, size: int | None = None
    ) -> None:
        """dst: the served volume src as it was at one moment, holding its I/O only briefly
        (files.LiveCopy). The first pass and the catch-up passes run while writes go on,
        until a pass has at most LIVE_COPY_FINAL_BYTES to copy again; only the last
        catch-up runs with the volume's requests held. copy_file_range shares blocks where
        the filesystem can (XFS, btrfs: every pass is a reflink of its ranges) and copies
        elsewhere. A volume written faster than the passes converge fails ABORTED after
        LIVE_COPY_PASSES passes rather than hold its I/O for long."""
        started = time.monotonic()
        name = f"{volume_id}.{secrets.token_hex(4)}"
        copy = await self._io(
            files.LiveCopy, src, dst, self.settings.data_dir / COPY_MAPS / f"{name}.map"
        )
        tracking = False
        try:
            await self.dataplane.track(volume_id, name, str(copy.map_path), copy.chunk, copy.chunks)
            tracking = True
            copied = await self._io(copy.first_pass)
            await self._io(copy.sync)  # the bulk of the writeback, while writes go on
            half, passes = await self._converge(volume_id, copy, name, 0)
            async with self.dataplane.quiesced(volume_id, flush=False):
                held = time.monotonic()
                final = await self._io(copy.catch_up, half)
                held = time.monotonic() - held
            await self.dataplane.untrack(name)
            tracking = False
            await self._io(copy.commit, size)
            log.info(
                "live copy of %s: %s copied while writes went on, %d catch-up pass(es), "
                "%s in the last, held for %.0f ms (%.0f ms in all)",
                volume_id,
                human(copied),
                passes,
                human(final),
                held * 1000,
                (time.monotonic() - started) * 1000,
            )
        except BaseException:
            if tracking:
                with contextlib.suppress(Exception):
                    await self.dataplane.untrack(name)
            await self._io(copy.abort)
            raise

    async def _converge(
        self, volume_id: str, copy: files.LiveCopy, name: str, half: int
    ) -> tuple[int, int]:
        """Catch-up passes while writes go on, until the changes of one pass are at most
        LIVE_COPY_FINAL_BYTES (ABORTED after LIVE_COPY_PASSES passes). Returns the map half
        writers mark now (the last catch-up, held, copies it) and the passes made."""
        passes = 0
        while True:
            # Writers move to the other half; the one they left is stable: catch it up.
            half ^= 1
            await self.dataplane.track_switch(name, half)
            last = await self._io(copy.catch_up, half ^ 1)
            await self._io(copy.sync)
            passes += 1
            if last <= LIVE_COPY_FINAL_BYTES:
                return half, passes
            if passes >= LIVE_COPY_PASSES:
                raise Aborted(
                    f"volume {volume_id} changes faster than storage node "
                    f"{self.settings.node_id!r} can copy it while it is written "
                    f"({human(last)} changed during the last of {passes} passes; "
                    "its I/O is never held for a whole copy); retry later"
                )

    async def _source_path(self, kind: str, source_id: str, tenant: str, size: int) -> str:
        if not kind:
            return ""
        if kind == "snapshot":
            snap = await self.store.run(lambda s: s.snapshot(source_id))
            if snap is None or snap.deleting:
                raise NotFound(f"snapshot {source_id} does not exist")
            if snap.tenant != tenant:
                raise NotFound(f"snapshot {source_id} does not exist for tenant {tenant!r}")
            if not snap.ready:
                raise FailedPrecondition(f"snapshot {source_id} is not ready yet")
            src_size, path = snap.size, snap.path
        elif kind == "volume":
            vol = await self.store.run(lambda s: s.volume(source_id))
            if vol is None or vol.tenant != tenant:
                raise NotFound(f"volume {source_id} does not exist for tenant {tenant!r}")
            if vol.state != "ready":
                raise FailedPrecondition(f"volume {source_id} is {vol.state}, not ready")
            src_size, path = vol.size, vol.path
        else:
            img = await self.store.run(lambda s: s.image(source_id))
            if img is None or img.deleting:
                raise NotFound(f"image {source_id} does not exist")
            if not img.ready:
                raise FailedPrecondition(f"image {source_id} is still being imported")
            src_size, path = img.size, img.path
        if size < src_size:
            raise InvalidArgument(
                f"size {size} is smaller than the source {kind} {source_id} ({src_size} bytes)"
            )
        return path

    async def _undo_volume(self, row: VolumeRow) -> None:
        log.error("volume %s (%s): creation failed; removing it", row.id, row.name)
        with contextlib.suppress(Exception):
            await self.dataplane.remove_volume(row.id)
        await self._io(files.remove, Path(row.path))
        await self.store.run(lambda s: s.delete_volume(row.id))

    def _no_space(self, exc: Exception, what: str) -> ResourceExhausted | None:
        """A full filesystem is RESOURCE_EXHAUSTED naming the node; None for other errors."""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ResourceExhausted(
                f"storage node {self.settings.node_id!r} ran out of space for {what}: "
                f"{exc.strerror}; nothing was kept"
            )
        return None

    async def _update_volume(self, volume_id: str, **changes: Any) -> None:
        await self.store.run(lambda s: s.set_volume(volume_id, **changes))

    async def _ready(self, row: VolumeRow) -> VolumeRow:
        # With the limits it was created with: they hold from its first request.
        await self.dataplane.add_volume(
            row.id, row.path, row.tenant, row.qos_iops, row.qos_bps, row.zero_detection
        )
        await self.store.run(lambda s: s.set_volume(row.id, state="ready"))
        return replace(row, state="ready")

    async def _fill_in_background(self, row: VolumeRow, source: Path) -> None:
        try:
            await self._io(files.copy_in_background, source, Path(row.path), row.size)
            await self._ready(row)
            log.info("volume %s filled from %s %s", row.id, row.source_kind, row.source_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("volume %s: filling from %s failed: %s", row.id, row.source_id, exc)
            await self._update_volume(row.id, state="failed", error=str(exc))

    async def get_volume(self, volume_id: str) -> VolumeRow:
        check_id(volume_id, "vol")
        row = await self.store.run(lambda s: s.volume(volume_id))
        if row is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return row

    async def list_volumes(
        self, tenant: str, page_size: int, token: str, name: str = ""
    ) -> tuple[list[VolumeRow], str]:
        limit = self._page(page_size)
        if tenant:
            check_tenant(tenant)
        if token:
            check_id(token, "vol")
        if name:
            check_name(name)
            row = await self.store.run(lambda s: s.volume_by_name(name))
            return [row] if row is not None and tenant in ("", row.tenant) else [], ""
        rows = await self.store.run(lambda s: s.volumes(tenant, token, limit + 1))
        return rows[:limit], rows[limit - 1].id if len(rows) > limit else ""

    @staticmethod
    def _page(page_size: int) -> int:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        return min(page_size or DEFAULT_PAGE, MAX_PAGE)

    async def delete_volume(self, volume_id: str) -> None:
        check_id(volume_id, "vol")
        with self.inflight.guard(volume_id):
            row = await self.store.run(lambda s: s.volume(volume_id))
            if row is None:
                return  # already gone: OK (idempotent)
            if row.state == "creating":
                raise Aborted(f"volume {volume_id} is still being filled; retry later")
            attached = await self.store.run(lambda s: s.attachments(volume_id))
            if attached:
                nodes = ", ".join(a.node_id for a in attached)
                raise FailedPrecondition(f"volume {volume_id} is published to node(s) {nodes}")
            await self._delete_volume_files(row)

    async def _delete_volume_files(self, row: VolumeRow) -> None:
        await self.store.run(lambda s: s.set_volume(row.id, state="deleting"))
        await self.dataplane.remove_volume(row.id)
        await self._io(files.remove, Path(row.path))
        await self.store.run(lambda s: s.delete_volume(row.id))
        log.info("volume %s (%s) deleted", row.id, row.name)

    async def expand_volume(self, volume_id: str, size: int) -> VolumeRow:
        check_id(volume_id, "vol")
        check_size(size)
        with self.inflight.guard(volume_id):
            row = await self.get_volume(volume_id)
            if row.state != "ready":
                raise FailedPrecondition(f"volume {volume_id} is {row.state}, not ready")
            if size < row.size:
                # FAILED_PRECONDITION, as the API documents for shrinking: the request is
                # well formed, the volume's current size forbids it.
                raise FailedPrecondition(
                    f"volume {volume_id} has {row.size} bytes; shrinking to {size} is not supported"
                )
            if size == row.size:
                return row
            await self._check_file_size(size, "a volume")
            total = await self._total_bytes()

            def reserve(s: Store) -> None:
                with s.tx():
                    self._check_room(s, row.tenant, size - row.size, 0, 0, total)
                    s.set_volume(volume_id, size=size)

            await self.store.run(reserve)
            await self._io(os.truncate, row.path, size)
            await self.dataplane.resize(volume_id)
            return replace(row, size=size)

    async def set_volume_qos(self, volume_id: str, iops: int, bps: int) -> VolumeRow:
        check_limits(qos_iops=iops, qos_bytes_per_second=bps)
        row = await self.get_volume(volume_id)
        await self.store.run(lambda s: s.set_volume(volume_id, qos_iops=iops, qos_bps=bps))
        await self.dataplane.set_qos(volume_id, row.tenant, iops, bps)
        return replace(row, qos_iops=iops, qos_bps=bps)

    # -- snapshots -------------------------------------------------------------------------

    async def create_snapshot(self, name: str, volume_id: str) -> SnapshotRow:
        check_name(name)
        check_id(volume_id, "vol")
        with self.inflight.guard(f"snapshot name {name}"):
            existing = await self.store.run(lambda s: s.snapshot_by_name(name))
            if existing is not None:
                if existing.volume_id != volume_id:
                    raise AlreadyExists(
                        f"snapshot {name!r} exists for another volume ({existing.volume_id})"
                    )
                if existing.ready:
                    return existing
            with self.inflight.guard(volume_id):
                vol = await self.get_volume(volume_id)
                if vol.state != "ready":
                    raise FailedPrecondition(f"volume {volume_id} is {vol.state}, not ready")
                if existing is None:
                    sid = _new_id("snap")
                    snap = SnapshotRow(
                        id=sid,
                        name=name,
                        volume_id=volume_id,
                        tenant=vol.tenant,
                        size=vol.size,
                        path=str(self.settings.snapshots_dir / f"{sid}.img"),
                        created_at=time.time(),
                    )
                    total = await self._total_bytes()

                    def reserve(s: Store) -> None:
                        with s.tx():
                            self._check_room(s, vol.tenant, vol.size, 0, 1, total)
                            s.insert_snapshot(snap)

                    await self.store.run(reserve)
                else:
                    snap = existing  # a retry after a crash or failure: finish it
                try:
                    await self._live_copy(volume_id, Path(vol.path), Path(snap.path))
                except Exception as exc:
                    # No half-made snapshot stays: the file (and its temporary) first, which
                    # frees the space, then the row.
                    log.error("snapshot %s (%s) of %s failed: %s", snap.id, name, volume_id, exc)
                    await self._io(files.remove, Path(snap.path))
                    await self.store.run(lambda s: s.delete_snapshot(snap.id))
                    no_space = self._no_space(exc, f"snapshot {name!r}")
                    if no_space is None:
                        raise
                    raise no_space from exc
                await self.store.run(lambda s: s.set_snapshot(snap.id, ready=True))
                log.info("snapshot %s (%s) of volume %s", snap.id, name, volume_id)
                return replace(snap, ready=True)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRow:
        check_id(snapshot_id, "snap")
        row = await self.store.run(lambda s: s.snapshot(snapshot_id))
        if row is None or row.deleting:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return row

    async def list_snapshots(
        self,
        tenant: str,
        volume_id: str,
        page_size: int,
        token: str,
        name: str = "",
        group_id: str = "",
    ) -> tuple[list[SnapshotRow], str]:
        limit = self._page(page_size)
        if tenant:
            check_tenant(tenant)
        if volume_id:
            check_id(volume_id, "vol")
        if token:
            check_id(token, "snap")
        if name:
            check_name(name)
            row = await self.store.run(lambda s: s.snapshot_by_name(name))
            if (
                row is None
                or tenant not in ("", row.tenant)
                or volume_id not in ("", row.volume_id)
                or group_id not in ("", row.group_id)
            ):
                return [], ""
            return [row], ""
        rows = await self.store.run(
            lambda s: s.snapshots(tenant, volume_id, token, limit + 1, group_id)
        )
        return rows[:limit], rows[limit - 1].id if len(rows) > limit else ""

    async def delete_snapshot(self, snapshot_id: str) -> None:
        check_id(snapshot_id, "snap")
        with self.inflight.guard(snapshot_id):
            row = await self.store.run(lambda s: s.snapshot(snapshot_id))
            if row is None:
                return
            await self.store.run(lambda s: self._mark_source_deleting(s, "snapshot", snapshot_id))
            await self._io(files.remove, Path(row.path))
            await self.store.run(lambda s: s.delete_snapshot(snapshot_id))

    @staticmethod
    def _mark_source_deleting(s: Store, kind: str, source_id: str) -> None:
        """Mark a snapshot or image deleting, unless a volume is still being filled from it:
        removing its file then would turn that volume FAILED after CreateVolume succeeded.
        CSI's "Snapshot in use" is FAILED_PRECONDITION; the caller retries with back-off."""
        with s.tx():
            filling = s.volumes_filling_from(kind, source_id)
            if filling:
                raise FailedPrecondition(
                    f"{kind} {source_id} is in use: volume {filling[0]} is still being "
                    "filled from it; retry when it is ready"
                )
            if kind == "snapshot":
                s.set_snapshot(source_id, deleting=True)
            else:
                s.set_image(source_id, deleting=True)

    # -- golden images ---------------------------------------------------------------------

    async def import_image(self, name: str, source_path: str, fmt: str) -> GoldenImageRow:
        check_name(name)
        if fmt not in ("", "raw", "qcow2"):
            raise InvalidArgument(f"format must be raw or qcow2, got {fmt!r}")
        if self.settings.import_dir is None:
            raise imports.disabled()
        with self.inflight.guard(f"image name {name}"):
            existing = await self.store.run(lambda s: s.image_by_name(name))
            if existing is not None:
                if (existing.source_path, existing.format) != (source_path, fmt):
                    raise AlreadyExists(
                        f"image {name!r} was imported with other parameters (file "
                        f"{existing.source_path}, format {existing.format or 'detected'})"
                    )
                return existing
            # Every check now, so a refused file is a clear error of this call; the
            # conversion checks again on the file it opens.
            await self._io(self._check_import, source_path, fmt)
            iid = _new_id("img")
            row = GoldenImageRow(
                id=iid,
                name=name,
                source_path=source_path,
                format=fmt,
                path=str(self.settings.images_dir / f"{iid}.img"),
                created_at=time.time(),
            )
            await self.store.run(lambda s: s.insert_image(row))
            self._spawn(self._convert(row))
            return row

    def _check_import(self, source_path: str, fmt: str) -> None:
        with imports.open_source(self.settings.import_dir, source_path, fmt) as source:
            size = imports.inspect(source)
        if size > MAX_VOLUME_SIZE:
            raise InvalidArgument(
                f"{source_path} is {human(size)}, more than a volume can hold "
                f"({human(MAX_VOLUME_SIZE)})"
            )

    def _convert_file(self, row: GoldenImageRow) -> None:
        with imports.open_source(self.settings.import_dir, row.source_path, row.format) as source:
            imports.inspect(source)
            files.convert_image(imports.qemu_source(source), Path(row.path), (source.fd,))

    async def _convert(self, row: GoldenImageRow) -> None:
        try:
            await self._io(self._convert_file, row)
            size = await self._io(files.image_size, Path(row.path))
            await self.store.run(lambda s: s.set_image(row.id, size=size, ready=True))
            log.info("image %s (%s) imported: %d bytes", row.id, row.name, size)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("image %s: import failed: %s", row.id, exc)
            message = str(exc)
            await self.store.run(lambda s: s.set_image(row.id, error=message))

    async def get_image(self, image_id: str) -> GoldenImageRow:
        check_id(image_id, "img")
        row = await self.store.run(lambda s: s.image(image_id))
        if row is None or row.deleting:
            raise NotFound(f"image {image_id} does not exist")
        return row

    async def list_images(self) -> list[GoldenImageRow]:
        return [i for i in await self.store.run(Store.images) if not i.deleting]

    async def delete_image(self, image_id: str) -> None:
        check_id(image_id, "img")
        with self.inflight.guard(image_id):
            row = await self.store.run(lambda s: s.image(image_id))
            if row is None:
                return
            await self.store.run(lambda s: self._mark_source_deleting(s, "image", image_id))
            await self._io(files.remove, Path(row.path))
            await self.store.run(lambda s: s.delete_image(image_id))

    # -- attachments -----------------------------------------------------------------------

    async def publish(
        self, volume_id: str, node_id: str, node_address: str, readonly: bool, multi_node: bool
    ) -> AttachmentRow:
        check_id(volume_id, "vol")
        check_name(node_id, "node_id")
        try:
            # The canonical form: the NBD server compares it with the peer's address as the
            # socket reports it ("::1", never "0:0::1").
            node_address = str(ipaddress.ip_address(node_address))
        except ValueError:
            raise InvalidArgument(f"node_address {node_address!r} is not an IP address") from None
        with self.inflight.guard(volume_id):
            vol = await self.get_volume(volume_id)
            if vol.state != "ready":
                raise FailedPrecondition(f"volume {volume_id} is {vol.state}, not ready")
            current = await self.store.run(lambda s: s.attachments(volume_id))
            for a in current:
                if a.node_id == node_id:
                    if (a.node_address, a.readonly, a.multi_node) == (
                        node_address,
                        readonly,
                        multi_node,
                    ):
                        return a
                    raise AlreadyExists(
                        f"volume {volume_id} is published to node {node_id} with other "
                        f"parameters (address {a.node_address}, readonly {a.readonly})"
                    )
            others = [a for a in current if a.node_id != node_id]
            if others and not (multi_node and all(a.multi_node for a in others)):
                raise FailedPrecondition(
                    f"volume {volume_id} is published to node {others[0].node_id}; a second "
                    "node is allowed only when every attachment asks for multi-node"
                )
            row = AttachmentRow(
                volume_id=volume_id,
                node_id=node_id,
                node_address=node_address,
                readonly=readonly,
                multi_node=multi_node,
                export_name=f"{volume_id}.{secrets.token_urlsafe(24)}",
                created_at=time.time(),
            )
            await self.store.run(lambda s: s.insert_attachment(row))
            await self._export_attachment(row)
            log.info("volume %s published to node %s (%s)", volume_id, node_id, node_address)
            return row

    async def _export_attachment(self, a: AttachmentRow) -> None:
        await self.dataplane.add_export(
            a.export_name,
            volume_id=a.volume_id,
            readonly=a.readonly,
            allowed_peers=[a.node_address],
            listed=False,
        )

    async def unpublish(self, volume_id: str, node_id: str) -> None:
        check_id(volume_id, "vol")
        check_name(node_id, "node_id")
        with self.inflight.guard(volume_id):
            current = await self.store.run(lambda s: s.attachments(volume_id))
            for a in current:
                if a.node_id == node_id:
                    # Fence first: the node's connections are gone before the row is.
                    await self.dataplane.remove_export(a.export_name)
                    await self.store.run(lambda s: s.delete_attachment(volume_id, node_id))
                    log.info("volume %s unpublished from node %s", volume_id, node_id)

    async def attachments(self, volume_id: str = "") -> list[AttachmentRow]:
        if volume_id:
            check_id(volume_id, "vol")
        return await self.store.run(lambda s: s.attachments(volume_id))

    # -- tenants ---------------------------------------------------------------------------

    async def tenant(self, name: str) -> tuple[TenantLimits, TenantUsage, int]:
        check_tenant(name)

        def read(s: Store) -> tuple[TenantLimits, TenantUsage, list[str]]:
            paths = [v.path for v in s.volumes(name)] + [x.path for x in s.snapshots(name)]
            return s.tenant_limits(name), s.tenant_usage(name), paths

        limits, usage, paths = await self.store.run(read)
        allocated = await self._io(lambda: sum(files.allocated_bytes(Path(p)) for p in paths))
        return limits, usage, allocated

    async def tenants(self) -> list[str]:
        return await self.store.run(Store.tenants)

    async def set_tenant_limits(self, name: str, limits: TenantLimits) -> None:
        check_tenant(name)
        check_limits(
            capacity_bytes=limits.capacity_bytes,
            volumes=limits.volumes,
            snapshots=limits.snapshots,
            qos_iops=limits.qos_iops,
            qos_bytes_per_second=limits.qos_bps,
        )
        await self.store.run(lambda s: s.set_tenant_limits(name, limits))
        await self.dataplane.set_tenant_qos(name, limits.qos_iops, limits.qos_bps)

    # -- recovery --------------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish or undo what a crash interrupted, then load volumes and attachments."""

        def load(
            s: Store,
        ) -> tuple[
            list[VolumeRow],
            list[SnapshotRow],
            list[GoldenImageRow],
            list[AttachmentRow],
            dict[str, TenantLimits],
        ]:
            return (
                s.volumes(),
                s.snapshots(),
                s.images(),
                s.attachments(),
                {t: s.tenant_limits(t) for t in s.tenants()},
            )

        volumes, snapshots, images, attachments, limits = await self.store.run(load)
        known = {Path(v.path).name for v in volumes}
        known |= {Path(x.path).name for x in snapshots}
        known |= {Path(i.path).name for i in images}
        await self._io(self._set_orphans_aside, known)
        await self._io(self._remove_copy_maps)
        for snap in snapshots:
            if snap.deleting or not snap.ready:
                # Never acknowledged as ready, or half deleted: finish deleting it. A retried
                # CreateSnapshot makes a new one.
                log.warning("recovery: removing unfinished snapshot %s", snap.id)
                await self._io(files.remove, Path(snap.path))
                await self.store.run(functools.partial(Store.delete_snapshot, snapshot_id=snap.id))
        for img in images:
            if img.deleting:
                await self._io(files.remove, Path(img.path))
                await self.store.run(functools.partial(Store.delete_image, image_id=img.id))
            elif not img.ready and not img.error:
                self._spawn(self._convert(img))
        for vol in volumes:
            path = Path(vol.path)
            if vol.state == "deleting":
                log.warning("recovery: finishing the deletion of volume %s", vol.id)
                await self._io(files.remove, path)
                await self.store.run(functools.partial(Store.delete_volume, volume_id=vol.id))
                continue
            if vol.state == "creating":
                if vol.source_kind in ("snapshot", "image"):
                    source = await self._source_path_for_recovery(vol)
                    if source is None:
                        await self._update_volume(vol.id, state="failed", error=GONE)
                    else:
                        self._spawn(self._fill_in_background(vol, Path(source)))
                    continue
                if vol.source_kind == "volume":
                    src = await self.store.run(
                        functools.partial(Store.volume, volume_id=vol.source_id)
                    )
                    if src is None:
                        await self._update_volume(vol.id, state="failed", error=GONE)
                        continue
                    await self._io(files.clone, Path(src.path), path, vol.size)
                elif not path.exists():
                    await self._io(files.create_sparse, path, vol.size)
                await self._update_volume(vol.id, state="ready")
            if vol.state in ("ready", "creating"):
                if not path.exists():
                    log.error("recovery: volume %s has no image; marking it failed", vol.id)
                    await self._update_volume(vol.id, state="failed", error="image file missing")
                    continue
                if path.stat().st_size < vol.size:  # an interrupted expansion
                    await self._io(os.truncate, path, vol.size)
                await self.dataplane.add_volume(
                    vol.id, vol.path, vol.tenant, zero_detection=vol.zero_detection
                )
                if vol.qos_iops or vol.qos_bps:
                    await self.dataplane.set_qos(vol.id, vol.tenant, vol.qos_iops, vol.qos_bps)
        for tenant, lim in limits.items():
            if lim.qos_iops or lim.qos_bps:
                await self.dataplane.set_tenant_qos(tenant, lim.qos_iops, lim.qos_bps)
        for a in attachments:
            if a.volume_id in self.dataplane.volumes:
                await self._export_attachment(a)

    def _set_orphans_aside(self, known: set[str]) -> None:
        """Files without a row. A temporary (files.temporary's name) is an unfinished copy
        or new file that was never acknowledged and whose source, if any, still exists: it
        is removed. Anything else is moved to the quarantine, never deleted: a catalogue
        restored from an older backup must not cost the data of the volumes it forgot."""
        orphans: list[Path] = []
        for d in (self.settings.volumes_dir, self.settings.snapshots_dir, self.settings.images_dir):
            for p in sorted(d.iterdir()):
                if p.name in known:
                    continue
                if files.is_temporary(p) and p.is_file():
                    log.warning("recovery: removing %s (an interrupted copy)", p)
                    p.unlink()
                else:
                    orphans.append(p)
        if orphans:
            batch = quarantine.move(self.settings.data_dir, orphans, "no catalogue row")
            log.warning(
                "recovery: %d file(s) without a catalogue row moved to %s; nothing was "
                "deleted (`python -m storage_node quarantine list`)",
                len(orphans),
                batch,
            )

    def _remove_copy_maps(self) -> None:
        """Dirty maps of live copies a crash interrupted: bookkeeping, never data."""
        maps = self.settings.data_dir / COPY_MAPS
        if maps.is_dir():
            for p in maps.iterdir():
                p.unlink()

    def quarantined(self) -> tuple[int, int]:
        """(files, bytes on disk) set aside in the quarantine."""
        return quarantine.totals(self.settings.data_dir)

    async def _source_path_for_recovery(self, vol: VolumeRow) -> str | None:
        if vol.source_kind == "snapshot":
            snap = await self.store.run(lambda s: s.snapshot(vol.source_id))
            return snap.path if snap and snap.ready else None
        img = await self.store.run(lambda s: s.image(vol.source_id))
        return img.path if img and img.ready else None
