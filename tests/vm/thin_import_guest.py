"""Inside the VM: copy a sparse image onto volumes staged by the real node plugin (kernel NBD,
/dev/nbdX), the way an importer does, with clients that send every zero as data.

Run by tests/vm/test_thin_import.py in a guest with the host's tree over 9p. One argument: a
JSON object with the source image's path (a host file, seen through 9p), its size, and the
volumes (CSI id, publish_context, and how to copy: `dd` or `qemu-img`). For each volume:
NodeStage and NodePublish (Block), copy, compare the device with the image, unpublish,
unstage. Prints `RESULT KEY VALUE` lines for the host, which then looks at the volumes'
allocated bytes on the storage node. Exits non-zero on the first failed expectation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.vm.node_plugin_guest import (
    block_cap,
    check,
    fail,
    nbd_of,
    node_plugin,
    publish,
    say,
    stage,
    step,
    unpublish,
    unstage,
)

COPY = {
    # dd of the raw file with direct I/O: 1 MiB WRITEs, every zero in them sent as data.
    "dd": ["dd", "if={src}", "of={dev}", "bs=1M", "oflag=direct", "conv=fsync", "status=none"],
    # qemu-img with its own zero detection off (-S 0): all of the image is written as data.
    "qemu-img": [
        "qemu-img", "convert", "-n", "-S", "0", "-t", "none", "-f", "raw", "-O", "raw",
        "{src}", "{dev}",
    ],
}  # fmt: skip


def main() -> None:
    spec = json.loads(sys.argv[1])
    plugin = node_plugin()
    plugin.start()
    step("plugin-up")
    for i, vol in enumerate(spec["volumes"]):
        staging, target = f"/run/staging/{i}", f"/run/pods/{i}/disk"
        stage(plugin, vol, staging, block_cap())
        publish(plugin, vol, staging, target, block_cap())
        dev = f"/dev/{nbd_of(target)}"
        argv = [a.format(src=spec["source"], dev=dev) for a in COPY[vol["copy"]]]
        t = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        check(done.returncode == 0, f"{argv[0]} onto {dev}: {done.stdout}{done.stderr}")
        say("RESULT", f"{vol['name']}_copy_seconds", f"{time.monotonic() - t:.1f}")
        same = subprocess.run(
            ["cmp", "-n", str(spec["size"]), spec["source"], dev], capture_output=True, text=True
        )
        check(same.returncode == 0, f"{dev} differs from the image: {same.stdout}{same.stderr}")
        unpublish(plugin, vol, target)
        unstage(plugin, vol, staging)
        say("RESULT", f"{vol['name']}_copied", "ok")
        step(f"copied-{vol['name']}")
    say("RESULT", "plugin_exit", plugin.stop())


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:
        fail(f"{type(exc).__name__}: {exc}")
