"""The node plugin's NBD client handshake (csi/nbd_client.py) and its socket driver.

Owns the byte-level contract of shared/reference/nbd-protocol.md from the client's side: the
greeting, the client flags, NBD_OPT_GO / NBD_OPT_INFO with the export name and a block size
request, the info replies, the fallback to NBD_OPT_EXPORT_NAME, refusals and protocol errors.
Each server script is fed whole, one byte at a time, and with trailing bytes. Then the codec
against the storage node's own server codec (no sockets), and the socket driver against a real
storage node: the credential from Publish gets a socket in the transmission phase that answers
an NBD_CMD_READ; a wrong credential is refused without the credential in the message.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from csi.nbd_client import (
    ClientHandshake,
    ExportInfo,
    HandshakeError,
    HandshakeProtocolError,
    HandshakeRefused,
    Mode,
)
from csi.nbd_dial import DialError, dial, dial_many, query
from storage_node.nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from tests.support.api import ApiNode

NAME = "vol-0123456789abcdef.s3cr3t-credential"
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.CAN_MULTI_CONN


def greeting(flags: int = 3) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def info_export(size: int = 1 << 30, flags: int = FLAGS, opt: int = Opt.GO) -> bytes:
    return reply(opt, Rep.INFO, struct.pack(">HQH", Info.EXPORT, size, flags))


def info_block(sizes: tuple[int, int, int] = (1, 4096, 1 << 25), opt: int = Opt.GO) -> bytes:
    return reply(opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, *sizes))


def client_first_write(opt: int = Opt.GO, client_flags: int = 3) -> bytes:
    data = struct.pack(">I", len(NAME)) + NAME.encode() + struct.pack(">HH", 1, Info.BLOCK_SIZE)
    return struct.pack(">I", client_flags) + struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def feed(handshake: ClientHandshake, data: bytes, how: str) -> bytes:
    if how == "whole":
        return handshake.receive(data)
    return b"".join(handshake.receive(data[i : i + 1]) for i in range(len(data)))


FEEDS = ["whole", "bytewise"]


@pytest.mark.parametrize("how", FEEDS)
def test_go_with_block_sizes(how: str) -> None:
    h = ClientHandshake(NAME)
    assert feed(h, greeting(), how) == client_first_write()
    name_info = reply(Opt.GO, Rep.INFO, struct.pack(">H", Info.NAME) + b"x")  # not asked: ignored
    out = feed(h, info_export() + name_info + info_block() + reply(Opt.GO, Rep.ACK), how)
    assert out == b"" and h.done
    assert h.info == ExportInfo(1 << 30, FLAGS, 1, 4096, 1 << 25)
    assert h.info.multi_conn and not h.info.read_only
    assert h.info.kernel_block_size() == 512


def test_query_sends_abort_after_the_ack() -> None:
    h = ClientHandshake(NAME, Mode.QUERY)
    assert h.receive(greeting()) == client_first_write(Opt.INFO)
    out = h.receive(info_export(5 << 20, opt=Opt.INFO) + reply(Opt.INFO, Rep.ACK))
    assert out == struct.pack(">QII", IHAVEOPT, Opt.ABORT, 0)
    assert h.info.size == 5 << 20


def test_server_without_no_zeroes_gets_plain_flags() -> None:
    h = ClientHandshake(NAME)
    assert h.receive(greeting(flags=1)) == client_first_write(client_flags=1)


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("no_zeroes", [True, False], ids=["no-zeroes", "zeroes"])
def test_fallback_to_export_name(how: str, no_zeroes: bool) -> None:
    h = ClientHandshake(NAME)
    h.receive(greeting(flags=3 if no_zeroes else 1))
    out = feed(h, reply(Opt.GO, Rep.ERR_UNSUP), how)
    assert out == struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, len(NAME)) + NAME.encode()
    tail = struct.pack(">QH", 7 << 20, TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY)
    feed(h, tail + (b"" if no_zeroes else bytes(124)), how)
    assert h.done and h.info.size == 7 << 20 and h.info.read_only


def test_refusal_never_shows_the_export_name() -> None:
    h = ClientHandshake(NAME)
    h.receive(greeting())
    with pytest.raises(HandshakeRefused) as info:
        h.receive(reply(Opt.GO, Rep.ERR_UNKNOWN, f"no export {NAME}".encode()))
    assert info.value.rep == Rep.ERR_UNKNOWN
    assert NAME not in str(info.value) and "ERR_UNKNOWN" in str(info.value)


BROKEN: dict[str, Callable[[], bytes]] = {
    "not nbd": lambda: struct.pack(">QQH", 0x1234, IHAVEOPT, 3),
    "oldstyle": lambda: struct.pack(">QQ", NBDMAGIC, 0x00420281861253) + bytes(10),
    "not fixed newstyle": lambda: greeting(flags=0),
    "bad reply magic": lambda: greeting() + struct.pack(">QIII", 1, Opt.GO, Rep.ACK, 0),
    "reply to another option": lambda: greeting() + reply(Opt.LIST, Rep.ACK),
    "ack before export info": lambda: greeting() + reply(Opt.GO, Rep.ACK),
    "ack with data": lambda: greeting() + info_export() + reply(Opt.GO, Rep.ACK, b"x"),
    "short export info": lambda: greeting() + reply(Opt.GO, Rep.INFO, struct.pack(">HQ", 0, 1)),
    "bad block sizes": lambda: greeting() + info_block((3, 4096, 4096)),
    "oversized reply": lambda: greeting() + struct.pack(">QIII", OPTION_REPLY_MAGIC, 7, 3, 1 << 20),
    "unknown reply type": lambda: greeting() + reply(Opt.GO, 99),
    "trailing bytes": lambda: greeting() + info_export() + reply(Opt.GO, Rep.ACK) + b"\0",
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_protocol_errors(case: str) -> None:
    with pytest.raises(HandshakeProtocolError) as info:
        ClientHandshake(NAME).receive(BROKEN[case]())
    assert NAME not in str(info.value)


@pytest.mark.parametrize(("minimum", "kernel"), [(1, 512), (512, 512), (1024, 1024), (4096, 4096)])
def test_kernel_block_size(minimum: int, kernel: int) -> None:
    assert ExportInfo(1 << 20, FLAGS, minimum, 4096, 1 << 25).kernel_block_size() == kernel


def test_block_size_the_kernel_cannot_take() -> None:
    with pytest.raises(HandshakeError):
        ExportInfo(1 << 20, FLAGS, 8192, 8192, 1 << 25).kernel_block_size()


# -- the storage node: its codec, then the real server -----------------------------------------


def test_against_the_storage_node_server_codec() -> None:
    from storage_node.nbd.handshake import Handshake, Refusal

    class Export:
        name, description, size = NAME, "", 3 << 20
        transmission_flags = int(FLAGS)
        block_sizes = (1, 4096, 1 << 25)

    class Directory:
        def lookup(self, name: str, peer: str) -> Export | Refusal:
            return Export() if name == NAME else Refusal(Rep.ERR_UNKNOWN, "unknown")

        def listing(self, peer: str) -> list[tuple[str, str]]:
            return []

    server = Handshake(Directory(), "127.0.0.1")
    client = ClientHandshake(NAME)
    to_server = client.receive(server.greeting())
    while not client.done:
        to_server = client.receive(server.receive(to_server))
    assert client.info == ExportInfo(3 << 20, FLAGS, 1, 4096, 1 << 25)


def test_dial_reaches_transmission_on_the_real_server(storage_node: ApiNode) -> None:
    api = storage_node.api
    volume = api.wait_volume(api.create_volume("dial", 4 << 20).id)
    att = api.publish(volume.id, "worker-1", "127.0.0.1")
    sock, info = dial(att.nbd_host, att.nbd_port, att.export_name)
    try:
        assert info.size == 4 << 20 and info.multi_conn
        # NBD_CMD_READ of 512 bytes at 0: a simple reply, then the data (zeros: a new volume).
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 512))
        header = _recv(sock, 16)
        assert struct.unpack(">IIQ", header) == (0x67446698, 0, 7)
        assert _recv(sock, 512) == bytes(512)
    finally:
        sock.close()
    socks, _ = dial_many(att.nbd_host, att.nbd_port, att.export_name, 3)
    assert len(socks) == 3
    for s in socks:
        s.close()
    assert query(att.nbd_host, att.nbd_port, att.export_name).size == 4 << 20

    wrong = att.export_name[:-4] + "0000"
    with pytest.raises(DialError) as refused:
        dial(att.nbd_host, att.nbd_port, wrong)
    assert wrong not in str(refused.value) and att.export_name not in str(refused.value)


def test_dial_to_nothing_fails_cleanly(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DialError, match="cannot connect"):
        dial("127.0.0.1", port, NAME, timeout=2)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data
