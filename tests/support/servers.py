"""Start and stop real NBD servers for tests and benchmarks.

Owns: launching `python -m storage_node` (ours) and qemu-nbd / nbdkit (peers) as child
processes on loopback, waiting until they accept connections, and stopping them by pid.
Nothing here fakes a server: every handle is a real process speaking NBD on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0
) -> int:
    """Send `sig` (SIGTERM: graceful stop), SIGKILL past `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def self_signed_certificate(
    directory: Path, name: str, san: str = "IP:127.0.0.1"
) -> tuple[Path, Path]:
    """A certificate and key for `san` (default 127.0.0.1), valid one day (openssl)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={san}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@dataclass
class ServerHandle:
    proc: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"
    log: Path | None = None
    data_dir: Path | None = None
    argv: list[str] = field(default_factory=list)

    def uri(self, export: str = "") -> str:
        return f"nbd://{self.host}:{self.port}/{export}"

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        return stop_process(self.proc, timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


def _spawn(argv: Sequence[str], port: int, log: Path, **kw: object) -> ServerHandle:
    # 0600 like everything else in a storage node's data directory, where logs are kept.
    with open(log, "ab", opener=lambda path, flags: os.open(path, flags, 0o600)) as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
    handle = ServerHandle(proc=proc, port=port, log=log, argv=list(argv))
    try:
        wait_port("127.0.0.1", port, proc)
    except BaseException:
        handle.kill()
        raise
    return handle


def start_storage_node(
    data_dir: Path,
    exports: Sequence[str] = ("name=demo,size=64M",),
    *,
    port: int | None = None,
    workers: int | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> ServerHandle:
    """Run our storage node. `exports` are `--export` specs: name=N[,size=S][,file=P][,readonly]."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "storage_node",
        "--data-dir",
        str(data_dir),
        "--nbd-listen",
        f"127.0.0.1:{port}",
    ]
    if workers is not None:
        argv += ["--workers", str(workers)]
    for spec in exports:
        argv += ["--export", spec]
    argv += list(extra_args)
    for option in ("--api-listen", "--metrics-listen"):
        if option not in argv:
            argv += [option, "127.0.0.1:0"]  # nodes of parallel tests must not clash
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    handle = _spawn(argv, port, data_dir / "storage-node.log", cwd=str(REPO), env=full_env)
    handle.data_dir = data_dir
    return handle


def start_qemu_nbd(
    image: Path,
    export: str,
    *,
    port: int | None = None,
    readonly: bool = False,
    extra_args: Sequence[str] = (),
) -> ServerHandle:
    port = port or free_port()
    argv = [
        "qemu-nbd",
        "-f",
        "raw",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "-x",
        export,
        "--persistent",
        "--shared=8",
        *extra_args,
    ]
    if readonly:
        argv.append("--read-only")
    argv.append(str(image))
    return _spawn(argv, port, image.with_suffix(".qemu-nbd.log"))


def start_nbdkit_file(
    image: Path, *, port: int | None = None, threads: int = 16, extra_args: Sequence[str] = ()
) -> ServerHandle:
    port = port or free_port()
    argv = [
        "nbdkit",
        "--foreground",
        "--exit-with-parent",
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        str(threads),
        *extra_args,
        "file",
        str(image),
    ]
    return _spawn(argv, port, image.with_suffix(".nbdkit.log"))


@contextlib.contextmanager
def running(handle: ServerHandle) -> Iterator[ServerHandle]:
    try:
        yield handle
    finally:
        handle.stop()
