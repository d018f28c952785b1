"""The CSI plugin process: one grpc.aio server on the CSI endpoint, and its lifecycle.

Owns binding the endpoint (a stale unix socket file is removed first, its directory created),
registering the services the mode asks for, and the ordered shutdown on SIGTERM/SIGINT: stop
accepting, let in-flight calls finish for `shutdown_grace` seconds, cancel the rest, close the
storage node channels, exit 0. Runs on uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import stat
from pathlib import Path
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry

from .config import Config, Endpoint, Mode
from .errors import StartupError
from .identity import AlwaysReady, IdentityServicer
from .metrics import GrpcMetrics, MetricsServer
from .storage_nodes import StorageNodes
from .v1 import csi_pb2_grpc as pb_grpc

log = logging.getLogger("csi.server")


def prepare_unix_socket(path: Path) -> None:
    """Make the socket's directory, and remove a socket file left by an earlier run (a live
    plugin on it is not detected: the CO runs one plugin per endpoint). Any other kind of file
    at that path is not ours to delete."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot use socket path {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; not replacing it")
    log.info("removing stale socket %s", path)
    path.unlink(missing_ok=True)


def build_server(
    config: Config, storage_nodes: StorageNodes, registry: CollectorRegistry
) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=[GrpcMetrics(registry)], options=[("grpc.so_reuseport", 0)]
    )
    # The controller needs its storage nodes; a node plugin does not (it learns where to
    # connect from each volume's publish_context), so in node mode it is ready once it runs:
    # tying it to the storage nodes would make livenessprobe restart it in a loop.
    readiness = storage_nodes if config.mode != Mode.NODE else AlwaysReady()
    pb_grpc.add_IdentityServicer_to_server(
        IdentityServicer(config.driver_name, config.vendor_version, readiness), server
    )
    return server


class Service(Protocol):
    """What the Controller and Node modules hand back from their `start`."""

    async def close(self) -> None: ...


def bind(server: grpc.aio.Server, endpoint: Endpoint) -> None:
    if endpoint.unix_path is not None:
        prepare_unix_socket(endpoint.unix_path)
    try:
        port = server.add_insecure_port(endpoint.grpc_address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {endpoint}: {exc}") from None
    if endpoint.unix_path is None and not port:
        raise StartupError(f"cannot listen on {endpoint}")


async def serve(config: Config) -> None:
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry(auto_describe=True)
    storage_nodes = StorageNodes.from_config(config)
    services: list[Service] = []
    metrics = MetricsServer(registry)
    try:
        server = build_server(config, storage_nodes, registry)
        if config.mode in (Mode.CONTROLLER, Mode.ALL):
            from . import controller

            control = await controller.start(config, storage_nodes, registry)
            services.append(control)
            pb_grpc.add_ControllerServicer_to_server(control.servicer, server)
            pb_grpc.add_GroupControllerServicer_to_server(control.group_servicer, server)
        if config.mode in (Mode.NODE, Mode.ALL):
            from . import node

            node_service = await node.start(config, registry)
            services.append(node_service)
            pb_grpc.add_NodeServicer_to_server(node_service.servicer, server)
        bind(server, config.endpoint)
        if config.metrics_listen is not None:
            host, port = config.metrics_listen
            try:
                bound = metrics.serve(host, port)
            except OSError as exc:
                raise StartupError(f"--metrics-listen {host}:{port}: {exc.strerror}") from None
            log.info("metrics on http://%s:%d/metrics", host, bound)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        log.info(
            "CSI plugin %s %s (mode %s, node %s) listening on %s; storage nodes: %s",
            config.driver_name,
            config.vendor_version,
            config.mode.value,
            config.node_id,
            config.endpoint,
            ", ".join(f"{n.id}={n.target}" for n in config.storage_nodes) or "none",
        )
        await stop.wait()
        log.info("shutting down: %.0f s for calls in flight", config.shutdown_grace)
        await server.stop(config.shutdown_grace)
    finally:
        for service in reversed(services):
            await service.close()
        metrics.close()
        await storage_nodes.close()
    log.info("stopped")


def run(config: Config) -> int:
    import uvloop

    try:
        uvloop.run(serve(config))
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0
