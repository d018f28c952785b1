"""A storage node never loses images because its catalogue is missing, empty or damaged, and
a full or too-small filesystem is a clear status, not INTERNAL.

Owns the promises of docs/storage-node-api.md ("Crash safety", "Full filesystems"): with
`storage-node.db` removed, truncated, recreated empty or damaged, the node refuses to start
with one line that names the file, the problem and the ways out, and touches no image;
`--quarantine-orphans` moves every image to DATA/quarantine/<time>/ and starts empty; files
without a row at a normal start (a catalogue restored from an older backup) are quarantined,
not deleted, counted by `nbdcsi_node_quarantined_files`, and removed only by
`python -m storage_node quarantine purge`. On a full tmpfs the management calls answer
RESOURCE_EXHAUSTED naming the node and "disk full", and work again once space is freed; on
ext4 a volume larger than its largest file is OUT_OF_RANGE. Real node processes, real SQLite.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import Api, ApiNode, api_node
from tests.support.filesystems import loop_filesystem, mounted
from tests.support.rawnbd import RawClient
from tests.support.servers import REPO, free_port

MiB, TiB = 1 << 20, 1 << 40
WRITE, FLUSH = 1, 3
Code = grpc.StatusCode
NODE = "storage-test"


def expect(code: grpc.StatusCode, call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    return info.value.details() or ""


def digests(data_dir: Path) -> dict[str, str]:
    """Every image file under data_dir (quarantine included) by its name: content hash."""
    out = {}
    for p in sorted(data_dir.rglob("*.img")):
        out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write(node: ApiNode, export: str, offset: int, payload: bytes) -> None:
    client = RawClient(node.nbd_port, timeout=30).connect(export)
    try:
        assert client.call(WRITE, 1, offset, len(payload), payload=payload).error == 0
        assert client.call(FLUSH, 2).error == 0
    finally:
        client.close()


def populated(data_dir: Path) -> dict[str, str]:
    """A volume with data and a snapshot of it, node stopped; the image digests."""
    with api_node(data_dir) as n:
        vol = n.api.create_volume("precious", 4 * MiB)
        att = n.api.publish(vol.id)
        write(n, att.export_name, 0, b"\x5a" * MiB)
        n.api.CreateSnapshot(pb.CreateSnapshotRequest(name="precious-snap", volume_id=vol.id))
        n.api.unpublish(vol.id)
    images = digests(data_dir)
    assert len(images) == 3, images  # demo export, volume, snapshot
    return images


def start_refused(data_dir: Path, *extra: str) -> str:
    """Start a node that must refuse: exit status 2; returns its output."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "storage_node",
            "--data-dir",
            str(data_dir),
            "--nbd-listen",
            f"127.0.0.1:{free_port()}",
            "--api-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--workers",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    return output


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("nbdcsi_node_quarantined")
    }


def quarantine_cli(data_dir: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "storage_node", "quarantine", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def remove(db: Path) -> None:
    db.unlink()


def truncate(db: Path) -> None:
    db.write_bytes(b"")


def recreate(db: Path) -> None:
    """A new catalogue with the schema and no row, as a node on an empty directory makes."""
    db.unlink()
    from storage_node.store import Store

    Store(db).close()


def damage(db: Path) -> None:
    """Overwrite the pages after the header: "database disk image is malformed"."""
    with open(db, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(4096)
        f.write(b"\xa5" * (size - 4096))


CASES = {"removed": remove, "truncated": truncate, "recreated": recreate, "damaged": damage}
PROBLEM = {
    "removed": "is missing",
    "truncated": "is empty (0 bytes)",
    "recreated": "is empty",
    "damaged": "is damaged",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_lost_catalogue_keeps_every_image(tmp_path: Path, case: str) -> None:
    data = tmp_path / "node"
    images = populated(data)
    db = data / "storage-node.db"
    assert not db.with_name(db.name + "-wal").exists()  # a clean stop checkpoints
    CASES[case](db)
    output = start_refused(data)
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    line = errors[0]
    for words in (str(db), PROBLEM[case], "3 image file(s)", "backup", "--quarantine-orphans"):
        assert words in line, line
    print(line)
    assert digests(data) == images  # nothing moved, nothing changed
    assert not (data / "quarantine").exists()

    # Once, on purpose: the images go to the quarantine and the node starts empty.
    metrics_port = free_port()
    extra = ["--quarantine-orphans", "--metrics-listen", f"127.0.0.1:{metrics_port}"]
    with api_node(data, extra_args=extra) as n:
        assert not n.api.ListVolumes(pb.ListVolumesRequest()).volumes
        assert "quarantined" in n.log_text()
        assert scrape(metrics_port) == {
            "nbdcsi_node_quarantined_files": 3 + (case == "damaged"),
            "nbdcsi_node_quarantined_bytes": pytest.approx(
                sum(
                    p.stat().st_blocks * 512
                    for p in (data / "quarantine").rglob("*")
                    if p.is_file()
                )
            ),
        }
    kept = {k: v for k, v in digests(data / "quarantine").items()}
    assert kept == images
    if case == "damaged":
        assert list((data / "quarantine").rglob("storage-node.db"))
    listed = quarantine_cli(data, "list")
    assert "volumes/vol-" in listed and "snapshots/snap-" in listed, listed
    # The next start is normal: its catalogue has the new demo export.
    with api_node(data) as n:
        assert not n.api.ListVolumes(pb.ListVolumesRequest()).volumes
    # Removing them is the administrator's explicit act.
    batch = listed.splitlines()[0]
    assert quarantine_cli(data, "purge", batch).startswith("removed")
    assert not list((data / "quarantine").rglob("*.img"))


def test_a_fresh_data_directory_starts_without_flags(tmp_path: Path) -> None:
    with api_node(tmp_path / "new", exports=()) as n:
        assert n.api.GetNodeInfo(pb.GetNodeInfoRequest()).node_id == NODE
    assert (tmp_path / "new" / "images" / "demo.img").exists()


def test_an_older_catalogue_quarantines_what_it_forgot(tmp_path: Path) -> None:
    """A catalogue restored from a backup older than some volumes: those volumes' files are
    set aside (logged, counted), not deleted; a temporary of a crashed copy is removed."""
    data = tmp_path / "node"
    metrics_port = free_port()
    extra = ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    with api_node(data, extra_args=extra) as n:
        old = n.api.create_volume("in-backup", 4 * MiB)
    backup = tmp_path / "backup.db"
    src, dst = sqlite3.connect(data / "storage-node.db"), sqlite3.connect(backup)
    src.backup(dst)
    src.close()
    dst.close()
    with api_node(data, extra_args=extra) as n:
        new = n.api.create_volume("after-backup", 4 * MiB)
        att = n.api.publish(new.id)
        write(n, att.export_name, 0, b"\x33" * MiB)
        n.api.unpublish(new.id)
    forgotten = hashlib.sha256((data / "volumes" / f"{new.id}.img").read_bytes()).hexdigest()
    assert not (data / "storage-node.db-wal").exists()
    (data / "storage-node.db").write_bytes(backup.read_bytes())
    temporary = data / "volumes" / f"{new.id}.img.0123abcd.tmp"
    temporary.write_bytes(b"half a copy")
    with api_node(data, extra_args=extra) as n:
        assert [v.name for v in n.api.ListVolumes(pb.ListVolumesRequest()).volumes] == ["in-backup"]
        log = n.log_text()
        assert "without a catalogue row moved to" in log, log
        assert scrape(metrics_port)["nbdcsi_node_quarantined_files"] == 1
    assert not temporary.exists()
    moved = list((data / "quarantine").rglob(f"{new.id}.img"))
    assert len(moved) == 1
    assert hashlib.sha256(moved[0].read_bytes()).hexdigest() == forgotten
    assert (data / "volumes" / f"{old.id}.img").exists()


# -- full and too-small filesystems --------------------------------------------------------------


def fill(path: Path) -> Path:
    """Write a file until the filesystem has no block left."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\xee" * MiB, b"\xee" * 4096, b"\xee"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted(tmp_path / "mnt", "-t", "tmpfs", "-o", "size=16m", "tmpfs") as mnt:
        yield mnt


def test_a_full_filesystem_is_resource_exhausted_naming_the_node(small_tmpfs: Path) -> None:
    data = small_tmpfs / "node"
    with api_node(data) as n:
        api: Api = n.api
        vol = api.create_volume("before", 4 * MiB)
        att = api.publish(vol.id)
        write(n, att.export_name, 0, b"\x77" * MiB)
        other = api.create_volume("other", MiB)
        filler = fill(small_tmpfs)
        calls: dict[str, Callable[[], object]] = {
            "CreateVolume": lambda: api.create_volume("full", MiB),
            "CreateSnapshot": lambda: api.CreateSnapshot(
                pb.CreateSnapshotRequest(name="full-snap", volume_id=vol.id)
            ),
            "SetTenantLimits": lambda: api.SetTenantLimits(
                pb.SetTenantLimitsRequest(
                    name="tenant-a", limits=pb.TenantLimits(capacity_bytes=1 << 30)
                )
            ),
            "Publish": lambda: api.publish(other.id),
        }
        for name, call in calls.items():
            message = expect(Code.RESOURCE_EXHAUSTED, call)
            print(f"{name}: RESOURCE_EXHAUSTED: {message}")
            assert NODE in message and ("disk full" in message or "space" in message), message
        assert "internal error" not in n.log_text()
        filler.unlink()
        # Space again: every call works, and nothing was lost or half made.
        assert sorted(v.name for v in api.ListVolumes(pb.ListVolumesRequest()).volumes) == [
            "before",
            "other",
        ]
        assert not api.ListSnapshots(pb.ListSnapshotsRequest()).snapshots
        for call in calls.values():
            call()
        client = RawClient(n.nbd_port, timeout=30).connect(att.export_name)
        try:
            assert client.call(0, 1, 0, MiB).data == b"\x77" * MiB
        finally:
            client.close()
        names = sorted(v.name for v in api.ListVolumes(pb.ListVolumesRequest()).volumes)
        assert names == ["before", "full", "other"]


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    with loop_filesystem(tmp_path, "ext4", 64 * MiB, "-b", "4096") as mnt:
        yield mnt


def test_a_volume_larger_than_the_filesystem_allows_is_out_of_range(small_ext4: Path) -> None:
    # Thin provisioning on: the file size limit, not the capacity, is what refuses.
    with api_node(small_ext4 / "node", extra_args=["--overcommit-ratio", "1000000000"]) as n:
        message = expect(Code.OUT_OF_RANGE, lambda: n.api.create_volume("huge", 64 * TiB))
        print(f"64 TiB on ext4: OUT_OF_RANGE: {message}")
        assert NODE in message and "largest file" in message and "16.0 TiB" in message
        assert not n.api.ListVolumes(pb.ListVolumesRequest()).volumes
        assert not list((small_ext4 / "node" / "volumes").iterdir())
        # The largest that fits works, and growing past it is refused the same way.
        top = 16 * TiB - 4096
        vol = n.api.create_volume("largest", top)
        assert vol.size_bytes == top
        small = n.api.create_volume("small", MiB)
        message = expect(
            Code.OUT_OF_RANGE,
            lambda: n.api.ExpandVolume(
                pb.ExpandVolumeRequest(volume_id=small.id, size_bytes=top + 4096)
            ),
        )
        assert "largest file" in message
