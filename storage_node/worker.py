"""An NBD worker process: serves the connections the main process hands it.

Owns one event loop (uvloop), one ProcessState (its own open volumes, exports and NBD server)
and one I/O thread pool. Reads control messages (see storage_node.node and
storage_node.dataplane) from the socket given as argv[1]: numbered data plane operations,
each answered with {"op": "reply", "id": N, "error": ""}; connections (with their fd); and
shutdown. When that socket closes, the main process is gone and the worker shuts down.
Once a second it sends the counters of the volumes that changed ({"op": "stats"}, see
storage_node.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .config import configure_logging
from .dataplane import ProcessState
from .exports import ExportRegistry
from .metrics import STATS_INTERVAL, StatsReporter
from .nbd.server import NbdServer
from .node import CONTROL_MAX, IO_THREADS
from .qos import SharedBuckets

log = logging.getLogger("storage_node.worker")
PR_SET_PDEATHSIG = 1


class WorkerProcess:
    def __init__(self, ctrl: socket.socket, init: dict[str, Any]) -> None:
        self.ctrl = ctrl
        self.executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="nbd-io")
        buckets = SharedBuckets(Path(init["qos_file"]))
        server = NbdServer(
            ExportRegistry(),
            self.executor,
            handshake_timeout=init["handshake_timeout"],
            on_closed=self._closed,
            board=buckets,
            board_entry=init["index"],
            budget=init.get("buffer_budget", 0),
            payload_timeout=init.get("payload_timeout", 30.0),
        )
        self.state = ProcessState(server, self.executor, buckets)
        self.reporter = StatsReporter(self.state.stats)
        self.shutdown_timeout: float = init["shutdown_timeout"]
        self.stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.ctrl.setblocking(False)
        loop.add_reader(self.ctrl.fileno(), self._control)
        # SIGTERM to a worker means what the main process's "shutdown" means; SIGINT from a
        # terminal reaches the whole process group and is the main process's to handle.
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        reporting = loop.create_task(self._report_stats())
        await self.stop.wait()
        loop.remove_reader(self.ctrl.fileno())
        await self.state.server.shutdown(self.shutdown_timeout)
        reporting.cancel()
        self._send_stats()  # what the last requests counted
        self.state.close()
        self.executor.shutdown()

    def _send(self, message: bytes) -> None:
        with contextlib.suppress(OSError):
            self.ctrl.send(message)

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self._send_stats()

    def _send_stats(self) -> None:
        for datagram in self.reporter.datagrams():
            try:
                self.ctrl.send(datagram)
            except OSError:  # full (or gone): counters are cumulative, send them all next time
                self.reporter.forget()
                return

    def _closed(self, peer: str) -> None:
        # The main process counts our connections to pick the least busy worker, and each
        # peer's connections across all workers (--max-connections-per-peer).
        self._send(json.dumps({"op": "closed", "peer": peer}).encode())

    def _control(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.ctrl, CONTROL_MAX, 4)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("control socket failed: %s", exc)
                data, fds = b"", []
            if not data:
                self.stop.set()
                return
            try:
                self._handle(json.loads(data), fds)
            except Exception:
                # Not the message itself: an add_export carries an attachment's credential.
                log.exception("bad control message (%d bytes)", len(data))
                for fd in fds:
                    with contextlib.suppress(OSError):
                        socket.socket(fileno=fd).close()

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg["op"]
        if op == "conn":
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            self._track(self._serve(sock, msg.get("peer") or "?"))
        elif op == "shutdown":
            self.stop.set()
        else:
            self._track(self._apply(msg))

    async def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            await self.state.server.adopt(sock, peer)
        except OSError as exc:  # gone before it was served: still counted as closed
            log.warning("%s: cannot serve the connection: %s", peer, exc)
            sock.close()
            self._closed(peer)

    def _track(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, msg: dict[str, Any]) -> None:
        error = ""
        try:
            await self.state.apply(msg)
        except Exception as exc:
            log.exception("control operation %s failed", msg.get("op"))
            error = f"{type(exc).__name__}: {exc}"
        self._send(json.dumps({"op": "reply", "id": msg.get("id"), "error": error}).encode())


def main() -> None:
    import uvloop

    # If the main process dies (even by SIGKILL), stop gracefully rather than keep serving.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # (Had it died before this line, the control socket is closed and we stop on its EOF.)
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    ctrl.setblocking(True)
    init = json.loads(ctrl.recv(CONTROL_MAX))
    configure_logging(init["log_level"], f"nbd-worker-{sys.argv[2]}")
    uvloop.run(WorkerProcess(ctrl, init).run())


if __name__ == "__main__":
    main()
