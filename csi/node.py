"""The CSI Node service (csi-spec-v1.12.md, "Node Service RPC").

Owns NodeStageVolume (attach the export as a block device; for a filesystem volume, format it
when blank and mount it at the staging path), NodePublishVolume (bind the device node onto the
target file for Block, bind the staged filesystem for Filesystem; read-only and mount flags
honoured), NodeUnpublishVolume and NodeUnstageVolume (idempotent; a device is disconnected only
when nothing holds it), NodeExpandVolume, NodeGetVolumeStats (with the volume's condition),
NodeGetCapabilities and NodeGetInfo, and the take-over of devices attached by an earlier run.

`NodeServicer` only checks arguments and builds replies; `NodeService` does the work through
the interfaces it is given: an `Attacher` (csi/attach.py: the kernel's NBD client over netlink
in production), a `Mounter` (csi/mounts.py: subprocesses and mountinfo) and a `StateStore`
(csi/node_state.py: one record per staged volume). Metrics are documented in docs/metrics.md,
the design in docs/csi-node.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .attach import Attacher, AttachError, Device, Target
from .config import Config
from .errors import (
    Aborted,
    AlreadyExists,
    CsiError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    rpc,
)
from .identity import NODE_TOPOLOGY_KEY, node_topology_value
from .luks import (
    LABEL_PREFIX,
    Crypt,
    Keys,
    SecretError,
    derive_key,
    is_blank,
    key_id,
    mapper_name,
    volume_encrypted,
)
from .mounts import DEFAULT_FS, FILESYSTEMS, CommandError, Mounter, devtmpfs_root
from .nbd_dial import DialError
from .nbd_kernel import KernelAttacher, KernelOptions
from .node_state import StagedVolume, StateStore
from .v1 import csi_pb2 as pb
from .v1 import csi_pb2_grpc as pb_grpc

log = logging.getLogger("csi.node")
T = TypeVar("T")

_Mode = pb.VolumeCapability.AccessMode.Mode
_RPC = pb.NodeServiceCapability.RPC.Type
_READER_MODES = (_Mode.SINGLE_NODE_READER_ONLY, _Mode.MULTI_NODE_READER_ONLY)
# Several nodes writing one filesystem would corrupt it: multi-node writers are Block only
# (KubeVirt live migration), as the controller also enforces.
_MULTI_WRITER_MODES = (_Mode.MULTI_NODE_SINGLE_WRITER, _Mode.MULTI_NODE_MULTI_WRITER)

CAPABILITIES = (
    _RPC.STAGE_UNSTAGE_VOLUME,
    _RPC.EXPAND_VOLUME,
    _RPC.GET_VOLUME_STATS,
    _RPC.VOLUME_CONDITION,
    _RPC.SINGLE_NODE_MULTI_WRITER,
)
# Reconnect blackouts range from a fraction of a second (the storage node answers again at
# once) to the dead-connection timeout.
BLACKOUT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class NodeMetrics:
    """The node plugin's families on the injected registry; also the attacher's AttachEvents."""

    def __init__(self, registry: CollectorRegistry, node: str, address: str, version: str) -> None:
        self.node = node
        self.info = Gauge(
            "nbdcsi_node_plugin_info",
            "Always 1: the node plugin's identity",
            ["node", "address", "version"],
            registry=registry,
        )
        self.info.labels(node, address, version).set(1)
        self.attached = Gauge(
            "nbdcsi_node_attached_devices",
            "Volumes staged on this node with a block device attached",
            registry=registry,
        )
        self.links_down = Gauge(
            "nbdcsi_node_links_down",
            "Attached volumes whose connection to the storage node is lost and not back yet",
            registry=registry,
        )
        self.reconnects = Counter(
            "nbdcsi_node_reconnects",
            "Times a volume's lost connection was replaced on the same device",
            ["volume", "node"],
            registry=registry,
        )
        self.blackout = Histogram(
            "nbdcsi_node_io_blackout_seconds",
            "Time from losing a volume's connection to having it back",
            ["volume"],
            buckets=BLACKOUT_BUCKETS,
            registry=registry,
        )
        self._down: set[str] = set()

    def link_lost(self, volume_id: str) -> None:
        self._down.add(volume_id)
        self.links_down.set(len(self._down))

    def link_back(self, volume_id: str, blackout_seconds: float) -> None:
        self._down.discard(volume_id)
        self.links_down.set(len(self._down))
        self.reconnects.labels(volume_id, self.node).inc()
        self.blackout.labels(volume_id).observe(blackout_seconds)

    def forget(self, volume_id: str) -> None:
        """An unstaged volume's series go away with it."""
        self._down.discard(volume_id)
        self.links_down.set(len(self._down))
        with contextlib.suppress(KeyError):
            self.reconnects.remove(volume_id, self.node)
        with contextlib.suppress(KeyError):
            self.blackout.remove(volume_id)


@dataclass(frozen=True)
class Capability:
    """What the Node service needs of a VolumeCapability."""

    block: bool
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    reader_only: bool = False
    single_writer: bool = False  # SINGLE_NODE_SINGLE_WRITER: one target path at a time

    @classmethod
    def parse(cls, cap: pb.VolumeCapability) -> Capability:
        mode = cap.access_mode.mode
        if mode == _Mode.UNKNOWN:
            raise InvalidArgument("volume_capability.access_mode is missing")
        reader = mode in _READER_MODES
        single = mode == _Mode.SINGLE_NODE_SINGLE_WRITER
        kind = cap.WhichOneof("access_type")
        if kind == "block":
            return cls(block=True, reader_only=reader, single_writer=single)
        if kind != "mount":
            raise InvalidArgument("volume_capability needs an access type (block or mount)")
        if mode in _MULTI_WRITER_MODES:
            raise InvalidArgument("multi-node writers are supported for block volumes only")
        fs_type = cap.mount.fs_type
        if fs_type and fs_type not in FILESYSTEMS:
            raise InvalidArgument(
                f"fs_type {fs_type!r} is not supported (one of {', '.join(FILESYSTEMS)})"
            )
        return cls(False, fs_type, tuple(cap.mount.mount_flags), reader, single)


@dataclass(frozen=True)
class Stats:
    total_bytes: int
    available_bytes: int | None = None
    used_bytes: int | None = None
    inodes: tuple[int, int, int] | None = None  # total, available, used
    abnormal: bool = False
    message: str = ""


class NodeService:
    """The Node service's work, behind the servicer."""

    def __init__(
        self,
        config: Config,
        attacher: Attacher,
        mounter: Mounter,
        store: StateStore,
        metrics: NodeMetrics,
        crypt: Crypt | None = None,
    ) -> None:
        self.config = config
        self.attacher = attacher
        self.mounter = mounter
        self.crypt = crypt or Crypt(mounter.runner)
        self.store = store
        self.metrics = metrics
        self.servicer = NodeServicer(self, config)
        self._busy: set[str] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-state")

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.asynccontextmanager
    async def guard(self, volume_id: str) -> AsyncIterator[None]:
        """One operation per volume at a time; a second one fails fast (the CO retries)."""
        if volume_id in self._busy:
            raise Aborted(f"an operation on volume {volume_id} is already in progress")
        self._busy.add(volume_id)
        try:
            yield
        finally:
            self._busy.discard(volume_id)

    async def _count_attached(self) -> None:
        records = await self._io(self.store.all)
        self.metrics.attached.set(sum(1 for r in records if r.device))

    # -- start and stop ------------------------------------------------------------------

    async def startup(self) -> None:
        """Take back what an earlier run attached; disconnect our devices nobody records."""
        records = await self._io(self.store.all)
        ours = await self.attacher.ours()
        for record in records:
            try:
                target = Target.from_context(record.context)
            except ValueError as exc:
                log.error("%s: state record unusable: %s", record.volume_id, exc)
                continue
            device = ours.get(record.volume_id)
            try:
                if device is not None:
                    await self.attacher.adopt(record.volume_id, device, target)
                    log.info("%s: took back %s", record.volume_id, device.path)
                elif record.device:
                    # The kernel lost it (a reboot, or the device was torn down): attach again,
                    # on the same device number when free, so whoever still holds the old
                    # device node sees the volume come back.
                    log.warning("%s: %s is gone; attaching again", record.volume_id, record.device)
                    device = await self._attach(record.volume_id, target, record.index)
                else:
                    continue  # staging never reached the attach; NodeStage/Unstage finish it
            except (AttachError, DialError) as exc:
                log.error("%s: cannot take the volume back: %s", record.volume_id, exc)
                continue
            if (record.device, record.index) != (device.path, device.index):
                record.device, record.index = device.path, device.index
                await self._io(self.store.put, record)
        known = {r.volume_id for r in records}
        for volume_id, device in ours.items():
            if volume_id in known:
                continue
            holders = await self.mounter.holders(device.path)
            if holders:
                log.warning(
                    "%s: %s is ours but not recorded, and in use (%s); leaving it",
                    volume_id,
                    device.path,
                    "; ".join(holders),
                )
                continue
            log.warning("%s: %s is ours but not recorded; disconnecting", volume_id, device.path)
            try:
                await self.attacher.detach(volume_id, device)
            except AttachError as exc:
                log.error("%s: %s", volume_id, exc)
        await self._count_attached()

    async def close(self) -> None:
        await self.attacher.close()
        self.mounter.close()
        self._executor.shutdown(wait=True)

    # -- stage ---------------------------------------------------------------------------

    async def _attach(self, volume_id: str, target: Target, index: int | None) -> Device:
        try:
            return await self.attacher.attach(volume_id, target, index)
        except AttachError:
            if index is None:
                raise
            log.warning("%s: device %d is taken; using any free one", volume_id, index)
            return await self.attacher.attach(volume_id, target, None)

    async def stage(
        self,
        volume_id: str,
        target: Target,
        staging_path: str,
        cap: Capability,
        keys: Keys | None = None,
    ) -> None:
        """Stage the volume; `keys`: it is encrypted (LUKS2), with these master keys."""
        record = await self._io(self.store.get, volume_id)
        if record is not None:
            if record.staging_path != staging_path or record.block != cap.block:
                raise AlreadyExists(
                    f"volume {volume_id} is already staged at {record.staging_path} as "
                    f"{'block' if record.block else 'filesystem'}"
                )
            if record.encrypted != (keys is not None):
                raise AlreadyExists(
                    f"volume {volume_id} is already staged "
                    f"{'encrypted' if record.encrypted else 'unencrypted'}"
                )
            if cap.fs_type and record.fs_type and cap.fs_type != record.fs_type:
                raise AlreadyExists(f"volume {volume_id} is already staged as {record.fs_type}")
            if record.context != target.context():
                record.context = target.context()  # published again: a new credential
                await self._io(self.store.put, record)
        else:
            record = StagedVolume(
                volume_id=volume_id,
                staging_path=staging_path,
                block=cap.block,
                fs_type=cap.fs_type,
                mount_flags=list(cap.mount_flags),
                readonly=target.readonly or cap.reader_only,
                single_writer=cap.single_writer,
                context=target.context(),
                encrypted=keys is not None,
            )
            # Recorded before attaching: a crash in between leaves a record that a retry of
            # NodeStage completes, NodeUnstage cleans up and a restart can match to a device.
            await self._io(self.store.put, record)
        device = await self._ensure_attached(record, target)
        path = device.path
        if keys is not None:
            path = await self._ensure_open(record, device, keys)
        if not record.block:
            await self._ensure_mounted(record, path)

    async def _ensure_attached(self, record: StagedVolume, target: Target) -> Device:
        found = await self.attacher.find(record.volume_id)
        if found is not None:
            if not self.attacher.watching(record.volume_id):
                # Attached by a run that died before recording it: take it over.
                await self.attacher.adopt(record.volume_id, found, target)
            device = found
        else:
            device = await self._attach(
                record.volume_id, target, record.index if record.index >= 0 else None
            )
        if (record.device, record.index) != (device.path, device.index):
            record.device, record.index = device.path, device.index
            await self._io(self.store.put, record)
            await self._count_attached()
        return device

    async def _ensure_open(self, record: StagedVolume, device: Device, keys: Keys) -> str:
        """Open the volume's LUKS2 mapping on the device (formatting a blank volume first);
        the mapper device's path. Idempotent: an open mapping is kept."""
        name = mapper_name(record.volume_id)
        mapped = await self.crypt.mapping(name)
        if mapped is not None:
            if mapped.slaves != (device.name,):
                raise FailedPrecondition(
                    f"{mapped.path} of volume {record.volume_id} is open on "
                    f"{', '.join(mapped.slaves) or 'nothing'}, not on {device.path}"
                )
        else:
            await self._open(record, device, keys, name)
            mapped = await self.crypt.mapping(name)
            if mapped is None:
                raise CsiError(f"cryptsetup opened {name} but no device-mapper device has it")
        path = mapped.path
        if not await self.mounter.exists(path):
            raise CsiError(f"{path} of volume {record.volume_id} has no device node")
        if record.mapper != path:
            record.mapper = path
            await self._io(self.store.put, record)
        return path

    async def _open(self, record: StagedVolume, device: Device, keys: Keys, name: str) -> None:
        volume_id = record.volume_id
        if not await self.crypt.is_luks(device.path):
            # Never format over something: only a volume that was never written gets a header.
            if record.readonly:
                raise FailedPrecondition(
                    f"volume {volume_id} is encrypted but has no LUKS2 header and is read-only"
                )
            if not await self._io(is_blank, device.path):
                raise FailedPrecondition(
                    f"volume {volume_id} is to be encrypted but holds data and no LUKS2 "
                    "header; not formatting it (an encrypted volume starts empty: clone or "
                    "restore only from an encrypted volume)"
                )
            kid = key_id(volume_id)
            await self.crypt.format(device.path, derive_key(keys.current, kid), kid)
        kid = await self.crypt.label(device.path)
        if not kid.startswith(LABEL_PREFIX):
            raise FailedPrecondition(
                f"volume {volume_id} holds a LUKS2 volume this driver did not make "
                "(its label is not a key id of nbd-csi); not opening it"
            )
        current = derive_key(keys.current, kid)
        if await self.crypt.open(device.path, name, current, record.readonly):
            # A rotation interrupted after the new keyslot was added: finish it.
            if (
                keys.previous is not None
                and not record.readonly
                and await self.crypt.remove_key(device.path, derive_key(keys.previous, kid))
            ):
                log.info("%s: removed the keyslot of the previous key", volume_id)
            log.info("%s: opened %s on %s", volume_id, name, device.path)
            return
        previous = derive_key(keys.previous, kid) if keys.previous is not None else None
        if previous is None or not await self.crypt.open(
            device.path, name, previous, record.readonly
        ):
            raise FailedPrecondition(
                f"the node-stage secret's key does not open encrypted volume {volume_id}"
            )
        if record.readonly:
            log.warning("%s: opened with the previous key; read-only, not re-keyed", volume_id)
            return
        # Rotation: a keyslot for the current key first, then the previous one's removed, so
        # the volume always has a key that opens it.
        await self.crypt.add_key(device.path, previous, current)
        await self.crypt.remove_key(device.path, previous)
        log.info("%s: opened with the previous key and re-keyed to the current one", volume_id)

    async def _ensure_mounted(self, record: StagedVolume, device: str) -> None:
        path = record.staging_path
        number = await self._io(_device_number, device)
        entry = await self.mounter.mounted_at(path)
        if entry is not None:
            if entry.major_minor == number:
                return  # already staged: NodeStage is idempotent
            raise AlreadyExists(f"something else ({entry.source}) is mounted at {path}")
        await self.mounter.make_dir(path)
        found = await self.mounter.probe(device)
        fs_type = record.fs_type or DEFAULT_FS
        if found is None:
            if record.readonly:
                raise FailedPrecondition(
                    f"volume {record.volume_id} has no filesystem and is read-only"
                )
            await self.mounter.mkfs(device, fs_type)
        elif found[0] == "TYPE" and found[1] in FILESYSTEMS:
            if record.fs_type and found[1] != record.fs_type:
                raise FailedPrecondition(
                    f"volume {record.volume_id} holds {found[1]}, the capability asks for "
                    f"{record.fs_type}"
                )
            fs_type = found[1]
        else:
            # Never format over something: a partition table or unknown data may be a VM's.
            raise FailedPrecondition(
                f"volume {record.volume_id} holds {found[0]}={found[1]}, not ext4 or xfs; "
                "not formatting it"
            )
        options = [*record.mount_flags, *(["ro"] if record.readonly else [])]
        await self.mounter.mount(device, path, fs_type, options)
        if record.fs_type != fs_type:
            record.fs_type = fs_type
            await self._io(self.store.put, record)
        log.info("%s: %s (%s) mounted at %s", record.volume_id, device, fs_type, path)

    # -- unstage -------------------------------------------------------------------------

    async def unstage(self, volume_id: str, staging_path: str) -> None:
        record = await self._io(self.store.get, volume_id)
        if record is None:
            return  # never staged, or unstaged already (the record goes last)
        device = await self.attacher.find(volume_id)
        if device is None and record.device:
            device = Device(record.device, record.index)
        mapped = await self.crypt.mapping(mapper_name(volume_id)) if record.encrypted else None
        # What the filesystem is on: the plaintext mapping of an encrypted volume.
        data_path = device.path if device is not None else None
        if record.encrypted:
            data_path = mapped.path if mapped is not None else None
        if not record.block and data_path is not None:
            number = await self._io(_device_number, data_path)
            for _ in range(8):  # stacked mounts, bounded
                entry = await self.mounter.mounted_at(record.staging_path)
                if entry is None or entry.major_minor != number:
                    break
                await self.mounter.umount(record.staging_path)
        if mapped is not None:
            holders = await self.mounter.holders(mapped.path)
            if holders:
                raise FailedPrecondition(
                    f"{mapped.path} of volume {volume_id} is still in use: {'; '.join(holders)}"
                )
            await self.crypt.close(mapped.name)
            log.info("%s: closed %s", volume_id, mapped.name)
        if device is not None:
            holders = await self.mounter.holders(device.path)
            if holders:
                raise FailedPrecondition(
                    f"{device.path} of volume {volume_id} is still in use: {'; '.join(holders)}"
                )
            await self.attacher.detach(volume_id, device)
        await self._io(self.store.delete, volume_id)
        self.metrics.forget(volume_id)
        await self._count_attached()
        log.info("%s: unstaged", volume_id)

    # -- publish -------------------------------------------------------------------------

    async def is_staged(self, volume_id: str) -> bool:
        record = await self._io(self.store.get, volume_id)
        return record is not None and bool(record.volume_device)

    async def _staged(self, volume_id: str) -> StagedVolume:
        record = await self._io(self.store.get, volume_id)
        if record is None or not record.volume_device:
            raise FailedPrecondition(f"volume {volume_id} is not staged on this node")
        return record

    async def publish(
        self,
        volume_id: str,
        staging_path: str,
        target_path: str,
        cap: Capability,
        readonly: bool,
    ) -> None:
        record = await self._staged(volume_id)
        if record.staging_path != staging_path:
            raise FailedPrecondition(
                f"volume {volume_id} is staged at {record.staging_path}, not {staging_path}"
            )
        if record.block != cap.block:
            raise InvalidArgument(
                f"volume {volume_id} is staged as {'block' if record.block else 'filesystem'}"
            )
        ro = readonly or record.readonly or cap.reader_only
        device = record.volume_device
        entry = await self.mounter.mounted_at(target_path)
        if entry is not None:
            number = await self._io(_device_number, device)
            ours = (
                (entry.fs_type == "devtmpfs" and entry.root == devtmpfs_root(device))
                if record.block
                else (entry.major_minor == number and entry.root == "/")
            )
            if not ours:
                raise AlreadyExists(f"something else ({entry.source}) is mounted at {target_path}")
            if entry.readonly != ro:
                raise AlreadyExists(
                    f"volume {volume_id} is published at {target_path} "
                    f"{'read-only' if entry.readonly else 'read-write'}"
                )
            return  # published already: NodePublish is idempotent
        if cap.single_writer or record.single_writer:
            # csi-spec, NodePublishVolume: a SINGLE_NODE_SINGLE_WRITER volume published at a
            # second target path is FAILED_PRECONDITION.
            others = [
                p
                for p in await self.mounter.mount_points(device)
                if p not in (record.staging_path, target_path)
            ]
            if others:
                raise FailedPrecondition(
                    f"volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and already published "
                    f"at {others[0]}"
                )
        if record.block:
            await self.mounter.make_file(target_path)
            await self.mounter.bind(device, target_path, ro, ())
        else:
            await self.mounter.make_dir(target_path)
            await self.mounter.bind(record.staging_path, target_path, ro, cap.mount_flags)
        log.info("%s: published at %s%s", volume_id, target_path, " read-only" if ro else "")

    async def unpublish(self, volume_id: str, target_path: str) -> None:
        for _ in range(8):  # stacked mounts, bounded
            if await self.mounter.mounted_at(target_path) is None:
                break
            await self.mounter.umount(target_path)
        else:
            raise FailedPrecondition(f"{target_path} is still mounted")
        await self.mounter.remove(target_path)

    # -- expand and stats ----------------------------------------------------------------

    async def expand(self, volume_id: str, volume_path: str, required: int) -> int:
        record = await self._io(self.store.get, volume_id)
        if record is None:
            raise NotFound(f"volume {volume_id} is not staged on this node")
        if not record.volume_device:
            raise FailedPrecondition(f"volume {volume_id} has no device attached")
        if not await self.mounter.exists(volume_path):
            raise NotFound(f"volume path {volume_path} does not exist")
        target = Target.from_context(record.context)
        size = await self.attacher.refresh_size(
            volume_id, Device(record.device, record.index), target
        )
        if required and size < required:
            raise FailedPrecondition(
                f"the storage node serves volume {volume_id} with {size} bytes, less than the "
                f"{required} asked for: expand it on the controller first"
            )
        if record.encrypted:
            # The mapping keeps its size until told: grow it to the NBD device's new size.
            await self.crypt.resize(mapper_name(volume_id))
        if not record.block:
            await self.mounter.grow(record.volume_device, record.staging_path, record.fs_type)
        log.info("%s: expanded to %d bytes", volume_id, size)
        return size

    async def stats(self, volume_id: str, volume_path: str) -> Stats:
        if not await self.mounter.exists(volume_path):
            raise NotFound(f"volume path {volume_path} does not exist")
        record = await self._io(self.store.get, volume_id)
        if record is None or not record.volume_device:
            raise NotFound(f"volume {volume_id} is not staged on this node")
        health = self.attacher.health(volume_id)
        abnormal, message = not health.ok, health.message
        if record.block:
            size = await self.mounter.device_size(record.volume_device)
            return Stats(size, abnormal=abnormal, message=message)
        if await self.mounter.mounted_at(volume_path) is None and not abnormal:
            abnormal, message = True, f"{volume_path} is not mounted"
        usage = await self.mounter.usage(volume_path)
        return Stats(
            usage.total_bytes,
            usage.available_bytes,
            usage.used_bytes,
            (usage.total_inodes, usage.free_inodes, usage.used_inodes),
            abnormal,
            message,
        )


def _device_number(path: str) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


# -- the servicer ------------------------------------------------------------------------------


def _require(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is missing")
    return value


def _path(value: str, what: str) -> str:
    _require(value, what)
    if not os.path.isabs(value):
        raise InvalidArgument(f"{what} {value!r} is not an absolute path")
    return os.path.normpath(value)


def _capability(request: Any) -> Capability:
    if not request.HasField("volume_capability"):
        raise InvalidArgument("volume_capability is missing")
    return Capability.parse(request.volume_capability)


def _translate(exc: Exception) -> CsiError:
    """Failures of the parts below, as CSI errors (the message already names the volume)."""
    if isinstance(exc, DialError):
        return CsiError(f"storage node unreachable: {exc}")
    return CsiError(str(exc))


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, service: NodeService, config: Config) -> None:
        self.service = service
        self.config = config

    async def _volume_path(self, volume_id: str, value: str) -> str:
        """`volume_path` of NodeGetVolumeStats and NodeExpandVolume. A volume not staged here
        is NOT_FOUND whatever the path (csi-spec: it "does not exist on specified
        volume_path"), so only a known volume's path can be INVALID_ARGUMENT."""
        if not os.path.isabs(value) and not await self.service.is_staged(volume_id):
            raise NotFound(f"volume {volume_id} is not staged on this node")
        return _path(value, "volume_path")

    @rpc
    async def NodeStageVolume(
        self, request: pb.NodeStageVolumeRequest, context: Any
    ) -> pb.NodeStageVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        staging = _path(request.staging_target_path, "staging_target_path")
        cap = _capability(request)
        try:
            target = Target.from_context(request.publish_context)
            encrypted = volume_encrypted(request.volume_context)
            # The secrets' values never reach a message: SecretError names the key only.
            keys = Keys.from_secrets(request.secrets) if encrypted else None
        except (ValueError, SecretError) as exc:
            raise InvalidArgument(str(exc)) from None
        async with self.service.guard(volume_id):
            try:
                await self.service.stage(volume_id, target, staging, cap, keys)
            except (AttachError, DialError, CommandError) as exc:
                raise _translate(exc) from None
        return pb.NodeStageVolumeResponse()

    @rpc
    async def NodeUnstageVolume(
        self, request: pb.NodeUnstageVolumeRequest, context: Any
    ) -> pb.NodeUnstageVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        staging = _path(request.staging_target_path, "staging_target_path")
        async with self.service.guard(volume_id):
            try:
                await self.service.unstage(volume_id, staging)
            except (AttachError, CommandError) as exc:
                raise _translate(exc) from None
        return pb.NodeUnstageVolumeResponse()

    @rpc
    async def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest, context: Any
    ) -> pb.NodePublishVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        staging = _path(request.staging_target_path, "staging_target_path")
        target = _path(request.target_path, "target_path")
        cap = _capability(request)
        async with self.service.guard(volume_id):
            try:
                await self.service.publish(volume_id, staging, target, cap, request.readonly)
            except CommandError as exc:
                raise _translate(exc) from None
        return pb.NodePublishVolumeResponse()

    @rpc
    async def NodeUnpublishVolume(
        self, request: pb.NodeUnpublishVolumeRequest, context: Any
    ) -> pb.NodeUnpublishVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        target = _path(request.target_path, "target_path")
        async with self.service.guard(volume_id):
            try:
                await self.service.unpublish(volume_id, target)
            except (CommandError, OSError) as exc:
                raise _translate(exc) from None
        return pb.NodeUnpublishVolumeResponse()

    @rpc
    async def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest, context: Any
    ) -> pb.NodeGetVolumeStatsResponse:
        volume_id = _require(request.volume_id, "volume_id")
        path = await self._volume_path(volume_id, request.volume_path)
        try:
            stats = await self.service.stats(volume_id, path)
        except CommandError as exc:
            raise _translate(exc) from None
        Unit = pb.VolumeUsage.Unit
        usage = [
            pb.VolumeUsage(
                unit=Unit.BYTES,
                total=stats.total_bytes,
                available=stats.available_bytes or 0,
                used=stats.used_bytes or 0,
            )
        ]
        if stats.inodes is not None:
            total, available, used = stats.inodes
            usage.append(
                pb.VolumeUsage(unit=Unit.INODES, total=total, available=available, used=used)
            )
        condition = pb.VolumeCondition(abnormal=stats.abnormal, message=stats.message)
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    @rpc
    async def NodeExpandVolume(
        self, request: pb.NodeExpandVolumeRequest, context: Any
    ) -> pb.NodeExpandVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        path = await self._volume_path(volume_id, request.volume_path)
        required = request.capacity_range.required_bytes
        async with self.service.guard(volume_id):
            try:
                size = await self.service.expand(volume_id, path, required)
            except (AttachError, DialError, CommandError) as exc:
                raise _translate(exc) from None
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    @rpc
    async def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest, context: Any
    ) -> pb.NodeGetCapabilitiesResponse:
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[
                pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=kind))
                for kind in CAPABILITIES
            ]
        )

    @rpc
    async def NodeGetInfo(
        self, request: pb.NodeGetInfoRequest, context: Any
    ) -> pb.NodeGetInfoResponse:
        node = self.config.node
        # Always a segment: the plugin advertises VOLUME_ACCESSIBILITY_CONSTRAINTS, and a CO
        # then needs topology keys from every node (docs/csi-node.md).
        segments = dict(node.topology) or {
            NODE_TOPOLOGY_KEY: node_topology_value(self.config.node_id)
        }
        return pb.NodeGetInfoResponse(
            # The limit rides in the id: the controller sees only the id (docs/csi-driver.md).
            node_id=f"{self.config.node_id}@{node.address};max-volumes={node.max_volumes}",
            max_volumes_per_node=node.max_volumes,
            accessible_topology=pb.Topology(segments=segments),
        )


async def start(
    config: Config,
    registry: CollectorRegistry,
    *,
    attacher: Attacher | None = None,
    mounter: Mounter | None = None,
) -> NodeService:
    """Build the Node service and take back what an earlier run attached. `attacher` and
    `mounter` replace the kernel's NBD client and the host's mount tools (tests)."""
    metrics = NodeMetrics(registry, config.node_id, config.node.address, config.vendor_version)
    if attacher is None:
        kernel = KernelAttacher(
            KernelOptions(
                connections=config.node.nbd_connections,
                io_timeout=config.node.nbd_io_timeout,
                dead_conn_timeout=config.node.nbd_dead_timeout,
            ),
            metrics,
        )
        try:
            await kernel.start()
        except (AttachError, OSError) as exc:
            # Serve anyway (Identity, NodeGetInfo); staging fails until the module is there.
            log.error("kernel NBD unavailable: %s", exc)
        attacher = kernel
    service = NodeService(
        config, attacher, mounter or Mounter(), StateStore(config.node.state_dir), metrics
    )
    await service.startup()
    return service
