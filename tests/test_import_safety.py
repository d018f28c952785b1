"""ImportImage reads only what the operator put in --import-dir, and only as the image it is.

Every attack of issue 12 against a real storage node, with real qemu-img-made files: paths
outside the import directory (/etc/shadow, the node's own api-token and catalogue, through a
symlink or `..`), qcow2 images whose backing file (absolute or relative) or external data file
is another tenant's volume image, and format probing. Each must be refused with
INVALID_ARGUMENT before anything is imported; a plain raw and a plain qcow2 still import, with
or without the format given, and their clones read what the files hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import Api, ApiNode, api_node
from tests.support.qemu_io import qemu_io
from tests.support.servers import REPO

MiB = 1 << 20
TENANT_A_BYTE = 0x5A
Code = grpc.StatusCode


def expect(code: grpc.StatusCode, call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, f"{info.value.code()}: {info.value.details()}"
    return info.value.details() or ""


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def import_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imports")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, import_dir: Path) -> Iterator[ApiNode]:
    data = tmp_path_factory.mktemp("import-node") / "data"
    with api_node(data, workers=0, extra_args=["--import-dir", str(import_dir)]) as n:
        yield n


@pytest.fixture(scope="module")
def tenant_a_image(node: ApiNode) -> Path:
    """Tenant A's volume, written over NBD; returns its image file on the node."""
    api = node.api
    vol = api.create_volume("secret-a", 4 * MiB, "tenant-a")
    attachment = api.publish(vol.id)
    qemu_io(attachment.uri, f"write -P {TENANT_A_BYTE:#x} 0 4M")
    api.unpublish(vol.id)
    path = node.data_dir / "volumes" / f"{vol.id}.img"
    assert path.stat().st_size == 4 * MiB
    return path


def import_image(api: Api, name: str, path: Path | str, fmt: int = 0) -> pb.Image:
    return api.ImportImage(pb.ImportImageRequest(name=name, path=str(path), format=fmt))  # type: ignore[arg-type]


def refused(api: Api, name: str, path: Path | str, fmt: int = 0) -> str:
    message = expect(Code.INVALID_ARGUMENT, lambda: import_image(api, name, path, fmt))
    assert name not in {i.name for i in api.ListImages(pb.ListImagesRequest()).images}
    return message


# ---- files outside the import directory ---------------------------------------------------


def test_etc_shadow_is_refused(node: ApiNode) -> None:
    assert "not inside the import directory" in refused(node.api, "shadow", "/etc/shadow")


@pytest.mark.parametrize("name", ["api-token", "storage-node.db"])
def test_the_nodes_own_files_are_refused(node: ApiNode, name: str) -> None:
    message = refused(node.api, f"own-{name}", node.data_dir / name)
    assert "not inside the import directory" in message


def test_a_symlink_out_of_the_import_dir_is_refused(node: ApiNode, import_dir: Path) -> None:
    link = import_dir / "token-link.raw"
    link.symlink_to(node.data_dir / "api-token")
    assert "not inside the import directory" in refused(node.api, "via-symlink", link)


def test_dot_dot_out_of_the_import_dir_is_refused(node: ApiNode, import_dir: Path) -> None:
    escape = f"{import_dir}/{os.path.relpath(node.data_dir / 'api-token', import_dir)}"
    assert ".." in escape
    assert "not inside the import directory" in refused(node.api, "via-dotdot", escape)


def test_a_fifo_is_refused_without_blocking(node: ApiNode, import_dir: Path) -> None:
    fifo = import_dir / "pipe.raw"
    os.mkfifo(fifo)
    assert "not a regular file" in refused(node.api, "fifo", fifo)


# ---- qcow2 images that point at other files -----------------------------------------------


@pytest.mark.parametrize("fmt", [pb.IMAGE_FORMAT_QCOW2, pb.IMAGE_FORMAT_UNSPECIFIED])
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_qcow2_backed_by_another_tenants_volume_is_refused(
    node: ApiNode, import_dir: Path, tenant_a_image: Path, fmt: int, relative: bool
) -> None:
    work = import_dir / f"backed-{fmt}-{relative}"
    work.mkdir()
    backing = os.path.relpath(tenant_a_image, work) if relative else str(tenant_a_image)
    image = work / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", str(image), "4M")
    message = refused(node.api, f"backed-{fmt}-{relative}", image, fmt)
    assert "backing file" in message


@pytest.mark.parametrize("fmt", [pb.IMAGE_FORMAT_QCOW2, pb.IMAGE_FORMAT_UNSPECIFIED])
def test_qcow2_with_an_external_data_file_is_refused(
    node: ApiNode, import_dir: Path, fmt: int
) -> None:
    work = import_dir / f"data-file-{fmt}"
    work.mkdir()
    image = work / "evil.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={work / 'data.raw'}", str(image), "4M"
    )
    assert "external data file" in refused(node.api, f"data-file-{fmt}", image, fmt)


def test_qcow2_asked_for_but_not_given_is_refused(node: ApiNode, import_dir: Path) -> None:
    raw = import_dir / "plain-bytes.raw"
    raw.write_bytes(b"\x01" * MiB)
    assert "not a qcow2 image" in refused(node.api, "not-qcow2", raw, pb.IMAGE_FORMAT_QCOW2)


def test_imports_are_disabled_without_an_import_dir(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x01" * MiB)
    with api_node(tmp_path / "data", workers=0) as n:
        message = expect(Code.FAILED_PRECONDITION, lambda: import_image(n.api, "off", raw))
        assert "--import-dir" in message


# ---- what still works ---------------------------------------------------------------------


def clone_reads(node: ApiNode, image: pb.Image, *commands: str) -> None:
    api = node.api
    image = api.wait_image(image.id)
    assert image.ready, image.error
    vol = api.create_volume(f"clone-of-{image.name}", 8 * MiB, "tenant-b", image_id=image.id)
    assert api.wait_volume(vol.id).state == pb.VOLUME_STATE_READY
    qemu_io(api.publish(vol.id).uri, *commands)
    api.unpublish(vol.id)


@pytest.mark.parametrize("fmt", [pb.IMAGE_FORMAT_QCOW2, pb.IMAGE_FORMAT_UNSPECIFIED])
def test_a_standalone_qcow2_imports_as_its_guest_data(
    node: ApiNode, import_dir: Path, fmt: int
) -> None:
    """UNSPECIFIED detects qcow2 by its magic number: the clone holds the guest's bytes, not
    the qcow2 file's."""
    image = import_dir / f"good-{fmt}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "8M")
    qemu_io(str(image), "write -P 0x6b 0 1M", "write -P 0x6c 7M 1M", fmt="qcow2")
    clone_reads(
        node,
        import_image(node.api, f"good-qcow2-{fmt}", image, fmt),
        "read -P 0x6b 0 1M",
        "read -P 0 1M 6M",
        "read -P 0x6c 7M 1M",
    )


@pytest.mark.parametrize("fmt", [pb.IMAGE_FORMAT_RAW, pb.IMAGE_FORMAT_UNSPECIFIED])
def test_a_raw_image_imports(node: ApiNode, import_dir: Path, fmt: int) -> None:
    sub = import_dir / f"raw-{fmt}"
    sub.mkdir()
    image = sub / "disk.img"
    image.write_bytes(b"\x3c" * (2 * MiB))
    clone_reads(
        node,
        import_image(node.api, f"good-raw-{fmt}", image, fmt),
        "read -P 0x3c 0 2M",
        "read -P 0 2M 6M",
    )


def test_a_symlink_inside_the_import_dir_is_followed(node: ApiNode, import_dir: Path) -> None:
    target = import_dir / "real.raw"
    target.write_bytes(b"\x77" * MiB)
    (import_dir / "alias.raw").symlink_to(target)
    clone_reads(
        node,
        import_image(node.api, "via-inner-link", import_dir / "alias.raw"),
        "read -P 0x77 0 1M",
    )


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_import_dir_overlapping_the_data_dir_is_refused(tmp_path: Path, where: str) -> None:
    """Else the catalogue, the token and every tenant's images could be imported."""
    data = tmp_path / "top" / "data"
    imports = {"same": data, "inside": data / "imports", "around": tmp_path / "top"}[where]
    imports.mkdir(parents=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "storage_node",
            *("--data-dir", str(data)),
            *("--import-dir", str(imports)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 2, result.stderr
    assert "must be outside --data-dir" in result.stderr
