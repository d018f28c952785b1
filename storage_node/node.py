"""A running storage node: catalogue, listening socket, NBD worker processes, shutdown.

Owns the process topology. The main process opens the catalogue (SQLite), decides which
exports exist, listens for NBD clients, and hands every accepted connection to one of N
worker processes over a unix SEQPACKET socket (SCM_RIGHTS), round-robin, so both cores
serve I/O and two connections from one client land on different cores. Each worker runs
its own event loop (uvloop) and opens the image files itself; they share the page cache, so
a FLUSH in any worker covers writes made in all of them (CAN_MULTI_CONN holds across
processes). With --workers 0 the main process serves NBD itself.

Control messages are JSON, one per datagram. To workers: init, conn (with the socket's fd),
add_export, remove_export, shutdown. From workers: closed (a connection ended), which keeps
the per-worker connection counts that pick the least busy worker for the next connection.
A worker that dies is replaced; its clients reconnect.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from .backend.file import FileBackend, create_sparse
from .backend.filters import ReadOnly
from .config import DEFAULT_EXPORT, Config, ExportSpec
from .exports import Export, ExportRegistry
from .nbd.server import NbdServer
from .store import ImageRow, Store

log = logging.getLogger("storage_node")

CONTROL_MAX = 64 * 1024
CLOSED_MESSAGE = b'{"op": "closed"}'
IO_THREADS = 16


@dataclass(frozen=True)
class ExportDefinition:
    """Everything a process needs to open an export; sent to workers as JSON."""

    name: str
    path: str
    readonly: bool = False
    description: str = ""


def open_export(d: ExportDefinition) -> Export:
    backend = FileBackend(d.path, readonly=d.readonly)
    return Export(d.name, ReadOnly(backend) if d.readonly else backend, d.description)


class StartupError(Exception):
    """The node cannot start as configured; the message says why."""


def resolve_exports(config: Config, store: Store) -> list[ExportDefinition]:
    """Images in the catalogue, plus what --export adds; creates new images."""
    config.images_dir.mkdir(parents=True, exist_ok=True)
    specs = list(config.exports)
    if not specs and not store.images():
        specs = [ExportSpec.parse(DEFAULT_EXPORT)]
    defs: dict[str, ExportDefinition] = {}
    for spec in specs:
        if spec.file is not None:
            path = os.path.abspath(spec.file)
            if not os.path.isfile(path):
                raise StartupError(f"export {spec.name!r}: {spec.file} is not a regular file")
            defs[spec.name] = ExportDefinition(spec.name, path, spec.readonly, spec.description)
            continue
        row = store.image(spec.name) or _create_image(config, store, spec)
        if spec.size is not None and spec.size != row.size:
            raise StartupError(
                f"export {spec.name!r} already exists with {row.size} bytes, not {spec.size}"
            )
        defs[spec.name] = ExportDefinition(
            row.name, row.path, spec.readonly or row.readonly, spec.description or row.description
        )
    for row in store.images():
        defs.setdefault(
            row.name, ExportDefinition(row.name, row.path, row.readonly, row.description)
        )
    return list(defs.values())


def _create_image(config: Config, store: Store, spec: ExportSpec) -> ImageRow:
    if spec.size is None:
        raise StartupError(f"export {spec.name!r} does not exist yet: give it a size=")
    path = config.images_dir / f"{spec.name}.img"
    if path.exists():
        # A crash between creating the file and recording it: adopt the file if it fits.
        if path.stat().st_size != spec.size:
            raise StartupError(f"{path} exists with another size and is not in the catalogue")
    else:
        create_sparse(str(path), spec.size)
    row = ImageRow(spec.name, str(path), spec.size, spec.readonly, spec.description)
    store.add_image(row)
    log.info("created image %s (%d bytes)", path, spec.size)
    return row


def control_message(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}).encode()


class Worker:
    """One NBD worker process and the main side of its control socket."""

    def __init__(self, index: int, init: bytes) -> None:
        self.index = index
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "storage_node.worker", str(child.fileno()), str(index)],
            pass_fds=[child.fileno()],
        )
        child.close()
        self.sock.sendall(init)
        self.sock.setblocking(False)
        self.connections = 0

    def send(self, message: bytes, fds: list[int] | None = None) -> bool:
        try:
            if fds:
                socket.send_fds(self.sock, [message], fds)
            else:
                self.sock.send(message)
            return True
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            return False

    def stop(self) -> None:
        self.send(control_message("shutdown"))


class StorageNode:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.definitions: list[ExportDefinition] = []
        self.workers: list[Worker] = []
        self._next = itertools.count()
        self._listener: socket.socket | None = None
        self._stopping = False
        self._local: NbdServer | None = None
        self._executor: ThreadPoolExecutor | None = None

    def _init_message(self) -> bytes:
        return control_message(
            "init",
            exports=[asdict(d) for d in self.definitions],
            handshake_timeout=self.config.handshake_timeout,
            shutdown_timeout=self.config.shutdown_timeout,
            log_level=self.config.log_level,
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(self.config.db_path)
        try:
            self.definitions = resolve_exports(self.config, store)
        finally:
            store.close()

        try:
            self._listener = socket.create_server(
                (self.config.nbd_host, self.config.nbd_port), backlog=1024
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {self.config.nbd_host}:{self.config.nbd_port}: {exc.strerror}"
            ) from None
        self._listener.setblocking(False)

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        if self.config.workers == 0:
            self._executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="nbd-io")
            registry = ExportRegistry()
            for d in self.definitions:
                registry.add(open_export(d))
            self._local = NbdServer(
                registry, self._executor, handshake_timeout=self.config.handshake_timeout
            )
        else:
            for i in range(self.config.workers):
                self._start_worker(i)

        loop.add_reader(self._listener.fileno(), self._accept)
        self._banner()
        await stop.wait()
        await self.shutdown()

    def _banner(self) -> None:
        host, port = self.config.nbd_host, self.config.nbd_port
        lines = [
            f"storage node ready: NBD on {host}:{port}, data in {self.config.data_dir}, "
            f"{max(self.config.workers, 1)} NBD process(es)"
        ]
        for d in self.definitions:
            lines.append(
                f"  export {d.name}: nbd://{host}:{port}/{d.name}"
                f"{' (read-only)' if d.readonly else ''}"
            )
        if self.definitions:
            uri = f"nbd://{host}:{port}/{self.definitions[0].name}"
            lines.append(f"try: nbdinfo {uri}   or   qemu-img info {uri}")
        print("\n".join(lines), flush=True)

    def _start_worker(self, index: int) -> None:
        worker = Worker(index, self._init_message())
        if index < len(self.workers):
            self.workers[index] = worker
        else:
            self.workers.append(worker)
        asyncio.get_running_loop().add_reader(worker.sock.fileno(), self._worker_readable, worker)

    def _worker_readable(self, worker: Worker) -> None:
        while True:
            try:
                message = worker.sock.recv(CONTROL_MAX)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                break  # EOF: the worker is gone
            if message == CLOSED_MESSAGE:
                worker.connections = max(worker.connections - 1, 0)
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.sock.fileno())
        worker.sock.close()
        code = worker.proc.wait()
        if self._stopping:
            return
        log.error("NBD worker %d exited with %s; starting a new one", worker.index, code)
        loop.call_later(0.5, self._start_worker, worker.index)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving existing clients
                log.error("accept failed: %s", exc)
                return
            self._hand_off(conn)

    def _hand_off(self, conn: socket.socket) -> None:
        if self._local is not None:
            conn.setblocking(False)
            asyncio.get_running_loop().create_task(self._local.adopt(conn))
            return
        with conn:
            # Least connections first; the rotating start breaks ties between equals.
            start = next(self._next)
            order = sorted(
                (w for w in self.workers if w.sock.fileno() >= 0),
                key=lambda w: (w.connections, (w.index - start) % len(self.workers)),
            )
            for worker in order:
                if worker.send(control_message("conn"), [conn.fileno()]):
                    worker.connections += 1
                    return
            log.error("no NBD worker could take a connection; closing it")

    async def shutdown(self) -> None:
        """Stop accepting, then let every worker finish in-flight requests and flush."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
        log.info("shutting down")
        if self._local is not None:
            await self._local.shutdown(self.config.shutdown_timeout)
        for worker in self.workers:
            worker.stop()
        deadline = self.config.shutdown_timeout + 5
        for worker in self.workers:
            try:
                await loop.run_in_executor(None, worker.proc.wait, deadline)
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop; killing it", worker.index)
                worker.proc.kill()
        if self._executor is not None:
            self._executor.shutdown()


def run(config: Config) -> int:
    import uvloop

    try:
        uvloop.run(StorageNode(config).run())
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    return 0
