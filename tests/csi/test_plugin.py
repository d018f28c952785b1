"""The CSI plugin program and its Identity service, as a CO sees them.

Owns the contract of `python -m csi`: the command line (help, argument errors exit 2, startup
errors exit 1), the endpoint (TCP for tests, a unix socket whose directory is created and whose
stale file is replaced), SIGTERM/SIGINT ending in exit 0, and the Identity RPCs of
csi-spec-v1.12.md: GetPluginInfo, GetPluginCapabilities (the same set in every mode), Probe
(ready exactly when every configured storage node answers its management API). Every plugin
is a real process called with the generated CSI stubs; every storage node is our real one.
"""

from __future__ import annotations

import importlib.metadata
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi.config import Mode, from_args
from csi.v1 import csi_pb2 as pb
from tests.support.api import ApiNode, start_api_node
from tests.support.servers import (
    ServerHandle,
    free_port,
    self_signed_certificate,
    start_storage_node,
)

from .plugin import Plugin, run_plugin, start_plugin, storage_args

Service = pb.PluginCapability.Service
Expansion = pb.PluginCapability.VolumeExpansion


def token_file(node: ApiNode) -> Path:
    return node.data_dir / "api-token"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory, storage_node: ApiNode) -> Iterator[Plugin]:
    args = storage_args([("a", storage_node.api_port)], token_file(storage_node))
    p = start_plugin(tmp_path_factory.mktemp("plugin"), *args)
    try:
        yield p
    finally:
        p.stop()


def expected_version() -> str:
    try:
        return importlib.metadata.version("nbd-csi")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


# -- the command line ----------------------------------------------------------------------


def test_help_exits_0() -> None:
    result = run_plugin("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--mode", "--endpoint", "--storage-node", "--storage-token-file", "--node-id"):
        assert option in result.stdout


def test_defaults() -> None:
    config = from_args(["--endpoint", "tcp://127.0.0.1:1"])
    assert config.mode is Mode.ALL
    assert config.node_id == socket.gethostname()
    assert config.storage_nodes == ()
    assert config.driver_name == "nbd.csi.dev"
    assert config.vendor_version == expected_version()


TOKEN = ["--storage-token-file", "token"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--mode", "both"], "argument --mode: invalid choice", id="unknown-mode"),
        pytest.param(["--frobnicate"], "unrecognized arguments: --frobnicate", id="unknown-option"),
        pytest.param(
            ["--endpoint", "http://127.0.0.1:1"],
            "endpoint must be unix:///PATH or tcp://HOST:PORT",
            id="endpoint-scheme",
        ),
        pytest.param(
            ["--endpoint", "unix://csi.sock"], "needs an absolute path", id="unix-relative-path"
        ),
        pytest.param(
            ["--endpoint", "unix:///" + "d" * 120], "longer than 107 bytes", id="unix-path-too-long"
        ),
        pytest.param(["--endpoint", "tcp://127.0.0.1"], "is not HOST:PORT", id="tcp-without-port"),
        pytest.param(
            ["--storage-node", "127.0.0.1:1", *TOKEN],
            "'127.0.0.1:1' is not ID=HOST:PORT",
            id="storage-node-without-id",
        ),
        pytest.param(
            ["--storage-node", "a=127.0.0.1", *TOKEN],
            "'127.0.0.1' is not HOST:PORT",
            id="storage-node-without-port",
        ),
        pytest.param(
            ["--storage-node", "a/b=127.0.0.1:1", *TOKEN],
            "the id must be",
            id="storage-node-bad-id",
        ),
        pytest.param(
            ["--storage-node", "a=127.0.0.1:1", "--storage-node", "a=127.0.0.1:2", *TOKEN],
            "--storage-node ids must be unique",
            id="storage-node-twice",
        ),
        pytest.param(
            ["--storage-node", "a=127.0.0.1:1"],
            "--storage-node needs --storage-token-file",
            id="storage-node-without-token",
        ),
        pytest.param(["--node-id", ""], "--node-id must not be empty", id="empty-node-id"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    result = run_plugin(*args)
    assert result.returncode == 2, result.stderr
    assert "python -m csi: error:" in result.stderr and message in result.stderr, result.stderr
    assert "usage: python -m csi" in result.stderr


@dataclass(frozen=True)
class StartupCase:
    args: Callable[[Path], list[str]]
    message: str


def _regular_file(tmp: Path) -> list[str]:
    (tmp / "not-a-socket").write_text("keep me\n")
    return ["--endpoint", f"unix://{tmp / 'not-a-socket'}"]


def _missing_token(tmp: Path) -> list[str]:
    return ["--storage-node", "a=127.0.0.1:1", "--storage-token-file", str(tmp / "nope")]


def _empty_token(tmp: Path) -> list[str]:
    (tmp / "token").write_text("\n")
    return ["--storage-node", "a=127.0.0.1:1", "--storage-token-file", str(tmp / "token")]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(StartupCase(_regular_file, "exists and is not a socket"), id="path-is-a-file"),
        pytest.param(StartupCase(_missing_token, "--storage-token-file"), id="token-file-missing"),
        pytest.param(StartupCase(_empty_token, "is empty"), id="token-file-empty"),
    ],
)
def test_startup_errors_exit_1(tmp_path: Path, case: StartupCase) -> None:
    result = run_plugin(*case.args(tmp_path))
    assert result.returncode == 1, result.stderr
    assert case.message in result.stderr
    if (tmp_path / "not-a-socket").exists():
        assert (tmp_path / "not-a-socket").read_text() == "keep me\n", "must not be replaced"


def test_endpoint_in_use_exits_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_plugin("--endpoint", f"tcp://127.0.0.1:{port}")
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on tcp://127.0.0.1:{port}" in result.stderr


# -- endpoint and lifecycle ----------------------------------------------------------------


def _stale_socket(path: Path) -> None:
    """A socket file left behind by a process that died without removing it."""
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    assert path.is_socket()


@pytest.mark.parametrize(
    "prepare",
    [
        pytest.param(lambda path: None, id="directory-created"),
        pytest.param(_stale_socket, id="stale-socket-replaced"),
    ],
)
def test_unix_socket_endpoint(tmp_path: Path, prepare: Callable[[Path], None]) -> None:
    path = tmp_path / "plugins" / "nbd.csi.dev" / "csi.sock"
    prepare(path)
    p = start_plugin(tmp_path, endpoint=f"unix://{path}")
    try:
        reply = p.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
        assert reply.name == "nbd.csi.dev"
        assert path.is_socket()
    finally:
        assert p.stop() == 0, p.log_text()


@pytest.mark.parametrize(
    "sig", [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGINT, id="SIGINT")]
)
def test_signal_stops_gracefully(
    tmp_path: Path, storage_node: ApiNode, sig: signal.Signals
) -> None:
    args = storage_args([("a", storage_node.api_port)], token_file(storage_node))
    p = start_plugin(tmp_path, *args)
    assert p.probe() is True
    assert p.stop(sig) == 0, p.log_text()
    log = p.log_text()
    assert "shutting down" in log and "stopped" in log
    assert "Traceback" not in log, log


# -- Identity service ----------------------------------------------------------------------


def test_plugin_info(plugin: Plugin) -> None:
    reply = plugin.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
    assert reply.name == "nbd.csi.dev"
    assert reply.vendor_version == expected_version()
    assert dict(reply.manifest) == {}


EXPECTED_CAPABILITIES = {
    ("service", Service.CONTROLLER_SERVICE),
    ("service", Service.VOLUME_ACCESSIBILITY_CONSTRAINTS),
    ("service", Service.GROUP_CONTROLLER_SERVICE),
    ("volume_expansion", Expansion.ONLINE),
}


def capability_set(reply: pb.GetPluginCapabilitiesResponse) -> set[tuple[str, int]]:
    found = set()
    for cap in reply.capabilities:
        kind = cap.WhichOneof("type")
        assert kind is not None
        found.add((kind, getattr(cap, kind).type))
    assert len(found) == len(reply.capabilities), "no capability twice"
    return found


@pytest.mark.parametrize("mode", [pytest.param(m.value, id=m.value) for m in Mode])
def test_capabilities_and_services_per_mode(tmp_path: Path, mode: str) -> None:
    p = start_plugin(tmp_path, "--mode", mode)
    try:
        reply = p.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=30)
        # The spec: every instance of one version reports the same set, whichever RPCs it
        # serves, so CONTROLLER_SERVICE is there in node mode too.
        assert capability_set(reply) == EXPECTED_CAPABILITIES
        # A service the mode does not serve is not registered: UNIMPLEMENTED.
        calls = {
            "controller": lambda: p.controller.ControllerGetCapabilities(
                pb.ControllerGetCapabilitiesRequest(), timeout=30
            ),
            "node": lambda: p.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=30),
            "group": lambda: p.group.GroupControllerGetCapabilities(
                pb.GroupControllerGetCapabilitiesRequest(), timeout=30
            ),
        }
        for service, call in calls.items():
            if mode in ({"group": "controller"}.get(service, service), "all"):
                assert call().capabilities
            else:
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        assert p.stop() == 0, p.log_text()


@dataclass(frozen=True)
class ProbeCase:
    nodes: tuple[str, ...]  # "up": the running storage node; "down": a port nothing listens on
    token: str  # "right" or "wrong"
    ready: bool
    logged: tuple[str, ...] = ()


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(ProbeCase(("up",), "right", True), id="node-up"),
        pytest.param(ProbeCase(("up", "up"), "right", True), id="two-ids-up"),
        pytest.param(
            ProbeCase((), "right", False, ("no storage node configured",)), id="no-storage-nodes"
        ),
        pytest.param(
            ProbeCase(("up",), "wrong", False, ("storage node n0: UNAUTHENTICATED",)),
            id="wrong-token",
        ),
        pytest.param(
            ProbeCase(("down",), "right", False, ("storage node n0: UNAVAILABLE",)),
            id="nothing-listening",
        ),
        pytest.param(
            ProbeCase(("up", "down"), "right", False, ("storage node n1: UNAVAILABLE",)),
            id="one-of-two-down",
        ),
    ],
)
def test_probe(tmp_path: Path, storage_node: ApiNode, case: ProbeCase) -> None:
    token = token_file(storage_node)
    if case.token == "wrong":
        token = tmp_path / "wrong-token"
        token.write_text("not-the-token-of-this-storage-node\n")
    nodes = [
        (f"n{i}", storage_node.api_port if state == "up" else free_port())
        for i, state in enumerate(case.nodes)
    ]
    args = storage_args(nodes, token) if nodes else []
    p = start_plugin(tmp_path, *args)
    try:
        # Probe answers OK either way; readiness is the field (spec, ProbeResponse).
        assert p.probe() is case.ready
        log = p.log_text()
        for text in case.logged:
            assert text in log, log
        if case.ready:
            assert "not ready" not in log, log
        assert "Traceback" not in log, log
    finally:
        assert p.stop() == 0, p.log_text()


def test_probe_follows_the_storage_node(tmp_path: Path) -> None:
    node = start_api_node(tmp_path / "storage", workers=0, node_id="storage-b")
    try:
        args = storage_args([("b", node.api_port)], token_file(node))
        p = start_plugin(tmp_path / "plugin", *args)
        try:
            assert p.probe() is True
            node.stop()
            assert p.probe() is False
            assert "storage node b: UNAVAILABLE" in p.log_text()
            node.start()  # same data dir, same ports
            p.wait_probe(True)
        finally:
            assert p.stop() == 0, p.log_text()
    finally:
        node.stop()


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, int, Path]]:
    """A storage node whose management API speaks TLS only, answering already."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(tmp, "storage-node")
    api_port = free_port()
    node = start_storage_node(
        tmp / "data",
        [],
        workers=0,
        extra_args=[
            *("--api-listen", f"127.0.0.1:{api_port}"),
            *("--tls-cert", str(cert), "--tls-key", str(key)),
        ],
    )
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{api_port}", creds) as channel:
            # The API starts after the NBD port that start_storage_node waits for.
            grpc.channel_ready_future(channel).result(timeout=30)
        yield node, api_port, cert
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("ca", "ready"),
    [
        pytest.param("node", True, id="node-ca-trusted"),
        pytest.param("other", False, id="other-ca"),
        pytest.param("none", False, id="plaintext-to-tls"),
    ],
)
def test_probe_over_tls(
    tmp_path: Path, tls_node: tuple[ServerHandle, int, Path], ca: str, ready: bool
) -> None:
    node, api_port, node_cert = tls_node
    assert node.data_dir is not None
    args = storage_args([("t", api_port)], node.data_dir / "api-token")
    if ca == "node":
        args += ["--storage-tls-ca", str(node_cert)]
    elif ca == "other":
        args += ["--storage-tls-ca", str(self_signed_certificate(tmp_path, "someone-else")[0])]
    p = start_plugin(tmp_path, *args)
    try:
        assert p.probe() is ready
        if not ready:
            assert "not ready: storage node t:" in p.log_text()
    finally:
        assert p.stop() == 0, p.log_text()


def test_sigterm_lets_a_call_in_flight_finish(tmp_path: Path) -> None:
    """A Probe waiting on a storage node that accepts but never answers is in flight when
    SIGTERM comes; it still gets its reply (ready=false after the probe timeout, well inside
    the shutdown grace), and the plugin then exits 0."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        token = tmp_path / "token"
        token.write_text("some-token-for-a-node-that-never-answers\n")
        p = start_plugin(tmp_path, *storage_args([("mute", silent.getsockname()[1])], token))
        try:
            reply = p.identity.Probe.future(pb.ProbeRequest(), timeout=30)
            silent.settimeout(30)
            conn, _ = silent.accept()  # the plugin is now inside Probe, asking the node
            with conn:
                p.proc.send_signal(signal.SIGTERM)
                assert reply.result().ready.value is False
                assert p.proc.wait(30) == 0
        finally:
            assert p.stop() == 0, p.log_text()
    assert "not ready: storage node mute: DEADLINE_EXCEEDED" in p.log_text()


def test_node_mode_is_ready_without_storage_nodes(tmp_path: Path) -> None:
    """A node plugin gets its NBD address from publish_context: no storage node to wait for."""
    p = start_plugin(tmp_path, "--mode", "node")
    try:
        assert p.probe() is True
    finally:
        assert p.stop() == 0, p.log_text()
