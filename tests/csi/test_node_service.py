"""The CSI Node service on this host: stage, publish, format, mount, bind, stats, restart.

Owns the Node RPCs of csi-spec-v1.12.md as a CO calls them (generated stubs over a real gRPC
unix socket), against volumes on a real storage node published as the controller will do it.
The kernel here has no NBD driver, so the device under the service is a loop device over
nbdfuse (tests/csi/loop_attacher.py): every byte still goes over NBD to the storage node, and
the tests check those bytes with an independent NBD client (nbdcopy). mkfs, blkid, mount,
bind mounts, statvfs and resize2fs are the real ones. The kernel attach itself, reconnects and
200 stage/unstage cycles run in tests/vm/test_node_plugin.py.

Needs root (mounts, loop devices), nbdfuse (libnbd-bin), e2fsprogs and xfsprogs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi import node
from csi.identity import NODE_TOPOLOGY_KEY
from csi.mounts import parse_mountinfo
from csi.v1 import csi_pb2 as pb
from tests.support.api import ApiNode

from .loop_attacher import LoopAttacher
from .node_harness import (
    MAX_VOLUMES,
    NODE_ADDRESS,
    NODE_NAME,
    TOPOLOGY,
    Attached,
    NodeHarness,
    attach_volume,
)

MiB = 1024 * 1024
Mode = pb.VolumeCapability.AccessMode.Mode
AccessMode = pb.VolumeCapability.AccessMode.Mode


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mounts and loop devices)"
    for tool in ("nbdfuse", "nbdcopy", "losetup", "mkfs.ext4", "mkfs.xfs", "blkid"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"{tool} is not installed"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[NodeHarness]:
    loops = tmp_path / "loops"
    attachers: list[LoopAttacher] = []

    def factory() -> LoopAttacher:
        attachers.append(LoopAttacher(loops))
        return attachers[-1]

    h = NodeHarness(tmp_path, factory)
    try:
        yield h
    finally:
        h.close()
        # Whatever a failed test left: mounts under tmp_path (deepest first), then devices.
        for entry in sorted(_mounts_under(tmp_path), key=len, reverse=True):
            subprocess.run(["umount", "-l", entry], check=False)
        for attacher in attachers:
            attacher.cleanup()


def _mounts_under(root: Path) -> list[str]:
    entries = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    return [e.mount_point for e in entries if e.mount_point.startswith(str(root))]


def block_cap(mode: AccessMode = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def mount_cap(
    fs_type: str = "", flags: tuple[str, ...] = (), mode: AccessMode = Mode.SINGLE_NODE_WRITER
) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def stage(h: NodeHarness, vol: Attached, path: Path, cap: pb.VolumeCapability) -> None:
    h.stub.NodeStageVolume(
        pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id,
            publish_context=vol.context,
            staging_target_path=str(path),
            volume_capability=cap,
        )
    )


def unstage(h: NodeHarness, vol: Attached, path: Path) -> None:
    h.stub.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=str(path))
    )


def publish(
    h: NodeHarness,
    vol: Attached,
    staging: Path,
    target: Path,
    cap: pb.VolumeCapability,
    readonly: bool = False,
) -> None:
    h.stub.NodePublishVolume(
        pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            publish_context=vol.context,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=cap,
            readonly=readonly,
        )
    )


def unpublish(h: NodeHarness, vol: Attached, target: Path) -> None:
    h.stub.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(target))
    )


def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()


def mount_at(path: Path):
    found = [
        e
        for e in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        if e.mount_point == str(path)
    ]
    return found[-1] if found else None


def export_bytes(vol: Attached, offset: int, length: int) -> bytes:
    """The volume's bytes as an independent NBD client (nbdcopy) reads them."""
    data = subprocess.run(
        ["nbdcopy", "--synchronous", vol.uri, "-"], capture_output=True, check=True
    ).stdout
    return data[offset : offset + length]


# -- identity of the node ------------------------------------------------------------------


def test_node_get_info_reports_the_contract(harness: NodeHarness) -> None:
    info = harness.stub.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == f"{NODE_NAME}@{NODE_ADDRESS};max-volumes={MAX_VOLUMES}"
    assert info.max_volumes_per_node == MAX_VOLUMES
    assert dict(info.accessible_topology.segments) == dict(TOPOLOGY)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (NODE_NAME, NODE_NAME),
        ("n" * 64, "node-" + hashlib.sha256(b"n" * 64).hexdigest()[:32]),  # too long a value
    ],
)
def test_node_get_info_without_topology_reports_the_node_segment(
    harness: NodeHarness, name: str, value: str
) -> None:
    """The plugin advertises VOLUME_ACCESSIBILITY_CONSTRAINTS, so a node without --topology
    still reports a segment: the node's own (issue 13)."""
    config = dataclasses.replace(
        harness.config,
        node_id=name,
        node=dataclasses.replace(harness.config.node, topology=()),
    )
    servicer = node.NodeServicer(harness.service, config)

    async def get_info() -> pb.NodeGetInfoResponse:
        return await servicer.NodeGetInfo(pb.NodeGetInfoRequest(), None)  # type: ignore[arg-type]

    info = harness.call(get_info())
    assert dict(info.accessible_topology.segments) == {NODE_TOPOLOGY_KEY: value}


def test_node_capabilities(harness: NodeHarness) -> None:
    caps = harness.stub.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
    RPC = pb.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps} == {
        RPC.STAGE_UNSTAGE_VOLUME,
        RPC.EXPAND_VOLUME,
        RPC.GET_VOLUME_STATS,
        RPC.VOLUME_CONDITION,
        RPC.SINGLE_NODE_MULTI_WRITER,
    }


# -- Block ---------------------------------------------------------------------------------


def test_block_volume_bound_onto_a_file_writes_reach_the_storage_node(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    vol = attach_volume(storage_node, "block-rw", 16 * MiB)
    staging, target = tmp_path / "staging", tmp_path / "pods" / "vm-disk"
    stage(harness, vol, staging, block_cap())
    stage(harness, vol, staging, block_cap())  # idempotent
    publish(harness, vol, staging, target, block_cap())
    publish(harness, vol, staging, target, block_cap())  # idempotent
    assert harness.metric("nbdcsi_node_attached_devices") == 1

    entry = mount_at(target)
    assert entry is not None and entry.fs_type == "devtmpfs" and not entry.readonly
    pattern = bytes(range(256)) * 16 * 64  # 256 KiB
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, pattern, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert export_bytes(vol, 3 * MiB, len(pattern)) == pattern

    # The device is held by the bind mount: unstage must refuse rather than pull it away.
    assert status_of(lambda: unstage(harness, vol, staging)) == grpc.StatusCode.FAILED_PRECONDITION
    assert mount_at(target) is not None

    unpublish(harness, vol, target)
    unpublish(harness, vol, target)  # idempotent
    assert not target.exists()
    unstage(harness, vol, staging)
    unstage(harness, vol, staging)  # idempotent
    assert harness.metric("nbdcsi_node_attached_devices") == 0
    assert not list((tmp_path / "loops").glob("*/disk")), "nbdfuse mount left behind"


def test_block_volume_published_read_only(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    # A read-only mount does not stop writes through a device node (the kernel checks the
    # mount's flag for regular files only): a read-only block volume is read-only because its
    # attachment is, down to the device. The bind is marked read-only as well.
    vol = attach_volume(storage_node, "block-ro", 8 * MiB, readonly=True)
    staging, target = tmp_path / "staging", tmp_path / "ro-disk"
    stage(harness, vol, staging, block_cap(Mode.SINGLE_NODE_READER_ONLY))
    publish(harness, vol, staging, target, block_cap(Mode.SINGLE_NODE_READER_ONLY), readonly=True)
    entry = mount_at(target)
    assert entry is not None and entry.readonly
    with pytest.raises(OSError):
        fd = os.open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
    assert export_bytes(vol, 0, 4096) == bytes(4096)
    unpublish(harness, vol, target)
    unstage(harness, vol, staging)


# -- Filesystem ----------------------------------------------------------------------------


def test_filesystem_formatted_once_mounted_and_bound_with_flags(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    vol = attach_volume(storage_node, "fs-ext4", 64 * MiB)
    staging = tmp_path / "staging"
    rw, ro = tmp_path / "pod-a" / "mount", tmp_path / "pod-b" / "mount"
    cap = mount_cap("ext4", ("noexec",))
    stage(harness, vol, staging, cap)
    staged = mount_at(staging)
    assert staged is not None and staged.fs_type == "ext4"
    publish(harness, vol, staging, rw, cap)
    publish(harness, vol, staging, ro, cap, readonly=True)
    assert "noexec" in mount_at(rw).options
    assert mount_at(ro).readonly and not mount_at(rw).readonly
    # Published again at the same target with another read-only setting: incompatible.
    code = status_of(lambda: publish(harness, vol, staging, rw, cap, readonly=True))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    (rw / "hello.txt").write_text("kept across stages")
    with pytest.raises(OSError):
        (ro / "nope.txt").write_text("read-only")

    stats = harness.stub.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(rw))
    )
    units = {u.unit: u for u in stats.usage}
    Unit = pb.VolumeUsage.Unit
    assert 0 < units[Unit.BYTES].total <= vol.size and units[Unit.BYTES].used > 0
    assert units[Unit.INODES].total > units[Unit.INODES].available > 0
    assert not stats.volume_condition.abnormal

    # NodeExpandVolume with the size unchanged: the size is reported, resize2fs is a no-op.
    grown = harness.stub.NodeExpandVolume(
        pb.NodeExpandVolumeRequest(volume_id=vol.volume_id, volume_path=str(rw))
    )
    assert grown.capacity_bytes == vol.size

    for target in (rw, ro):
        unpublish(harness, vol, target)
    unstage(harness, vol, staging)
    assert mount_at(staging) is None

    # Staged again: the filesystem is found, not made again; the file is still there.
    stage(harness, vol, staging, cap)
    publish(harness, vol, staging, rw, cap)
    assert (rw / "hello.txt").read_text() == "kept across stages"
    unpublish(harness, vol, rw)
    unstage(harness, vol, staging)


def test_xfs_and_the_default_filesystem(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    # mkfs.xfs wants at least 300 MiB; the volume is sparse on the storage node.
    xfs = attach_volume(storage_node, "fs-xfs", 320 * MiB)
    plain = attach_volume(storage_node, "fs-default", 32 * MiB)
    stage(harness, xfs, tmp_path / "x", mount_cap("xfs"))
    stage(harness, plain, tmp_path / "p", mount_cap())
    assert mount_at(tmp_path / "x").fs_type == "xfs"
    assert mount_at(tmp_path / "p").fs_type == "ext4"
    assert harness.metric("nbdcsi_node_attached_devices") == 2
    # Staged as xfs: asking for ext4 at the same path is an incompatible stage.
    code = status_of(lambda: stage(harness, xfs, tmp_path / "x", mount_cap("ext4")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    unstage(harness, xfs, tmp_path / "x")
    unstage(harness, plain, tmp_path / "p")
    # The capability asks for ext4 but the volume holds xfs: never reformatted.
    code = status_of(lambda: stage(harness, xfs, tmp_path / "x", mount_cap("ext4")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    unstage(harness, xfs, tmp_path / "x")


def test_blank_read_only_volume_is_not_formatted(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    vol = attach_volume(storage_node, "fs-ro-blank", 16 * MiB, readonly=True)
    code = status_of(lambda: stage(harness, vol, tmp_path / "s", mount_cap("ext4")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    unstage(harness, vol, tmp_path / "s")
    assert harness.metric("nbdcsi_node_attached_devices") == 0


def test_raw_data_is_never_formatted(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    vol = attach_volume(storage_node, "fs-raw-data", 16 * MiB)
    stage(harness, vol, tmp_path / "s", block_cap())
    publish(harness, vol, tmp_path / "s", tmp_path / "dev", block_cap())
    # A VM wrote a partition table: an MBR with one Linux partition from sector 2048.
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little")
    mbr = bytearray(512)
    mbr[446 : 446 + 16] = entry + (8192).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    fd = os.open(tmp_path / "dev", os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(mbr), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    unpublish(harness, vol, tmp_path / "dev")
    unstage(harness, vol, tmp_path / "s")
    code = status_of(lambda: stage(harness, vol, tmp_path / "f", mount_cap("ext4")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    unstage(harness, vol, tmp_path / "f")


# -- restart -------------------------------------------------------------------------------


def test_restarted_service_takes_its_devices_back(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    blk = attach_volume(storage_node, "restart-block", 8 * MiB)
    fs = attach_volume(storage_node, "restart-fs", 32 * MiB)
    stage(harness, blk, tmp_path / "sb", block_cap())
    publish(harness, blk, tmp_path / "sb", tmp_path / "disk", block_cap())
    stage(harness, fs, tmp_path / "sf", mount_cap("ext4"))
    publish(harness, fs, tmp_path / "sf", tmp_path / "mnt", mount_cap("ext4"))
    state_files = list((tmp_path / "state" / "volumes").iterdir())
    assert len(state_files) == 2
    for f in state_files:
        assert f.stat().st_mode & 0o777 == 0o600
        assert blk.context["nbd.csi.dev/export"] not in f.name

    harness.restart()

    attacher: LoopAttacher = harness.attacher  # type: ignore[assignment]
    assert attacher.attach_calls == 0, "a device was attached again instead of taken back"
    assert attacher.detach_calls == 0
    assert harness.metric("nbdcsi_node_attached_devices") == 2
    # Idempotent calls after the restart find everything in place.
    stage(harness, fs, tmp_path / "sf", mount_cap("ext4"))
    publish(harness, fs, tmp_path / "sf", tmp_path / "mnt", mount_cap("ext4"))
    assert attacher.attach_calls == 0
    (tmp_path / "mnt" / "after-restart").write_text("ok")
    for vol, staging, target in ((blk, "sb", "disk"), (fs, "sf", "mnt")):
        unpublish(harness, vol, tmp_path / target)
        unstage(harness, vol, tmp_path / staging)
    assert attacher.detach_calls == 2
    assert not list((tmp_path / "state" / "volumes").iterdir())


def test_unrecorded_device_of_ours_is_disconnected_on_start(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    vol = attach_volume(storage_node, "orphan", 8 * MiB)
    stage(harness, vol, tmp_path / "s", block_cap())
    for f in (tmp_path / "state" / "volumes").iterdir():
        f.unlink()  # as if the plugin died between attaching and recording
    harness.restart()
    attacher: LoopAttacher = harness.attacher  # type: ignore[assignment]
    assert attacher.detach_calls == 1
    assert harness.call(attacher.find(vol.volume_id)) is None


# -- errors --------------------------------------------------------------------------------


def test_argument_and_state_errors(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    vol = attach_volume(storage_node, "errors", 8 * MiB)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "no volume id": lambda: harness.stub.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                staging_target_path=str(tmp_path), volume_capability=block_cap()
            )
        ),
        "no capability": lambda: harness.stub.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=str(tmp_path),
                publish_context=vol.context,
            )
        ),
        "no publish_context": lambda: harness.stub.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=vol.volume_id,
                staging_target_path=str(tmp_path),
                volume_capability=block_cap(),
            )
        ),
        "relative path": lambda: stage(harness, vol, Path("relative"), block_cap()),
        "unsupported fs": lambda: stage(harness, vol, tmp_path / "s", mount_cap("btrfs")),
        "multi-node fs writer": lambda: stage(
            harness, vol, tmp_path / "s", mount_cap("ext4", mode=Mode.MULTI_NODE_MULTI_WRITER)
        ),
        "no target path": lambda: harness.stub.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id)
        ),
    }
    for name, call in cases.items():
        assert status_of(call) == invalid, name

    code = status_of(lambda: publish(harness, vol, tmp_path / "s", tmp_path / "t", block_cap()))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, "publish before stage"
    stats = pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(tmp_path))
    assert status_of(lambda: harness.stub.NodeGetVolumeStats(stats)) == grpc.StatusCode.NOT_FOUND
    expand = pb.NodeExpandVolumeRequest(volume_id=vol.volume_id, volume_path=str(tmp_path))
    assert status_of(lambda: harness.stub.NodeExpandVolume(expand)) == grpc.StatusCode.NOT_FOUND

    stage(harness, vol, tmp_path / "s", block_cap())
    code = status_of(lambda: stage(harness, vol, tmp_path / "elsewhere", block_cap()))
    assert code == grpc.StatusCode.ALREADY_EXISTS, "staged at another path"
    code = status_of(lambda: publish(harness, vol, tmp_path / "s", tmp_path / "t", mount_cap()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, "staged as block, published as filesystem"
    publish(harness, vol, tmp_path / "s", tmp_path / "t", block_cap())
    block_stats = harness.stub.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(tmp_path / "t"))
    )
    bytes_unit = pb.VolumeUsage.Unit.BYTES
    assert [(u.unit, u.total) for u in block_stats.usage] == [(bytes_unit, vol.size)]
    assert not block_stats.volume_condition.abnormal
    unpublish(harness, vol, tmp_path / "t")
    unstage(harness, vol, tmp_path / "s")


def test_one_operation_per_volume_at_a_time(harness: NodeHarness) -> None:
    from csi.errors import Aborted

    async def overlap() -> str:
        async with harness.service.guard("vol-x"):
            try:
                async with harness.service.guard("vol-x"):
                    return "entered twice"
            except Aborted:
                pass
            async with harness.service.guard("vol-y"):
                return "other volumes proceed"

    assert harness.call(overlap()) == "other volumes proceed"


@pytest.mark.parametrize("kind", ["block", "mount"])
def test_single_node_single_writer_is_published_at_one_target_only(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path, kind: str
) -> None:
    """csi-spec, NodePublishVolume table: SINGLE_NODE_SINGLE_WRITER at a second target path
    is FAILED_PRECONDITION (issue 13); the refusal leaves nothing that blocks NodeUnstage."""
    vol = attach_volume(storage_node, f"snsw-{kind}", 16 * MiB)
    snsw = Mode.SINGLE_NODE_SINGLE_WRITER
    cap = block_cap(snsw) if kind == "block" else mount_cap("ext4", mode=snsw)
    staging, first, second = tmp_path / "staging", tmp_path / "t1" / "x", tmp_path / "t2" / "x"
    stage(harness, vol, staging, cap)
    publish(harness, vol, staging, first, cap)
    publish(harness, vol, staging, first, cap)  # T1=T2, P1=P2: idempotent
    code = status_of(lambda: publish(harness, vol, staging, second, cap))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert mount_at(second) is None and not second.exists()
    # Once the first publication is gone, the volume can be published elsewhere.
    unpublish(harness, vol, first)
    publish(harness, vol, staging, second, cap)
    unpublish(harness, vol, second)
    unstage(harness, vol, staging)
    assert mount_at(staging) is None


def test_unknown_volume_is_not_found_before_its_path_is_checked(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    """csi-spec: NOT_FOUND is "a volume ... does not exist on specified volume_path"; a
    relative path of a volume that is not here is still that (issue 13)."""
    stats = pb.NodeGetVolumeStatsRequest(volume_id="storage-a:unknown", volume_path="some/path")
    expand = pb.NodeExpandVolumeRequest(volume_id="storage-a:unknown", volume_path="some/path")
    assert status_of(lambda: harness.stub.NodeGetVolumeStats(stats)) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: harness.stub.NodeExpandVolume(expand)) == grpc.StatusCode.NOT_FOUND
    # A staged volume with a relative path: the argument is wrong.
    vol = attach_volume(storage_node, "relative-path", 8 * MiB)
    stage(harness, vol, tmp_path / "s", block_cap())
    stats = pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path="some/path")
    expand = pb.NodeExpandVolumeRequest(volume_id=vol.volume_id, volume_path="some/path")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: harness.stub.NodeGetVolumeStats(stats)) == invalid
    assert status_of(lambda: harness.stub.NodeExpandVolume(expand)) == invalid
    unstage(harness, vol, tmp_path / "s")


# -- children under load ---------------------------------------------------------------------

STRESS_VOLUMES = 4
STRESS_CYCLES = int(os.environ.get("NBDCSI_STRESS_CYCLES", "500"))


@pytest.mark.slow
def test_stage_unstage_cycles_with_parallel_rpcs_never_crash_a_child(
    harness: NodeHarness, storage_node: ApiNode, tmp_path: Path
) -> None:
    """Issue 12: mkfs, mount and umount died with SIGSEGV when they were forked while other
    threads were inside gRPC. 500 stage/unstage cycles of ext4 volumes (blkid, mount, umount
    each time, mkfs the first), four volumes at once, while other threads keep calling
    NodeGetInfo, NodeGetCapabilities and NodeGetVolumeStats: every call succeeds."""
    vols = [attach_volume(storage_node, f"stress-{i}", 16 * MiB) for i in range(STRESS_VOLUMES)]
    cap = mount_cap("ext4")
    stop = threading.Event()
    failures: list[str] = []
    side_calls = [0]

    def cycles(vol: Attached, count: int) -> None:
        staging = tmp_path / vol.backend_id / "staging"
        target = tmp_path / vol.backend_id / "target"
        try:
            for _ in range(count):
                stage(harness, vol, staging, cap)
                publish(harness, vol, staging, target, cap)
                unpublish(harness, vol, target)
                unstage(harness, vol, staging)
        except grpc.RpcError as exc:
            failures.append(f"{vol.volume_id}: {exc.code().name}: {exc.details()}")

    def side_rpcs() -> None:
        while not stop.is_set():
            try:
                harness.stub.NodeGetInfo(pb.NodeGetInfoRequest())
                harness.stub.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
                with contextlib.suppress(grpc.RpcError):  # NOT_FOUND between stages
                    harness.stub.NodeGetVolumeStats(
                        pb.NodeGetVolumeStatsRequest(
                            volume_id=vols[0].volume_id,
                            volume_path=str(tmp_path / vols[0].backend_id / "target"),
                        )
                    )
            except grpc.RpcError as exc:
                failures.append(f"side call: {exc.code().name}: {exc.details()}")
                return
            side_calls[0] += 1

    per_volume = STRESS_CYCLES // STRESS_VOLUMES
    workers = [threading.Thread(target=cycles, args=(v, per_volume)) for v in vols]
    side = [threading.Thread(target=side_rpcs) for _ in range(2)]
    for t in side + workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in side:
        t.join()
    assert failures == []
    assert side_calls[0] > 0
    assert not _mounts_under(tmp_path / vols[0].backend_id)
    assert not list((harness.config.node.state_dir / "volumes").glob("*.json"))
