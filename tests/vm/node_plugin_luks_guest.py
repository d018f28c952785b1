"""Inside the VM: encrypted volumes (LUKS2) through the real node plugin process.

Run by tests/vm/test_node_plugin_luks.py in a guest booted from Debian's kernel (dm-crypt) with
the host's tree over 9p; the plugin and its helpers (node_plugin_guest.py) are the ones the
plain test uses. One argument: a JSON object with the volumes (CSI id, publish_context), the
node-stage secrets and the marker to write.

An encrypted Block volume and an encrypted ext4 volume are staged (formatted with LUKS2 on
first use) and published; the marker is written through the published device and into a file,
and into a plain control volume. The plugin is killed and restarted (the mappings stay open,
the data reads back), then the storage node (reconnect under dm-crypt, data reads back), then
both encrypted volumes are grown (cryptsetup resize, then ext4) and unstaged (no dm device
left), staged again with the same key (data back), and the master key is rotated through
`encryption-key-previous`. The host then looks for the marker in the storage node's files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc

from csi.v1 import csi_pb2 as pb
from tests.vm.node_plugin_guest import (
    METRICS,
    PLUGIN_LOG,
    STATE,
    Plugin,
    block_cap,
    check,
    configured_nbd,
    fail,
    metric,
    mount_cap,
    node_plugin,
    poll,
    publish,
    say,
    stats,
    step,
    unpublish,
    unstage,
)

MiB = 1024 * 1024
ENCRYPTED = {"nbd.csi.dev/encrypted": "true"}


def stage(p: Plugin, vol: dict, staging: str, cap: pb.VolumeCapability, secrets: dict) -> None:
    p.node.NodeStageVolume(
        pb.NodeStageVolumeRequest(
            volume_id=vol["id"],
            publish_context=vol["context"],
            staging_target_path=staging,
            volume_capability=cap,
            volume_context=ENCRYPTED if secrets else {},
            secrets=secrets,
        ),
        timeout=120,
    )


def stage_error(p: Plugin, vol: dict, staging: str, secrets: dict) -> str:
    try:
        stage(p, vol, staging, block_cap(), secrets)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def dm_devices() -> list[str]:
    return sorted(d.name for d in Path("/sys/block").glob("dm-*"))


def dm_of(path: str) -> tuple[str, list[str]]:
    """The dm-N behind a device node, and the devices under it."""
    rdev = os.stat(path).st_rdev
    name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))
    check(name.startswith("dm-"), f"{path} is {name}, not a device-mapper device")
    return name, sorted(s.name for s in Path(f"/sys/block/{name}/slaves").iterdir())


def size_of(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def write_pattern(path: str, pattern: bytes, offsets: list[int]) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in offsets:
            os.pwrite(fd, pattern, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_pattern(path: str, pattern: bytes, offsets: list[int]) -> bool:
    """The pattern at every offset, read past the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return all(os.pread(fd, len(pattern), o) == pattern for o in offsets)
    finally:
        os.close(fd)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    spec = json.loads(sys.argv[1])
    a, b, c = spec["block"], spec["fs"], spec["plain"]
    key1 = {"encryption-key": spec["key1"]}
    key2 = {"encryption-key": spec["key2"]}
    rotate = {"encryption-key": spec["key2"], "encryption-key-previous": spec["key1"]}
    marker = spec["marker"].encode()
    pattern = marker * (MiB // len(marker))
    offsets = [0, 5 * MiB, a["size"] - 4 * MiB]  # offsets in the plaintext device
    plugin = node_plugin(
        f"--metrics-listen={METRICS}",
        f"--nbd-io-timeout={spec['io_timeout']}",
        "--nbd-dead-timeout=90",
    )
    plugin.start()
    step("plugin-up")

    # -- encrypted Block: formatted on first stage, published as the dm-crypt device ---------
    stage(plugin, a, "/run/staging/a", block_cap(), key1)
    publish(plugin, a, "/run/staging/a", "/run/pods/a/disk", block_cap())
    dm, slaves = dm_of("/run/pods/a/disk")
    check(len(slaves) == 1 and slaves[0].startswith("nbd"), f"{dm} sits on {slaves}")
    say("RESULT", "block_dm", f"{dm}:{slaves[0]}")
    plain_size = size_of("/run/pods/a/disk")
    say("RESULT", "block_plaintext_bytes", plain_size)
    write_pattern("/run/pods/a/disk", pattern, offsets)
    check(read_pattern("/run/pods/a/disk", pattern, offsets), "block pattern read back")
    step("block-written")

    # -- encrypted ext4 --------------------------------------------------------------------
    stage(plugin, b, "/run/staging/b", mount_cap("ext4"), key1)
    publish(plugin, b, "/run/staging/b", "/run/pods/b/mnt", mount_cap("ext4"))
    Path("/run/pods/b/mnt/secret").write_bytes(pattern * 2)
    os.sync()
    say(
        "RESULT",
        "fs_source",
        subprocess.check_output(["findmnt", "-no", "SOURCE", "/run/staging/b"], text=True).strip(),
    )

    # -- a plain volume with the same bytes: the host's search must find them there --------
    stage(plugin, c, "/run/staging/c", block_cap(), {})
    publish(plugin, c, "/run/staging/c", "/run/pods/c/disk", block_cap())
    write_pattern("/run/pods/c/disk", pattern, [0])
    unpublish(plugin, c, "/run/pods/c/disk")
    unstage(plugin, c, "/run/staging/c")
    step("written")

    # -- the plugin is killed and comes back: the mappings stay open ------------------------
    plugin.kill()
    plugin.start()
    check(dm_of("/run/pods/a/disk") == (dm, slaves), "the mapping changed across a restart")
    st = stats(plugin, a, "/run/pods/a/disk")
    check(not st.volume_condition.abnormal, f"abnormal after restart: {st.volume_condition}")
    check(st.usage[0].total == plain_size, f"block stats {st.usage[0].total} != {plain_size}")
    # NodeStage again (kubelet retries it): idempotent on the open mapping.
    stage(plugin, a, "/run/staging/a", block_cap(), key1)
    stage(plugin, b, "/run/staging/b", mount_cap("ext4"), key1)
    drop_caches()
    check(read_pattern("/run/pods/a/disk", pattern, offsets), "block pattern after restart")
    check(Path("/run/pods/b/mnt/secret").read_bytes() == pattern * 2, "file after restart")
    step("plugin-restarted")

    # -- the storage node restarts: the NBD device reconnects under dm-crypt ------------------
    say("NBDCSI-REQUEST", "restart-storage")

    def reconnected() -> float | None:
        count = metric("nbdcsi_node_reconnects_total", volume=a["id"])
        return count if count and count >= 1 else None

    poll("a reconnect after the storage node restart", reconnected, 120, 0.2)
    poll(
        "volume b's reconnect",
        lambda: (metric("nbdcsi_node_reconnects_total", volume=b["id"]) or 0) >= 1,
        120,
        0.2,
    )
    drop_caches()
    check(read_pattern("/run/pods/a/disk", pattern, offsets), "block pattern after storage")
    check(Path("/run/pods/b/mnt/secret").read_bytes() == pattern * 2, "file after storage")
    step("storage-restarted")

    # -- expand: the NBD device, then the mapping, then ext4 ---------------------------------
    say("NBDCSI-REQUEST", "expand")
    before = os.statvfs("/run/pods/b/mnt").f_blocks

    def grown(vol: dict, path: str) -> int:
        try:
            got = plugin.node.NodeExpandVolume(
                pb.NodeExpandVolumeRequest(volume_id=vol["id"], volume_path=path), timeout=60
            ).capacity_bytes
        except grpc.RpcError as exc:
            fail(f"NodeExpandVolume: {exc.code().name}: {exc.details()}")
        return got if got >= spec["grown_size"] else 0

    poll("volume a to grow", lambda: grown(a, "/run/pods/a/disk"), 60, 0.5)
    poll("volume b to grow", lambda: grown(b, "/run/pods/b/mnt"), 60, 0.5)
    grown_size = size_of("/run/pods/a/disk")
    say("RESULT", "block_grown_plaintext_bytes", grown_size)
    check(grown_size == plain_size + spec["grown_size"] - a["size"], "mapping not resized")
    check(os.statvfs("/run/pods/b/mnt").f_blocks > before, "ext4 did not grow")
    check(read_pattern("/run/pods/a/disk", pattern, offsets), "block pattern after expand")
    step("expanded")

    # -- unstage closes the mappings; stage again opens them with the same key --------------
    unpublish(plugin, a, "/run/pods/a/disk")
    unstage(plugin, a, "/run/staging/a")
    unpublish(plugin, b, "/run/pods/b/mnt")
    unstage(plugin, b, "/run/staging/b")
    unstage(plugin, b, "/run/staging/b")  # idempotent
    say("RESULT", "dm_after_unstage", len(dm_devices()))
    say("RESULT", "nbd_after_unstage", len(configured_nbd()))
    stage(plugin, b, "/run/staging/b", mount_cap("ext4"), key1)
    publish(plugin, b, "/run/staging/b", "/run/pods/b/mnt", mount_cap("ext4"))
    check(Path("/run/pods/b/mnt/secret").read_bytes() == pattern * 2, "file after restage")
    unpublish(plugin, b, "/run/pods/b/mnt")
    say("RESULT", "wrong_key_fs", stage_error_fs(plugin, b, key2))
    unstage(plugin, b, "/run/staging/b")
    step("restaged")

    # -- rotation: the new key with the previous one; afterwards only the new key opens -----
    stage(plugin, a, "/run/staging/a", block_cap(), rotate)
    publish(plugin, a, "/run/staging/a", "/run/pods/a/disk", block_cap())
    check(read_pattern("/run/pods/a/disk", pattern, offsets), "block pattern after rotation")
    unpublish(plugin, a, "/run/pods/a/disk")
    unstage(plugin, a, "/run/staging/a")
    say("RESULT", "old_key_after_rotation", stage_error(plugin, a, "/run/staging/a", key1))
    unstage(plugin, a, "/run/staging/a")
    say("RESULT", "new_key_after_rotation", stage_error(plugin, a, "/run/staging/a", key2))
    unstage(plugin, a, "/run/staging/a")
    say("RESULT", "dm_at_end", len(dm_devices()))
    say("RESULT", "nbd_at_end", len(configured_nbd()))
    step("rotated")

    # -- no key in the plugin's log or state files ------------------------------------------
    leaks = 0
    texts = [PLUGIN_LOG.read_bytes()] + [p.read_bytes() for p in Path(STATE).rglob("*.json")]
    for text in texts:
        for secret in (spec["key1"], spec["key2"], *spec["derived_hex"]):
            leaks += text.count(secret.encode())
    say("RESULT", "key_leaks", leaks)
    say("RESULT", "plugin_exit", plugin.stop())


def stage_error_fs(p: Plugin, vol: dict, secrets: dict) -> str:
    """Stage with a key that is not the volume's: refused (after unstage of the good one)."""
    unstage(p, vol, "/run/staging/b")
    try:
        stage(p, vol, "/run/staging/b", mount_cap("ext4"), secrets)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


if __name__ == "__main__":
    t0 = time.monotonic()
    try:
        main()
    except Exception as exc:
        fail(f"{type(exc).__name__}: {exc}")
    say("RESULT", "seconds", f"{time.monotonic() - t0:.1f}")
