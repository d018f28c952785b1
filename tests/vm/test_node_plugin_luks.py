"""Encrypted volumes (LUKS2) through the real node plugin on Debian's kernel (dm-crypt), in
one qemu-system guest (TCG) running the host's tree over 9p, against our storage node on the
host (tests/vm/node_plugin_luks_guest.py says what the guest does).

The proof that the storage node never sees plaintext is made here, on the host: after the
guest wrote a marker through the encrypted Block device, into a file on encrypted ext4, and
onto a plain control volume, no file of the storage node holds the marker except the plain
volume's image (which shows the search would find it), and the encrypted images start with
a LUKS2 header. Around that: the plugin killed and restarted, the storage node restarted, both
volumes grown, unstaged (no dm device left), staged again, a wrong key refused, and a master
key rotation.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from csi import luks
from storage_node.v1 import storage_node_pb2 as spb
from tests.support.api import ApiNode
from tests.vm.guest import GuestImage
from tests.vm.plugin_host import IO_TIMEOUT, attachment, guest_python, results

pytestmark = pytest.mark.vm

MiB = 1024 * 1024
SIZE, GROWN = 64 * MiB, 80 * MiB


def files_holding(root: Path, marker: bytes) -> set[Path]:
    """Every file under root whose bytes contain marker (read in overlapping chunks)."""
    found = set()
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        tail = b""
        with open(path, "rb") as f:
            while chunk := f.read(4 * MiB):
                if marker in tail + chunk:
                    found.add(path)
                    break
                tail = chunk[-len(marker) :]
    return found


def image_of(node: ApiNode, backend: str) -> Path:
    hits = list(node.data_dir.rglob(f"{backend}.img"))
    assert len(hits) == 1, hits
    return hits[0]


def test_encrypted_volumes_in_the_vm(
    hostroot_image: GuestImage, storage: ApiNode, tmp_path: Path
) -> None:
    block = attachment(storage, "vm-luks-block", SIZE)
    fs = attachment(storage, "vm-luks-ext4", SIZE)
    plain = attachment(storage, "vm-plain", 16 * MiB)
    key1 = base64.b64encode(secrets.token_bytes(32)).decode()
    key2 = base64.b64encode(secrets.token_bytes(32)).decode()
    marker = f"NBDCSI-PLAINTEXT-{secrets.token_hex(8)}-"
    derived = [
        luks.derive_key(base64.b64decode(k), luks.key_id(str(v["id"]))).hex()
        for k in (key1, key2)
        for v in (block, fs)
    ]
    spec = {
        "block": block,
        "fs": fs,
        "plain": plain,
        "grown_size": GROWN,
        "key1": key1,
        "key2": key2,
        "derived_hex": derived,
        "marker": marker,
        "io_timeout": IO_TIMEOUT,
    }
    script = guest_python("tests/vm/node_plugin_luks_guest.py", spec)

    def expand() -> None:
        for vol in (block, fs):
            storage.api.ExpandVolume(
                spb.ExpandVolumeRequest(volume_id=str(vol["backend"]), size_bytes=GROWN)
            )

    def restart_storage() -> None:
        storage.stop()
        storage.start()

    result, handled = hostroot_image.run_following(
        script,
        tmp_path / "guest",
        {"expand": expand, "restart-storage": restart_storage},
        nbd_port=storage.nbd_port,
        memory_mb=1024,
        timeout=480,
        host_root=True,
    )
    got = results(result)
    print(f"\nencrypted volumes in the VM: {got.get('seconds')}s in the guest")
    assert not result.timed_out, result.explain(120)
    assert result.exit_code == 0, result.explain(120)
    assert handled == ["restart-storage", "expand"]
    assert got["block_plaintext_bytes"] == str(SIZE - luks.HEADER_BYTES)
    assert got["block_grown_plaintext_bytes"] == str(GROWN - luks.HEADER_BYTES)
    assert got["fs_source"] == f"/dev/mapper/{luks.mapper_name(str(fs['id']))}"
    assert got["dm_after_unstage"] == "0" and got["nbd_after_unstage"] == "0"
    assert got["wrong_key_fs"] == "FAILED_PRECONDITION"
    assert got["old_key_after_rotation"] == "FAILED_PRECONDITION"
    assert got["new_key_after_rotation"] == "OK"
    assert got["dm_at_end"] == "0" and got["nbd_at_end"] == "0"
    assert got["key_leaks"] == "0"
    assert got["plugin_exit"] == "0"

    # What the storage node holds: ciphertext and LUKS2 headers, never the marker.
    storage.stop()
    holding = files_holding(storage.data_dir, marker.encode())
    assert holding == {image_of(storage, str(plain["backend"]))}, holding
    for vol in (block, fs):
        header = image_of(storage, str(vol["backend"])).read_bytes()[: luks.HEADER_BYTES]
        assert header[:6] == b"LUKS\xba\xbe", "a LUKS2 header at the start of the image"
        assert luks.key_id(str(vol["id"])).encode() in header
        for key in (key1, key2, *derived):
            assert key.encode() not in header
    storage.start()
