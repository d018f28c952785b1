"""Start and stop the CSI plugin as a real process for tests.

Owns: launching `python -m csi` with its log in a file, waiting until its Identity service
answers (a state, polled with a bound, never a sleep), the generated CSI stubs on a channel to
it, and stopping it by pid with a chosen signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi.v1 import csi_pb2 as pb
from csi.v1 import csi_pb2_grpc as pb_grpc
from tests.support.servers import REPO, free_port, stop_process

START_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


def plugin_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "csi", *args]


def run_plugin(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the program to completion (for --help and argument errors)."""
    return subprocess.run(
        plugin_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def grpc_target(endpoint: str) -> str:
    """The client-side address of a plugin endpoint (`tcp://H:P` -> `H:P`; unix as is)."""
    return endpoint.removeprefix("tcp://")


@dataclass
class Plugin:
    proc: subprocess.Popen[bytes]
    endpoint: str
    log: Path
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        # Short reconnect backoff: the first connect usually comes before the plugin listens.
        self.channel = grpc.insecure_channel(grpc_target(self.endpoint), options=_FAST_RECONNECT)
        self.identity = pb_grpc.IdentityStub(self.channel)
        self.controller = pb_grpc.ControllerStub(self.channel)
        self.group = pb_grpc.GroupControllerStub(self.channel)
        self.node = pb_grpc.NodeStub(self.channel)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self) -> None:
        """Until GetPluginInfo answers; fails at once if the process exits first."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"plugin exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            try:
                self.identity.GetPluginInfo(
                    pb.GetPluginInfoRequest(), timeout=0.5, wait_for_ready=True
                )
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"plugin not answering after {START_TIMEOUT}s")

    def probe(self) -> bool:
        reply = self.identity.Probe(pb.ProbeRequest(), timeout=CALL_TIMEOUT)
        assert reply.HasField("ready"), "Probe must say whether the plugin is ready"
        return reply.ready.value

    def wait_probe(self, want: bool, timeout: float = 30.0) -> None:
        """Poll Probe until it answers `want` (a bound, not an assertion on time)."""
        deadline = time.monotonic() + timeout
        while self.probe() != want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Probe never answered ready={want}:\n{self.log_text()}")
            time.sleep(0.1)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig`, wait for the exit (SIGKILL past the timeout); returns the exit code."""
        self.channel.close()
        return stop_process(self.proc, sig, timeout)


def start_plugin(log_dir: Path, *args: str, endpoint: str | None = None) -> Plugin:
    """Run `python -m csi --endpoint ENDPOINT ARGS...` until its Identity service answers."""
    endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "csi-plugin.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            plugin_argv("--endpoint", endpoint, *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
    plugin = Plugin(proc, endpoint, log)
    try:
        plugin.wait_ready()
    except BaseException:
        plugin.stop(signal.SIGKILL)
        raise
    return plugin


def storage_args(nodes: Sequence[tuple[str, int]], token_file: Path) -> list[str]:
    """`--storage-node ID=127.0.0.1:PORT ... --storage-token-file PATH`."""
    args = []
    for node_id, port in nodes:
        args += ["--storage-node", f"{node_id}=127.0.0.1:{port}"]
    return [*args, "--storage-token-file", str(token_file)]
