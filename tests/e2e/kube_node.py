"""Kubernetes nodes of the kernel-path scenario: qemu-system guests running the node plugin.

Owns booting one guest (Debian's kernel under TCG, the host's tree over 9p read-only, the
initramfs of tests/vm/guest.py) whose init runs tests/e2e/kube_node_guest.py, and the host's
handles on it:

- `node`: the CSI Node service of the plugin in the guest, over gRPC through QEMU's hostfwd
  (host 127.0.0.1:PORT -> guest 10.0.2.15:10000), called the way kubelet calls it;
- `request()`: the guest agent's control socket (hostfwd too), one JSON request per connection;
- `metric()`: the plugin's Prometheus metrics (hostfwd);
- `console`: the serial console, each line stamped with the host's monotonic clock
  (tests/e2e/qemu.py's Console).

The guest reaches nothing but the storage nodes: user networking with restrict=on, and one
guestfwd per storage node (guest ADVERTISED_IP:PORT, the address the storage node advertises in
publish_context) that runs `socat` to the node's real listener on 127.0.0.1, with `bind=` this
node's own loopback address as the source. So each guest's NBD connections reach the storage
node from its own address (127.0.0.2 for node A, 127.0.0.3 for node B), the address its node id
`NAME@ADDRESS` names and its attachments are bound to: the address binding and the fence are
the storage node's real checks, not a convention of the test.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from csi.v1 import csi_pb2 as pb
from csi.v1 import csi_pb2_grpc as pb_grpc
from tests.e2e.qemu import Console
from tests.support.servers import REPO, free_port, stop_process
from tests.vm.guest import GuestImage

GUEST_IP = "10.0.2.15"
GUEST_ENDPOINT_PORT = 10000
GUEST_CONTROL_PORT = 7000
GUEST_METRICS_PORT = 9810
CALL_TIMEOUT = 180.0
# The user-mode netdev tests/vm/guest.py builds when it forwards nothing.
_BARE_NETDEV = "user,id=n0,restrict=on"
_METRIC = re.compile(r"^(\w+)(\{[^}]*\})? (\S+)$")


class NodeRequestFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Forward:
    """A storage node as the guests see it: guest `ip`:`port` -> host 127.0.0.1:`port`."""

    ip: str
    port: int


@dataclass(frozen=True)
class NodeOptions:
    connections: int = 2
    io_timeout: int = 4  # docs/csi-node.md: bounds the VM's longest I/O across a restart
    dead_timeout: int = 120
    memory_mb: int = 1024


class KubeNode:
    """One guest = one Kubernetes node `name@address`, booted by `boot()`."""

    def __init__(
        self,
        name: str,
        address: str,
        image: GuestImage,
        workdir: Path,
        forwards: Sequence[Forward],
        options: NodeOptions = NodeOptions(),
    ) -> None:
        self.name, self.address, self.image = name, address, image
        self.workdir, self.forwards, self.options = workdir, tuple(forwards), options
        workdir.mkdir(parents=True, exist_ok=True)
        self.console = Console(workdir / "console.log")
        self.endpoint_port = free_port()
        self.control_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.node: Any = None
        self.identity: Any = None
        # What NodeGetInfo reported: the CO's node id for this node (ControllerPublish and
        # ControllerUnpublish take it as kubelet put it in the CSINode object).
        self.reported_node_id = ""

    @property
    def node_id(self) -> str:
        return self.reported_node_id or f"{self.name}@{self.address}"

    # -- booting ---------------------------------------------------------------------------

    def netdev(self) -> str:
        parts = [_BARE_NETDEV]
        for f in self.forwards:
            # QEMU options escape a comma by doubling it: socat's `TCP:...,bind=...`.
            # socat's messages go to a file: QEMU gives the command the guest's connection as
            # stdin, stdout *and* stderr, so an error message would reach the guest's NBD
            # client as protocol bytes ("Wrong magic").
            parts.append(
                f"guestfwd=tcp:{f.ip}:{f.port}-cmd:socat -lf {self.workdir / 'socat.log'} - "
                f"TCP:127.0.0.1:{f.port},,bind={self.address}"
            )
        for host_port, guest_port in (
            (self.endpoint_port, GUEST_ENDPOINT_PORT),
            (self.control_port, GUEST_CONTROL_PORT),
            (self.metrics_port, GUEST_METRICS_PORT),
        ):
            parts.append(f"hostfwd=tcp:127.0.0.1:{host_port}-{GUEST_IP}:{guest_port}")
        return ",".join(parts)

    def script(self) -> str:
        o = self.options
        spec = {
            "node": self.name,
            "address": self.address,
            "endpoint_port": GUEST_ENDPOINT_PORT,
            "control_port": GUEST_CONTROL_PORT,
            "metrics_port": GUEST_METRICS_PORT,
            "connections": o.connections,
            "io_timeout": o.io_timeout,
            "dead_timeout": o.dead_timeout,
        }
        return (
            f"cd {shlex.quote(str(REPO))}\n"
            f"export PYTHONPATH={shlex.quote(str(REPO))} PYTHONDONTWRITEBYTECODE=1\n"
            f"exec {shlex.quote(sys.executable)} -u tests/e2e/kube_node_guest.py "
            f"{shlex.quote(json.dumps(spec))}\n"
        )

    def argv(self) -> list[str]:
        cmd_file = self.workdir / "guest-cmd.sh"
        cmd_file.write_text(self.script())
        argv = self.image.qemu_argv(
            cmd_file,
            nbd_port=None,
            drives=(),
            files={},
            memory_mb=self.options.memory_mb,
            cpus=1,
        )
        if argv.count(_BARE_NETDEV) != 1:
            raise RuntimeError(f"tests/vm/guest.py's netdev is no longer {_BARE_NETDEV!r}")
        argv[argv.index(_BARE_NETDEV)] = self.netdev()
        return [
            *argv,
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        ]

    def boot(self) -> None:
        argv = self.argv()
        (self.workdir / "qemu-argv.txt").write_text("\n".join(argv) + "\n")
        with open(self.workdir / "qemu-stderr.log", "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
            )
        self.console.follow(self.proc.stdout)

    def wait_ready(self, timeout: float) -> float:
        """Until the agent listens and the plugin answers Probe; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        self.console.wait(r"^E2E-NODE READY ", timeout)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.endpoint_port}")
        self.node = pb_grpc.NodeStub(self.channel)
        self.identity = pb_grpc.IdentityStub(self.channel)
        while True:
            if not self.request("ping")["plugin_alive"]:
                raise RuntimeError(f"{self.name}: the node plugin exited:\n{self.plugin_log()}")
            try:
                if self.identity.Probe(pb.ProbeRequest(), timeout=10).ready.value:
                    return time.monotonic()
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: plugin not ready: {exc.code()}") from None
            time.sleep(0.2)

    # -- the agent -------------------------------------------------------------------------

    def request(self, op: str, timeout: float = CALL_TIMEOUT, **args: Any) -> dict[str, Any]:
        """One request to the guest agent; raises NodeRequestFailed with its error."""
        message = json.dumps({"op": op, **args}).encode() + b"\n"
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=timeout) as s:
            s.sendall(message)
            reply_line = s.makefile("rb").readline()
        if not reply_line:
            raise NodeRequestFailed(f"{self.name}: no reply to {op} (guest agent gone?)")
        reply: dict[str, Any] = json.loads(reply_line)
        if not reply.pop("ok", False):
            raise NodeRequestFailed(f"{self.name}: {op}: {reply.get('error')}")
        return reply

    def plugin_log(self, lines: int = 80) -> str:
        with contextlib.suppress(Exception):
            return str(self.request("log", timeout=30, lines=lines)["log"])
        return "(the plugin log could not be read)"

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample of the plugin's metrics, or None when it is not there (yet)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=30).read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            m = _METRIC.match(line)
            if not m or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
        return None

    # -- stopping --------------------------------------------------------------------------

    def shutdown(self, timeout: float = 120.0) -> int | None:
        """The agent stops the plugin and powers the guest off; returns the plugin's code."""
        rc: int | None = None
        with contextlib.suppress(Exception):
            rc = int(self.request("shutdown", timeout=timeout)["plugin_rc"])
        self.close(timeout)
        return rc

    def close(self, timeout: float = 30.0) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, timeout=10)
            with contextlib.suppress(TimeoutError):
                self.console.wait_closed(10)
