"""The generic netlink codec of the node plugin (csi/netlink.py), byte for byte.

Owns the wire layout of the NBD netlink commands the plugin sends (shared/reference/
nbd-netlink.md; attribute numbers from the kernel's uapi header linux/nbd-netlink.h, fixed
ABI) and the parsing of what the kernel answers: acks and errors, the connect reply's index,
the status device list, the nlctrl family reply with its multicast group, LINK_DEAD. Expected
bytes are written out by hand from the header layouts, not produced by the code under test.
The same code runs against the real kernel in tests/vm/test_node_plugin.py.
"""

from __future__ import annotations

import struct

import pytest

from csi import netlink as nl


def hdr(length: int, kind: int, flags: int, seq: int) -> bytes:
    return struct.pack("=IHHII", length, kind, flags, seq, 0)


def test_attribute_padding_and_nesting() -> None:
    assert nl.attr_u8(2, 1) == struct.pack("=HHB", 5, 2, 1) + b"\0\0\0"
    assert nl.attr_u32(1, 7) == struct.pack("=HHI", 8, 1, 7)
    assert nl.attr_u64(2, 1 << 40) == struct.pack("=HHQ", 12, 2, 1 << 40)
    assert nl.attr_str(10, "ab") == struct.pack("=HH", 7, 10) + b"ab\0" + b"\0"
    inner = nl.attr_u32(1, 5)
    assert nl.attr_nested(7, [inner]) == struct.pack("=HH", 12, 7 | (1 << 15)) + inner


def test_connect_request_bytes() -> None:
    params = nl.ConnectParams(
        fds=[5, 6],
        size=10 << 30,
        block_size=512,
        server_flags=0x10D,
        timeout=10,
        dead_conn_timeout=120,
        backend="nbd.csi.dev/v",
    )
    got = nl.connect_request(0x1B, params, seq=9)
    sock = lambda fd: struct.pack("=HH", 12, 1 | 0x8000) + struct.pack("=HHI", 8, 1, fd)  # noqa: E731
    body = (
        struct.pack("=BBH", 1, 1, 0)  # NBD_CMD_CONNECT, version 1
        + struct.pack("=HHQ", 12, 2, 10 << 30)  # SIZE_BYTES
        + struct.pack("=HHQ", 12, 3, 512)  # BLOCK_SIZE_BYTES
        + struct.pack("=HHQ", 12, 5, 0x10D)  # SERVER_FLAGS
        + struct.pack("=HHQ", 12, 4, 10)  # TIMEOUT
        + struct.pack("=HHQ", 12, 8, 120)  # DEAD_CONN_TIMEOUT
        + struct.pack("=HH", 18, 10)
        + b"nbd.csi.dev/v\0"
        + b"\0\0"  # BACKEND_IDENTIFIER
        + struct.pack("=HH", 28, 7 | 0x8000)
        + sock(5)
        + sock(6)  # SOCKETS
    )
    assert got == hdr(16 + len(body), 0x1B, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 9) + body


def test_connect_to_a_chosen_index_puts_the_index_first() -> None:
    params = nl.ConnectParams(fds=[3], size=1 << 20, block_size=4096, server_flags=1, index=4)
    got = nl.connect_request(0x1B, params, seq=1)
    assert got[20:28] == struct.pack("=HHI", 8, 1, 4)


def test_reconfigure_disconnect_status_bytes() -> None:
    got = nl.reconfigure_request(0x1B, 3, 2, fds=[8], size=1 << 30, backend="b")
    body = (
        struct.pack("=BBH", 3, 1, 0)
        + struct.pack("=HHI", 8, 1, 3)
        + struct.pack("=HH", 6, 10)
        + b"b\0"
        + b"\0\0"
        + struct.pack("=HHQ", 12, 2, 1 << 30)
        + struct.pack("=HH", 16, 7 | 0x8000)
        + struct.pack("=HH", 12, 1 | 0x8000)
        + struct.pack("=HHI", 8, 1, 8)
    )
    assert got == hdr(16 + len(body), 0x1B, 5, 2) + body
    body = struct.pack("=BBH", 2, 1, 0) + struct.pack("=HHI", 8, 1, 3)
    assert nl.disconnect_request(0x1B, 3, 4) == hdr(28, 0x1B, 5, 4) + body
    assert nl.status_request(0x1B, 5) == hdr(20, 0x1B, 5, 5) + struct.pack("=BBH", 5, 1, 0)


def genl_reply(cmd: int, attrs: bytes, seq: int = 1, kind: int = 0x1B) -> bytes:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    return hdr(16 + len(body), kind, 0, seq) + body


def ack(seq: int, error: int = 0) -> bytes:
    payload = struct.pack("=i", error) + hdr(16, 0x1B, 5, seq)
    return hdr(16 + len(payload), nl.NLMSG_ERROR, 0, seq) + payload


def test_parse_connect_reply_and_ack_in_one_datagram() -> None:
    data = genl_reply(nl.NbdCmd.CONNECT, struct.pack("=HHI", 8, 1, 12), seq=7) + ack(7)
    reply, done = nl.parse_messages(data)
    assert reply.cmd == nl.NbdCmd.CONNECT and nl.parse_index(reply) == 12
    assert done.type == nl.NLMSG_ERROR and done.error == 0 and done.seq == 7


def test_parse_error() -> None:
    (message,) = nl.parse_messages(ack(3, -16))
    assert message.error == -16  # EBUSY


def test_parse_status() -> None:
    def item(index: int, connected: int) -> bytes:
        inner = struct.pack("=HHI", 8, 1, index) + struct.pack("=HHB", 5, 2, connected) + b"\0" * 3
        return struct.pack("=HH", 4 + len(inner), 1) + inner  # kernel: no NESTED flag

    items = item(0, 1) + item(1, 0) + item(2, 1)
    attrs = struct.pack("=HH", 4 + len(items), 9) + items
    (message,) = nl.parse_messages(genl_reply(nl.NbdCmd.STATUS, attrs))
    assert nl.parse_status(message) == {0: True, 1: False, 2: True}


def test_parse_family_with_its_multicast_group() -> None:
    name = struct.pack("=HH", 17, 1) + b"nbd_mc_group\0" + b"\0" * 3
    group = name + struct.pack("=HHI", 8, 2, 0x2A)
    groups = struct.pack("=HH", 4 + 4 + len(group), 7) + struct.pack("=HH", 4 + len(group), 1)
    attrs = struct.pack("=HHH", 6, 1, 0x1B) + b"\0\0" + groups + group
    (message,) = nl.parse_messages(genl_reply(1, attrs, kind=nl.GENL_ID_CTRL))
    family = nl.parse_family(message)
    assert family == nl.Family(0x1B, {"nbd_mc_group": 0x2A})


def test_get_family_request_bytes() -> None:
    body = struct.pack("=BBH", 3, 1, 0) + struct.pack("=HH", 8, 2) + b"nbd\0"
    assert nl.get_family_request("nbd", 1) == hdr(28, nl.GENL_ID_CTRL, 5, 1) + body


def test_link_dead_notification() -> None:
    (message,) = nl.parse_messages(genl_reply(nl.NbdCmd.LINK_DEAD, struct.pack("=HHI", 8, 1, 6)))
    assert message.cmd == nl.NbdCmd.LINK_DEAD and nl.parse_index(message) == 6


@pytest.mark.parametrize(
    "data",
    [
        hdr(64, 0x1B, 0, 1) + b"\0" * 4,  # length beyond the datagram
        hdr(16, 0x1B, 0, 1),  # generic message without its genl header
        genl_reply(5, struct.pack("=HH", 40, 9)),  # attribute beyond the message
        hdr(16, nl.NLMSG_ERROR, 0, 1),  # error without its code
    ],
    ids=["message-overrun", "no-genl-header", "attribute-overrun", "error-without-code"],
)
def test_malformed_input_raises(data: bytes) -> None:
    with pytest.raises(nl.NetlinkProtocolError):
        nl.parse_messages(data)
