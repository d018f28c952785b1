"""QEMU virtual machines for the end-to-end scenario: a QMP client, the serial console, one VM.

Owns: starting qemu-system-x86_64 (TCG) paused, with no disk on its command line; attaching
the volume over QMP the way a virt-launcher's QEMU has it (QEMU's own NBD client, a raw
format node on top, a virtio-blk device that the firmware boots from), so the export name
that carries the attachment's credential never shows in a process list or a log; reading the
serial console in a thread that stamps each line with the host's monotonic clock (the
scenario's timings come from these stamps, not from the guest's clock, which TCG and migration
distort); live migration (`-incoming defer` on the destination, `migrate` on the source,
`query-migrate` until it ends); and stopping the process by pid.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.servers import free_port, stop_process

QEMU = "qemu-system-x86_64"
# Seconds QEMU's NBD client keeps requests waiting while it reconnects to a storage node that
# went away (a restart): longer than any restart, so the guest never sees an error.
RECONNECT_DELAY = 60
# The device's PCI slot is fixed: source and destination of a migration must match.
DISK_PCI_ADDR = "0x4"


class QmpError(RuntimeError):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class Qmp:
    """A QMP client over a unix socket: one command at a time, events kept in `events`."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        value: dict[str, Any] = json.loads(line)
        return value

    def execute(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(command, reply["error"])
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


@dataclass
class Line:
    at: float  # time.monotonic() when the host read it
    text: str


@dataclass
class Console:
    """The guest's serial console, line by line, each stamped on arrival."""

    log: Path
    lines: list[Line] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False

    def follow(self, stream: Any) -> threading.Thread:
        def run() -> None:
            with open(self.log, "ab") as out:
                for raw in iter(stream.readline, b""):
                    out.write(raw)
                    out.flush()
                    text = raw.decode(errors="replace").rstrip("\r\n")
                    with self.cond:
                        self.lines.append(Line(time.monotonic(), text))
                        self.cond.notify_all()
            with self.cond:
                self.closed = True
                self.cond.notify_all()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def wait(
        self,
        pattern: str,
        timeout: float,
        start: int = 0,
        accept: Callable[[re.Match[str]], bool] = lambda m: True,
    ) -> tuple[int, Line, re.Match[str]]:
        """The first line from index `start` matching `pattern` (and `accept`); bounded."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self.cond:
            while True:
                while index < len(self.lines):
                    m = regex.search(self.lines[index].text)
                    if m and accept(m):
                        return index, self.lines[index], m
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    tail = "\n".join(line.text for line in self.lines[-30:])
                    why = "console closed" if self.closed else f"not within {timeout}s"
                    raise TimeoutError(f"{pattern!r}: {why}; console tail:\n{tail}")
                self.cond.wait(left)

    def wait_closed(self, timeout: float) -> None:
        """Until the console reached its end (the VM exited), so every line is in."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.closed, timeout):
                raise TimeoutError(f"console {self.log} still open after {timeout}s")

    def snapshot(self) -> list[Line]:
        with self.cond:
            return list(self.lines)

    def __len__(self) -> int:
        with self.cond:
            return len(self.lines)


@dataclass(frozen=True)
class NbdTarget:
    """Where a VM's disk is: publish_context's host, port and export (a secret)."""

    host: str
    port: int
    export: str

    def __repr__(self) -> str:  # never show the credential
        return f"NbdTarget({self.host}:{self.port}, export=<secret>)"


class Vm:
    """One qemu-system-x86_64 process: a paused machine whose disk is added over QMP."""

    def __init__(
        self, name: str, workdir: Path, *, memory_mb: int = 256, incoming: bool = False
    ) -> None:
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = workdir / "qmp.sock"
        if len(str(self.qmp_path)) > 100:  # sun_path holds 108 bytes
            raise ValueError(f"work directory too deep for a unix socket: {self.qmp_path}")
        self.qmp_path.unlink(missing_ok=True)
        self.console = Console(workdir / "console.log")
        self._nbd_node = "nbd0"
        self._nbd_generation = 0
        argv = [
            QEMU,
            "-name",
            name,
            "-accel",
            "tcg",
            "-m",
            str(memory_mb),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            # QEMU's own record of NBD reconnects (to stderr, a file apart from the console).
            "-trace",
            "nbd_reconnect_attempt_result",
            *(["-incoming", "defer"] if incoming else ["-S"]),
        ]
        (workdir / "qemu-argv.txt").write_text("\n".join(argv) + "\n")
        self.started = time.monotonic()
        self.stderr = workdir / "qemu-stderr.log"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
        self.console.follow(self.proc.stdout)
        try:
            self.qmp = Qmp(self.qmp_path)
        except BaseException:
            self.kill()
            raise

    def attach_disk(self, target: NbdTarget) -> None:
        """The volume as the VM's boot disk: nbd node, raw node, virtio-blk device."""
        self._add_nbd(self._nbd_node, target)
        self.qmp.execute("blockdev-add", **self._raw_options(self._nbd_node))
        self.qmp.execute(
            "device_add",
            driver="virtio-blk-pci",
            id="vd0",
            drive="disk0",
            bus="pci.0",
            addr=DISK_PCI_ADDR,
            bootindex=1,
        )

    def _add_nbd(self, node_name: str, target: NbdTarget) -> None:
        self.qmp.execute(
            "blockdev-add",
            **{
                "driver": "nbd",
                "node-name": node_name,
                "server": {"type": "inet", "host": target.host, "port": str(target.port)},
                "export": target.export,
                "reconnect-delay": RECONNECT_DELAY,
            },
        )

    def _raw_options(self, file_node: str) -> dict[str, Any]:
        return {"driver": "raw", "node-name": "disk0", "file": file_node, "cache": {"direct": True}}

    def boot(self) -> None:
        self.qmp.execute("cont")

    # -- migration -------------------------------------------------------------------------

    def listen_incoming(self) -> int:
        port = free_port()
        self.qmp.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        return port

    def migrate(self, port: int, timeout: float = 120.0) -> dict[str, Any]:
        """Migrate to a destination listening on `port`; returns the final query-migrate."""
        self.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
        self.qmp.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.qmp.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"migration of {self.name} {status}: {info}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration of {self.name} still {status} after {timeout}s")
            time.sleep(0.1)

    def status(self) -> str:
        reply: dict[str, Any] = self.qmp.execute("query-status")
        return str(reply["status"])

    # -- online expansion ------------------------------------------------------------------

    def grow_disk(self, target: NbdTarget, size: int) -> None:
        """What the node side and KubeVirt do once the volume is bigger on the storage node.

        QEMU's NBD client learns an export's size in the handshake only and refuses to grow
        past it ("Cannot grow NBD nodes"). So, as the node plugin's NodeExpandVolume refreshes
        its device: a second NBD node on the same attachment (its handshake carries the new
        size) takes the place of the first under the raw node (`blockdev-reopen`), and the old
        connection goes. Then `block_resize`, which KubeVirt calls after the PVC grew, tells
        the virtio-blk device, which tells the guest (a configuration change interrupt).
        """
        self._nbd_generation += 1
        old, new = self._nbd_node, f"nbd{self._nbd_generation}"
        self._add_nbd(new, target)
        self.qmp.execute("blockdev-reopen", options=[self._raw_options(new)])
        self._nbd_node = new
        self.qmp.execute("blockdev-del", **{"node-name": old})
        self.qmp.execute("block_resize", **{"node-name": "disk0", "size": size})

    def reconnects(self) -> int:
        """How many times QEMU's NBD client reconnected (successfully) to its server."""
        text = self.stderr.read_text(errors="replace")
        return len(re.findall(r"nbd_reconnect_attempt_result ret 0\b", text))

    def io_error_events(self) -> list[dict[str, Any]]:
        with contextlib.suppress(OSError, ConnectionError, QmpError):
            self.qmp.execute("query-status")  # reads the events queued so far
        return [e for e in self.qmp.events if e.get("event") == "BLOCK_IO_ERROR"]

    # -- stopping --------------------------------------------------------------------------

    def quit(self) -> int:
        with contextlib.suppress(OSError, ConnectionError, QmpError):
            self.qmp.execute("quit")
        self.qmp.close()
        return stop_process(self.proc, timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(AttributeError):
            self.qmp.close()
