"""The node plugin on a real kernel NBD client: one qemu-system guest (TCG, Debian's kernel)
running the plugin's own code from the host tree over 9p, against our storage node on the host.

Owns the end-to-end path the host tests cannot run (tests/csi/test_node_service.py has no
kernel NBD): NodeStage attaching /dev/nbdX through netlink with two connections, Block publish,
data written in the VM and read back on the host with an independent NBD client, ext4 made,
mounted, grown online after the storage node grew the volume, staged again with its data; fio
on the raw device while the plugin is killed and restarted (it takes the device back) and then
while the storage node is restarted, once gracefully (SIGTERM) and once by a crash (SIGKILL)
(each time the plugin reconnects the same device and fio sees no I/O error; fio runs until
the guest stops it after both restarts, never for a fixed time; the blackout is measured from
the plugin's metrics and printed, not asserted on); 200 stage /
unstage cycles that leave no configured or extra /dev/nbdX behind.

The guest drives the plugin through tests/vm/node_plugin_guest.py and asks the host for what
only the host can do with `NBDCSI-REQUEST` lines on its console, which this test follows.
Attachments are made the way the controller will: CreateVolume then Publish to 127.0.0.1 (the
guest's connections reach the storage node through QEMU's guestfwd, from 127.0.0.1).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from storage_node.v1 import storage_node_pb2 as spb
from tests.support.api import ApiNode
from tests.vm.guest import GUEST_NBD_PORT, GuestImage
from tests.vm.plugin_host import IO_TIMEOUT, attachment, guest_python, results

pytestmark = pytest.mark.vm

MiB = 1024 * 1024
BLOCK_SIZE = 64 * MiB
FS_SIZE, FS_GROWN = 64 * MiB, 96 * MiB
CYCLES = 200
SEED = 4242


def test_node_plugin_on_kernel_nbd(
    hostroot_image: GuestImage, storage: ApiNode, tmp_path: Path
) -> None:
    block = attachment(storage, "vm-block", BLOCK_SIZE)
    fs = attachment(storage, "vm-ext4", FS_SIZE)
    cycle = attachment(storage, "vm-cycle", 16 * MiB)
    spec = {
        "block": block,
        "fs": fs,
        "cycle": cycle,
        "fs_grown_size": FS_GROWN,
        "cycles": CYCLES,
        "seed": SEED,
        "io_timeout": IO_TIMEOUT,
        "nbd_port": GUEST_NBD_PORT,
    }
    script = guest_python("tests/vm/node_plugin_guest.py", spec)
    restarts: list[float] = []

    def expand() -> None:
        storage.api.ExpandVolume(
            spb.ExpandVolumeRequest(volume_id=str(fs["backend"]), size_bytes=FS_GROWN)
        )

    def restart_storage() -> None:
        t = time.monotonic()
        storage.stop()  # SIGTERM: finishes what it started, leaves new requests unanswered
        storage.start()
        restarts.append(time.monotonic() - t)

    def crash_storage() -> None:
        t = time.monotonic()
        storage.kill_tree()  # a crash: no goodbye to the clients
        storage.start()
        restarts.append(time.monotonic() - t)

    result, handled = hostroot_image.run_following(
        script,
        tmp_path / "guest",
        {"expand": expand, "restart-storage": restart_storage, "crash-storage": crash_storage},
        nbd_port=storage.nbd_port,
        memory_mb=1024,
        timeout=420,
        host_root=True,
    )
    got = results(result)
    print(
        f"\nnode plugin in the VM: plugin start {got.get('plugin_start_seconds')}s, restart "
        f"{got.get('plugin_restart_seconds')}s; storage node restarts (SIGTERM, SIGKILL) took "
        f"{', '.join(f'{r:.2f}' for r in restarts)}s on the host; connection blackout (sum) "
        f"{got.get('blackout_seconds')}s, longest I/O in the VM "
        f"{got.get('fio_longest_io_seconds')}s (request timeout {IO_TIMEOUT}s); "
        f"{got.get('cycles')} stage/unstage cycles in {got.get('cycles_seconds')}s"
    )
    assert not result.timed_out, result.explain(120)
    assert result.exit_code == 0, result.explain(120)
    assert handled == ["expand", "restart-storage", "crash-storage"]
    assert got["block_backend"] == f"nbd.csi.dev/{block['id']}"
    assert got["block_connections"] == "2", "multi-conn: two connections per device"
    assert int(got["expanded_bytes"]) >= FS_GROWN
    assert float(got["reconnects"]) >= 2, "one reconnect per storage node restart"
    assert float(got["blackouts"]) >= 2, "each restart is one blackout in the plugin's metrics"
    # fio ran through both restarts until the guest stopped it, and none of its I/O failed
    # (an I/O the kernel had given up on, past the dead timeout, would be an I/O error).
    assert got["fio_end"] == "stopped-by-test", result.explain(120)
    assert got["fio_errors"] == "0", result.explain(120)
    assert int(got["ios_after_restarts"]) > 0
    assert int(got["fio_ios"]) > 0
    assert "I/O error" not in result.output, result.explain(120)
    assert got["configured_after_unstage"] == "0"
    assert got["cycles"] == str(CYCLES)
    assert got["configured_after_cycles"] == "0"
    assert got["nbd_devices_grew"] == "0"
    assert got["state_files_left"] == "0"
    assert got["plugin_exit"] == "0"

    # What the VM wrote is on the storage node, read by an independent NBD client.
    import random

    rng = random.Random(SEED)
    layout = ((0, 64 * 1024), (MiB + 12 * 1024, 192 * 1024), (BLOCK_SIZE - 128 * 1024, 128 * 1024))
    image = subprocess.run(
        ["nbdcopy", "--synchronous", str(block["uri"]), "-"], capture_output=True, check=True
    ).stdout
    for offset, length in layout:
        assert image[offset : offset + length] == rng.randbytes(length), f"bytes at {offset}"
