"""The management API over TLS: a client that trusts the node's certificate gets answers,
a plaintext client and a client without the token do not."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from storage_node.v1 import storage_node_pb2 as pb
from storage_node.v1 import storage_node_pb2_grpc as pb_grpc
from tests.support.servers import free_port, self_signed_certificate, start_storage_node


@pytest.fixture
def tls_node(tmp_path: Path):
    cert, key = self_signed_certificate(tmp_path, "storage-node")
    port = free_port()
    node = start_storage_node(
        tmp_path / "data",
        [],
        extra_args=[
            "--api-listen",
            f"127.0.0.1:{port}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        ],
    )
    yield node, port, cert.read_bytes(), (tmp_path / "data" / "api-token").read_text().strip()
    node.stop()


def test_tls_with_token_works_and_nothing_else_does(tls_node) -> None:
    _, port, cert, token = tls_node
    creds = grpc.ssl_channel_credentials(root_certificates=cert)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        stub = pb_grpc.StorageNodeStub(channel)
        info = stub.GetNodeInfo(
            pb.GetNodeInfoRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=30
        )
        assert info.nbd_port > 0
        with pytest.raises(grpc.RpcError) as no_token:
            stub.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=30)
        assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
        stub = pb_grpc.StorageNodeStub(plain)
        with pytest.raises(grpc.RpcError) as no_tls:
            stub.GetNodeInfo(
                pb.GetNodeInfoRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10
            )
        assert no_tls.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
