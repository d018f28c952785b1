"""An NBD worker process: serves the connections the main process hands it.

Owns one event loop (uvloop), one export registry (its own open files) and one I/O thread
pool. Reads control messages (see storage_node.node) from the socket given as argv[1];
when that socket closes, the main process is gone and the worker shuts down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .config import configure_logging
from .exports import ExportRegistry
from .nbd.server import NbdServer
from .node import CLOSED_MESSAGE, CONTROL_MAX, IO_THREADS, ExportDefinition, open_export

log = logging.getLogger("storage_node.worker")


class WorkerProcess:
    def __init__(self, ctrl: socket.socket, init: dict[str, Any]) -> None:
        self.ctrl = ctrl
        self.executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="nbd-io")
        self.registry = ExportRegistry()
        for d in init["exports"]:
            self.registry.add(open_export(ExportDefinition(**d)))
        self.server = NbdServer(
            self.registry,
            self.executor,
            handshake_timeout=init["handshake_timeout"],
            on_closed=self._closed,
        )
        self.shutdown_timeout: float = init["shutdown_timeout"]
        self.stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.ctrl.setblocking(False)
        loop.add_reader(self.ctrl.fileno(), self._control)
        # SIGTERM to a worker means what the main process's "shutdown" means; SIGINT from a
        # terminal reaches the whole process group and is the main process's to handle.
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        await self.stop.wait()
        loop.remove_reader(self.ctrl.fileno())
        await self.server.shutdown(self.shutdown_timeout)
        for export in self.registry:
            export.backend.close()
        self.executor.shutdown()

    def _closed(self) -> None:
        # The main process counts our connections to pick the least busy worker.
        with contextlib.suppress(OSError):
            self.ctrl.send(CLOSED_MESSAGE)

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
                log.exception("bad control message %r", data[:200])
                for fd in fds:
                    with contextlib.suppress(OSError):
                        socket.socket(fileno=fd).close()

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg["op"]
        if op == "conn":
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            asyncio.get_running_loop().create_task(self.server.adopt(sock))
        elif op == "add_export":
            self.registry.add(open_export(ExportDefinition(**msg["export"])))
        elif op == "remove_export":
            export = self.registry.remove(msg["name"])
            if export is not None:
                export.backend.close()
        elif op == "shutdown":
            self.stop.set()
        else:
            raise ValueError(f"unknown control op {op!r}")


def main() -> None:
    import uvloop

    ctrl = socket.socket(fileno=int(sys.argv[1]))
    ctrl.setblocking(True)
    init = json.loads(ctrl.recv(CONTROL_MAX))
    configure_logging(init["log_level"], f"nbd-worker-{sys.argv[2]}")
    uvloop.run(WorkerProcess(ctrl, init).run())


if __name__ == "__main__":
    main()
