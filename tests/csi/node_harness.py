"""Run the real Node service in-process, served over a real gRPC unix socket, for host tests.

Owns: an asyncio loop (uvloop, as in production) in a background thread running
`csi.node.start(...)` with an injected Attacher (tests/csi/loop_attacher.py: nbdfuse + loop
devices, since this host's kernel has no NBD) and the real Mounter, behind a grpc.aio server;
a blocking NodeStub for the tests; and the attachment a controller would make (storage node
CreateVolume + Publish), turned into the publish_context of docs/csi-driver.md.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import uvloop
from prometheus_client import CollectorRegistry

from csi import node
from csi.attach import CTX_EXPORT, CTX_HOST, CTX_PORT, CTX_READONLY, Attacher
from csi.config import Config, Endpoint, Mode, NodeOptions
from csi.v1 import csi_pb2_grpc as pb_grpc
from tests.support.api import ApiNode

T = TypeVar("T")
NODE_NAME = "worker-1"
NODE_ADDRESS = "127.0.0.1"
TOPOLOGY = (("topology.nbd.csi.dev/zone", "zone-a"),)
MAX_VOLUMES = 7


def node_config(state_dir: Path, socket_path: Path) -> Config:
    return Config(
        mode=Mode.NODE,
        endpoint=Endpoint.parse(f"unix://{socket_path}"),
        node_id=NODE_NAME,
        storage_nodes=(),
        storage_token_file=None,
        storage_tls_ca=None,
        log_level="INFO",
        node=NodeOptions(
            address=NODE_ADDRESS, topology=TOPOLOGY, max_volumes=MAX_VOLUMES, state_dir=state_dir
        ),
    )


class NodeHarness:
    """One Node service on its own loop and unix socket; `restart()` keeps the state dir."""

    def __init__(self, workdir: Path, attacher_factory: Any) -> None:
        self.workdir = workdir
        self.socket_path = workdir / "node.sock"
        self.config = node_config(workdir / "state", self.socket_path)
        self.attacher_factory = attacher_factory
        # uvloop, as the plugin runs: its subprocesses would fork (see csi/mounts.py).
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.channel: grpc.Channel | None = None
        self._start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _start(self) -> None:
        self.attacher: Attacher = self.attacher_factory()
        self.registry = CollectorRegistry()
        self.service, self.server = self.call(self._serve())
        self.channel = grpc.insecure_channel(f"unix://{self.socket_path}")
        self.stub = pb_grpc.NodeStub(self.channel)

    async def _serve(self) -> tuple[node.NodeService, grpc.aio.Server]:
        service = await node.start(self.config, self.registry, attacher=self.attacher)
        server = grpc.aio.server()
        pb_grpc.add_NodeServicer_to_server(service.servicer, server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        await server.start()
        return service, server

    async def _shutdown(self) -> None:
        await self.server.stop(1)
        await self.service.close()

    def stop_service(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.call(self._shutdown())

    def restart(self) -> None:
        """A new service instance, as after the plugin was killed: same state dir, new
        attacher object; the devices stay attached."""
        self.stop_service()
        self._start()

    def close(self) -> None:
        self.stop_service()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def metric(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@dataclass
class Attached:
    """A volume as the controller would leave it: created, published to this node."""

    volume_id: str  # the CSI volume id (storage node id : volume id)
    backend_id: str
    context: dict[str, str]
    size: int

    @property
    def uri(self) -> str:
        return f"nbd://{self.context[CTX_HOST]}:{self.context[CTX_PORT]}/{self.context[CTX_EXPORT]}"


def attach_volume(storage: ApiNode, name: str, size: int, *, readonly: bool = False) -> Attached:
    api = storage.api
    volume = api.wait_volume(api.create_volume(name, size).id)
    attachment = api.publish(volume.id, NODE_NAME, NODE_ADDRESS, readonly=readonly)
    context = {
        CTX_HOST: attachment.nbd_host,
        CTX_PORT: str(attachment.nbd_port),
        CTX_EXPORT: attachment.export_name,
        CTX_READONLY: "true" if readonly else "false",
    }
    return Attached(f"storage-a:{volume.id}", volume.id, context, size)
