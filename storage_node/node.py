"""A running storage node: catalogue, listening socket, NBD worker processes, shutdown.

Owns the process topology. The main process opens the catalogue (SQLite), decides which
exports exist, listens for NBD clients, and hands every accepted connection to one of N
worker processes over a unix SEQPACKET socket (SCM_RIGHTS), round-robin, so both cores
serve I/O and two connections from one client land on different cores. Each worker runs
its own event loop (uvloop) and opens the image files itself; they share the page cache, so
a FLUSH in any worker covers writes made in all of them (CAN_MULTI_CONN holds across
processes). With --workers 0 the main process serves NBD itself.

Control messages are JSON, one per datagram. To workers: init, conn (with the socket's fd),
add_export, remove_export, shutdown. From workers: closed {peer} (a connection ended), which
keeps the per-worker connection counts that pick the least busy worker for the next connection
and the per-address counts of --max-connections-per-peer;
stats (volume counters for the metrics, storage_node.metrics).
A worker that dies is replaced; its clients reconnect.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client.registry import CollectorRegistry

from . import api, quarantine
from .config import DEFAULT_EXPORT, Config, ExportSpec
from .dataplane import ControlChannel, DataPlane, ProcessState
from .exports import ExportRegistry, normalize_peer
from .files import create_sparse
from .groups import GroupSnapshots
from .metrics import REFRESH_INTERVAL, STATS_INTERVAL, NodeMetrics, StatsReporter
from .nbd.server import NbdServer
from .qos import SharedBuckets
from .store import ExportRow, Store, StoreThread, catalogue_problem
from .volumes import NodeSettings, VolumeService

log = logging.getLogger("storage_node")

CONTROL_MAX = 64 * 1024
# Files the node makes are for the node alone: the catalogue holds every attachment's
# credential, images hold tenants' data. The umask is the backstop for anything created
# without an explicit mode (SQLite's -wal/-shm, qemu-img's output, child processes).
UMASK = 0o077
PRIVATE_DIR = 0o700
CLOSED_MESSAGE = b'{"op": "closed"}'
IO_THREADS = 16


class StartupError(Exception):
    """The node cannot start as configured; the message says why."""


def open_catalogue(config: Config) -> Store:
    """The catalogue, refusing to start when it is missing, empty or unreadable while image
    files exist: starting with an empty catalogue would orphan every one of them (and a
    damaged one is never replaced by an empty one silently). --quarantine-orphans moves the
    files (and a damaged catalogue) to DATA_DIR/quarantine/<time>/ and starts empty."""
    db = config.db_path
    problem = catalogue_problem(db)
    held = quarantine.image_files(config.data_dir)
    damaged = problem is not None and problem.kind == "damaged"
    if problem is not None and (held or damaged):
        if not config.quarantine_orphans:
            where = f" while {len(held)} image file(s) exist under {config.data_dir}"
            raise StartupError(
                f"refusing to start: the catalogue {db} {problem.text}{where if held else ''}. "
                f"To recover, stop the node and either restore {db.name} from a backup (with "
                "its -wal file, if any), or start once with --quarantine-orphans to move "
                f"{'these files' if held else 'the damaged catalogue'} to "
                f"{quarantine.root(config.data_dir)}/<time>/ and start with an empty "
                "catalogue (docs/storage-node-api.md, Crash safety)"
            )
        # A stale -wal next to a new catalogue would be replayed into it: it goes too.
        journal = [db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        moved = [p for p in [*held, *([db] if damaged else []), *journal] if p.exists()]
        batch = quarantine.move(config.data_dir, moved, f"the catalogue {problem.text}")
        log.warning(
            "--quarantine-orphans: the catalogue %s %s; moved %d file(s) to %s; starting "
            "with an empty catalogue",
            db,
            problem.text,
            len(moved),
            batch,
        )
    try:
        return Store(db)
    except sqlite3.DatabaseError as exc:
        raise StartupError(
            f"refusing to start: the catalogue {db} cannot be used ({exc}). Restore it from "
            "a backup, or start once with --quarantine-orphans (docs/storage-node-api.md, "
            "Crash safety)"
        ) from None


def resolve_exports(config: Config, store: Store) -> list[ExportRow]:
    """Exports in the catalogue, plus what --export adds; creates new images."""
    config.images_dir.mkdir(parents=True, exist_ok=True)
    specs = list(config.exports)
    if not specs and config.default_export and not store.exports():
        specs = [ExportSpec.parse(DEFAULT_EXPORT)]
    defs: dict[str, ExportRow] = {}
    for spec in specs:
        if spec.file is not None:
            path = os.path.abspath(spec.file)
            if not os.path.isfile(path):
                raise StartupError(f"export {spec.name!r}: {spec.file} is not a regular file")
            defs[spec.name] = ExportRow(spec.name, path, 0, spec.readonly, spec.description)
            continue
        row = store.export(spec.name) or _create_image(config, store, spec)
        if spec.size is not None and spec.size != row.size:
            raise StartupError(
                f"export {spec.name!r} already exists with {row.size} bytes, not {spec.size}"
            )
        defs[spec.name] = ExportRow(
            row.name,
            row.path,
            row.size,
            spec.readonly or row.readonly,
            spec.description or row.description,
        )
    for row in store.exports():
        defs.setdefault(row.name, row)
    return list(defs.values())


def _create_image(config: Config, store: Store, spec: ExportSpec) -> ExportRow:
    if spec.size is None:
        raise StartupError(f"export {spec.name!r} does not exist yet: give it a size=")
    path = config.images_dir / f"{spec.name}.img"
    if path.exists():
        # A crash between creating the file and recording it: adopt the file if it fits.
        if path.stat().st_size != spec.size:
            raise StartupError(f"{path} exists with another size and is not in the catalogue")
    else:
        create_sparse(path, spec.size)
    row = ExportRow(spec.name, str(path), spec.size, spec.readonly, spec.description)
    store.add_export(row)
    log.info("created image %s (%d bytes)", path, spec.size)
    return row


def make_private(data_dir: Path) -> None:
    """The data directory 0700, and everything in it readable by the node's user only: files
    made by an older version with the default umask are tightened too (chmod, nothing else)."""
    data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    for root, dirs, names in os.walk(data_dir):
        for name in dirs:
            _tighten(Path(root) / name, PRIVATE_DIR)
        for name in names:
            _tighten(Path(root) / name, 0o600)
    _tighten(data_dir, PRIVATE_DIR)


def _tighten(path: Path, mode: int) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
        except OSError as exc:  # a read-only mount inside the data directory, say
            log.warning("cannot make %s private: %s", path, exc.strerror)


def control_message(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}).encode()


def load_token(path: Path) -> str:
    """The API bearer token; a new random one is written (0600) when the file is missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    token = path.read_text().strip()
    if len(token) < 16:
        raise StartupError(f"the API token in {path} is shorter than 16 characters")
    return token


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
        self.peers: Counter[str] = Counter()  # its open connections by client address
        self.ready = False
        self.channel = ControlChannel(self.send)

    def send(self, message: bytes, fds: list[int] | None = None) -> bool:
        try:
            if fds:
                socket.send_fds(self.sock, [message], fds)
            else:
                self.sock.send(message)
            return True
        except OSError:  # full (BlockingIOError) or gone (BrokenPipeError, ...)
            return False

    def stop(self) -> None:
        self.send(control_message("shutdown"))


class StorageNode:
    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = NodeMetrics(registry or CollectorRegistry())
        self._metrics_task: asyncio.Task[None] | None = None
        self.workers: list[Worker] = []
        self.dataplane = DataPlane()
        self._next = itertools.count()
        self._listener: socket.socket | None = None
        self._stopping = False
        self._local: ProcessState | None = None
        self.groups: GroupSnapshots | None = None
        self._executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="node-io")
        self._tasks: set[asyncio.Task[None]] = set()
        self._local_peers: Counter[str] = Counter()  # --workers 0: connections by address
        self._peers_at_cap: set[str] = set()  # logged once until they are below it again
        self.settings = NodeSettings(
            node_id=config.node_id,
            data_dir=config.data_dir,
            nbd_host=config.nbd_advertise or config.nbd_host,
            nbd_port=config.nbd_port,
            overcommit_ratio=config.overcommit_ratio,
            topology=dict(config.topology),
            import_dir=config.import_dir,
        )

    @property
    def qos_path(self) -> Path:
        return self.config.data_dir / "qos.shm"

    def _init_message(self, index: int) -> bytes:
        return control_message(
            "init",
            index=index,
            handshake_timeout=self.config.handshake_timeout,
            shutdown_timeout=self.config.shutdown_timeout,
            log_level=self.config.log_level,
            qos_file=str(self.qos_path),
            # Each worker gets an equal share: no shared counter on the hot path.
            buffer_budget=self.config.buffer_budget // max(self.config.workers, 1),
            payload_timeout=self.config.payload_timeout,
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        make_private(config.data_dir)
        store = open_catalogue(config)
        try:
            exports = resolve_exports(config, store)
        except BaseException:
            store.close()
            raise
        token = load_token(config.token_path)
        self.buckets = SharedBuckets(self.qos_path, create=True)
        self.store = StoreThread(store, config.node_id, config.db_path)
        for e in exports:
            await self.dataplane.add_export(
                e.name, path=e.path, readonly=e.readonly, description=e.description
            )
        self.service = VolumeService(self.store, self.dataplane, self.settings, self._executor)
        await self.service.recover()

        # Bind now, so a taken port fails the start at once; listen only when everything is
        # up (below): until then clients are refused, so an open NBD port means a ready node.
        family = socket.AF_INET6 if ":" in config.nbd_host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # `::` means IPv4 too (and ::ffff:a.b.c.d can be bound), whatever the host's
            # bindv6only default; IPv4 peers then appear as ::ffff:a.b.c.d and are
            # normalised to a.b.c.d (normalize_peer), the form attachments are bound to.
            self._listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self._listener.bind((config.nbd_host, config.nbd_port))
        except OSError as exc:
            self._listener.close()
            raise StartupError(
                f"cannot listen on {config.nbd_host}:{config.nbd_port}: {exc.strerror}"
            ) from None
        self._listener.setblocking(False)
        tls = None
        if config.tls_cert and config.tls_key:
            tls = (config.tls_cert.read_bytes(), config.tls_key.read_bytes())
        self.groups = GroupSnapshots(self.service)
        servicer = api.ManagementServicer(self.service, self.settings, version(), self.groups)
        grpc_server, api_port = api.make_server(
            servicer, token, f"{config.api_host}:{config.api_port}", tls
        )
        if not api_port:
            raise StartupError(f"cannot listen on {config.api_host}:{config.api_port}")

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        if config.workers == 0:
            registry = ExportRegistry()
            server = NbdServer(
                registry,
                self._executor,
                handshake_timeout=config.handshake_timeout,
                board=self.buckets,
                on_closed=self._local_closed,
                budget=config.buffer_budget,
                payload_timeout=config.payload_timeout,
            )
            self._local = ProcessState(server, self._executor, self.buckets)
            async with self.dataplane.joining(0, self._local.apply):
                pass
        else:
            for i in range(config.workers):
                await self._start_worker(i)

        await grpc_server.start()
        metrics_port = await self._start_metrics()
        self._listener.listen(1024)
        loop.add_reader(self._listener.fileno(), self._accept)
        self._banner(api_port, metrics_port)
        await stop.wait()
        await self.shutdown(grpc_server)

    def _banner(self, api_port: int, metrics_port: int | None) -> None:
        c = self.config
        metrics = f"http://{c.metrics_host}:{metrics_port}/metrics" if metrics_port else "none"
        lines = [
            f"storage node {c.node_id!r} ready: NBD on {c.nbd_host}:{c.nbd_port}, management "
            f"API on {c.api_host}:{api_port} ({'TLS' if c.tls_cert else 'plaintext'}, token in "
            f"{c.token_path}), metrics {metrics}, data in {c.data_dir}, "
            f"{max(c.workers, 1)} NBD process(es)"
        ]
        names = [n for n, e in self.dataplane.exports.items() if not e.get("volume_id")]
        for name in names:
            readonly = " (read-only)" if self.dataplane.exports[name].get("readonly") else ""
            lines.append(f"  export {name}: nbd://{c.nbd_host}:{c.nbd_port}/{name}{readonly}")
        if names:
            uri = f"nbd://{c.nbd_host}:{c.nbd_port}/{names[0]}"
            lines.append(f"try: nbdinfo {uri}   or   qemu-img info {uri}")
        print("\n".join(lines), flush=True)

    async def _start_metrics(self) -> int | None:
        """Read the numbers once, then serve them; a port already taken costs the metrics,
        not the volumes (the error is logged and Prometheus sees the target down)."""
        await self.metrics.refresh(self.service, self._connections(), version())
        self._metrics_task = asyncio.get_running_loop().create_task(self._metrics_loop())
        c = self.config
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, self.metrics.serve, c.metrics_host, c.metrics_port
            )
        except OSError as exc:
            log.error("no metrics: cannot listen on %s:%d: %s", c.metrics_host, c.metrics_port, exc)
            return None

    async def _metrics_loop(self) -> None:
        """Keep the metrics' control-plane snapshot fresh; with --workers 0, also take this
        process's own volume counters (workers send theirs in "stats" messages)."""
        reporter = StatsReporter(self._local.stats) if self._local is not None else None
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + REFRESH_INTERVAL
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            try:
                if reporter is not None:
                    self.metrics.stats.update(0, reporter.changed())
                if loop.time() >= next_refresh:
                    next_refresh = loop.time() + REFRESH_INTERVAL
                    await self.metrics.refresh(self.service, self._connections(), version())
            except Exception:
                log.exception("updating the metrics failed")

    def _connections(self) -> dict[str, int]:
        if self._local is not None:
            return {"0": len(self._local.server.connections)}
        return {str(w.index): w.connections for w in self.workers}

    async def _start_worker(self, index: int) -> None:
        worker = Worker(index, self._init_message(index))
        if index < len(self.workers):
            self.workers[index] = worker
        else:
            self.workers.append(worker)
        asyncio.get_running_loop().add_reader(worker.sock.fileno(), self._worker_readable, worker)
        try:
            async with self.dataplane.joining(index, worker.channel.call):
                worker.ready = True
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            log.error("NBD worker %d failed to start: %s", index, exc)
            worker.proc.kill()

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
                continue
            try:
                reply = json.loads(message)
                if reply.get("op") == "closed":
                    worker.connections = max(worker.connections - 1, 0)
                    self._forget_peer(worker.peers, reply.get("peer", ""))
                elif reply.get("op") == "stats":
                    self.metrics.stats.update(worker.index, reply.get("volumes", {}))
                else:
                    worker.channel.replied(reply)
            except (ValueError, AttributeError):
                log.error("worker %d sent a malformed message %r", worker.index, message[:200])
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.sock.fileno())
        worker.sock.close()
        worker.ready = False
        worker.channel.fail_all("the worker exited")
        self.dataplane.detach(worker.index)
        self.metrics.stats.worker_gone(worker.index)
        code = worker.proc.wait()
        if self._stopping:
            return
        log.error("NBD worker %d exited with %s; starting a new one", worker.index, code)
        task = loop.create_task(self._restart_worker(worker.index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart_worker(self, index: int) -> None:
        await asyncio.sleep(0.5)
        if not self._stopping:
            await self._start_worker(index)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                conn, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving existing clients
                log.error("accept failed: %s", exc)
                return
            peer = normalize_peer(str(address[0]))
            if not self._peer_admitted(peer):
                conn.close()
                continue
            self._hand_off(conn, peer)

    def _peer_connections(self, peer: str) -> int:
        if self._local is not None:
            return self._local_peers[peer]
        return sum(w.peers[peer] for w in self.workers)

    def _peer_admitted(self, peer: str) -> bool:
        """--max-connections-per-peer, counted here, where every connection is handed out,
        so it holds across workers (handshakes run in the workers)."""
        cap = self.config.max_connections_per_peer
        if not cap or self._peer_connections(peer) < cap:
            return True
        if peer not in self._peers_at_cap:
            self._peers_at_cap.add(peer)
            log.warning("%s: %d connections, the limit per client address; closing more", peer, cap)
        return False

    def _forget_peer(self, peers: Counter[str], peer: str) -> None:
        peers[peer] -= 1
        if peers[peer] <= 0:
            del peers[peer]
        if peer in self._peers_at_cap and self._peer_connections(peer) < (
            self.config.max_connections_per_peer
        ):
            self._peers_at_cap.discard(peer)

    def _local_closed(self, peer: str) -> None:
        self._forget_peer(self._local_peers, peer)

    def _hand_off(self, conn: socket.socket, peer: str) -> None:
        if self._local is not None:
            conn.setblocking(False)
            self._local_peers[peer] += 1
            task = asyncio.get_running_loop().create_task(self._local.server.adopt(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        with conn:
            # Least connections first; the rotating start breaks ties between equals.
            start = next(self._next)
            order = sorted(
                (w for w in self.workers if w.ready),
                key=lambda w: (w.connections, (w.index - start) % len(self.workers)),
            )
            for worker in order:
                if worker.send(control_message("conn", peer=peer), [conn.fileno()]):
                    worker.connections += 1
                    worker.peers[peer] += 1
                    return
            log.error("no NBD worker could take a connection; closing it")

    async def shutdown(self, grpc_server: Any) -> None:
        """Stop accepting, then let every worker finish in-flight requests and flush."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
        log.info("shutting down")
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        await loop.run_in_executor(None, self.metrics.stop)
        await grpc_server.stop(5)
        if self.groups is not None:
            await self.groups.close()  # no volume stays held
        await self.service.close()
        if self._local is not None:
            await self._local.server.shutdown(self.config.shutdown_timeout)
            self._local.close()
        for worker in self.workers:
            worker.stop()
        deadline = self.config.shutdown_timeout + 5
        for worker in self.workers:
            try:
                await loop.run_in_executor(None, worker.proc.wait, deadline)
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop; killing it", worker.index)
                worker.proc.kill()
        self.store.close()
        self.buckets.close()
        self._executor.shutdown()


def version() -> str:
    try:
        return importlib.metadata.version("nbd-csi")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def run(config: Config) -> int:
    import uvloop

    os.umask(UMASK)  # inherited by the NBD workers and every child (qemu-img, copies)
    try:
        uvloop.run(StorageNode(config).run())
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    return 0
