"""The management API over TLS: a client that trusts the node's certificate gets answers,
a plaintext client and a client without the token do not; a plaintext API is refused on a
non-loopback address unless --insecure-api; the CSI plugin checks one server name
(--storage-tls-server-name) in every storage node's certificate, whatever address it dials."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from csi import config as csi_config_module
from csi.errors import StorageNodeError
from csi.storage_nodes import StorageNodes
from storage_node import config as storage_config
from storage_node.v1 import storage_node_pb2 as pb
from storage_node.v1 import storage_node_pb2_grpc as pb_grpc
from tests.csi.plugin import run_plugin, start_plugin, storage_args
from tests.support.servers import REPO, free_port, self_signed_certificate, start_storage_node


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


# ---- a plaintext API only on loopback ------------------------------------------------------


def run_node(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "storage_node", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.1.2.3", "storage.example"])
def test_plaintext_api_on_a_non_loopback_address_is_refused(tmp_path: Path, host: str) -> None:
    """The node exits at once (status 2) with a message naming the options; nothing listens
    and nothing is written to the data directory."""
    result = run_node("--data-dir", str(tmp_path / "data"), "--api-listen", f"{host}:10810")
    assert result.returncode == 2, result.stderr
    assert "is not a loopback address and the API has no TLS" in result.stderr
    assert "--tls-cert" in result.stderr and "--insecure-api" in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "[::1]", "localhost"])
def test_plaintext_api_on_loopback_needs_no_flag(host: str) -> None:
    config = storage_config.from_args(["--api-listen", f"{host}:10810"])
    assert config.tls_cert is None and not config.insecure_api


def test_non_loopback_api_with_tls_or_insecure_api_is_accepted(tmp_path: Path) -> None:
    """Parsed only: tests listen on loopback, never on every interface."""
    insecure = storage_config.from_args(["--api-listen", "0.0.0.0:10810", "--insecure-api"])
    assert (insecure.api_host, insecure.insecure_api) == ("0.0.0.0", True)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    tls = storage_config.from_args(
        ["--api-listen", "0.0.0.0:10810", "--tls-cert", str(cert), "--tls-key", str(key)]
    )
    assert (tls.api_host, tls.tls_cert) == ("0.0.0.0", cert)


@pytest.mark.parametrize(
    "port", ["\u0661\u0660\u0668\u0661\u0660", "\uff11\uff10\uff10", "65536", "-1", "1e3", ""]
)
def test_listen_ports_are_ascii_digits_up_to_65535(port: str) -> None:
    for option in ("--api-listen", "--nbd-listen", "--metrics-listen"):
        result = run_node(option, f"127.0.0.1:{port}")
        assert result.returncode == 2, (option, port, result.stderr)
        assert "is not HOST:PORT" in result.stderr


# ---- one server name for every storage node ------------------------------------------------

SERVER_NAME = "storage.nbd-csi.test"


@pytest.fixture(scope="module")
def named_node(tmp_path_factory: pytest.TempPathFactory):
    """A TLS storage node whose certificate names SERVER_NAME only (no IP address), dialled
    by 127.0.0.1 like a discovered pod IP."""
    tmp = tmp_path_factory.mktemp("named")
    cert, key = self_signed_certificate(tmp, "named", san=f"DNS:{SERVER_NAME}")
    port = free_port()
    node = start_storage_node(
        tmp / "data",
        [],
        workers=0,
        extra_args=[
            *("--api-listen", f"127.0.0.1:{port}", "--node-id", "sn-named"),
            *("--tls-cert", str(cert), "--tls-key", str(key)),
        ],
    )
    try:
        yield port, cert, tmp / "data" / "api-token"
    finally:
        node.stop()


def csi_config(port: int, cert: Path, token: Path, *extra: str) -> csi_config_module.Config:
    return csi_config_module.from_args(
        [
            *("--mode", "controller", "--storage-node", f"sn-named=127.0.0.1:{port}"),
            *("--storage-token-file", str(token), "--storage-tls-ca", str(cert)),
            *extra,
        ]
    )


async def node_ids(config: csi_config_module.Config, discover: list[str] | None = None) -> list:
    nodes = StorageNodes.from_config(config)
    try:
        if discover is not None:
            await nodes.discover(discover)
        return [(await c.node_info(30)).node_id for c in nodes]
    finally:
        await nodes.close()


def test_server_name_is_checked_whatever_address_is_dialled(named_node) -> None:
    port, cert, token = named_node
    config = csi_config(port, cert, token, "--storage-tls-server-name", SERVER_NAME)
    assert asyncio.run(node_ids(config)) == ["sn-named"]
    # Discovery dials endpoint addresses; the same name is checked for them.
    discovered = dataclasses.replace(
        config,
        storage_nodes=(),
        kube=csi_config_module.KubeOptions(in_cluster=True, storage_node_service="ns/sn"),
    )
    assert asyncio.run(node_ids(discovered, [f"127.0.0.1:{port}"])) == ["sn-named"]


@pytest.mark.parametrize("name", ["", "other.nbd-csi.test"])
def test_a_certificate_without_the_name_is_refused(named_node, name: str) -> None:
    """Without the option the dialled IP is checked (the certificate has none); with another
    name, that name is checked: both fail the TLS handshake (UNAVAILABLE)."""
    port, cert, token = named_node
    extra = ["--storage-tls-server-name", name] if name else []
    with pytest.raises(StorageNodeError) as failed:
        asyncio.run(node_ids(csi_config(port, cert, token, *extra)))
    assert failed.value.node_code == grpc.StatusCode.UNAVAILABLE


def test_the_plugin_probes_ready_with_the_server_name(tmp_path: Path, named_node) -> None:
    port, cert, token = named_node
    args = [*storage_args([("sn-named", port)], token), "--storage-tls-ca", str(cert)]
    p = start_plugin(tmp_path, *args, "--storage-tls-server-name", SERVER_NAME)
    try:
        assert p.probe() is True
    finally:
        assert p.stop() == 0, p.log_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage-tls-server-name", SERVER_NAME], "needs --storage-tls-ca"),
        (["--storage-tls-ca", "ca.pem", "--storage-tls-server-name", "a b"], "not a DNS name"),
    ],
)
def test_server_name_option_errors(args: list[str], message: str) -> None:
    result = run_plugin("--storage-node", "a=127.0.0.1:1", "--storage-token-file", "t", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
