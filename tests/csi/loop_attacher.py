"""An Attacher for machines without kernel NBD: nbdfuse exposes the export as a file, and a loop
device turns the file into a block device.

Owns the host-side stand-in for csi/nbd_kernel.py (this host's kernel has no NBD driver). It is
not a mock: every byte the Node service formats, mounts and reads travels over NBD to a real
storage node, through libnbd inside nbdfuse. What it cannot do: change size (nbdfuse reads the
export's size once) and reconnect; those paths run for real inside the VM tests
(tests/vm/test_node_plugin.py). The export name (the credential) is on nbdfuse's command line:
acceptable for a test helper, which is one reason this is not production code.

Devices are recognised after a "restart" (a new instance on the same base directory) by the
loop device's backing file, whose directory name is a hash of the volume id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

from csi.attach import AttachError, Device, Health, Target

SETTLE = 20.0


def _slot(volume_id: str) -> str:
    return hashlib.sha256(volume_id.encode()).hexdigest()[:16]


class LoopAttacher:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._watching: set[str] = set()
        self.volumes: dict[str, str] = {}  # slot -> volume id, for ours()
        self.attach_calls = 0
        self.detach_calls = 0

    def _dir(self, volume_id: str) -> Path:
        return self.base / _slot(volume_id)

    def _losetup_list(self) -> list[dict[str, str]]:
        out = subprocess.run(
            ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if not out.strip():
            return []
        return list(json.loads(out).get("loopdevices", []))

    def _loop_of(self, volume_id: str) -> Device | None:
        disk = str(self._dir(volume_id) / "disk")
        for row in self._losetup_list():
            if (row.get("back-file") or "").strip() == disk:
                name = row["name"]
                return Device(name, int(name.removeprefix("/dev/loop")))
        return None

    async def attach(self, volume_id: str, target: Target, index: int | None = None) -> Device:
        return await asyncio.to_thread(self._attach, volume_id, target)

    def _attach(self, volume_id: str, target: Target) -> Device:
        self.attach_calls += 1
        mount_dir = self._dir(volume_id)
        mount_dir.mkdir(exist_ok=True)
        uri = f"nbd://{target.host}:{target.port}/{urllib.parse.quote(target.export, safe='')}"
        log = open(self.base / f"{_slot(volume_id)}.log", "ab")  # noqa: SIM115
        argv = ["nbdfuse", *(["-r"] if target.readonly else []), str(mount_dir / "disk"), uri]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[volume_id] = proc
        disk = mount_dir / "disk"
        deadline = time.monotonic() + SETTLE
        while not disk.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                self._stop_fuse(volume_id)
                raise AttachError(f"nbdfuse did not expose {target.address} (exit {proc.poll()})")
            time.sleep(0.02)
        argv = ["losetup", "--find", "--show", *(["--read-only"] if target.readonly else [])]
        result = subprocess.run([*argv, str(disk)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            self._stop_fuse(volume_id)
            raise AttachError(f"losetup failed: {result.stderr.strip()}")
        name = result.stdout.strip()
        self._watching.add(volume_id)
        self.volumes[_slot(volume_id)] = volume_id
        (self.base / f"{_slot(volume_id)}.volume").write_text(volume_id)
        return Device(name, int(name.removeprefix("/dev/loop")))

    async def find(self, volume_id: str) -> Device | None:
        return await asyncio.to_thread(self._loop_of, volume_id)

    async def adopt(self, volume_id: str, device: Device, target: Target) -> None:
        self._watching.add(volume_id)

    async def detach(self, volume_id: str, device: Device) -> None:
        await asyncio.to_thread(self._detach, volume_id, device)

    def _detach(self, volume_id: str, device: Device) -> None:
        self.detach_calls += 1
        self._watching.discard(volume_id)
        if self._loop_of(volume_id) is not None:
            subprocess.run(["losetup", "--detach", device.path], check=False)
            deadline = time.monotonic() + SETTLE
            while self._loop_of(volume_id) is not None:
                if time.monotonic() > deadline:
                    raise AttachError(f"{device.path} stays attached")
                time.sleep(0.02)
        self._stop_fuse(volume_id)

    def _stop_fuse(self, volume_id: str) -> None:
        mount_dir = self._dir(volume_id)
        deadline = time.monotonic() + SETTLE
        while os.path.ismount(mount_dir):
            # Busy for a moment after the loop device lets go of the file: retry, bounded.
            result = subprocess.run(
                ["fusermount3", "-u", str(mount_dir)], capture_output=True, text=True, check=False
            )
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AttachError(f"cannot unmount {mount_dir}: {result.stderr.strip()}")
            time.sleep(0.05)
        proc = self.procs.pop(volume_id, None)
        if proc is not None:
            try:
                proc.wait(SETTLE)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(OSError):
            mount_dir.rmdir()

    async def refresh_size(self, volume_id: str, device: Device, target: Target) -> int:
        # nbdfuse fixes the size at start: report the device as it is.
        out = subprocess.run(
            ["blockdev", "--getsize64", device.path], capture_output=True, text=True, check=True
        ).stdout
        return int(out)

    def health(self, volume_id: str) -> Health:
        proc = self.procs.get(volume_id)
        if volume_id not in self._watching:
            return Health(False, "the device is not attached")
        if proc is not None and proc.poll() is not None:
            return Health(False, f"nbdfuse exited with {proc.returncode}")
        return Health(True)

    def watching(self, volume_id: str) -> bool:
        return volume_id in self._watching

    async def ours(self) -> dict[str, Device]:
        found = {}
        for record in self.base.glob("*.volume"):
            volume_id = record.read_text()
            device = await self.find(volume_id)
            if device is not None:
                found[volume_id] = device
        return found

    async def close(self) -> None:
        pass

    def cleanup(self) -> None:
        """Test teardown: detach whatever is left (loop devices, fuse mounts, processes)."""
        for record in self.base.glob("*.volume"):
            volume_id = record.read_text()
            device = self._loop_of(volume_id)
            with contextlib.suppress(AttachError):
                if device is not None:
                    self._detach(volume_id, device)
                self._stop_fuse(volume_id)
