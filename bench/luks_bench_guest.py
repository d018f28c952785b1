"""Inside the guest of bench/luks_bench.py: the real node plugin stages a plain and an
encrypted Block volume; fio runs on each published device in turn, row by row, and prints
`BENCH ROW DEVICE BYTES_PER_SECOND IOPS` lines for the host.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.vm.node_plugin_guest import (
    METRICS,
    block_cap,
    check,
    fail,
    node_plugin,
    publish,
    say,
    unpublish,
    unstage,
)
from tests.vm.node_plugin_luks_guest import stage


def fio(path: str, rw: str, bs: str, depth: int, runtime: int) -> tuple[int, int]:
    """One fio run; runtime 0: once over the whole device instead of for a time."""
    timing = ["--time_based", f"--runtime={runtime}", "--ramp_time=1"] if runtime else []
    out = subprocess.run(
        [
            "fio",
            "--name=bench",
            f"--filename={path}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={depth}",
            "--ioengine=libaio",
            "--direct=1",
            *timing,
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
    )
    check(out.returncode == 0, f"fio failed: {out.stderr[-500:]}")
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return int(side["bw_bytes"]), int(side["iops"])


def main() -> None:
    spec = json.loads(sys.argv[1])
    plugin = node_plugin(
        f"--metrics-listen={METRICS}",
    )
    plugin.start()
    volumes = {
        "plain": (spec["plain"], {}),
        "encrypted": (spec["encrypted"], {"encryption-key": spec["key"]}),
    }
    for name, (vol, secrets) in volumes.items():
        stage(plugin, vol, f"/run/staging/{name}", block_cap(), secrets)
        publish(plugin, vol, f"/run/staging/{name}", f"/run/pods/{name}", block_cap())
        # Written once in full (fio's buffers: not zeroes, which a storage node may skip), so
        # that reads hit allocated blocks on the storage node for both.
        fio(f"/run/pods/{name}", "write", "1m", 4, 0)
    for i, (row, (rw, bs, depth)) in enumerate(spec["rows"].items()):
        order = list(volumes) if i % 2 == 0 else list(reversed(volumes))  # neither always first
        for name in order:
            bw, iops = fio(f"/run/pods/{name}", rw, bs, depth, spec["runtime"])
            say("BENCH", row, f"{name} {bw} {iops}")
    for name, (vol, _) in volumes.items():
        unpublish(plugin, vol, f"/run/pods/{name}")
        unstage(plugin, vol, f"/run/staging/{name}")
    plugin.stop()


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:
        fail(f"{type(exc).__name__}: {exc}")
