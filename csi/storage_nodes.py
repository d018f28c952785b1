"""Clients for the storage nodes' management API (proto/storage_node/v1/storage_node.proto).

Owns one async gRPC channel per configured storage node, the bearer token sent with every
call, TLS to the nodes when a CA is given, and the translation of a node's failed call into
`csi.errors.StorageNodeError`. `StorageNodes` is the set the plugin was started with; the
Identity service asks it whether every node answers (Probe), the Controller will use it to
place and manage volumes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from storage_node.v1 import storage_node_pb2 as pb
from storage_node.v1 import storage_node_pb2_grpc as pb_grpc

from .config import Config, StorageNodeAddress
from .errors import StartupError, StorageNodeError, Unavailable

T = TypeVar("T")

log = logging.getLogger("csi.storage_nodes")

# A node that comes back should be seen again within seconds, not after grpc's default
# reconnect backoff (up to two minutes), since Probe's answer drives liveness restarts.
# Long enough for a clone or an image import on the node; the CO's own deadline still applies.
CALL_TIMEOUT = 120.0

_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]


class StorageNodeClient:
    """One storage node's management API: an async channel and the token metadata."""

    def __init__(
        self,
        address: StorageNodeAddress,
        token: str,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        self.address = address
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address.target, options=_CHANNEL_OPTIONS)
        else:
            # One name for every node (the chart's certificate), whatever IP is dialled:
            # discovered nodes are dialled by their pod IPs, which no certificate can list.
            options: list[tuple[str, str | int]] = [*_CHANNEL_OPTIONS]
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.aio.secure_channel(address.target, credentials, options=options)
        self.stub = pb_grpc.StorageNodeStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._topology: dict[str, str] | None = None

    @property
    def id(self) -> str:
        return self.address.id

    async def topology(self) -> dict[str, str]:
        """The node's topology segments (asked once; they come from its command line)."""
        if self._topology is None:
            self._topology = dict((await self.node_info(CALL_TIMEOUT)).topology)
        return self._topology

    async def call(self, method: str, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """One management API call; a failed call raises StorageNodeError with its status."""
        try:
            return await getattr(self.stub, method)(
                request, metadata=self._metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise StorageNodeError(self.id, exc.code(), exc.details() or "") from None

    async def node_info(self, timeout: float) -> pb.NodeInfo:
        reply: pb.NodeInfo = await self.call("GetNodeInfo", pb.GetNodeInfoRequest(), timeout)
        return reply

    async def close(self) -> None:
        await self.channel.close(None)


class StorageNodes:
    """The storage nodes this plugin was configured with, by id."""

    def __init__(
        self,
        clients: list[StorageNodeClient],
        probe_timeout: float,
        token: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        self._clients = {c.id: c for c in clients}
        self.probe_timeout = probe_timeout
        self._token = token
        self._credentials = credentials
        self._server_name = server_name
        # Ids seen through discovery that are not in the Service now: volumes on them still
        # exist, so their ids must not be taken for unknown ones.
        self._away: dict[str, StorageNodeClient] = {}
        self.discovered = False

    @classmethod
    def from_config(cls, config: Config) -> StorageNodes:
        """Read the token (and CA) once; raises StartupError when they are unusable."""
        clients: list[StorageNodeClient] = []
        token = ""
        credentials = None
        if config.storage_nodes or config.kube.storage_node_service:
            assert config.storage_token_file is not None  # from_args requires it
            token = _read_text(config.storage_token_file, "--storage-token-file").strip()
            if not token:
                raise StartupError(f"--storage-token-file {config.storage_token_file} is empty")
            credentials = None
            if config.storage_tls_ca is not None:
                ca = _read_text(config.storage_tls_ca, "--storage-tls-ca").encode()
                credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            server_name = config.storage_tls_server_name
            clients = [
                StorageNodeClient(a, token, credentials, server_name) for a in config.storage_nodes
            ]
        return cls(
            clients, config.probe_timeout, token, credentials, config.storage_tls_server_name
        )

    def __iter__(self) -> Iterator[StorageNodeClient]:
        """The nodes in service, in the order of their ids."""
        return iter(sorted(self._clients.values(), key=lambda c: c.id))

    async def every(
        self, call: Callable[[StorageNodeClient], Awaitable[T]], what: str
    ) -> list[tuple[StorageNodeClient, T]]:
        """Run `call` on every node in service at once. A node that does not answer fails the
        whole call with UNAVAILABLE ("cannot WHAT: ..."): an answer missing one node (a name
        lookup, a tenant's usage) could lead to a duplicate or past a quota."""
        nodes = list(self)
        if not nodes:
            raise Unavailable(f"cannot {what}: no storage node is configured or in service")
        replies = await asyncio.gather(*(call(n) for n in nodes), return_exceptions=True)
        out = []
        for node, reply in zip(nodes, replies, strict=True):
            if isinstance(reply, StorageNodeError):
                raise Unavailable(f"cannot {what}: {reply}") from None
            if isinstance(reply, BaseException):
                raise reply
            out.append((node, reply))
        return out

    def get(self, node_id: str) -> StorageNodeClient | None:
        return self._clients.get(node_id) or self._away.get(node_id)

    async def discover(self, targets: list[str]) -> None:
        """Make the nodes at `targets` (HOST:PORT from the Service's endpoints) the nodes in
        service; each one's id is what its GetNodeInfo says."""
        self.discovered = True
        by_target = {c.address.target: c for c in [*self._clients.values(), *self._away.values()]}
        current: dict[str, StorageNodeClient] = {}
        for target in targets:
            client = by_target.get(target)
            if client is None:
                host, _, port = target.rpartition(":")
                probe = StorageNodeAddress("pending", host.strip("[]"), int(port))
                client = StorageNodeClient(probe, self._token, self._credentials, self._server_name)
                try:
                    info = await client.node_info(self.probe_timeout)
                except StorageNodeError as exc:
                    log.warning("storage node at %s not added: %s", target, exc)
                    await client.close()
                    continue
                client.address = StorageNodeAddress(info.node_id, probe.host, probe.port)
                log.info("storage node %s found at %s", info.node_id, target)
            current[client.id] = client
        for node_id, client in self._clients.items():
            if node_id not in current:
                log.warning("storage node %s left the service", node_id)
                self._away[node_id] = client
        for node_id in current:
            self._away.pop(node_id, None)
        self._clients = current

    async def ready(self) -> bool:
        """True when there is at least one node and every node answers GetNodeInfo in time.
        A node that does not answer is logged (it is the reason for `false`), never raised."""
        if not self._clients:
            log.warning("not ready: no storage node configured (--storage-node)")
            return False
        results = await asyncio.gather(
            *(c.node_info(self.probe_timeout) for c in self), return_exceptions=True
        )
        ready = True
        for client, result in zip(self, results, strict=True):
            if isinstance(result, StorageNodeError):
                log.warning("not ready: %s (at %s)", result, client.address.target)
                ready = False
            elif isinstance(result, BaseException):
                raise result
        return ready

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in [*self._clients.values(), *self._away.values()]))


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise StartupError(f"{option} {path}: {exc.strerror}") from None
