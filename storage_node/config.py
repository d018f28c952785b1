"""The storage node's configuration: one frozen object, built in __main__ and passed down.

Owns the command-line surface (`python -m storage_node --help`) and its defaults, so that
`python -m storage_node` with no argument starts a working node under the current directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = "nbd-csi-data"
DEFAULT_NBD_PORT = 10809
DEFAULT_API_PORT = 10810
DEFAULT_METRICS_PORT = 10811
DEFAULT_EXPORT = "name=demo,size=1G"
DEFAULT_MAX_CONNECTIONS_PER_PEER = 256
DEFAULT_BUFFER_BUDGET = "1G"
DEFAULT_PAYLOAD_TIMEOUT = 30.0

_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def parse_size(text: str) -> int:
    """'512', '64K', '1G', '2GiB' -> bytes (binary multiples)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G/T suffix")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


@dataclass(frozen=True)
class ExportSpec:
    name: str
    size: int | None = None  # create DATA/images/NAME.img at this size if it does not exist
    file: str | None = None  # or serve this existing file
    readonly: bool = False
    description: str = ""

    @classmethod
    def parse(cls, text: str) -> ExportSpec:
        """name=NAME[,size=SIZE][,file=PATH][,readonly][,description=TEXT]"""
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if key in fields:
                raise ValueError(f"export {text!r}: {key} given twice")
            if key == "readonly" and not sep:
                value = "true"
            elif key not in ("name", "size", "file", "readonly", "description") or not sep:
                raise ValueError(f"export {text!r}: unknown or empty field {part!r}")
            fields[key] = value
        name = fields.get("name", "")
        if not _NAME.match(name):
            raise ValueError(
                f"export {text!r}: name must be 1-128 characters of letters, digits, '.', '_', '-'"
            )
        if "size" in fields and "file" in fields:
            raise ValueError(f"export {text!r}: give size= or file=, not both")
        size = parse_size(fields["size"]) if "size" in fields else None
        if size is not None and size <= 0:
            raise ValueError(f"export {text!r}: size must be positive")
        readonly = fields.get("readonly", "false").lower() in ("1", "true", "yes")
        return cls(name, size, fields.get("file"), readonly, fields.get("description", ""))


@dataclass(frozen=True)
class Config:
    data_dir: Path
    nbd_host: str
    nbd_port: int
    exports: tuple[ExportSpec, ...]
    workers: int
    default_export: bool
    handshake_timeout: float
    shutdown_timeout: float
    log_level: str
    api_host: str = "127.0.0.1"
    api_port: int = 10810
    api_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    node_id: str = "storage-node"
    nbd_advertise: str = ""
    topology: dict[str, str] = field(default_factory=dict)
    overcommit_ratio: float = 1.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = DEFAULT_METRICS_PORT
    # ImportImage reads files only from here (docs/storage-node-api.md); None: no imports.
    import_dir: Path | None = None
    insecure_api: bool = False
    # NBD memory limits (docs/storage-node.md, "Limits and bad input"); 0: no limit.
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    buffer_budget: int = 1 << 30
    payload_timeout: float = DEFAULT_PAYLOAD_TIMEOUT
    quarantine_orphans: bool = False

    @property
    def token_path(self) -> Path:
        return self.api_token_file or self.data_dir / "api-token"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "storage-node.db"


def parse_port(text: str, allow_zero: bool = False) -> int:
    """A TCP port written in ASCII digits, 1-65535 (0 too when `allow_zero`: any free port).
    str.isdigit alone would take other scripts' digits ("\u0661\u0660"), which int() reads."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} is not in 1-65535")
    return port


def _host_port(text: str) -> tuple[str, int]:
    """HOST:PORT of a listening address; port 0 means any free port."""
    host, sep, port = text.rpartition(":")
    try:
        if not sep:
            raise ValueError("no port")
        number = parse_port(port, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT ({exc})") from None
    return host.strip("[]") or "127.0.0.1", number


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; False for wildcards and every other name."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m storage_node",
        description="nbd-csi storage node: serves volume images over NBD.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help="where images and the SQLite metadata live"
    )
    p.add_argument(
        "--nbd-listen",
        default=f"127.0.0.1:{DEFAULT_NBD_PORT}",
        type=_host_port,
        metavar="HOST:PORT",
        help="NBD listening address",
    )
    p.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="SPEC",
        help="name=NAME[,size=SIZE][,file=PATH][,readonly][,description=TEXT]; "
        "repeatable. size= creates DATA_DIR/images/NAME.img once and keeps it; "
        f"with no export given and an empty catalogue, {DEFAULT_EXPORT!r}",
    )
    p.add_argument(
        "--no-default-export",
        action="store_true",
        help="never create the default export: volumes come only from the management API "
        "(what a deployment wants: the default export needs no attachment credential)",
    )
    p.add_argument(
        "--quarantine-orphans",
        action="store_true",
        help="only when the catalogue is missing, empty or damaged while image files exist "
        "(the node refuses to start then): move those files (and a damaged catalogue) to "
        "DATA_DIR/quarantine/<time>/ and start with an empty catalogue. Use once, on purpose",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="NBD worker processes (0: serve in the main process)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        help="seconds a client may take to finish the NBD handshake",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish on SIGTERM",
    )
    p.add_argument(
        "--max-connections-per-peer",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS_PER_PEER,
        help="NBD connections one client address may hold across the node, in the handshake "
        "or not; more are closed at once (0: no limit)",
    )
    p.add_argument(
        "--buffer-budget",
        default=DEFAULT_BUFFER_BUDGET,
        metavar="SIZE",
        help="bytes of WRITE payloads and queued READ replies the node buffers over all its "
        "connections, split evenly between the workers (at least 64M each); over it, "
        "connections holding buffers stop being read until it drains",
    )
    p.add_argument(
        "--payload-timeout",
        type=float,
        default=DEFAULT_PAYLOAD_TIMEOUT,
        help="seconds a request (header and WRITE payload) may take to arrive once it has "
        "begun; a connection that stalls midway is closed",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    api = p.add_argument_group("management API (gRPC)")
    api.add_argument(
        "--api-listen",
        default=f"127.0.0.1:{DEFAULT_API_PORT}",
        type=_host_port,
        metavar="HOST:PORT",
        help="management API address",
    )
    api.add_argument(
        "--api-token-file",
        type=Path,
        default=None,
        help="file holding the bearer token; default DATA_DIR/api-token, "
        "created with a random token when missing",
    )
    api.add_argument("--tls-cert", type=Path, help="PEM certificate: serve the API over TLS")
    api.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    api.add_argument(
        "--insecure-api",
        action="store_true",
        help="allow a plaintext management API on a non-loopback --api-listen (the token and "
        "every attachment credential then cross the network in clear)",
    )
    api.add_argument(
        "--import-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="ImportImage reads image files only from this directory (symlinks and '..' "
        "leading out of it are refused); default none: ImportImage is disabled",
    )
    api.add_argument(
        "--node-id",
        default=socket.gethostname(),
        help="this storage node's id (volume ids carry it in the CSI driver)",
    )
    api.add_argument(
        "--nbd-advertise",
        default="",
        metavar="HOST",
        help="host that clients connect to for NBD (default: the listen host)",
    )
    api.add_argument(
        "--topology",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="topology segment of this node, repeatable",
    )
    api.add_argument(
        "--overcommit-ratio",
        type=float,
        default=1.0,
        help="thin provisioning: volumes may promise up to this many times the filesystem's size",
    )
    p.add_argument_group("metrics (Prometheus, docs/metrics.md)").add_argument(
        "--metrics-listen",
        default=f"127.0.0.1:{DEFAULT_METRICS_PORT}",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics",
    )
    return p


def from_args(argv: list[str] | None = None) -> Config:
    p = parser()
    args = p.parse_args(argv)
    try:
        exports = tuple(ExportSpec.parse(e) for e in args.export)
    except ValueError as exc:
        p.error(str(exc))
    names = [e.name for e in exports]
    if len(set(names)) != len(names):
        p.error("export names must be unique")
    if args.workers < 0:
        p.error("--workers must be 0 or more")
    host, port = args.nbd_listen
    api_host, api_port = args.api_listen
    metrics_host, metrics_port = args.metrics_listen
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if args.tls_cert is None and not args.insecure_api and not is_loopback(api_host):
        p.error(
            f"--api-listen {api_host}:{api_port} is not a loopback address and the API has no "
            "TLS: give --tls-cert and --tls-key (the bearer token and the attachment "
            "credentials would cross the network in clear), or --insecure-api to accept that"
        )
    if args.overcommit_ratio <= 0:
        p.error("--overcommit-ratio must be positive")
    if args.import_dir is not None:
        if not args.import_dir.is_dir():
            p.error(f"--import-dir {args.import_dir} is not a directory")
        imports, data = args.import_dir.resolve(), Path(args.data_dir).resolve()
        if imports.is_relative_to(data) or data.is_relative_to(imports):
            # The catalogue, the token and every tenant's images would be importable.
            p.error(f"--import-dir {args.import_dir} must be outside --data-dir, and not hold it")
    if args.max_connections_per_peer < 0:
        p.error("--max-connections-per-peer must be 0 or more")
    try:
        buffer_budget = parse_size(args.buffer_budget)
    except ValueError as exc:
        p.error(f"--buffer-budget: {exc}")
    if args.payload_timeout <= 0:
        p.error("--payload-timeout must be positive")
    topology = {}
    for item in args.topology:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--topology {item!r} is not KEY=VALUE")
        topology[key] = value
    return Config(
        data_dir=Path(args.data_dir).absolute(),
        nbd_host=host,
        nbd_port=port,
        exports=exports,
        workers=args.workers,
        default_export=not args.no_default_export,
        handshake_timeout=args.handshake_timeout,
        shutdown_timeout=args.shutdown_timeout,
        log_level=args.log_level,
        api_host=api_host,
        api_port=api_port,
        api_token_file=args.api_token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        node_id=args.node_id,
        nbd_advertise=args.nbd_advertise or host,
        topology=topology,
        overcommit_ratio=args.overcommit_ratio,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        import_dir=args.import_dir.absolute() if args.import_dir is not None else None,
        insecure_api=args.insecure_api,
        max_connections_per_peer=args.max_connections_per_peer,
        buffer_budget=buffer_budget,
        payload_timeout=args.payload_timeout,
        quarantine_orphans=args.quarantine_orphans,
    )


def configure_logging(level: str, process: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
    )
