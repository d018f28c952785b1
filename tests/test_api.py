"""The storage node's management API against a real node process (gRPC on loopback).

Owns the contract of proto/storage_node/v1/storage_node.proto as a client sees it:
idempotency, the status code and message of every kind of bad input, paging, tenant limits
(also under 50 concurrent calls), node capacity, attachments (address binding, revocation,
multi-node, surviving a restart), data kept by snapshots, clones and golden images (written
and read with qemu-io and qemu-img), reflinks on XFS, a full filesystem, and expansion.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from storage_node.v1 import storage_node_pb2 as pb
from tests.nbd.wire import go_data
from tests.support.api import Api, ApiNode, api_node
from tests.support.filesystems import loop_filesystem, mounted
from tests.support.qemu_io import qemu_io
from tests.support.rawnbd import RawClient

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
MAX_SIZE = 64 * TiB
READ, WRITE, FLUSH, TRIM = 0, 1, 3, 4
ENOSPC, EPERM = 28, 1
OPT_GO = 7
REP_ERR_UNKNOWN = (1 << 31) + 6
Code = grpc.StatusCode

_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


def expect(code: grpc.StatusCode, call: Callable[[], object]) -> str:
    """Run call, which must fail with `code`; return the status message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"{err.code()}: {err.details()}"
    details = err.details() or ""
    assert details and "internal error" not in details
    return details


def volume_ids(api: Api, tenant: str) -> list[str]:
    return [v.id for v in api.ListVolumes(pb.ListVolumesRequest(tenant=tenant)).volumes]


def attach(api: Api, volume_id: str, **kw: object) -> pb.Attachment:
    return api.publish(volume_id, **kw)  # type: ignore[arg-type]


def refused_from(port: int, export: str, source: str) -> bool:
    """True when the NBD handshake for `export` from `source` ends in NBD_REP_ERR_UNKNOWN."""
    client = RawClient(port, source=source, timeout=10)
    try:
        client.greet()
        replies = client.option(OPT_GO, go_data(export))
        return replies[-1][0] == REP_ERR_UNKNOWN
    finally:
        client.close()


def closed_without_reply(client: RawClient) -> bool:
    """The server closed the connection and sent nothing more (no reply to a request)."""
    client.sock.settimeout(10)
    try:
        return client.sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


@pytest.fixture(scope="module")
def import_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The node's --import-dir: ImportImage reads files only from there."""
    return tmp_path_factory.mktemp("imports")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, import_root: Path) -> Iterator[ApiNode]:
    # Two NBD workers: every attachment change must reach both.
    with api_node(
        tmp_path_factory.mktemp("api") / "node",
        workers=2,
        extra_args=["--import-dir", str(import_root)],
    ) as n:
        yield n
        print(n.log_text()[-6000:])


@pytest.fixture
def image_dir(import_root: Path) -> Path:
    """A directory of this test's own inside the node's import directory."""
    path = import_root / unique("t")
    path.mkdir()
    return path


@pytest.fixture
def api(node: ApiNode) -> Api:
    return node.api


@dataclass(frozen=True)
class Objects:
    """A few objects that bad-input cases refer to."""

    vol_a: pb.Volume
    snap_a: pb.Snapshot
    vol_b: pb.Volume
    snap_b: pb.Snapshot


@pytest.fixture(scope="module")
def objects(node: ApiNode) -> Objects:
    api = node.api
    vol_a = api.create_volume(unique("obj-a"), 8 * MiB, "tenant-a")
    snap_a = api.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap-a"), volume_id=vol_a.id))
    vol_b = api.create_volume(unique("obj-b"), 8 * MiB, "tenant-b")
    snap_b = api.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap-b"), volume_id=vol_b.id))
    return Objects(vol_a, snap_a, vol_b, snap_b)


# ---- idempotency --------------------------------------------------------------------------


def test_create_volume_twice_returns_the_same_volume(api: Api) -> None:
    name = unique("idem")
    first = api.create_volume(name, 4 * MiB)
    second = api.create_volume(name, 4 * MiB)
    assert (second.id, second.size_bytes, second.state) == (first.id, 4 * MiB, first.state)
    assert volume_ids(api, "tenant-a").count(first.id) == 1


@pytest.mark.parametrize(
    ("size", "tenant", "from_snapshot"),
    [(12 * MiB, "tenant-a", False), (8 * MiB, "tenant-other", False), (8 * MiB, "tenant-a", True)],
    ids=["other-size", "other-tenant", "other-source"],
)
def test_create_volume_same_name_other_parameters_already_exists(
    api: Api, objects: Objects, size: int, tenant: str, from_snapshot: bool
) -> None:
    """The first call makes an empty 8 MiB volume of tenant-a; the second differs in one way."""
    name = unique("idem-diff")
    api.create_volume(name, 8 * MiB, "tenant-a")
    snapshot = objects.snap_a.id if from_snapshot else ""
    message = expect(
        Code.ALREADY_EXISTS, lambda: api.create_volume(name, size, tenant, snapshot_id=snapshot)
    )
    assert name in message


def test_create_snapshot_twice_returns_the_same_snapshot(api: Api, objects: Objects) -> None:
    name = unique("idem-snap")
    request = pb.CreateSnapshotRequest(name=name, volume_id=objects.vol_a.id)
    first = api.CreateSnapshot(request)
    second = api.CreateSnapshot(request)
    assert first.ready and second.ready and first.id == second.id
    message = expect(
        Code.ALREADY_EXISTS,
        lambda: api.CreateSnapshot(pb.CreateSnapshotRequest(name=name, volume_id=objects.vol_b.id)),
    )
    assert name in message


def test_import_image_twice_returns_the_same_image(api: Api, image_dir: Path) -> None:
    raw = image_dir / "small.raw"
    raw.write_bytes(b"\x42" * 64 * KiB)
    other = image_dir / "other.raw"
    other.write_bytes(b"\x43" * 64 * KiB)
    name = unique("idem-img")
    first = api.ImportImage(pb.ImportImageRequest(name=name, path=str(raw)))
    second = api.ImportImage(pb.ImportImageRequest(name=name, path=str(raw)))
    assert first.id == second.id
    assert api.wait_image(first.id).ready
    expect(
        Code.ALREADY_EXISTS,
        lambda: api.ImportImage(pb.ImportImageRequest(name=name, path=str(other))),
    )
    expect(
        Code.ALREADY_EXISTS,
        lambda: api.ImportImage(
            pb.ImportImageRequest(name=name, path=str(raw), format=pb.IMAGE_FORMAT_QCOW2)
        ),
    )
    api.DeleteImage(pb.DeleteImageRequest(image_id=first.id))
    api.DeleteImage(pb.DeleteImageRequest(image_id=first.id))
    expect(Code.NOT_FOUND, lambda: api.GetImage(pb.GetImageRequest(image_id=first.id)))


def test_delete_twice_is_ok(api: Api) -> None:
    vol = api.create_volume(unique("del"), 4 * MiB)
    snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("del-snap"), volume_id=vol.id))
    for _ in range(2):
        api.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snap.id))
    for _ in range(2):
        api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id))
    expect(Code.NOT_FOUND, lambda: api.GetVolume(pb.GetVolumeRequest(volume_id=vol.id)))
    expect(Code.NOT_FOUND, lambda: api.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snap.id)))
    # Never existed at all: still OK (CSI DeleteVolume/DeleteSnapshot semantics).
    api.DeleteVolume(pb.DeleteVolumeRequest(volume_id="vol-0123456789abcdef"))
    api.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="snap-0123456789abcdef"))


def test_publish_twice_same_attachment_and_unpublish_twice_ok(api: Api) -> None:
    vol = api.create_volume(unique("pub"), 4 * MiB)
    first = attach(api, vol.id)
    second = attach(api, vol.id)
    assert first.export_name == second.export_name and first.uri == second.uri
    expect(Code.ALREADY_EXISTS, lambda: attach(api, vol.id, readonly=True))
    api.unpublish(vol.id)
    api.unpublish(vol.id)
    assert not api.ListAttachments(pb.ListAttachmentsRequest(volume_id=vol.id)).attachments
    api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id))


@pytest.mark.parametrize("kind", ["volume", "snapshot", "image"])
def test_names_of_128_characters_work_129_do_not(api: Api, kind: str, image_dir: Path) -> None:
    raw = image_dir / "img.raw"
    raw.write_bytes(b"\0" * 4096)
    base = unique(kind)
    ok_name = (base + "x" * 128)[:128]
    long_name = ok_name + "y"
    vol = api.create_volume(unique("for-names"), 4 * MiB)

    def create(name: str) -> str:
        if kind == "volume":
            return api.create_volume(name, 4 * MiB).name
        if kind == "snapshot":
            return api.CreateSnapshot(pb.CreateSnapshotRequest(name=name, volume_id=vol.id)).name
        return api.ImportImage(pb.ImportImageRequest(name=name, path=str(raw))).name

    assert create(ok_name) == ok_name
    assert create(ok_name) == ok_name  # and idempotent
    message = expect(Code.INVALID_ARGUMENT, lambda: create(long_name))
    assert "128" in message


# ---- bad input ----------------------------------------------------------------------------

UNKNOWN_VOL = "vol-00000000deadbeef"
UNKNOWN_SNAP = "snap-00000000deadbeef"
UNKNOWN_IMG = "img-00000000deadbeef"


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable[[Api, Objects], object]
    code: grpc.StatusCode
    says: str  # a fragment the message must hold


def _vol(name: str, size: int, tenant: str = "tenant-a", **source: str) -> Callable[..., object]:
    return lambda api, o: api.create_volume(name, size, tenant, **source)


BAD_INPUT = [
    # names
    Bad("name-empty", _vol("", 4 * MiB), Code.INVALID_ARGUMENT, "name"),
    Bad("name-with-space", _vol("a b", 4 * MiB), Code.INVALID_ARGUMENT, "name"),
    Bad("name-with-newline", _vol("a\nb", 4 * MiB), Code.INVALID_ARGUMENT, "name"),
    Bad("name-129", _vol("n" * 129, 4 * MiB), Code.INVALID_ARGUMENT, "128"),
    # sizes
    Bad("size-zero", _vol("bad-size-0", 0), Code.INVALID_ARGUMENT, "size"),
    Bad("size-unaligned", _vol("bad-size-1", 4 * MiB + 512), Code.INVALID_ARGUMENT, "4096"),
    Bad("size-above-max", _vol("bad-size-2", MAX_SIZE + 4096), Code.INVALID_ARGUMENT, "size"),
    # tenants
    Bad("tenant-empty", _vol("bad-tenant-0", 4 * MiB, ""), Code.INVALID_ARGUMENT, "tenant"),
    Bad("tenant-spaces", _vol("bad-tenant-1", 4 * MiB, "a b"), Code.INVALID_ARGUMENT, "tenant"),
    Bad("tenant-slash", _vol("bad-tenant-2", 4 * MiB, "a/b"), Code.INVALID_ARGUMENT, "tenant"),
    # sources
    Bad(
        "source-snapshot-malformed",
        _vol("bad-src-0", 8 * MiB, snapshot_id="snap-xyz"),
        Code.INVALID_ARGUMENT,
        "snap-xyz",
    ),
    Bad(
        "source-snapshot-is-a-volume-id",
        _vol("bad-src-1", 8 * MiB, snapshot_id=UNKNOWN_VOL),
        Code.INVALID_ARGUMENT,
        UNKNOWN_VOL,
    ),
    Bad(
        "source-snapshot-unknown",
        _vol("bad-src-2", 8 * MiB, snapshot_id=UNKNOWN_SNAP),
        Code.NOT_FOUND,
        UNKNOWN_SNAP,
    ),
    Bad(
        "source-volume-unknown",
        _vol("bad-src-3", 8 * MiB, volume_id=UNKNOWN_VOL),
        Code.NOT_FOUND,
        UNKNOWN_VOL,
    ),
    Bad(
        "source-image-unknown",
        _vol("bad-src-4", 8 * MiB, image_id=UNKNOWN_IMG),
        Code.NOT_FOUND,
        UNKNOWN_IMG,
    ),
    Bad(
        "clone-other-tenants-snapshot",
        lambda api, o: api.create_volume("bad-src-5", 8 * MiB, "tenant-a", snapshot_id=o.snap_b.id),
        Code.NOT_FOUND,
        "does not exist",
    ),
    Bad(
        "clone-other-tenants-volume",
        lambda api, o: api.create_volume("bad-src-6", 8 * MiB, "tenant-a", volume_id=o.vol_b.id),
        Code.NOT_FOUND,
        "does not exist",
    ),
    Bad(
        "clone-smaller-than-snapshot",
        lambda api, o: api.create_volume("bad-src-7", 4 * MiB, "tenant-a", snapshot_id=o.snap_a.id),
        Code.INVALID_ARGUMENT,
        "smaller",
    ),
    Bad(
        "clone-smaller-than-volume",
        lambda api, o: api.create_volume("bad-src-8", 4 * MiB, "tenant-a", volume_id=o.vol_a.id),
        Code.INVALID_ARGUMENT,
        "smaller",
    ),
    # ids
    Bad(
        "get-volume-empty-id",
        lambda api, o: api.GetVolume(pb.GetVolumeRequest(volume_id="")),
        Code.INVALID_ARGUMENT,
        "vol id",
    ),
    Bad(
        "get-volume-malformed-id",
        lambda api, o: api.GetVolume(pb.GetVolumeRequest(volume_id="vol-12")),
        Code.INVALID_ARGUMENT,
        "vol-12",
    ),
    Bad(
        "get-volume-snapshot-id",
        lambda api, o: api.GetVolume(pb.GetVolumeRequest(volume_id=o.snap_a.id)),
        Code.INVALID_ARGUMENT,
        "vol id",
    ),
    Bad(
        "get-volume-unknown",
        lambda api, o: api.GetVolume(pb.GetVolumeRequest(volume_id=UNKNOWN_VOL)),
        Code.NOT_FOUND,
        UNKNOWN_VOL,
    ),
    Bad(
        "get-snapshot-malformed",
        lambda api, o: api.GetSnapshot(pb.GetSnapshotRequest(snapshot_id="snap-../../etc")),
        Code.INVALID_ARGUMENT,
        "snap id",
    ),
    Bad(
        "get-snapshot-unknown",
        lambda api, o: api.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=UNKNOWN_SNAP)),
        Code.NOT_FOUND,
        UNKNOWN_SNAP,
    ),
    Bad(
        "get-image-malformed",
        lambda api, o: api.GetImage(pb.GetImageRequest(image_id="img-")),
        Code.INVALID_ARGUMENT,
        "img id",
    ),
    Bad(
        "get-image-unknown",
        lambda api, o: api.GetImage(pb.GetImageRequest(image_id=UNKNOWN_IMG)),
        Code.NOT_FOUND,
        UNKNOWN_IMG,
    ),
    Bad(
        "delete-volume-malformed",
        lambda api, o: api.DeleteVolume(pb.DeleteVolumeRequest(volume_id="../x")),
        Code.INVALID_ARGUMENT,
        "vol id",
    ),
    Bad(
        "delete-snapshot-malformed",
        lambda api, o: api.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="x")),
        Code.INVALID_ARGUMENT,
        "snap id",
    ),
    # expand
    Bad(
        "expand-unknown",
        lambda api, o: api.ExpandVolume(
            pb.ExpandVolumeRequest(volume_id=UNKNOWN_VOL, size_bytes=16 * MiB)
        ),
        Code.NOT_FOUND,
        UNKNOWN_VOL,
    ),
    Bad(
        "expand-shrink",
        lambda api, o: api.ExpandVolume(
            pb.ExpandVolumeRequest(volume_id=o.vol_a.id, size_bytes=4 * MiB)
        ),
        Code.FAILED_PRECONDITION,
        "shrink",
    ),
    Bad(
        "expand-unaligned",
        lambda api, o: api.ExpandVolume(
            pb.ExpandVolumeRequest(volume_id=o.vol_a.id, size_bytes=16 * MiB + 1)
        ),
        Code.INVALID_ARGUMENT,
        "4096",
    ),
    Bad(
        "expand-above-max",
        lambda api, o: api.ExpandVolume(
            pb.ExpandVolumeRequest(volume_id=o.vol_a.id, size_bytes=MAX_SIZE + 4096)
        ),
        Code.INVALID_ARGUMENT,
        "size",
    ),
    # snapshots
    Bad(
        "snapshot-of-missing-volume",
        lambda api, o: api.CreateSnapshot(
            pb.CreateSnapshotRequest(name="bad-snap-0", volume_id=UNKNOWN_VOL)
        ),
        Code.NOT_FOUND,
        UNKNOWN_VOL,
    ),
    Bad(
        "snapshot-of-malformed-volume",
        lambda api, o: api.CreateSnapshot(
            pb.CreateSnapshotRequest(name="bad-snap-1", volume_id="")
        ),
        Code.INVALID_ARGUMENT,
        "vol id",
    ),
    Bad(
        "snapshot-name-empty",
        lambda api, o: api.CreateSnapshot(pb.CreateSnapshotRequest(name="", volume_id=o.vol_a.id)),
        Code.INVALID_ARGUMENT,
        "name",
    ),
    # attachments
    Bad(
        "publish-bad-address",
        lambda api, o: attach(api, o.vol_a.id, address="not-an-ip"),
        Code.INVALID_ARGUMENT,
        "not-an-ip",
    ),
    Bad(
        "publish-address-with-port",
        lambda api, o: attach(api, o.vol_a.id, address="127.0.0.1:10809"),
        Code.INVALID_ARGUMENT,
        "IP address",
    ),
    Bad(
        "publish-empty-address",
        lambda api, o: attach(api, o.vol_a.id, address=""),
        Code.INVALID_ARGUMENT,
        "node_address",
    ),
    Bad(
        "publish-empty-node",
        lambda api, o: attach(api, o.vol_a.id, node_id=""),
        Code.INVALID_ARGUMENT,
        "node_id",
    ),
    Bad(
        "publish-unknown-volume",
        lambda api, o: attach(api, UNKNOWN_VOL),
        Code.NOT_FOUND,
        UNKNOWN_VOL,
    ),
    # QoS and limits: uint64 on the wire, at most 2**63-1 here
    Bad(
        "qos-above-int64",
        lambda api, o: api.CreateVolume(
            pb.CreateVolumeRequest(
                name="bad-qos-0", tenant="tenant-a", size_bytes=4 * MiB, qos=pb.Qos(iops=2**64 - 1)
            )
        ),
        Code.INVALID_ARGUMENT,
        "qos_iops",
    ),
    Bad(
        "set-qos-above-int64",
        lambda api, o: api.SetVolumeQos(
            pb.SetVolumeQosRequest(volume_id=o.vol_a.id, qos=pb.Qos(bytes_per_second=2**63))
        ),
        Code.INVALID_ARGUMENT,
        "qos_bytes_per_second",
    ),
    Bad(
        "tenant-capacity-above-int64",
        lambda api, o: api.SetTenantLimits(
            pb.SetTenantLimitsRequest(
                name="tenant-a", limits=pb.TenantLimits(capacity_bytes=2**64 - 1)
            )
        ),
        Code.INVALID_ARGUMENT,
        "capacity_bytes",
    ),
    Bad(
        "tenant-qos-above-int64",
        lambda api, o: api.SetTenantLimits(
            pb.SetTenantLimitsRequest(
                name="tenant-a", limits=pb.TenantLimits(qos=pb.Qos(iops=2**63))
            )
        ),
        Code.INVALID_ARGUMENT,
        "qos_iops",
    ),
    # images, listing, tenants
    Bad(
        "import-relative-path",
        lambda api, o: api.ImportImage(pb.ImportImageRequest(name="bad-img-0", path="a.qcow2")),
        Code.INVALID_ARGUMENT,
        "absolute",
    ),
    Bad(
        "import-missing-file",
        lambda api, o: api.ImportImage(
            pb.ImportImageRequest(name="bad-img-1", path="/nonexistent/a.qcow2")
        ),
        Code.INVALID_ARGUMENT,
        "/nonexistent/a.qcow2",
    ),
    Bad(
        "list-volumes-bad-token",
        lambda api, o: api.ListVolumes(pb.ListVolumesRequest(page_token="garbage")),
        Code.INVALID_ARGUMENT,
        "garbage",
    ),
    Bad(
        "list-snapshots-bad-token",
        lambda api, o: api.ListSnapshots(pb.ListSnapshotsRequest(page_token="vol-0")),
        Code.INVALID_ARGUMENT,
        "vol-0",
    ),
    Bad(
        "list-volumes-bad-tenant",
        lambda api, o: api.ListVolumes(pb.ListVolumesRequest(tenant="no such/tenant")),
        Code.INVALID_ARGUMENT,
        "no such/tenant",
    ),
    Bad(
        "list-snapshots-bad-volume",
        lambda api, o: api.ListSnapshots(pb.ListSnapshotsRequest(volume_id="disk-1")),
        Code.INVALID_ARGUMENT,
        "disk-1",
    ),
    Bad(
        "get-tenant-bad-name",
        lambda api, o: api.GetTenant(pb.GetTenantRequest(name="no such/tenant")),
        Code.INVALID_ARGUMENT,
        "tenant",
    ),
    Bad(
        "set-limits-bad-name",
        lambda api, o: api.SetTenantLimits(pb.SetTenantLimitsRequest(name="")),
        Code.INVALID_ARGUMENT,
        "tenant",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c.id for c in BAD_INPUT])
def test_bad_input_gets_the_documented_status(api: Api, objects: Objects, case: Bad) -> None:
    message = expect(case.code, lambda: case.call(api, objects))
    assert case.says in message, message
    # Nothing was left behind, and the node keeps serving other calls.
    assert api.GetVolume(pb.GetVolumeRequest(volume_id=objects.vol_a.id)).state == (
        pb.VOLUME_STATE_READY
    )
    names = {v.name for v in api.ListVolumes(pb.ListVolumesRequest()).volumes}
    assert not any(n.startswith("bad-") for n in names)


@pytest.mark.parametrize("token", [None, "", "Bearer wrong-token-0123456789"], ids=str)
def test_calls_without_the_token_are_unauthenticated(node: ApiNode, token: str | None) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{node.api_port}") as channel:
        api = Api(channel, "x")
        api.metadata = () if token is None else (("authorization", token),)
        message = expect(Code.UNAUTHENTICATED, lambda: api.GetNodeInfo(pb.GetNodeInfoRequest()))
        assert "token" in message


def test_unknown_tenant_is_empty_not_an_error(api: Api) -> None:
    tenant = api.GetTenant(pb.GetTenantRequest(name="never-seen"))
    assert tenant.name == "never-seen"
    usage, limits = tenant.usage, tenant.limits
    assert (usage.provisioned_bytes, usage.allocated_bytes, usage.volumes, usage.snapshots) == (
        0,
        0,
        0,
        0,
    )
    assert (limits.capacity_bytes, limits.volumes, limits.snapshots) == (0, 0, 0)
    assert not api.ListVolumes(pb.ListVolumesRequest(tenant="never-seen")).volumes
    assert not api.ListSnapshots(pb.ListSnapshotsRequest(tenant="never-seen")).snapshots


# ---- paging -------------------------------------------------------------------------------


def _pages(fetch: Callable[[int, str], tuple[list[str], str]], page_size: int) -> list[str]:
    seen: list[str] = []
    token = ""
    for _ in range(1000):
        ids, token = fetch(page_size, token)
        assert len(ids) <= (page_size or 100)
        seen += ids
        if not token:
            return seen
    raise AssertionError("paging never ended")


def test_list_volumes_and_snapshots_page_by_page(api: Api) -> None:
    tenant = unique("paging")
    vols = [api.create_volume(unique("page"), 4 * MiB, tenant).id for _ in range(7)]
    snaps = [
        api.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("page-snap"), volume_id=vols[0])).id
        for _ in range(5)
    ]
    api.create_volume(unique("page-other"), 4 * MiB, tenant + "-x")  # another tenant: not listed

    def list_volumes(size: int, token: str) -> tuple[list[str], str]:
        r = api.ListVolumes(pb.ListVolumesRequest(tenant=tenant, page_size=size, page_token=token))
        return [v.id for v in r.volumes], r.next_page_token

    def list_snapshots(size: int, token: str) -> tuple[list[str], str]:
        r = api.ListSnapshots(
            pb.ListSnapshotsRequest(tenant=tenant, page_size=size, page_token=token)
        )
        return [s.id for s in r.snapshots], r.next_page_token

    def list_snapshots_of_volume(size: int, token: str) -> tuple[list[str], str]:
        r = api.ListSnapshots(
            pb.ListSnapshotsRequest(volume_id=vols[0], page_size=size, page_token=token)
        )
        return [s.id for s in r.snapshots], r.next_page_token

    for page_size in range(1, len(vols) + 2):
        got = _pages(list_volumes, page_size)
        assert sorted(got) == sorted(vols), page_size
    for page_size in range(1, len(snaps) + 2):
        assert sorted(_pages(list_snapshots, page_size)) == sorted(snaps), page_size
        assert sorted(_pages(list_snapshots_of_volume, page_size)) == sorted(snaps), page_size
    # page_size 0 means the server's default, which holds all of these.
    assert sorted(_pages(list_volumes, 0)) == sorted(vols)


def test_list_by_name_finds_at_most_one(api: Api) -> None:
    """The CSI controller looks a name up on every node before it creates anything."""
    tenant = unique("by-name")
    name = unique("named")
    vol = api.create_volume(name, 4 * MiB, tenant)
    snap_name = unique("named-snap")
    snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name=snap_name, volume_id=vol.id))
    found = api.ListVolumes(pb.ListVolumesRequest(name=name)).volumes
    assert [v.id for v in found] == [vol.id]
    assert [v.id for v in api.ListVolumes(pb.ListVolumesRequest(name=name, tenant=tenant)).volumes]
    assert not api.ListVolumes(pb.ListVolumesRequest(name=name, tenant=tenant + "-x")).volumes
    assert not api.ListVolumes(pb.ListVolumesRequest(name=unique("nothing"))).volumes
    request = pb.ListSnapshotsRequest(name=snap_name, volume_id=vol.id)
    assert [s.id for s in api.ListSnapshots(request).snapshots] == [snap.id]
    other = api.create_volume(unique("named-other"), 4 * MiB, tenant)
    request = pb.ListSnapshotsRequest(name=snap_name, volume_id=other.id)
    assert not api.ListSnapshots(request).snapshots


# ---- tenant limits ------------------------------------------------------------------------


def _limits(
    api: Api, tenant: str, capacity_bytes: int = 0, volumes: int = 0, snapshots: int = 0
) -> None:
    limits = pb.TenantLimits(capacity_bytes=capacity_bytes, volumes=volumes, snapshots=snapshots)
    api.SetTenantLimits(pb.SetTenantLimitsRequest(name=tenant, limits=limits))


@pytest.mark.parametrize("limit", ["capacity", "capacity-by-expand", "volumes", "snapshots"])
def test_tenant_limit_is_resource_exhausted_with_the_numbers(api: Api, limit: str) -> None:
    tenant = unique(f"limit-{limit}")
    if limit == "capacity":
        _limits(api, tenant, capacity_bytes=20 * MiB)
        api.create_volume(unique("cap"), 12 * MiB, tenant)
        message = expect(
            Code.RESOURCE_EXHAUSTED, lambda: api.create_volume(unique("cap"), 12 * MiB, tenant)
        )
        for fragment in (tenant, "20.0 MiB", "12.0 MiB"):
            assert fragment in message, message
        api.create_volume(unique("cap"), 8 * MiB, tenant)  # exactly up to the limit
    elif limit == "capacity-by-expand":
        _limits(api, tenant, capacity_bytes=20 * MiB)
        vol = api.create_volume(unique("grow"), 12 * MiB, tenant)
        message = expect(
            Code.RESOURCE_EXHAUSTED,
            lambda: api.ExpandVolume(pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=24 * MiB)),
        )
        for fragment in (tenant, "20.0 MiB", "12.0 MiB"):
            assert fragment in message, message
        assert api.GetVolume(pb.GetVolumeRequest(volume_id=vol.id)).size_bytes == 12 * MiB
        api.ExpandVolume(pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=20 * MiB))
    elif limit == "volumes":
        _limits(api, tenant, volumes=2)
        for _ in range(2):
            api.create_volume(unique("count"), 4 * MiB, tenant)
        message = expect(
            Code.RESOURCE_EXHAUSTED, lambda: api.create_volume(unique("count"), 4 * MiB, tenant)
        )
        assert tenant in message and "2 volumes" in message and "has 2" in message, message
    else:
        _limits(api, tenant, snapshots=1)
        vol = api.create_volume(unique("snaps"), 4 * MiB, tenant)
        api.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("s"), volume_id=vol.id))
        message = expect(
            Code.RESOURCE_EXHAUSTED,
            lambda: api.CreateSnapshot(
                pb.CreateSnapshotRequest(name=unique("s"), volume_id=vol.id)
            ),
        )
        assert tenant in message and "1 snapshots" in message and "has 1" in message, message
    usage = api.GetTenant(pb.GetTenantRequest(name=tenant))
    lim = usage.limits
    assert not lim.capacity_bytes or usage.usage.provisioned_bytes <= lim.capacity_bytes
    assert not lim.volumes or usage.usage.volumes <= lim.volumes
    assert not lim.snapshots or usage.usage.snapshots <= lim.snapshots


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [
        ({"volumes": 7}, 7),
        ({"capacity_bytes": 5 * 4 * MiB}, 5),
        ({"volumes": 9, "capacity_bytes": 3 * 4 * MiB}, 3),
    ],
    ids=["volume-count", "capacity", "both"],
)
def test_concurrent_creates_never_exceed_tenant_limits(
    api: Api, limits: dict[str, int], allowed: int
) -> None:
    tenant = unique("burst")
    _limits(api, tenant, **limits)

    def create(i: int) -> grpc.StatusCode:
        try:
            api.create_volume(f"{tenant}-{i}", 4 * MiB, tenant)
            return Code.OK
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(create, range(50)))
    assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}, codes
    assert codes.count(Code.OK) == allowed
    t = api.GetTenant(pb.GetTenantRequest(name=tenant))
    assert t.usage.volumes == allowed and t.usage.provisioned_bytes == allowed * 4 * MiB
    assert len(volume_ids(api, tenant)) == allowed


def test_concurrent_creates_of_one_name_make_one_volume(api: Api) -> None:
    name = unique("same-name")

    def create(_: int) -> str:
        try:
            return api.create_volume(name, 4 * MiB, "tenant-same").id
        except grpc.RpcError as exc:
            assert exc.code() == Code.ABORTED, exc
            return ""

    with ThreadPoolExecutor(50) as pool:
        ids = {i for i in pool.map(create, range(50)) if i}
    assert len(ids) == 1
    assert [v.id for v in api.ListVolumes(pb.ListVolumesRequest(tenant="tenant-same")).volumes] == [
        *ids
    ]


# ---- node capacity ------------------------------------------------------------------------


def test_node_capacity_is_resource_exhausted_naming_the_node(tmp_path: Path) -> None:
    with api_node(tmp_path / "node", extra_args=["--overcommit-ratio", "0.0001"]) as n:
        api = n.api
        cap = api.GetCapacity(pb.GetCapacityRequest())
        assert cap.overcommit_ratio == pytest.approx(0.0001)
        fits = cap.available_bytes // 4096 * 4096
        assert fits > 0, cap
        message = expect(
            Code.RESOURCE_EXHAUSTED, lambda: api.create_volume("too-big", fits + 4096, "t")
        )
        assert "storage-test" in message and "overcommit" in message, message
        api.create_volume("fits", fits, "t")
        assert api.GetCapacity(pb.GetCapacityRequest()).available_bytes < 4096
        expect(Code.RESOURCE_EXHAUSTED, lambda: api.create_volume("one-more", 4096, "t"))


# ---- attachments --------------------------------------------------------------------------


def test_publish_gives_a_uri_that_works_only_from_the_attached_address(
    node: ApiNode, api: Api
) -> None:
    vol = api.create_volume(unique("att"), 4 * MiB)
    att = attach(api, vol.id, address="127.0.0.1")
    assert att.uri == f"nbd://127.0.0.1:{node.nbd_port}/{att.export_name}"
    assert att.export_name != vol.id and vol.id in att.export_name
    qemu_io(att.uri, "write -P 0x3c 0 64k", "read -P 0x3c 0 64k")
    assert refused_from(node.nbd_port, att.export_name, "127.0.0.2")
    # The volume's id alone is no export name, not even from the attached address.
    assert refused_from(node.nbd_port, vol.id, "127.0.0.1")
    # Another volume's attachment does not open this one.
    api.unpublish(vol.id)
    assert refused_from(node.nbd_port, att.export_name, "127.0.0.1")


def test_readonly_attachment_refuses_writes(node: ApiNode, api: Api) -> None:
    vol = api.create_volume(unique("ro"), 4 * MiB)
    att = attach(api, vol.id, readonly=True)
    qemu_io(att.uri, "read -P 0 0 64k", read_only=True)
    # qemu-io sees the export is read-only and refuses to open it for writing ...
    result = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", att.uri],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "Permission denied" in result.stderr + result.stdout
    # ... and a client that writes anyway gets EPERM.
    client = RawClient(node.nbd_port).connect(att.export_name)
    try:
        assert client.call(WRITE, 1, 0, 4096, payload=b"\1" * 4096).error == EPERM
        assert client.call(READ, 2, 0, 4096).data == bytes(4096)
    finally:
        client.close()
    api.unpublish(vol.id)


def test_unpublish_drops_a_live_connection_at_once(node: ApiNode, api: Api) -> None:
    vol = api.create_volume(unique("drop"), 4 * MiB)
    att = attach(api, vol.id)
    # Two connections: with two NBD workers, one lands on each.
    clients = [RawClient(node.nbd_port).connect(att.export_name) for _ in range(2)]
    try:
        for c in clients:
            assert c.call(WRITE, 1, 0, 4096, payload=b"\x11" * 4096).error == 0
            assert c.call(READ, 2, 0, 4096).data == b"\x11" * 4096
        api.unpublish(vol.id)
        # The fence is done when Unpublish returns: the next request gets no answer.
        for c in clients:
            with contextlib.suppress(OSError):
                c.send(READ, 3, 0, 4096)
            assert closed_without_reply(c)
    finally:
        for c in clients:
            c.close()
    assert refused_from(node.nbd_port, att.export_name, "127.0.0.1")


@pytest.mark.parametrize(
    ("first_multi", "second_multi", "allowed"),
    [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
    ids=["single-single", "multi-single", "single-multi", "multi-multi"],
)
def test_second_node_needs_every_attachment_multi_node(
    node: ApiNode, api: Api, first_multi: bool, second_multi: bool, allowed: bool
) -> None:
    vol = api.create_volume(unique("multi"), 4 * MiB)
    first = attach(api, vol.id, node_id="node-1", multi_node=first_multi)
    if allowed:
        second = attach(api, vol.id, node_id="node-2", multi_node=second_multi)
        assert second.export_name != first.export_name
        got = api.ListAttachments(pb.ListAttachmentsRequest(volume_id=vol.id)).attachments
        assert sorted(a.node_id for a in got) == ["node-1", "node-2"]
        qemu_io(first.uri, "write -P 0x77 0 4k")
        qemu_io(second.uri, "read -P 0x77 0 4k")
        api.unpublish(vol.id, "node-2")
    else:
        message = expect(
            Code.FAILED_PRECONDITION,
            lambda: attach(api, vol.id, node_id="node-2", multi_node=second_multi),
        )
        assert "node-1" in message and "multi" in message, message
    api.unpublish(vol.id, "node-1")
    # Once the first node is gone, the second may attach alone.
    attach(api, vol.id, node_id="node-2")
    api.unpublish(vol.id, "node-2")


def test_publish_keeps_the_address_in_canonical_form(api: Api) -> None:
    """The NBD server compares it with the peer address the socket reports."""
    vol = api.create_volume(unique("canon"), 4 * MiB)
    att = attach(api, vol.id, address="0:0::1")
    assert att.node_address == "::1"
    assert attach(api, vol.id, address="::1").export_name == att.export_name
    api.unpublish(vol.id)


def test_deleting_a_published_volume_fails_until_unpublished(api: Api) -> None:
    vol = api.create_volume(unique("busy"), 4 * MiB)
    attach(api, vol.id)
    message = expect(
        Code.FAILED_PRECONDITION, lambda: api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id))
    )
    assert "node-1" in message
    api.unpublish(vol.id)
    api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id))


def test_attachments_survive_a_restart(tmp_path: Path) -> None:
    with api_node(tmp_path / "node") as n:
        vol = n.api.create_volume("survivor", 8 * MiB)
        att = attach(n.api, vol.id)
        other = n.api.create_volume("bystander", 8 * MiB)
        qemu_io(att.uri, "write -P 0x5e 1M 1M")
        n.restart()
        again = n.api.ListAttachments(pb.ListAttachmentsRequest(volume_id=vol.id)).attachments
        assert [a.uri for a in again] == [att.uri]
        qemu_io(att.uri, "read -P 0x5e 1M 1M", "read -P 0 0 1M")
        assert refused_from(n.nbd_port, att.export_name, "127.0.0.2")
        assert refused_from(n.nbd_port, other.id, "127.0.0.1")
        # Publishing again is still idempotent: the same credential.
        assert attach(n.api, vol.id).export_name == att.export_name


# ---- data: snapshots, clones, golden images, expansion ------------------------------------


def test_snapshot_and_clones_keep_their_point_in_time(api: Api) -> None:
    vol = api.create_volume(unique("src"), 16 * MiB)
    att = attach(api, vol.id)
    qemu_io(att.uri, "write -P 0xa1 0 2M", "write -P 0xa2 8M 1M")
    snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("pit"), volume_id=vol.id))
    assert snap.ready and snap.size_bytes == 16 * MiB
    qemu_io(att.uri, "write -P 0xb1 0 2M")
    from_snap = api.create_volume(unique("from-snap"), 24 * MiB, snapshot_id=snap.id)
    from_vol = api.create_volume(unique("from-vol"), 16 * MiB, volume_id=vol.id)
    assert api.wait_volume(from_snap.id).state == pb.VOLUME_STATE_READY
    assert api.wait_volume(from_vol.id).state == pb.VOLUME_STATE_READY
    uri = attach(api, from_snap.id).uri
    qemu_io(uri, "read -P 0xa1 0 2M", "read -P 0xa2 8M 1M", "read -P 0 9M 15M")
    assert api.GetVolume(pb.GetVolumeRequest(volume_id=from_snap.id)).size_bytes == 24 * MiB
    qemu_io(attach(api, from_vol.id).uri, "read -P 0xb1 0 2M", "read -P 0xa2 8M 1M")
    # The clone is independent of its source.
    qemu_io(uri, "write -P 0xc1 0 1M")
    qemu_io(att.uri, "read -P 0xb1 0 2M")
    for v in (vol, from_snap, from_vol):
        api.unpublish(v.id)


def test_golden_image_clones(api: Api, image_dir: Path) -> None:
    qcow2 = image_dir / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "32M"], check=True)
    qemu_io(str(qcow2), "write -P 0x6b 0 1M", "write -P 0x6c 30M 2M", fmt="qcow2")
    image = api.ImportImage(
        pb.ImportImageRequest(name=unique("golden"), path=str(qcow2), format=pb.IMAGE_FORMAT_QCOW2)
    )
    image = api.wait_image(image.id)
    assert image.ready and not image.error and image.size_bytes == 32 * MiB
    assert image.id in {i.id for i in api.ListImages(pb.ListImagesRequest()).images}
    expect(
        Code.INVALID_ARGUMENT,
        lambda: api.create_volume(unique("small"), 16 * MiB, image_id=image.id),
    )
    clones = [api.create_volume(unique("vm"), 64 * MiB, image_id=image.id) for _ in range(2)]
    for c in clones:
        assert api.wait_volume(c.id).state == pb.VOLUME_STATE_READY
        qemu_io(
            attach(api, c.id).uri,
            "read -P 0x6b 0 1M",
            "read -P 0 1M 29M",
            "read -P 0x6c 30M 2M",
            "read -P 0 32M 32M",
        )
        api.unpublish(c.id)


@pytest.mark.parametrize("kind", ["snapshot", "image"])
def test_source_in_use_by_a_filling_clone_is_not_deleted(
    api: Api, image_dir: Path, kind: str
) -> None:
    """A clone accepted as CREATING must not turn FAILED because its source was deleted."""
    vol = api.create_volume(unique("in-use"), 32 * MiB)
    qemu_io(attach(api, vol.id).uri, "write -P 0x4d 0 8M")
    api.unpublish(vol.id)
    if kind == "snapshot":
        source = api.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("s"), volume_id=vol.id))
        clone = api.create_volume(unique("c"), 32 * MiB, snapshot_id=source.id)

        def delete() -> None:
            api.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=source.id))
    else:
        raw = image_dir / "golden.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "32M"], check=True)
        qemu_io(str(raw), "write -P 0x4d 0 8M")
        image = api.wait_image(
            api.ImportImage(pb.ImportImageRequest(name=unique("i"), path=str(raw))).id
        )
        clone = api.create_volume(unique("c"), 32 * MiB, image_id=image.id)

        def delete() -> None:
            api.DeleteImage(pb.DeleteImageRequest(image_id=image.id))

    try:
        delete()
        deleted = True
    except grpc.RpcError as exc:
        assert exc.code() == Code.FAILED_PRECONDITION, exc
        details = exc.details() or ""
        assert "in use" in details and clone.id in details
        deleted = False
    done = api.wait_volume(clone.id)
    assert done.state == pb.VOLUME_STATE_READY, done.error
    if not deleted:
        delete()
    qemu_io(attach(api, clone.id).uri, "read -P 0x4d 0 8M", "read -P 0 8M 24M")
    api.unpublish(clone.id)


def test_import_of_a_broken_image_is_refused(api: Api, image_dir: Path) -> None:
    bad = image_dir / "bad.qcow2"
    bad.write_bytes(b"not a qcow2 image at all" * 100)
    name = unique("broken")
    message = expect(
        Code.INVALID_ARGUMENT,
        lambda: api.ImportImage(
            pb.ImportImageRequest(name=name, path=str(bad), format=pb.IMAGE_FORMAT_QCOW2)
        ),
    )
    assert "not a qcow2 image" in message
    assert name not in {i.name for i in api.ListImages(pb.ListImagesRequest()).images}


def test_expand_volume_is_seen_by_a_new_connection(node: ApiNode, api: Api) -> None:
    vol = api.create_volume(unique("grow"), 16 * MiB)
    att = attach(api, vol.id)
    old = RawClient(node.nbd_port).connect(att.export_name)
    try:
        assert old.size == 16 * MiB
        assert old.call(WRITE, 1, 16 * MiB - 4096, 4096, payload=b"\x99" * 4096).error == 0
        grown = api.ExpandVolume(pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=48 * MiB))
        assert grown.size_bytes == 48 * MiB
        # Idempotent: the same size again is OK.
        api.ExpandVolume(pb.ExpandVolumeRequest(volume_id=vol.id, size_bytes=48 * MiB))
        assert api.GetVolume(pb.GetVolumeRequest(volume_id=vol.id)).size_bytes == 48 * MiB
        new = RawClient(node.nbd_port).connect(att.export_name)
        try:
            assert new.size == 48 * MiB
            assert new.call(READ, 1, 16 * MiB - 4096, 4096).data == b"\x99" * 4096
            assert new.call(WRITE, 2, 48 * MiB - 4096, 4096, payload=b"\x98" * 4096).error == 0
            assert new.call(READ, 3, 32 * MiB, 4096).data == bytes(4096)
        finally:
            new.close()
    finally:
        old.close()
    qemu_io(att.uri, f"read -P 0x98 {48 * MiB - 4096} 4k")
    api.unpublish(vol.id)


# ---- filesystems: reflink on XFS, a full tmpfs --------------------------------------------


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shared_extents(path: Path) -> int:
    out = subprocess.run(
        ["filefrag", "-v", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return sum(1 for line in out.splitlines() if "shared" in line)


def test_snapshot_on_xfs_is_a_reflink(tmp_path: Path) -> None:
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is missing (Debian package xfsprogs)")
    with (
        loop_filesystem(tmp_path, "xfs", 512 * MiB, "-m", "reflink=1") as mnt,
        api_node(mnt / "node") as n,
    ):
        api = n.api
        vol = api.create_volume("big", 128 * MiB)
        att = attach(api, vol.id)
        qemu_io(att.uri, "write -P 0x2f 0 64M", "flush")
        vol_path = mnt / "node" / "volumes" / f"{vol.id}.img"
        os.sync()
        before = used_bytes(mnt)
        snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name="snap", volume_id=vol.id))
        os.sync()
        grew = used_bytes(mnt) - before
        assert grew < 8 * MiB, f"a 64 MiB snapshot took {grew} bytes: not a reflink"
        snap_path = mnt / "node" / "snapshots" / f"{snap.id}.img"
        assert shared_extents(snap_path) > 0 and shared_extents(vol_path) > 0
        # Copy-on-write: overwriting the volume leaves the snapshot as it was.
        qemu_io(att.uri, "write -P 0x30 0 1M")
        clone = api.create_volume("clone", 128 * MiB, snapshot_id=snap.id)
        assert api.wait_volume(clone.id).state == pb.VOLUME_STATE_READY
        qemu_io(attach(api, clone.id).uri, "read -P 0x2f 0 64M", "read -P 0 64M 64M")
        for v in (vol, clone):
            api.unpublish(v.id)


def test_full_filesystem_fails_cleanly(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", "-t", "tmpfs", "-o", "size=8m", "tmpfs") as mnt:
        data = mnt / "node"
        with api_node(data, extra_args=["--overcommit-ratio", "100"]) as n:
            api = n.api
            # Thin: far more than the 8 MiB there is.
            vol = api.create_volume("thin", 64 * MiB)
            att = attach(api, vol.id)
            client = RawClient(n.nbd_port).connect(att.export_name)
            try:
                chunk = MiB
                for i in range(4):
                    payload = bytes([0x40 + i]) * chunk
                    assert client.call(WRITE, i, i * chunk, chunk, payload=payload).error == 0
                assert client.call(FLUSH, 9).error == 0
                # A snapshot needs 4 MiB more than is left: it fails, and leaves nothing.
                message = expect(
                    Code.RESOURCE_EXHAUSTED,
                    lambda: api.CreateSnapshot(
                        pb.CreateSnapshotRequest(name="no-room", volume_id=vol.id)
                    ),
                )
                assert "storage-test" in message or "space" in message, message
                assert not api.ListSnapshots(pb.ListSnapshotsRequest()).snapshots
                assert sorted(os.listdir(data / "snapshots")) == []
                # So does a clone of the volume: no row, no file.
                message = expect(
                    Code.RESOURCE_EXHAUSTED,
                    lambda: api.create_volume("no-room-clone", 64 * MiB, volume_id=vol.id),
                )
                assert "storage-test" in message, message
                assert [v.name for v in api.ListVolumes(pb.ListVolumesRequest()).volumes] == [
                    "thin"
                ]
                assert sorted(os.listdir(data / "volumes")) == [f"{vol.id}.img"]
                # Writes past the space: NBD ENOSPC, not a dropped connection.
                errors = []
                for i in range(4, 16):
                    payload = bytes([0x40 + i]) * chunk
                    errors.append(client.call(WRITE, i, i * chunk, chunk, payload=payload).error)
                    if errors[-1]:
                        break
                assert errors[-1] == ENOSPC, errors
                # What was written before is intact, and the node keeps serving.
                for i in range(4):
                    assert (
                        client.call(READ, 100 + i, i * chunk, chunk).data
                        == bytes([0x40 + i]) * chunk
                    )
                assert api.GetVolume(pb.GetVolumeRequest(volume_id=vol.id)).state == (
                    pb.VOLUME_STATE_READY
                )
                cap = api.GetCapacity(pb.GetCapacityRequest())
                assert cap.free_bytes < MiB and cap.total_bytes == 8 * MiB
                # Free space with TRIM, and the control path works again.
                assert client.call(TRIM, 200, 4 * chunk, 12 * chunk).error == 0
            finally:
                client.close()
            small = api.create_volume("after", 4 * MiB)
            snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name="fits", volume_id=small.id))
            assert snap.ready
            api.unpublish(vol.id)
            api.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id))
        assert not [p for p in data.rglob("*.tmp")]


def test_capacity_reports_provisioned_and_allocated(tmp_path: Path) -> None:
    with api_node(tmp_path / "node") as n:
        api = n.api
        vol = api.create_volume("cap", 32 * MiB)
        qemu_io(attach(api, vol.id).uri, "write -P 1 0 2M", "flush")
        cap = api.GetCapacity(pb.GetCapacityRequest())
        assert cap.provisioned_bytes == 32 * MiB
        assert 2 * MiB <= cap.allocated_bytes < 32 * MiB
        assert cap.available_bytes == int(cap.total_bytes * cap.overcommit_ratio) - 32 * MiB
        t = api.GetTenant(pb.GetTenantRequest(name="tenant-a"))
        assert t.usage.volumes == 1 and t.usage.allocated_bytes >= 2 * MiB
        tenants = api.ListTenants(pb.ListTenantsRequest()).tenants
        assert [x.name for x in tenants] == ["tenant-a"]


def test_volume_from_volume_while_it_is_written(node: ApiNode, api: Api) -> None:
    """A clone of a live volume is one point in time: every block is all-old or all-new."""
    vol = api.create_volume(unique("live"), 8 * MiB)
    att = attach(api, vol.id)
    client = RawClient(node.nbd_port).connect(att.export_name)
    try:
        with ThreadPoolExecutor(1) as pool:
            stop = False

            def writer() -> int:
                n = 0
                while not stop and n < 5000:
                    block = bytes([n % 251 + 1]) * 4096
                    assert client.call(WRITE, n, (n % 64) * 4096, 4096, payload=block).error == 0
                    n += 1
                return n

            future = pool.submit(writer)
            clone = api.create_volume(unique("live-clone"), 8 * MiB, volume_id=vol.id)
            stop = True
            assert future.result() > 0
    finally:
        client.close()
    assert api.wait_volume(clone.id).state == pb.VOLUME_STATE_READY
    check = RawClient(node.nbd_port).connect(attach(api, clone.id).export_name)
    try:
        for i in range(64):
            data = check.call(READ, i, i * 4096, 4096).data
            assert data == bytes([data[0]]) * 4096, f"block {i} is torn"
    finally:
        check.close()
    api.unpublish(clone.id)
    api.unpublish(vol.id)


@pytest.mark.parametrize("flag", [False, True], ids=["default", "no-default-export"])
def test_default_export_only_without_the_flag(tmp_path: Path, flag: bool) -> None:
    """A deployment passes --no-default-export: then nothing is served without an attachment."""
    extra = ["--no-default-export"] if flag else []
    with api_node(tmp_path, workers=0, exports=(), extra_args=extra) as node:
        listed = subprocess.run(
            ["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{node.nbd_port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    if flag:
        assert '"export-name": "demo"' not in listed.stdout, listed.stdout
    else:
        assert '"export-name": "demo"' in listed.stdout, listed.stdout + listed.stderr
