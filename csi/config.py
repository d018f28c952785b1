"""The CSI plugin's configuration: one frozen object, built in __main__ and passed down.

Owns the command-line surface (`python -m csi --help`), the parsing of endpoints and storage
node addresses, and the plugin's identity (driver name, vendor version). Nothing here runs at
import time: no environment reads, no globals computed from the machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import socket
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

DRIVER_NAME = "nbd.csi.dev"
FALLBACK_VERSION = "0.1.0"
DEFAULT_ENDPOINT = "unix:///csi/csi.sock"

# Storage node ids end up inside volume ids, so they stay short and free of separators.
_NODE_ID = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
# A DNS name as certificates carry it (RFC 1123 labels, at most 253 characters).
_SERVER_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_UNIX_PATH_MAX = 107


class Mode(StrEnum):
    """Which CSI services this process serves (Identity is always served)."""

    CONTROLLER = "controller"
    NODE = "node"
    ALL = "all"


@dataclass(frozen=True)
class Endpoint:
    """Where the plugin listens: a unix socket path, or a TCP host and port (tests)."""

    unix_path: Path | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """`unix:///ABSOLUTE/PATH` or `tcp://HOST:PORT`."""
        if text.startswith("unix://"):
            path = text.removeprefix("unix://")
            if not path.startswith("/"):
                raise ValueError(f"{text!r}: a unix endpoint needs an absolute path (unix:///...)")
            if len(path.encode()) > _UNIX_PATH_MAX:
                raise ValueError(f"{text!r}: socket path longer than {_UNIX_PATH_MAX} bytes")
            return cls(unix_path=Path(path))
        if text.startswith("tcp://"):
            host, port = _host_port(text.removeprefix("tcp://"))
            return cls(host=host, port=port)
        raise ValueError(f"{text!r}: endpoint must be unix:///PATH or tcp://HOST:PORT")

    @property
    def grpc_address(self) -> str:
        """The address in the form grpc's add_insecure_port takes."""
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True)
class StorageNodeAddress:
    """A storage node's management API, as given by `--storage-node ID=HOST:PORT`."""

    id: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> StorageNodeAddress:
        node_id, sep, address = text.partition("=")
        if not sep:
            raise ValueError(f"{text!r} is not ID=HOST:PORT")
        if not _NODE_ID.match(node_id):
            raise ValueError(
                f"{text!r}: the id must be 1-63 letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit"
            )
        host, port = _host_port(address)
        return cls(node_id, host, port)

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class NodeOptions:
    """What only the node plugin uses (docs/csi-driver.md)."""

    # The address storage nodes see this node's NBD connections come from; NodeGetInfo
    # reports `NODE_ID@ADDRESS` so the controller can bind attachments to it.
    address: str = "127.0.0.1"
    topology: tuple[tuple[str, str], ...] = ()
    max_volumes: int = 64
    state_dir: Path = Path("/var/lib/nbd-csi")
    # Kernel NBD (docs/csi-node.md): connections per device when the storage node allows
    # several; seconds before an unanswered request counts its connection as dead (it is then
    # sent again on a new one); seconds requests wait for a reconnect before they fail.
    nbd_connections: int = 4
    nbd_io_timeout: int = 10
    nbd_dead_timeout: int = 120


@dataclass(frozen=True)
class KubeOptions:
    """How the controller reaches the Kubernetes API (quotas, storage node discovery)."""

    kubeconfig: Path | None = None
    in_cluster: bool = False
    # NAMESPACE/NAME of the storage nodes' Service, or "" to use --storage-node only.
    storage_node_service: str = ""

    @property
    def enabled(self) -> bool:
        return self.in_cluster or self.kubeconfig is not None


@dataclass(frozen=True)
class Config:
    mode: Mode
    endpoint: Endpoint
    node_id: str
    storage_nodes: tuple[StorageNodeAddress, ...]
    storage_token_file: Path | None
    storage_tls_ca: Path | None
    log_level: str
    node: NodeOptions = NodeOptions()
    kube: KubeOptions = KubeOptions()
    # HOST:PORT for Prometheus metrics, or None for no metrics server.
    metrics_listen: tuple[str, int] | None = None
    driver_name: str = DRIVER_NAME
    vendor_version: str = FALLBACK_VERSION
    # How long Probe waits for each storage node's GetNodeInfo.
    probe_timeout: float = 3.0
    # How long in-flight calls may run after SIGTERM before they are cancelled.
    shutdown_grace: float = 5.0
    # The name checked in every storage node's TLS certificate, whatever address is dialled
    # ("" : the address itself).
    storage_tls_server_name: str = ""


def vendor_version() -> str:
    try:
        return importlib.metadata.version("nbd-csi")
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_VERSION


def parse_port(text: str) -> int:
    """A TCP port in ASCII digits, 1-65535. str.isdigit alone takes other scripts' digits
    ("\u0661\u0660"), which int() reads, and any number of them."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise ValueError(f"port {text[:20]!r} is not a number from 1 to 65535")
    return int(text)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    try:
        number = parse_port(port)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not HOST:PORT: {exc}") from None
    return host.strip("[]"), number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m csi",
        description=f"nbd-csi CSI plugin ({DRIVER_NAME}): serves the CSI gRPC services.",
    )
    p.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=Mode.ALL.value,
        help="which CSI services to serve besides Identity (default: %(default)s)",
    )
    p.add_argument(
        "--endpoint",
        default=DEFAULT_ENDPOINT,
        metavar="unix:///PATH|tcp://HOST:PORT",
        help="where to listen for CSI calls (default: %(default)s); a stale unix socket file "
        "is replaced",
    )
    p.add_argument(
        "--storage-node",
        action="append",
        default=[],
        metavar="ID=HOST:PORT",
        help="a storage node's management API address; repeatable",
    )
    p.add_argument(
        "--storage-token-file",
        type=Path,
        metavar="PATH",
        help="file holding the bearer token for the storage nodes' management API",
    )
    p.add_argument(
        "--storage-tls-ca",
        type=Path,
        metavar="PATH",
        help="PEM CA certificate: talk TLS to the storage nodes and trust this CA",
    )
    p.add_argument(
        "--storage-tls-server-name",
        default="",
        metavar="NAME",
        help="the name every storage node's certificate must carry (its SAN), checked "
        "whatever address is dialled; needs --storage-tls-ca (default: the dialled address)",
    )
    p.add_argument(
        "--node-id",
        default=None,
        help="this Kubernetes node's id (default: the host name)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: none)",
    )
    kube = p.add_argument_group("Kubernetes API (controller: tenant quotas, discovery)")
    kube.add_argument("--kubeconfig", type=Path, metavar="PATH", help="kubeconfig file to use")
    kube.add_argument(
        "--in-cluster",
        action="store_true",
        help="use the pod's service account (without this or --kubeconfig, quotas are off)",
    )
    kube.add_argument(
        "--storage-node-service",
        default="",
        metavar="NAMESPACE/NAME",
        help="find storage nodes from this Service's endpoints (port named 'api')",
    )
    node = p.add_argument_group("node plugin")
    node.add_argument(
        "--node-address",
        default=NodeOptions.address,
        metavar="ADDRESS",
        help="the address storage nodes see this node's NBD connections come from "
        "(default: %(default)s)",
    )
    node.add_argument(
        "--topology",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a topology segment of this node; repeatable",
    )
    node.add_argument(
        "--max-volumes",
        type=int,
        default=NodeOptions.max_volumes,
        help="volumes this node may attach (default: %(default)s)",
    )
    node.add_argument(
        "--state-dir",
        type=Path,
        default=NodeOptions.state_dir,
        metavar="PATH",
        help="where the node plugin records what it attached (default: %(default)s)",
    )
    node.add_argument(
        "--nbd-connections",
        type=int,
        default=NodeOptions.nbd_connections,
        metavar="N",
        help="NBD connections per device when the storage node allows several "
        "(default: %(default)s)",
    )
    node.add_argument(
        "--nbd-io-timeout",
        type=int,
        default=NodeOptions.nbd_io_timeout,
        metavar="SECONDS",
        help="a request unanswered this long marks its connection dead; it is sent again on "
        "a new one (default: %(default)s)",
    )
    node.add_argument(
        "--nbd-dead-timeout",
        type=int,
        default=NodeOptions.nbd_dead_timeout,
        metavar="SECONDS",
        help="how long I/O waits for a lost connection to be replaced before it fails "
        "(default: %(default)s)",
    )
    return p


def from_args(argv: list[str] | None = None) -> Config:
    """Parse the command line; errors exit with status 2 and a message naming the option."""
    p = parser()
    args = p.parse_args(argv)
    try:
        endpoint = Endpoint.parse(args.endpoint)
    except ValueError as exc:
        p.error(f"--endpoint {exc}")
    nodes: list[StorageNodeAddress] = []
    for text in args.storage_node:
        try:
            nodes.append(StorageNodeAddress.parse(text))
        except ValueError as exc:
            p.error(f"--storage-node {exc}")
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids):
        p.error(f"--storage-node ids must be unique, got {', '.join(ids)}")
    if (nodes or args.storage_node_service) and args.storage_token_file is None:
        p.error("--storage-node needs --storage-token-file (the management API wants a token)")
    server_name = args.storage_tls_server_name
    if server_name and args.storage_tls_ca is None:
        p.error("--storage-tls-server-name needs --storage-tls-ca (it names what TLS checks)")
    if server_name and not _SERVER_NAME.match(server_name):
        p.error(f"--storage-tls-server-name {server_name[:80]!r} is not a DNS name")
    node_id = args.node_id if args.node_id is not None else socket.gethostname()
    if not node_id:
        p.error("--node-id must not be empty")
    topology = []
    for text in args.topology:
        key, sep, value = text.partition("=")
        if not sep or not key:
            p.error(f"--topology {text!r} is not KEY=VALUE")
        topology.append((key, value))
    if args.max_volumes < 1:
        p.error("--max-volumes must be at least 1")
    if not 1 <= args.nbd_connections <= 16:
        p.error("--nbd-connections must be 1 to 16")
    if args.nbd_io_timeout < 1 or args.nbd_dead_timeout < 1:
        p.error("--nbd-io-timeout and --nbd-dead-timeout must be at least 1 second")
    if not args.node_address or "@" in args.node_address:
        p.error(f"--node-address {args.node_address!r} is not an address")
    if "@" in node_id:
        p.error(f"--node-id {node_id!r} must not contain '@'")
    service = args.storage_node_service
    if service and (service.count("/") != 1 or not all(service.split("/"))):
        p.error(f"--storage-node-service {service!r} is not NAMESPACE/NAME")
    if args.kubeconfig is not None and args.in_cluster:
        p.error("--kubeconfig and --in-cluster exclude each other")
    kube_options = KubeOptions(args.kubeconfig, args.in_cluster, service)
    if service and not kube_options.enabled:
        p.error("--storage-node-service needs --kubeconfig or --in-cluster")
    metrics_listen = None
    if args.metrics_listen:
        try:
            metrics_listen = _host_port(args.metrics_listen)
        except ValueError as exc:
            p.error(f"--metrics-listen {exc}")
    return Config(
        mode=Mode(args.mode),
        endpoint=endpoint,
        node_id=node_id,
        storage_nodes=tuple(nodes),
        storage_token_file=args.storage_token_file,
        storage_tls_ca=args.storage_tls_ca,
        log_level=args.log_level,
        node=NodeOptions(
            address=args.node_address,
            topology=tuple(topology),
            max_volumes=args.max_volumes,
            state_dir=args.state_dir,
            nbd_connections=args.nbd_connections,
            nbd_io_timeout=args.nbd_io_timeout,
            nbd_dead_timeout=args.nbd_dead_timeout,
        ),
        kube=kube_options,
        metrics_listen=metrics_listen,
        vendor_version=vendor_version(),
        storage_tls_server_name=server_name,
    )


def configure_logging(level: str, process: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
    )
