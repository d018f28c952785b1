"""Nothing a storage node or the node plugin writes is readable by other users.

The storage node's data directory holds the catalogue (every attachment's credential), the
API token and every tenant's data: the directory and every directory below it are 0700 and
every file 0600, whatever the umask it was started with (a real node, started with umask 022,
after making one object of every kind; the tree is listed while it runs, so SQLite's -wal and
-shm files and the QoS shared file are in it). The file operations give their files 0600 even
under umask 0; an existing data directory from an older version is tightened at start; the
node plugin's state directory, whose records hold credentials, is 0700 with 0600 files.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from csi.node_state import StagedVolume, StateStore
from storage_node import files
from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import api_node

MiB = 1 << 20


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def loose(root: Path) -> list[str]:
    """Every path under root (root included) not 0700 (directories) or 0600 (files)."""
    found = []
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            continue
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want:
            found.append(f"{path.relative_to(root)}: {stat.S_IMODE(st.st_mode):o}")
    return found


def test_every_file_the_node_writes_is_0600_in_0700_directories(tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    qcow2 = imports / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "4M"], check=True)
    data = tmp_path / "data"
    with (
        umask(0o022),
        api_node(
            data,
            workers=1,
            exports=("name=demo,size=1M",),
            extra_args=["--import-dir", str(imports)],
        ) as node,
    ):
        api = node.api
        vol = api.create_volume("v", 4 * MiB, "tenant-a")
        api.SetVolumeQos(pb.SetVolumeQosRequest(volume_id=vol.id, qos=pb.Qos(iops=1000)))
        api.SetTenantLimits(
            pb.SetTenantLimitsRequest(
                name="tenant-a", limits=pb.TenantLimits(qos=pb.Qos(iops=5000))
            )
        )
        api.publish(vol.id)
        snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name="s", volume_id=vol.id))
        image = api.ImportImage(pb.ImportImageRequest(name="i", path=str(qcow2)))
        assert api.wait_image(image.id).ready
        clones = [
            api.create_volume("from-snap", 4 * MiB, snapshot_id=snap.id),
            api.create_volume("from-vol", 4 * MiB, volume_id=vol.id),
            api.create_volume("from-img", 4 * MiB, image_id=image.id),
        ]
        for c in clones:
            assert api.wait_volume(c.id).state == pb.VOLUME_STATE_READY
        names = {p.name for p in data.iterdir()}
        assert {"storage-node.db-wal", "storage-node.db-shm", "qos.shm", "api-token"} <= names
        assert loose(data) == []
    assert loose(data) == []


def test_an_older_data_directory_is_tightened_at_start(tmp_path: Path) -> None:
    # A real data directory (catalogue, token, images) as an older version left it, with the
    # default umask's modes; planting files without catalogue rows would rightly be refused.
    data = tmp_path / "data"
    with api_node(data, workers=0):
        pass
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert loose(data) != []
    with umask(0o022), api_node(data, workers=0):
        pass
    assert loose(data) == []


def test_file_operations_make_0600_files_even_under_umask_0(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with umask(0):
        files.create_sparse(src, MiB)
        files.clone(src, tmp_path / "clone.img")
        files.sparse_copy(src, tmp_path / "copy.img")
        files.convert_image(["-f", "raw", str(src)], tmp_path / "converted.img")
    for name in ("src.img", "clone.img", "copy.img", "converted.img"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name


def test_node_plugin_state_is_0600_in_0700_directories(tmp_path: Path) -> None:
    root = tmp_path / "state"
    store = StateStore(root)
    with umask(0o022):
        store.put(
            StagedVolume(
                volume_id="sn-a:vol-0123456789abcdef",
                staging_path="/staging",
                block=True,
                context={"nbd.csi.dev/export": "vol-0123456789abcdef.secret-credential"},
            )
        )
    assert len(list((root / "volumes").iterdir())) == 1
    assert loose(root) == []
