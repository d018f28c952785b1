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
from collections.abc import Iterator
from pathlib import Path

import grpc

from storage_node.v1 import storage_node_pb2 as pb
from storage_node.v1 import storage_node_pb2_grpc as pb_grpc

from .config import Config, StorageNodeAddress
from .errors import StartupError, StorageNodeError

log = logging.getLogger("csi.storage_nodes")

# A node that comes back should be seen again within seconds, not after grpc's default
# reconnect backoff (up to two minutes), since Probe's answer drives liveness restarts.
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
    ) -> None:
        self.address = address
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address.target, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(
                address.target, credentials, options=_CHANNEL_OPTIONS
            )
        self.stub = pb_grpc.StorageNodeStub(self.channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    @property
    def id(self) -> str:
        return self.address.id

    async def node_info(self, timeout: float) -> pb.NodeInfo:
        try:
            reply: pb.NodeInfo = await self.stub.GetNodeInfo(
                pb.GetNodeInfoRequest(), metadata=self._metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise StorageNodeError(self.id, exc.code(), exc.details() or "") from None
        return reply

    async def close(self) -> None:
        await self.channel.close(None)


class StorageNodes:
    """The storage nodes this plugin was configured with, by id."""

    def __init__(self, clients: list[StorageNodeClient], probe_timeout: float) -> None:
        self._clients = {c.id: c for c in clients}
        self.probe_timeout = probe_timeout

    @classmethod
    def from_config(cls, config: Config) -> StorageNodes:
        """Read the token (and CA) once; raises StartupError when they are unusable."""
        clients: list[StorageNodeClient] = []
        if config.storage_nodes:
            assert config.storage_token_file is not None  # from_args requires it
            token = _read_text(config.storage_token_file, "--storage-token-file").strip()
            if not token:
                raise StartupError(f"--storage-token-file {config.storage_token_file} is empty")
            credentials = None
            if config.storage_tls_ca is not None:
                ca = _read_text(config.storage_tls_ca, "--storage-tls-ca").encode()
                credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            clients = [StorageNodeClient(a, token, credentials) for a in config.storage_nodes]
        return cls(clients, config.probe_timeout)

    def __iter__(self) -> Iterator[StorageNodeClient]:
        return iter(self._clients.values())

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
        await asyncio.gather(*(c.close() for c in self))


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise StartupError(f"{option} {path}: {exc.strerror}") from None
