"""Inside a kernel-path guest: one Kubernetes node of the end-to-end scenario (docs/e2e.md).

Run by tests/e2e/kube_node.py in a qemu-system guest booted from Debian's kernel with the host's
tree over 9p (tests/vm/guest.py), so the node plugin here is the project's own code on a kernel
with NBD. One argument, a JSON object: the node's name and address, the guest ports of the
plugin's CSI endpoint, of its metrics and of this agent's control socket, and the plugin's NBD
options.

It starts the node plugin (`python -m csi --mode node`, CSI endpoint on TCP so the host, which
plays kubelet, reaches it through QEMU's hostfwd), then serves a control socket with one JSON
request per connection for what kubelet and a VM would do on the node and the CSI calls do not:
make kubelet's directories, run and stop the workload (tests/e2e/records.py) on a published
device, read records back, and the fence probes (a leftover kernel device on an attachment, a
write to it, a fresh NBD connection with libnbd). It prints `E2E-NODE READY` once the control
socket listens and `E2E-NODE ...` lines as it goes; the workload prints its records' `E2E-WL`
lines to the same console. Every wait here has a bound; none is a sleep for a state.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from csi.attach import Target
from csi.nbd_dial import dial
from csi.nbd_kernel import NbdNetlink
from csi.netlink import ConnectParams
from tests.e2e import records

GUEST_IP = "10.0.2.15"
STATE_DIR = "/run/nbd-csi"
PLUGIN_LOG = Path("/run/plugin.log")
STOP_FILE = Path("/run/e2e-workload.stop")
SUMMARY = Path("/run/e2e-workload.json")
# The leftover device of the fence probe is marked apart from the plugin's own devices.
STALE_BACKEND = "nbd-csi-e2e/stale"
REPLY_LIMIT = 1 << 20

# libnbd (nbdsh's Python), fed host, port and export name on stdin, never on a command line.
_PROBE = """
import sys
import nbd
host, port, export = (sys.stdin.readline().strip() for _ in range(3))
try:
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_tcp(host, port)
    h.pread(4096, 0)
    print("ok")
except nbd.Error as exc:
    print("refused", str(exc).replace(export, "<export>") if export else exc)
"""


def say(text: str) -> None:
    print(f"E2E-NODE {text}", flush=True)


class RequestError(Exception):
    pass


def bounded_wait(what: str, ready: Any, timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RequestError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def device_of(path: str) -> str:
    """The nbdX name of the block device node at `path` (a bind mount of it)."""
    rdev = os.stat(path).st_rdev
    return os.path.basename(os.readlink(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))


def configured(name: str) -> bool:
    return Path(f"/sys/block/{name}/pid").exists()


class Agent:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.plugin: subprocess.Popen[bytes] | None = None
        self.writer: subprocess.Popen[bytes] | None = None
        self.running = True

    # -- the node plugin -------------------------------------------------------------------

    def start_plugin(self) -> None:
        s = self.spec
        argv = [
            sys.executable,
            "-m",
            "csi",
            "--mode=node",
            f"--endpoint=tcp://{GUEST_IP}:{s['endpoint_port']}",
            f"--node-id={s['node']}",
            f"--node-address={s['address']}",
            f"--state-dir={STATE_DIR}",
            f"--metrics-listen={GUEST_IP}:{s['metrics_port']}",
            f"--nbd-connections={s['connections']}",
            f"--nbd-io-timeout={s['io_timeout']}",
            f"--nbd-dead-timeout={s['dead_timeout']}",
        ]
        with open(PLUGIN_LOG, "ab") as log:
            self.plugin = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        say(f"PLUGIN-STARTED pid={self.plugin.pid}")

    def stop_plugin(self) -> int:
        if self.plugin is None:
            return 0
        if self.plugin.poll() is None:
            self.plugin.send_signal(signal.SIGTERM)
            try:
                self.plugin.wait(60)
            except subprocess.TimeoutExpired:
                self.plugin.kill()
                self.plugin.wait()
        return self.plugin.returncode

    # -- requests --------------------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = str(request.pop("op", ""))
        fn = getattr(self, "op_" + op.replace("-", "_"), None)
        if fn is None:
            raise RequestError(f"unknown op {op!r}")
        result: dict[str, Any] = fn(**request)
        return result

    def op_ping(self) -> dict[str, Any]:
        alive = self.plugin is not None and self.plugin.poll() is None
        return {"plugin_alive": alive}

    def op_mkdir(self, path: str) -> dict[str, Any]:
        """kubelet makes the staging directory and the publish target's parent."""
        Path(path).mkdir(parents=True, exist_ok=True)
        return {}

    def op_device_of(self, path: str) -> dict[str, Any]:
        name = device_of(path)
        return {"device": name, "backend": Path(f"/sys/block/{name}/backend").read_text().strip()}

    def op_configured(self) -> dict[str, Any]:
        names = sorted(p.name for p in Path("/sys/block").glob("nbd*") if configured(p.name))
        return {"devices": names}

    def op_write_start(self, path: str, tag: str, first: int) -> dict[str, Any]:
        if self.writer is not None and self.writer.poll() is None:
            raise RequestError("the workload is already running")
        STOP_FILE.unlink(missing_ok=True)
        SUMMARY.unlink(missing_ok=True)
        self.writer = subprocess.Popen(
            [
                sys.executable,
                "-u",
                "-m",
                "tests.e2e.records",
                "write",
                path,
                f"--tag={tag}",
                f"--first={first}",
                f"--stop-file={STOP_FILE}",
                f"--summary={SUMMARY}",
            ]
        )
        say(f"WORKLOAD-STARTED pid={self.writer.pid} first={first}")
        return {"pid": self.writer.pid}

    def op_write_stop(self, timeout: float = 120.0) -> dict[str, Any]:
        if self.writer is None:
            raise RequestError("no workload was started")
        STOP_FILE.touch()
        try:
            rc = self.writer.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RequestError(f"the workload did not stop within {timeout}s") from None
        self.writer = None
        if rc != 0 or not SUMMARY.exists():
            raise RequestError(f"the workload exited with {rc} and no summary")
        summary: dict[str, Any] = json.loads(SUMMARY.read_text())
        return summary

    def op_verify(self, path: str, tag: str, first: int, last: int) -> dict[str, Any]:
        bad = records.verify_device(path, tag, first, last)
        return {"checked": last - first + 1, "bad": bad[:10], "bad_count": len(bad)}

    def op_stale_attach(self, context: dict[str, str]) -> dict[str, Any]:
        """A second kernel device on this node's attachment, made outside the plugin: what a
        node whose NodeUnstageVolume never ran (a crashed plugin, a hung process) keeps."""
        target = Target.from_context(context)
        sock, info = dial(target.host, target.port, target.export)
        netlink = NbdNetlink()
        try:
            index = netlink.connect(
                ConnectParams(
                    fds=[sock.fileno()],
                    size=info.size,
                    block_size=info.kernel_block_size(),
                    server_flags=int(info.flags),
                    # As the plugin's devices: a request unanswered this long is retried on
                    # another connection, and fails when there is none (no dead timeout).
                    timeout=int(self.spec["io_timeout"]),
                    backend=STALE_BACKEND,
                )
            )
        finally:
            sock.close()
            netlink.close()
        name = f"nbd{index}"
        bounded_wait(f"{name} to show its size", lambda: _size(name) > 0, 30)
        say(f"STALE-DEVICE {name}")
        return {"device": name, "size": _size(name)}

    def op_stale_write(self, device: str, label: str, timeout: float = 90.0) -> dict[str, Any]:
        """One O_DIRECT write + fsync of a probe block at the device's reserved tail. In a
        thread, so a write the kernel keeps waiting cannot stop this agent: past `timeout`
        the answer is "hung" (not acknowledged either)."""
        outcome: list[str] = []
        worker = threading.Thread(target=lambda: outcome.append(_probe_write(device, label)))
        worker.daemon = True
        worker.start()
        worker.join(timeout)
        result = outcome[0] if outcome else f"hung for {timeout}s"
        return {"result": result, "configured": configured(device)}

    def op_stale_detach(self, device: str) -> dict[str, Any]:
        netlink = NbdNetlink()
        try:
            if configured(device):
                netlink.disconnect(int(device.removeprefix("nbd")))
        finally:
            netlink.close()
        bounded_wait(f"{device} to be released", lambda: not configured(device), 30)
        return {}

    def op_probe_connect(self, context: dict[str, str]) -> dict[str, Any]:
        """A new NBD connection from this node (libnbd), with the export name given."""
        target = Target.from_context(context)
        done = subprocess.run(
            ["nbdsh", "-n", "-c", _PROBE],
            input=f"{target.host}\n{target.port}\n{target.export}\n",
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "HOME": "/root"},
        )
        text = (done.stdout.strip() or done.stderr.strip()).replace(target.export, "<export>")
        return {"result": text.splitlines()[-1] if text else f"nbdsh exited {done.returncode}"}

    def op_log(self, lines: int = 80) -> dict[str, Any]:
        text = PLUGIN_LOG.read_text(errors="replace") if PLUGIN_LOG.exists() else ""
        return {"log": "\n".join(text.splitlines()[-lines:])}

    def op_shutdown(self) -> dict[str, Any]:
        if self.writer is not None and self.writer.poll() is None:
            STOP_FILE.touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.writer.wait(60)
        self.running = False
        return {"plugin_rc": self.stop_plugin()}

    # -- the control socket ----------------------------------------------------------------

    def serve(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((GUEST_IP, self.spec["control_port"]))
        listener.listen(4)
        # Wake up now and then to notice a plugin that died (then say so once).
        listener.settimeout(1.0)
        say(f"READY node={self.spec['node']} address={self.spec['address']}")
        reported = False
        while self.running:
            if not reported and self.plugin is not None and self.plugin.poll() is not None:
                say(f"PLUGIN-EXITED rc={self.plugin.returncode}")
                reported = True
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                self._one(conn)
        listener.close()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        reader = conn.makefile("rb")
        line = reader.readline(REPLY_LIMIT)
        try:
            request = json.loads(line)
            reply = {"ok": True, **self.handle(request)}
        except Exception as exc:  # one failed request must not end the node
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")


def _probe_write(device: str, label: str) -> str:
    buf = records._aligned(records.RECORD)
    buf[:] = records.probe_block(label)
    try:
        fd = os.open(f"/dev/{device}", os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        return f"error {_errname(exc)}"
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            return "error the device has size 0 (disconnected)"
        os.pwrite(fd, buf, records.probe_offset(size))
        os.fsync(fd)
        return "ok"
    except OSError as exc:
        return f"error {_errname(exc)}"
    finally:
        os.close(fd)


def _size(name: str) -> int:
    try:
        return int(Path(f"/sys/block/{name}/size").read_text()) * 512
    except (OSError, ValueError):
        return 0


def _errname(exc: OSError) -> str:
    code = exc.errno or 0
    return f"{errno.errorcode.get(code, code)} ({exc.strerror})"


def main() -> int:
    agent = Agent(json.loads(sys.argv[1]))
    agent.start_plugin()
    try:
        agent.serve()
    finally:
        rc = agent.stop_plugin()
        say(f"DONE plugin_rc={rc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
