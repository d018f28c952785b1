"""The command behind the VM guests' forwarded NBD address carries only the server's bytes.

Owns: tests/vm/guest.py's guestfwd command, run the way QEMU's user-mode network runs it (the
command line split like a shell's, one connected socket as its stdin, stdout and stderr), with
real socat. No VM: a guest would only see the same bytes later, as a kernel NBD error.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.servers import free_port
from tests.vm.guest import guestfwd_command

pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")


def forwarded_stream(command: str, sent: bytes = b"") -> bytes:
    """What the guest side of one forwarded connection receives until the command exits."""
    guest, host = socket.socketpair()
    with guest, host:
        fd = host.fileno()
        proc = subprocess.Popen(shlex.split(command), stdin=fd, stdout=fd, stderr=fd)
        host.close()
        guest.sendall(sent)
        guest.settimeout(30)
        received = b""
        while chunk := guest.recv(65536):
            received += chunk
        assert proc.wait(30) is not None
    return received


def test_socat_messages_stay_out_of_the_stream(tmp_path: Path) -> None:
    # Nothing listens on the port (a storage node restarting): socat logs a connect error.
    log = tmp_path / "guestfwd.log"
    command = guestfwd_command(free_port(), log)
    assert forwarded_stream(command) == b""
    assert forwarded_stream(command) == b""
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and all("Connection refused" in line for line in lines), lines


def test_server_bytes_pass_unchanged(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"NBDMAGIC" + conn.recv(5))

    server = threading.Thread(target=serve)
    server.start()
    try:
        got = forwarded_stream(guestfwd_command(port, tmp_path / "guestfwd.log"), b"hello")
    finally:
        server.join(30)
        listener.close()
    assert got == b"NBDMAGIChello"


def test_log_path_with_a_comma_is_refused(tmp_path: Path) -> None:
    # QEMU's option parser would end the command at the comma.
    with pytest.raises(ValueError, match="comma"):
        guestfwd_command(10809, tmp_path / "a,b.log")
