"""Thin imports: zeroes written to a volume become holes (docs/storage-node.md, "Thin writes").

A real storage node process on loopback, volumes made and published through its management API,
written by real NBD clients (qemu-img, nbdsh) through their attachment's export name, and the
image file's allocated blocks (st_blocks) read on the node's side. The source images are
sparse, with about a tenth of their size in data, laid out in 64 KiB clusters as qcow2 keeps
them. Also: TRIM and WRITE_ZEROES as before, the per-volume switch (`zero_detection_disabled`)
kept across a restart, golden image imports, and live copies seeing punched ranges as changed.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from storage_node.backend.file import ZERO_RUN, DirtyMap, FileBackend
from storage_node.v1 import storage_node_pb2 as pb
from tests.clients.targets import debian_python_env
from tests.support.api import Api, ApiNode, api_node
from tests.support.images import sparse_raw
from tests.support.rawnbd import RawClient

KiB, MiB = 1 << 10, 1 << 20
READ, WRITE, FLUSH, TRIM, ZERO = 0, 1, 3, 4, 6
FUA, NO_HOLE = 1, 2
_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def run(*argv: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{argv[0]}: {result.stdout}{result.stderr}"
    return result.stdout


def within_one_percent(got: int, data: int) -> bool:
    return abs(got - data) <= data // 100


@pytest.fixture(scope="module")
def import_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("thin-imports")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, import_root: Path) -> Iterator[ApiNode]:
    with api_node(
        tmp_path_factory.mktemp("thin") / "node",
        workers=1,
        extra_args=["--import-dir", str(import_root)],
    ) as n:
        yield n
        print(n.log_text()[-4000:])


@pytest.fixture
def api(node: ApiNode) -> Api:
    return node.api


def new_volume(api: Api, size: int, *, zero_detection_disabled: bool = False) -> pb.Volume:
    return api.CreateVolume(
        pb.CreateVolumeRequest(
            name=unique("thin"),
            tenant="tenant-thin",
            size_bytes=size,
            zero_detection_disabled=zero_detection_disabled,
        )
    )


def image_of(node: ApiNode, vol: pb.Volume) -> Path:
    return node.data_dir / "volumes" / f"{vol.id}.img"


def export_name(api: Api, vol: pb.Volume) -> str:
    return api.publish(vol.id).export_name


def uri(api: Api, vol: pb.Volume) -> str:
    return api.publish(vol.id).uri


def nbdsh(target: str, script: str) -> None:
    run("nbdsh", "-u", target, "-c", script, env=debian_python_env())


# ---- imports with QEMU's NBD client ---------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        # qemu-img's defaults: it finds the holes itself and sends WRITE_ZEROES for them.
        "qcow2",
        # -S 0: no zero detection in qemu-img, every zero goes over the wire as WRITE data.
        "raw-S0",
        # dd of the raw file: 1 MiB WRITEs, all data as far as the client knows.
        "dd",
    ],
)
def test_qemu_img_convert_onto_a_volume_allocates_only_the_data(
    node: ApiNode, api: Api, tmp_path: Path, variant: str
) -> None:
    size = 128 * MiB
    raw = tmp_path / "src.raw"
    data = sparse_raw(raw, size, seed=len(variant))
    vol = new_volume(api, size)
    target = uri(api, vol)
    if variant == "qcow2":
        qcow2 = tmp_path / "src.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
        run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(qcow2), target)
    elif variant == "raw-S0":
        run("qemu-img", "convert", "-n", "-S", "0", "-f", "raw", "-O", "raw", str(raw), target)
    else:
        nbdsh(
            target,
            f"with open({str(raw)!r}, 'rb') as f:\n"
            f"    for off in range(0, {size}, 1 << 20):\n"
            "        h.pwrite(f.read(1 << 20), off)\n"
            "h.flush()\n",
        )
    got = allocated(image_of(node, vol))
    assert within_one_percent(got, data), f"{got} bytes allocated for {data} bytes of data"
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), target)


def test_zero_writes_from_a_dd_like_writer_leave_nothing_allocated(node: ApiNode, api: Api) -> None:
    size = 16 * MiB
    vol = new_volume(api, size)
    target = uri(api, vol)
    nbdsh(
        target,
        f"import os\nfor off in range(0, {size}, 1 << 20):\n"
        "    h.pwrite(os.urandom(1 << 20), off)\n"
        "h.flush()\n",
    )
    assert allocated(image_of(node, vol)) >= size, "random data is allocated"
    # Zeroes over all of it, as dd if=/dev/zero would write them: 4 KiB requests (every other
    # one with FUA) over the first MiB, 1 MiB requests over the rest.
    nbdsh(
        target,
        "import nbd\n"
        "for i, off in enumerate(range(0, 1 << 20, 4096)):\n"
        "    h.pwrite(bytes(4096), off, nbd.CMD_FLAG_FUA if i % 2 else 0)\n"
        f"for off in range(1 << 20, {size}, 1 << 20):\n"
        "    h.pwrite(bytes(1 << 20), off)\n"
        "h.flush()\n"
        f"assert h.pread({size}, 0) == bytes({size})\n",
    )
    assert allocated(image_of(node, vol)) == 0


def test_a_large_write_punches_its_aligned_zero_runs_and_writes_the_rest(
    node: ApiNode, api: Api
) -> None:
    vol = new_volume(api, 8 * MiB)
    c = RawClient(node.nbd_port).connect(export_name(api, vol))
    try:
        payload = bytearray(MiB)
        payload[100] = 1  # in the first 64 KiB block
        payload[-1] = 2  # in the last one
        payload[5 * ZERO_RUN + 7] = 3  # in the sixth one
        assert c.call(WRITE, 1, 0, MiB, payload=bytes(payload), flags=FUA).error == 0
        assert allocated(image_of(node, vol)) == 3 * ZERO_RUN
        assert c.call(READ, 2, 0, MiB).data == payload  # READ
        # Not aligned to 64 KiB: only the aligned blocks inside it are punched; its first
        # 60 KiB and last 4 KiB are written.
        payload = bytearray(MiB)
        payload[0] = payload[-1] = 4
        assert c.call(WRITE, 3, 4 * MiB + 4 * KiB, MiB, payload=bytes(payload)).error == 0
        assert allocated(image_of(node, vol)) == 3 * ZERO_RUN + 64 * KiB
        assert c.call(READ, 4, 4 * MiB + 4 * KiB, MiB).data == payload
        # A small write of zeroes that is not whole 4 KiB blocks stays a write.
        assert c.call(WRITE, 5, 7 * MiB + 512, 512, payload=bytes(512)).error == 0
        assert allocated(image_of(node, vol)) == 3 * ZERO_RUN + 64 * KiB + 4 * KiB
    finally:
        c.close()


def test_trim_and_write_zeroes_work_as_before(node: ApiNode, api: Api) -> None:
    vol = new_volume(api, 4 * MiB)
    path = image_of(node, vol)
    c = RawClient(node.nbd_port).connect(export_name(api, vol))
    try:
        assert c.call(WRITE, 1, 0, 2 * MiB, payload=b"\x5a" * 2 * MiB).error == 0
        assert allocated(path) == 2 * MiB
        # WRITE_ZEROES with NO_HOLE keeps the blocks; without it they are punched; TRIM too.
        assert c.call(ZERO, 2, 0, 512 * KiB, flags=NO_HOLE | FUA).error == 0
        assert allocated(path) == 2 * MiB
        assert c.call(ZERO, 3, 512 * KiB, 512 * KiB).error == 0
        assert c.call(TRIM, 4, MiB, 512 * KiB).error == 0
        assert allocated(path) == 2 * MiB - MiB
        assert c.call(READ, 5, 0, 2 * MiB).data == bytes(3 * 512 * KiB) + b"\x5a" * 512 * KiB
    finally:
        c.close()


def test_with_zero_detection_off_zeroes_are_written_as_data_also_after_a_restart(
    node: ApiNode, tmp_path: Path
) -> None:
    api = node.api
    size = 32 * MiB
    vol = new_volume(api, size, zero_detection_disabled=True)
    assert vol.zero_detection_disabled
    got = api.GetVolume(pb.GetVolumeRequest(volume_id=vol.id))
    assert got.zero_detection_disabled
    on = api.GetVolume(pb.GetVolumeRequest(volume_id=new_volume(api, MiB).id))
    assert not on.zero_detection_disabled
    with pytest.raises(grpc.RpcError) as info:
        api.CreateVolume(pb.CreateVolumeRequest(name=vol.name, tenant=vol.tenant, size_bytes=size))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "zero detection off" in (info.value.details() or "")
    raw = tmp_path / "src.raw"
    sparse_raw(raw, size // 2, seed=7)
    run("qemu-img", "convert", "-n", "-S", "0", "-f", "raw", "-O", "raw", str(raw), uri(api, vol))
    assert allocated(image_of(node, vol)) == size // 2, "every zero written as data"
    node.restart()
    api = node.api
    nbdsh(uri(api, vol), f"h.pwrite(bytes({size // 2}), {size // 2})\nh.flush()\n")
    assert allocated(image_of(node, vol)) == size


def test_golden_image_imports_and_their_clones_stay_sparse(
    node: ApiNode, api: Api, import_root: Path
) -> None:
    size = 64 * MiB
    raw = import_root / f"{unique('golden')}.raw"
    data = sparse_raw(raw, size, seed=11)
    qcow2 = raw.with_suffix(".qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    img = api.ImportImage(pb.ImportImageRequest(name=unique("golden"), path=str(qcow2)))
    img = api.wait_image(img.id)
    assert img.ready, img.error
    assert within_one_percent(allocated(node.data_dir / "golden-images" / f"{img.id}.img"), data)
    vol = api.create_volume(unique("from-golden"), size, tenant="tenant-thin", image_id=img.id)
    vol = api.wait_volume(vol.id)
    assert vol.state == pb.VOLUME_STATE_READY, vol.error
    assert within_one_percent(allocated(image_of(node, vol)), data)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), uri(api, vol))


# ---- the backend itself -------------------------------------------------------------------


def test_punched_zero_writes_are_marked_changed_for_live_copies(tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    with open(image, "wb") as f:
        f.write(b"\x77" * 4 * MiB)
    chunk, chunks = MiB, 4
    map_path = tmp_path / "copy.map"
    map_path.write_bytes(bytes(2 * chunks))
    backend = FileBackend(str(image), zero_detection=True)
    try:
        backend.track("copy", str(map_path), chunk, chunks)
        backend.pwrite(memoryview(bytes(MiB)), MiB, False)  # whole-request zeroes
        payload = bytearray(MiB)
        payload[0] = 1
        backend.pwrite(memoryview(payload), 3 * MiB, True)  # zero runs inside data, FUA
        backend.untrack("copy")
        assert map_path.read_bytes()[:chunks] == b"\x00\x01\x00\x01"
        assert allocated(image) == 2 * MiB + ZERO_RUN
        assert backend.pread(MiB, MiB) == bytes(MiB)
        assert backend.pread(3 * MiB, MiB) == payload
    finally:
        backend.close()
    # And the dirty map format is the one the live copy reads.
    dirty = DirtyMap(str(map_path), chunk, chunks)
    dirty.close()


def test_a_live_snapshot_taken_while_zeroes_are_written_holds_a_prefix_of_them(
    node: ApiNode, api: Api
) -> None:
    """One 4 KiB WRITE of zeroes after another (each punched) over a volume of 0xAA while a
    snapshot is taken (ext4: no reflink, so a live copy with change tracking): the snapshot
    holds zeroes exactly in the blocks of writes 0..K-1 for some K inside the call."""
    size, block, stride = 64 * MiB, 4096, 7919
    blocks = size // block
    vol = new_volume(api, size)
    target = uri(api, vol)
    nbdsh(
        target,
        f"for off in range(0, {size}, 1 << 20):\n    h.pwrite(b'\\xaa' * (1 << 20), off)\n"
        "h.flush()\n",
    )
    client = RawClient(node.nbd_port, timeout=120).connect(export_name(api, vol))
    stop, acked, sent, errors = threading.Event(), [], [], []
    progress = threading.Condition()

    def writer() -> None:
        try:
            k = 0
            while not stop.is_set() and k < blocks:
                sent.append(time.monotonic())
                offset = k * stride % blocks * block
                assert client.call(WRITE, k, offset, block, payload=bytes(block)).error == 0
                acked.append(time.monotonic())
                k += 1
                with progress:
                    progress.notify_all()
        except BaseException as exc:
            errors.append(exc)

    def wait_for(n: int) -> None:
        with progress:
            assert progress.wait_for(lambda: len(acked) >= n or errors, 120)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        wait_for(100)
        start = time.monotonic()
        snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name=unique("snap"), volume_id=vol.id))
        end = time.monotonic()
        wait_for(len(acked) + 100)
    finally:
        stop.set()
        thread.join(120)
        client.close()
    assert not errors, errors
    data = (node.data_dir / "snapshots" / f"{snap.id}.img").read_bytes()
    zeroed = {b for b in range(blocks) if data[b * block] == 0}
    for b in range(blocks):
        want = bytes(block) if b in zeroed else b"\xaa" * block
        assert data[b * block : (b + 1) * block] == want, f"block {b} torn"
    k = len(zeroed)
    assert zeroed == {i * stride % blocks for i in range(k)}, "not a prefix of the writes"
    assert sum(1 for a in acked if a < start) <= k <= sum(1 for s in sent if s < end)
