"""Fixtures for the VM tests: the guest images (built once per session), the NBD server, and
the storage node that the node-plugin guests use.

Owns: skipping the whole directory cleanly when qemu-system-x86_64, the Debian kernel or the
guest tools are missing; choosing the server under test from NBD_VM_SERVER:

    NBD_VM_SERVER=storage-node   (default) our `python -m storage_node`
    NBD_VM_SERVER=qemu-nbd       qemu-nbd on a sparse image made with truncate (a reference peer)

Either way the server listens on 127.0.0.1 only and serves one export, EXPORT, of EXPORT_SIZE.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.api import ApiNode, start_api_node
from tests.support.servers import ServerHandle, start_qemu_nbd, start_storage_node
from tests.vm.guest import (
    GuestImage,
    build_hostroot_initramfs,
    build_initramfs,
    find_kernel,
    missing_prerequisites,
)

EXPORT = "vm-disk"
EXPORT_SIZE = 64 * 1024 * 1024
SERVERS = ("storage-node", "qemu-nbd")


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    reason = missing_prerequisites()
    if reason is not None:
        pytest.skip(f"VM tests need a guest: {reason}")
    kernel = find_kernel()
    cache = tmp_path_factory.mktemp("vm-initramfs")
    return GuestImage(kernel, build_initramfs(cache, kernel))


@pytest.fixture(scope="session")
def hostroot_image(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    """The image whose guests run the host's own tree (the node plugin tests)."""
    cache = tmp_path_factory.mktemp("vm-hostroot")
    return GuestImage(guest_image.kernel, build_hostroot_initramfs(cache, guest_image.kernel))


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[ApiNode]:
    """A storage node with its management API, for volumes the guest's node plugin stages."""
    node = start_api_node(tmp_path / "storage", workers=0, node_id="storage-vm")
    try:
        yield node
    finally:
        node.stop()


@dataclass
class ServedExport:
    """One running server with one export, and the image file behind it."""

    kind: str
    handle: ServerHandle
    image: Path
    name: str = EXPORT
    size: int = EXPORT_SIZE

    @property
    def port(self) -> int:
        return self.handle.port

    def stop(self) -> int:
        """SIGTERM (graceful shutdown), wait, return the exit code."""
        return self.handle.stop()


def server_kind() -> str:
    kind = os.environ.get("NBD_VM_SERVER", "storage-node")
    if kind not in SERVERS:
        raise pytest.UsageError(f"NBD_VM_SERVER={kind!r}: expected one of {', '.join(SERVERS)}")
    return kind


@pytest.fixture
def nbd_export(tmp_path: Path) -> Iterator[ServedExport]:
    kind = server_kind()
    if kind == "qemu-nbd":
        if shutil.which("qemu-nbd") is None:
            pytest.skip("NBD_VM_SERVER=qemu-nbd but qemu-nbd is not installed (qemu-utils)")
        image = tmp_path / f"{EXPORT}.img"
        with open(image, "wb") as f:
            f.truncate(EXPORT_SIZE)
        served = ServedExport(kind, start_qemu_nbd(image, EXPORT), image)
    else:
        data_dir = tmp_path / "storage-node"
        try:
            handle = start_storage_node(data_dir, (f"name={EXPORT},size={EXPORT_SIZE // 2**20}M",))
        except (RuntimeError, TimeoutError) as exc:
            log = data_dir / "storage-node.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"storage node did not start: {exc}\n{tail}")
        served = ServedExport(kind, handle, data_dir / "images" / f"{EXPORT}.img")
    try:
        yield served
    finally:
        served.stop()
