"""Inside the VM: drive the real node plugin process (`python -m csi --mode node`) as kubelet
would, over its unix socket, against volumes on the host's storage node.

Run by tests/vm/test_node_plugin.py in a guest booted from Debian's kernel with the host's tree
over 9p (so this is the project's own code on a kernel with NBD). One argument: a JSON object
with the volumes (CSI id and publish_context), the sizes and the number of stage cycles.

It prints `RESULT KEY VALUE` lines for the host to check, `STEP NAME` lines to follow progress,
and `NBDCSI-REQUEST WHAT` when the host must act (grow a volume on the storage node, restart
the storage node); it then waits for the effect (a state it can observe), never for a time.
Exits non-zero on the first failed expectation, with the plugin's log.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from csi.v1 import csi_pb2 as pb
from csi.v1 import csi_pb2_grpc as pb_grpc

SOCKET = "/run/csi/csi.sock"
STATE = "/run/nbd-csi"
METRICS = "127.0.0.1:9810"
PLUGIN_LOG = Path("/run/plugin.log")
MiB = 1024 * 1024
T0 = time.monotonic()
# fio's --runtime when it must run until told to stop: a day, far past any timeout here.
FIO_UNTIL_STOPPED = 24 * 3600


def say(kind: str, key: str, value: object = "") -> None:
    print(f"{kind} {key} {value}".rstrip(), flush=True)


def step(name: str) -> None:
    say("STEP", name, f"{time.monotonic() - T0:.1f}s")


def fail(message: str) -> None:
    print(f"GUEST-FAILURE {message}", flush=True)
    if PLUGIN_LOG.exists():
        print("---- plugin log (tail) ----")
        print("\n".join(PLUGIN_LOG.read_text(errors="replace").splitlines()[-40:]))
    subprocess.run(["dmesg"], check=False)
    sys.exit(1)


def check(ok: bool, message: str) -> None:
    if not ok:
        fail(message)


def poll(what: str, fn, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        time.sleep(interval)


class Plugin:
    def __init__(self, python: str, args: list[str]) -> None:
        self.python, self.args = python, args
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> float:
        t = time.monotonic()
        log = open(PLUGIN_LOG, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.python, "-m", "csi", *self.args], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.channel = grpc.insecure_channel(f"unix://{SOCKET}")
        self.node = pb_grpc.NodeStub(self.channel)
        identity = pb_grpc.IdentityStub(self.channel)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                fail(f"plugin exited with {self.proc.returncode}")
            try:
                return identity.Probe(pb.ProbeRequest(), timeout=2).ready.value
            except grpc.RpcError:
                return False

        poll("the plugin to answer Probe", ready, 120, 0.2)
        return time.monotonic() - t

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        if self.channel is not None:
            self.channel.close()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def node_plugin(*extra: str) -> Plugin:
    """The node plugin as the DaemonSet runs it, on the guest's socket and state directory,
    with two NBD connections per device; `extra` adds options."""
    return Plugin(
        sys.executable,
        [
            "--mode=node",
            f"--endpoint=unix://{SOCKET}",
            "--node-id=vm-node",
            "--node-address=127.0.0.1",
            f"--state-dir={STATE}",
            "--nbd-connections=2",
            *extra,
        ],
    )


def block_cap() -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER
        ),
    )


def mount_cap(fs_type: str) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.Mode.SINGLE_NODE_WRITER
        ),
    )


def stage(p: Plugin, vol: dict, staging: str, cap: pb.VolumeCapability) -> None:
    p.node.NodeStageVolume(
        pb.NodeStageVolumeRequest(
            volume_id=vol["id"],
            publish_context=vol["context"],
            staging_target_path=staging,
            volume_capability=cap,
        ),
        timeout=120,
    )


def unstage(p: Plugin, vol: dict, staging: str) -> None:
    p.node.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=vol["id"], staging_target_path=staging),
        timeout=120,
    )


def publish(p: Plugin, vol: dict, staging: str, target: str, cap: pb.VolumeCapability) -> None:
    p.node.NodePublishVolume(
        pb.NodePublishVolumeRequest(
            volume_id=vol["id"],
            publish_context=vol["context"],
            staging_target_path=staging,
            target_path=target,
            volume_capability=cap,
        ),
        timeout=120,
    )


def unpublish(p: Plugin, vol: dict, target: str) -> None:
    p.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vol["id"], target_path=target), timeout=120
    )


def stats(p: Plugin, vol: dict, path: str) -> pb.NodeGetVolumeStatsResponse:
    return p.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=vol["id"], volume_path=path), timeout=60
    )


def configured_nbd() -> list[str]:
    return sorted(d.name for d in Path("/sys/block").glob("nbd*") if (d / "pid").exists())


def nbd_of(target: str) -> str:
    rdev = os.stat(target).st_rdev
    return os.path.basename(os.readlink(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))


def completed_ios(dev: str) -> int:
    """Reads plus writes the block device has completed (/sys/block/DEV/stat fields 1 and 5)."""
    fields = Path(f"/sys/block/{dev}/stat").read_text().split()
    return int(fields[0]) + int(fields[4])


def established(port: int) -> int:
    """TCP connections to the storage node in state ESTABLISHED (the kernel's sockets)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2].endswith(f":{port:04X}") and fields[3] == "01":
            count += 1
    return count


def metric(name: str, **labels: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


def regions(seed: int, size: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    layout = ((0, 64 * 1024), (MiB + 12 * 1024, 192 * 1024), (size - 128 * 1024, 128 * 1024))
    return [(offset, rng.randbytes(length)) for offset, length in layout]


def main() -> None:
    spec = json.loads(sys.argv[1])
    a, b, c = spec["block"], spec["fs"], spec["cycle"]
    plugin = node_plugin(
        f"--metrics-listen={METRICS}",
        f"--nbd-io-timeout={spec['io_timeout']}",
        "--nbd-dead-timeout=90",
    )
    say("RESULT", "plugin_start_seconds", f"{plugin.start():.1f}")
    step("plugin-up")
    info = plugin.node.NodeGetInfo(pb.NodeGetInfoRequest())
    check(info.node_id == "vm-node@127.0.0.1;max-volumes=64", f"node id {info.node_id}")

    # -- raw block: stage, publish, write, read back ---------------------------------------
    stage(plugin, a, "/run/staging/a", block_cap())
    publish(plugin, a, "/run/staging/a", "/run/pods/a/disk", block_cap())
    dev = nbd_of("/run/pods/a/disk")
    say("RESULT", "block_device", dev)
    say("RESULT", "block_backend", Path(f"/sys/block/{dev}/backend").read_text().strip())
    say("RESULT", "block_connections", established(spec["nbd_port"]))
    fd = os.open("/run/pods/a/disk", os.O_RDWR)
    for offset, data in regions(spec["seed"], a["size"]):
        os.pwrite(fd, data, offset)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    for i, (offset, data) in enumerate(regions(spec["seed"], a["size"])):
        got = os.pread(fd, len(data), offset)
        check(got == data, f"block region {i} read back other bytes")
    os.close(fd)
    step("block-written")

    # -- ext4: stage (formats), publish, write, expand online, unstage, stage again ---------
    stage(plugin, b, "/run/staging/b", mount_cap("ext4"))
    publish(plugin, b, "/run/staging/b", "/run/pods/b/mnt", mount_cap("ext4"))
    Path("/run/pods/b/mnt/hello").write_text("from the VM")
    os.sync()
    before = os.statvfs("/run/pods/b/mnt")
    st = stats(plugin, b, "/run/pods/b/mnt")
    check(len(st.usage) == 2 and not st.volume_condition.abnormal, f"fs stats {st}")
    say("NBDCSI-REQUEST", "expand")

    def grown() -> int:
        try:
            got = plugin.node.NodeExpandVolume(
                pb.NodeExpandVolumeRequest(volume_id=b["id"], volume_path="/run/pods/b/mnt"),
                timeout=60,
            ).capacity_bytes
        except grpc.RpcError as exc:
            fail(f"NodeExpandVolume: {exc.code().name}: {exc.details()}")
        return got if got >= spec["fs_grown_size"] else 0

    say("RESULT", "expanded_bytes", poll("the volume to grow", grown, 60, 0.5))
    after = os.statvfs("/run/pods/b/mnt")
    check(after.f_blocks > before.f_blocks, "ext4 did not grow online")
    say("RESULT", "fs_grew_blocks", f"{before.f_blocks}->{after.f_blocks}")
    unpublish(plugin, b, "/run/pods/b/mnt")
    unstage(plugin, b, "/run/staging/b")
    stage(plugin, b, "/run/staging/b", mount_cap("ext4"))
    publish(plugin, b, "/run/staging/b", "/run/pods/b/mnt", mount_cap("ext4"))
    check(Path("/run/pods/b/mnt/hello").read_text() == "from the VM", "file lost")
    unpublish(plugin, b, "/run/pods/b/mnt")
    unstage(plugin, b, "/run/staging/b")
    step("ext4-done")

    # -- fio on the raw block volume while the plugin and then the storage node restart ----
    # fio runs until this script stops it (SIGINT, after the restarts it must live through),
    # never for a fixed time: a slow guest takes longer for each restart, not fewer of them.
    fio = subprocess.Popen(
        [
            "fio",
            "--name=vm-io",
            "--filename=/run/pods/a/disk",
            "--rw=randrw",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--offset=16M",
            "--size=32M",
            "--time_based",
            f"--runtime={FIO_UNTIL_STOPPED}",
            "--output-format=json",
            "--eta=never",
            "--output=/run/fio.out",
        ]
    )
    poll("fio to start", lambda: Path("/run/fio.out").exists() or fio.poll() is not None, 30)
    plugin.kill()
    say("RESULT", "plugin_restart_seconds", f"{plugin.start():.1f}")
    st = stats(plugin, a, "/run/pods/a/disk")
    check(not st.volume_condition.abnormal, f"adopted volume abnormal: {st.volume_condition}")
    step("plugin-restarted")
    check(fio.poll() is None, "fio ended before the storage node restart")
    seen_abnormal = False

    def reconnects(at_least: int) -> float | None:
        nonlocal seen_abnormal
        if not seen_abnormal:
            seen_abnormal = stats(plugin, a, "/run/pods/a/disk").volume_condition.abnormal
        count = metric("nbdcsi_node_reconnects_total", volume=a["id"])
        return count if count and count >= at_least else None

    # First a graceful restart (SIGTERM, as a rollout does), then a crash (SIGKILL).
    say("NBDCSI-REQUEST", "restart-storage")
    poll("a reconnect after the graceful restart", lambda: reconnects(1), 120, 0.2)
    step("storage-restarted-gracefully")
    say("NBDCSI-REQUEST", "crash-storage")
    count = poll("a reconnect after the crash", lambda: reconnects(2), 120, 0.2)
    say("RESULT", "reconnects", count)
    say("RESULT", "abnormal_seen", seen_abnormal)
    say("RESULT", "blackout_seconds", metric("nbdcsi_node_io_blackout_seconds_sum", volume=a["id"]))
    step("storage-restarted")
    check(not stats(plugin, a, "/run/pods/a/disk").volume_condition.abnormal, "still abnormal")

    def blackouts() -> float | None:
        count = metric("nbdcsi_node_io_blackout_seconds_count", volume=a["id"])
        return count if count and count >= 2 else None

    say("RESULT", "blackouts", poll("a blackout per restart in the metrics", blackouts, 60, 0.2))
    # fio lives through the restarts: the device completes more of its I/O after the last one.
    after_restarts = completed_ios(dev)
    poll("fio's I/O after the restarts", lambda: completed_ios(dev) > after_restarts, 120, 0.2)
    say("RESULT", "ios_after_restarts", completed_ios(dev) - after_restarts)
    check(fio.poll() is None, f"fio ended on its own (exit {fio.poll()}) before it was stopped")
    fio.send_signal(signal.SIGINT)  # the events are over: fio finishes its I/O and reports
    rc = fio.wait(120)
    text = Path("/run/fio.out").read_text(errors="replace")
    # fio stopped by a signal exits 128 and notes it before its JSON report.
    stopped = rc == 128 and "terminating on signal 2" in text[: text.find("{")]
    say("RESULT", "fio_end", "stopped-by-test" if stopped else f"exit-{rc}")
    job = json.loads(text[text.index("{") :])["jobs"][0]
    say("RESULT", "fio_errors", job["error"])
    say("RESULT", "fio_ios", job["read"]["total_ios"] + job["write"]["total_ios"])
    # The longest a single I/O of the VM waited: the blackout as the VM sees it.
    longest = max(job[op]["clat_ns"]["max"] for op in ("read", "write")) / 1e9
    say("RESULT", "fio_longest_io_seconds", f"{longest:.2f}")
    step("fio-done")
    fd = os.open("/run/pods/a/disk", os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    for i, (offset, data) in enumerate(regions(spec["seed"], a["size"])):
        check(os.pread(fd, len(data), offset) == data, f"region {i} changed across restarts")
    os.close(fd)
    unpublish(plugin, a, "/run/pods/a/disk")
    unstage(plugin, a, "/run/staging/a")
    say("RESULT", "configured_after_unstage", len(configured_nbd()))

    # -- stage/unstage cycles: no device may stay busy or configured -------------------------
    devices_before = len(list(Path("/sys/block").glob("nbd*")))
    t = time.monotonic()
    for i in range(spec["cycles"]):
        stage(plugin, c, "/run/staging/c", block_cap())
        if i == 0:
            say("RESULT", "cycle_device", configured_nbd())
        unstage(plugin, c, "/run/staging/c")
    say("RESULT", "cycles", spec["cycles"])
    say("RESULT", "cycles_seconds", f"{time.monotonic() - t:.1f}")
    say("RESULT", "configured_after_cycles", len(configured_nbd()))
    say("RESULT", "nbd_devices_grew", len(list(Path("/sys/block").glob("nbd*"))) - devices_before)
    say("RESULT", "state_files_left", len(list(Path(STATE).glob("volumes/*.json"))))
    step("cycles-done")
    say("RESULT", "plugin_exit", plugin.stop())


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:
        fail(f"{type(exc).__name__}: {exc}")
