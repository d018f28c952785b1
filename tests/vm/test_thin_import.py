"""Thin imports through the node plugin's device: a sparse image copied in a VM onto volumes
staged by the real node plugin (kernel NBD, two connections), against our storage node on the
host, with `dd` and `qemu-img convert -S 0` (both send every zero of the image as data).

The storage node turns those zeroes into holes (docs/storage-node.md, "Thin writes"): each
volume's image on the node then has its allocated bytes within 1 % of the image's data, and
the volume created with zero detection off (`zero_detection_disabled`) is fully allocated, as
every volume was before. The guest (tests/vm/thin_import_guest.py) compares each device with
the image after the copy; the host reads each volume back with qemu-img compare.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from csi.attach import CTX_EXPORT, CTX_HOST, CTX_PORT, CTX_READONLY
from storage_node.v1 import storage_node_pb2 as spb
from tests.support.api import ApiNode
from tests.support.images import sparse_raw
from tests.vm.guest import GUEST_NBD_ADDR, GUEST_NBD_PORT, GuestImage
from tests.vm.plugin_host import guest_python

pytestmark = pytest.mark.vm

MiB = 1024 * 1024
SIZE = 64 * MiB
# (name, copy tool, zero detection off)
VOLUMES = [("dd", "dd", False), ("qemuimg", "qemu-img", False), ("ddoff", "dd", True)]


def test_sparse_image_copied_through_the_node_plugin_device_stays_thin(
    hostroot_image: GuestImage, storage: ApiNode, tmp_path: Path
) -> None:
    source = tmp_path / "golden.raw"
    data = sparse_raw(source, SIZE, seed=99)
    source.chmod(0o644)
    api = storage.api
    volumes, uris, ids = [], {}, {}
    for name, tool, off in VOLUMES:
        vol = api.CreateVolume(
            spb.CreateVolumeRequest(
                name=f"thin-{name}", tenant="vm", size_bytes=SIZE, zero_detection_disabled=off
            )
        )
        att = api.publish(vol.id, "vm-node", "127.0.0.1")
        uris[name], ids[name] = att.uri, vol.id
        volumes.append(
            {
                "name": name,
                "copy": tool,
                "id": f"storage-vm:{vol.id}",
                "context": {
                    CTX_HOST: GUEST_NBD_ADDR,
                    CTX_PORT: str(GUEST_NBD_PORT),
                    CTX_EXPORT: att.export_name,
                    CTX_READONLY: "false",
                },
            }
        )
    spec = {"source": str(source), "size": SIZE, "volumes": volumes}
    script = guest_python("tests/vm/thin_import_guest.py", spec)
    result = hostroot_image.run(
        script,
        tmp_path / "guest",
        nbd_port=storage.nbd_port,
        memory_mb=1024,
        timeout=600,
        host_root=True,
    )
    assert not result.timed_out, result.explain(120)
    assert result.exit_code == 0, result.explain(120)
    got = result.tagged("RESULT")
    allocated = {
        name: os.stat(storage.data_dir / "volumes" / f"{ids[name]}.img").st_blocks * 512
        for name, _, _ in VOLUMES
    }
    print(
        f"\n{data} bytes of data in a {SIZE}-byte image; allocated on the storage node: "
        + ", ".join(f"{n} {a} ({got.get(f'{n}_copy_seconds')}s)" for n, a in allocated.items())
    )
    for name, _, off in VOLUMES:
        assert got[f"{name}_copied"] == "ok"
        if off:
            assert allocated[name] == SIZE, "zero detection off: every zero written as data"
        else:
            assert abs(allocated[name] - data) <= data // 100, (name, allocated[name], data)
        subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), uris[name]],
            check=True,
            capture_output=True,
            timeout=300,
        )
    assert got["plugin_exit"] == "0"
