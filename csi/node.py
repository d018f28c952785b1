"""The CSI Node service: being written (every RPC answers UNIMPLEMENTED until then)."""

from __future__ import annotations

from typing import Any

from .v1 import csi_pb2_grpc as pb_grpc


class NodeService:
    def __init__(self) -> None:
        self.servicer = pb_grpc.NodeServicer()

    async def close(self) -> None:
        pass


async def start(config: Any, *args: Any) -> NodeService:
    return NodeService()
