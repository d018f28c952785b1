"""A deliberately small, blocking NBD client for tests that need to misbehave on the wire.

Real clients (qemu-io, nbdsh, ...) refuse to send malformed traffic; this one sends exactly
the bytes a test asks for. Message layouts come from the NBD protocol specification (the
NetworkBlockDevice project's doc/proto.md).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from tests.nbd.wire import go_data, meta_data, option, request

SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF


@dataclass
class Reply:
    cookie: int
    error: int
    data: bytes = b""
    message: str = ""
    chunks: list[tuple[int, bytes]] | None = None


class RawClient:
    def __init__(
        self, port: int, host: str = "127.0.0.1", source: str | None = None, timeout: float = 30.0
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.structured = False
        self.size = 0
        self.flags = 0

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def greet(self, client_flags: int = 3) -> None:
        magic, opt_magic, _flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (0x4E42444D41474943, 0x49484156454F5054)
        self.sock.sendall(struct.pack(">I", client_flags))

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; collect replies up to the final one (ACK or error)."""
        self.sock.sendall(option(opt, data))
        replies = []
        while True:
            _, _, rep, length = struct.unpack(">QIII", self.recv_exact(20))
            replies.append((rep, self.recv_exact(length)))
            if rep == 1 or rep & (1 << 31):
                return replies

    def connect(self, export: str, structured: bool = True, meta: bool = False) -> RawClient:
        self.greet()
        if structured:
            assert self.option(8)[-1][0] == 1
            self.structured = True
        if meta:
            assert self.option(10, meta_data(export, "base:allocation"))[-1][0] == 1
        replies = self.option(7, go_data(export))
        assert replies[-1][0] == 1, replies
        for rep, data in replies:
            if rep == 3 and data[:2] == b"\0\0":
                self.size, self.flags = struct.unpack(">QH", data[2:])
        return self

    def send(
        self,
        typ: int,
        cookie: int = 1,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        self.sock.sendall(request(typ, cookie, offset, length, flags, payload))

    def reply(self, read_length: int = 0) -> Reply:
        """Read one reply. For a simple READ reply pass the requested length."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_length) if read_length and not error else b""
            return Reply(cookie, error, data)
        assert magic == STRUCTURED_MAGIC, hex(magic)
        chunks: list[tuple[int, bytes]] = []
        error, message, data = 0, "", b""
        while True:
            if chunks:
                assert struct.unpack(">I", self.recv_exact(4))[0] == STRUCTURED_MAGIC
            flags, typ, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            chunks.append((typ, payload))
            if typ == 1:
                data += payload[8:]
            elif typ & 0x8000:
                error, mlen = struct.unpack(">IH", payload[:6])
                message = payload[6 : 6 + mlen].decode()
            if flags & 1:
                return Reply(cookie, error, data, message, chunks)

    def call(
        self,
        typ: int,
        cookie: int = 1,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
    ) -> Reply:
        self.send(typ, cookie, offset, length, flags, payload)
        return self.reply(length if typ == 0 else 0)

    def is_closed(self, timeout: float = 30.0) -> bool:
        """True once the server has closed the connection (reads EOF or reset)."""
        return closed_by_server(self.sock, timeout)


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed `sock` (reads EOF or reset); False if it is still open
    after `timeout` seconds (a bound on the wait, not an assertion)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
