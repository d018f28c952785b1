"""Connect to a storage node and run the NBD handshake over a real socket (blocking).

Owns the thin I/O around the pure codec in `csi/nbd_client.py`: open a TCP connection, set the
options the kernel keeps using once it owns the socket (TCP_NODELAY, keepalive so a silently
vanished peer is noticed), feed the codec until it is done, and hand back a socket sitting at
the start of the transmission phase. Runs in an executor thread: it blocks.

One deadline covers a whole call, every connection and every byte of its handshake (a peer
that drips its greeting a byte at a time, or never ends its replies, is cut off at the
deadline, not per read). A `Cancel` shuts the sockets of a call in progress from another
thread, so work nobody waits for any more ends at once instead of holding its thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from .nbd_client import ClientHandshake, ExportInfo, HandshakeError, HandshakeRefused, Mode

# Keepalive: a peer that vanished without a FIN or RST is noticed after about
# KEEPIDLE + KEEPCNT * KEEPINTVL seconds, and the kernel then marks the connection dead.
KEEPIDLE, KEEPINTVL, KEEPCNT = 10, 5, 3
_RECV = 65536


class DialError(Exception):
    """The storage node could not be reached or refused the handshake (no secret inside).
    `refused`: the node answered and refused the export (a revoked or unknown attachment),
    which retrying soon will not change."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class Cancel:
    """Abort a dial in progress from another thread: its sockets are shut down, its blocking
    reads return, and it raises DialError("cancelled")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _add(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)
            cancelled = self.cancelled
        if cancelled:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sock)

    def check(self) -> None:
        if self.cancelled:
            raise DialError("cancelled")


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{what} did not finish in time")
    return left


def _handshake(sock: socket.socket, handshake: ClientHandshake, deadline: float) -> ExportInfo:
    while not handshake.done:
        sock.settimeout(_remaining(deadline, "the handshake"))
        data = sock.recv(_RECV)
        if not data:
            raise DialError("the storage node closed the connection during the handshake")
        out = handshake.receive(data)
        if out:
            sock.settimeout(_remaining(deadline, "the handshake"))
            sock.sendall(out)
    return handshake.info


def _connect(host: str, port: int, deadline: float, cancel: Cancel) -> socket.socket:
    cancel.check()
    try:
        return socket.create_connection(
            (host, port), timeout=_remaining(deadline, f"connecting to {host}:{port}")
        )
    except TimeoutError as exc:
        raise DialError(f"cannot connect to {host}:{port}: {exc}") from None
    except OSError as exc:
        raise DialError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None


def _run(
    host: str, port: int, export: str, mode: Mode, deadline: float, cancel: Cancel
) -> tuple[socket.socket, ExportInfo]:
    sock = _connect(host, port, deadline, cancel)
    cancel._add(sock)
    try:
        if mode is Mode.GO:
            _tune(sock)
        info = _handshake(sock, ClientHandshake(export, mode), deadline)
        cancel.check()
        sock.settimeout(None)
        return sock, info
    except BaseException as exc:
        sock.close()
        if cancel.cancelled:
            raise DialError("cancelled") from None
        if isinstance(exc, HandshakeRefused):
            raise DialError(f"{host}:{port}: {exc}", refused=True) from None
        if isinstance(exc, HandshakeError):
            raise DialError(f"{host}:{port}: {exc}") from None
        if isinstance(exc, TimeoutError):
            raise DialError(f"{host}:{port}: the handshake did not finish in time") from None
        if isinstance(exc, OSError):
            raise DialError(f"{host}:{port}: handshake failed: {exc.strerror or exc}") from None
        raise
    finally:
        cancel._discard(sock)


def dial(
    host: str, port: int, export: str, timeout: float = 10.0, cancel: Cancel | None = None
) -> tuple[socket.socket, ExportInfo]:
    """A connected socket in the transmission phase, and what the server said of the export;
    connecting and the whole handshake take at most `timeout` seconds."""
    return _run(host, port, export, Mode.GO, time.monotonic() + timeout, cancel or Cancel())


def dial_many(
    host: str,
    port: int,
    export: str,
    count: int,
    timeout: float = 10.0,
    cancel: Cancel | None = None,
) -> tuple[list[socket.socket], ExportInfo]:
    """`count` connections to one export (fewer if the server does not allow multi-conn),
    all within one deadline of `timeout` seconds."""
    deadline = time.monotonic() + timeout
    cancel = cancel or Cancel()
    first, info = _run(host, port, export, Mode.GO, deadline, cancel)
    socks = [first]
    try:
        if info.multi_conn:
            for _ in range(count - 1):
                socks.append(_run(host, port, export, Mode.GO, deadline, cancel)[0])
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, info


def query(
    host: str, port: int, export: str, timeout: float = 10.0, cancel: Cancel | None = None
) -> ExportInfo:
    """The export's current size and flags, without entering transmission (NBD_OPT_INFO)."""
    sock, info = _run(
        host, port, export, Mode.QUERY, time.monotonic() + timeout, cancel or Cancel()
    )
    sock.close()
    return info
