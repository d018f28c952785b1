"""Connect to a storage node and run the NBD handshake over a real socket (blocking).

Owns the thin I/O around the pure codec in `csi/nbd_client.py`: open a TCP connection, set the
options the kernel keeps using once it owns the socket (TCP_NODELAY, keepalive so a silently
vanished peer is noticed), feed the codec until it is done, and hand back a socket sitting at
the start of the transmission phase. Runs in an executor thread: it blocks.
"""

from __future__ import annotations

import contextlib
import socket

from .nbd_client import ClientHandshake, ExportInfo, HandshakeError, Mode

# Keepalive: a peer that vanished without a FIN or RST is noticed after about
# KEEPIDLE + KEEPCNT * KEEPINTVL seconds, and the kernel then marks the connection dead.
KEEPIDLE, KEEPINTVL, KEEPCNT = 10, 5, 3
_RECV = 65536


class DialError(Exception):
    """The storage node could not be reached or refused the handshake (no secret inside)."""


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)


def _handshake(sock: socket.socket, handshake: ClientHandshake) -> ExportInfo:
    while not handshake.done:
        data = sock.recv(_RECV)
        if not data:
            raise DialError("the storage node closed the connection during the handshake")
        out = handshake.receive(data)
        if out:
            sock.sendall(out)
    return handshake.info


def dial(
    host: str, port: int, export: str, timeout: float = 10.0
) -> tuple[socket.socket, ExportInfo]:
    """A connected socket in the transmission phase, and what the server said of the export."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise DialError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    try:
        _tune(sock)
        info = _handshake(sock, ClientHandshake(export, Mode.GO))
        sock.settimeout(None)
        return sock, info
    except HandshakeError as exc:
        sock.close()
        raise DialError(f"{host}:{port}: {exc}") from None
    except OSError as exc:
        sock.close()
        raise DialError(f"{host}:{port}: handshake failed: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise


def dial_many(
    host: str, port: int, export: str, count: int, timeout: float = 10.0
) -> tuple[list[socket.socket], ExportInfo]:
    """`count` connections to one export (fewer if the server does not allow multi-conn)."""
    first, info = dial(host, port, export, timeout)
    socks = [first]
    try:
        if info.multi_conn:
            for _ in range(count - 1):
                socks.append(dial(host, port, export, timeout)[0])
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, info


def query(host: str, port: int, export: str, timeout: float = 10.0) -> ExportInfo:
    """The export's current size and flags, without entering transmission (NBD_OPT_INFO)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise DialError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    with contextlib.closing(sock):
        try:
            return _handshake(sock, ClientHandshake(export, Mode.QUERY))
        except HandshakeError as exc:
            raise DialError(f"{host}:{port}: {exc}") from None
        except OSError as exc:
            raise DialError(f"{host}:{port}: query failed: {exc.strerror or exc}") from None
