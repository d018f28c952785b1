"""Generic netlink messages for the kernel's NBD family, as a pure codec.

Owns the bytes of shared/reference/nbd-netlink.md and of the netlink framing under it
(linux/netlink.h, linux/genetlink.h): building NBD_CMD_CONNECT, NBD_CMD_RECONFIGURE,
NBD_CMD_DISCONNECT, NBD_CMD_STATUS and the nlctrl CTRL_CMD_GETFAMILY look-up, and parsing what
the kernel sends back (acks, errors, the connect reply's index, the status device list, the
family id and its multicast groups, NBD_CMD_LINK_DEAD notifications). No sockets, no os:
`csi/nbd_kernel.py` sends and receives.

Layout, all in host byte order (netlink is native-endian):
  nlmsghdr   u32 length, u16 type, u16 flags, u32 seq, u32 port id
  genlmsghdr u8 cmd, u8 version, u16 reserved
  nlattr     u16 length (header included, padding excluded), u16 type, payload, pad to 4
Attribute numbers are the kernel's uapi enums (linux/nbd-netlink.h), which are ABI.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_F_NESTED = 1 << 15
NLA_TYPE_MASK = ~((1 << 15) | (1 << 14)) & 0xFFFF

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
CTRL_ATTR_MCAST_GROUPS = 7
CTRL_ATTR_MCAST_GRP_NAME = 1
CTRL_ATTR_MCAST_GRP_ID = 2

NBD_FAMILY = "nbd"
NBD_VERSION = 1
NBD_MCAST_GROUP = "nbd_mc_group"

_NLMSGHDR = struct.Struct("=IHHII")
_GENLMSGHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")


class NbdCmd(IntEnum):
    CONNECT = 1
    DISCONNECT = 2
    RECONFIGURE = 3
    LINK_DEAD = 4
    STATUS = 5


class NbdAttr(IntEnum):
    INDEX = 1
    SIZE_BYTES = 2
    BLOCK_SIZE_BYTES = 3
    TIMEOUT = 4
    SERVER_FLAGS = 5
    CLIENT_FLAGS = 6
    SOCKETS = 7
    DEAD_CONN_TIMEOUT = 8
    DEVICE_LIST = 9
    BACKEND_IDENTIFIER = 10


NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1
NBD_DEVICE_ITEM = 1
NBD_DEVICE_INDEX = 1
NBD_DEVICE_CONNECTED = 2


class ClientFlag(IntFlag):
    """linux/nbd.h NBD_CFLAG_*."""

    DESTROY_ON_DISCONNECT = 1 << 0
    DISCONNECT_ON_CLOSE = 1 << 1


class NetlinkProtocolError(Exception):
    """The kernel sent something this codec cannot read."""


def _pad(n: int) -> int:
    return (n + 3) & ~3


# -- attributes ------------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + bytes(_pad(length) - length)


def attr_u8(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=B", value))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attr_u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=Q", value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attr_nested(kind: int, children: Iterable[bytes]) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def parse_attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type without the NESTED/BYTEORDER bits, payload) for each attribute, in order."""
    found: list[tuple[int, bytes]] = []
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size or pos + length > len(data):
            raise NetlinkProtocolError(f"attribute of length {length} at {pos} overruns")
        found.append((kind & NLA_TYPE_MASK, bytes(data[pos + _NLATTR.size : pos + length])))
        pos += _pad(length)
    return found


def first(attrs: Sequence[tuple[int, bytes]], kind: int) -> bytes | None:
    return next((payload for k, payload in attrs if k == kind), None)


def as_u32(payload: bytes) -> int:
    if len(payload) < 4:
        raise NetlinkProtocolError(f"u32 attribute of {len(payload)} bytes")
    return int(struct.unpack_from("=I", payload)[0])


def as_u16(payload: bytes) -> int:
    if len(payload) < 2:
        raise NetlinkProtocolError(f"u16 attribute of {len(payload)} bytes")
    return int(struct.unpack_from("=H", payload)[0])


def as_str(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode("utf-8", "replace")


# -- messages --------------------------------------------------------------------------------


def genl_request(
    family: int, cmd: int, version: int, attrs: Iterable[bytes], seq: int, *, ack: bool = True
) -> bytes:
    """One generic netlink request; with `ack` the kernel confirms success with an ACK."""
    body = _GENLMSGHDR.pack(cmd, version, 0) + b"".join(attrs)
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), family, flags, seq, 0) + body


@dataclass(frozen=True)
class Message:
    """One netlink message from the kernel."""

    type: int
    flags: int
    seq: int
    port: int
    payload: bytes
    # For NLMSG_ERROR: 0 for an ACK, else a negative errno.
    error: int | None = None
    # For generic netlink messages.
    cmd: int = 0
    attrs: list[tuple[int, bytes]] = field(default_factory=list)


def parse_messages(data: bytes) -> list[Message]:
    """Every netlink message in one datagram."""
    messages: list[Message] = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, port = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            raise NetlinkProtocolError(f"message of length {length} at {pos} overruns")
        payload = bytes(data[pos + _NLMSGHDR.size : pos + length])
        if kind == NLMSG_ERROR:
            if len(payload) < 4:
                raise NetlinkProtocolError("NLMSG_ERROR without an error code")
            (error,) = struct.unpack_from("=i", payload)
            messages.append(Message(kind, flags, seq, port, payload, error=error))
        elif kind == NLMSG_DONE:
            messages.append(Message(kind, flags, seq, port, payload))
        else:
            if len(payload) < _GENLMSGHDR.size:
                raise NetlinkProtocolError("generic netlink message without its header")
            cmd, _, _ = _GENLMSGHDR.unpack_from(payload)
            attrs = parse_attrs(payload[_GENLMSGHDR.size :])
            messages.append(Message(kind, flags, seq, port, payload, cmd=cmd, attrs=attrs))
        pos += _pad(length)
    return messages


# -- nlctrl: resolving the family ------------------------------------------------------------


def get_family_request(name: str, seq: int) -> bytes:
    return genl_request(
        GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, [attr_str(CTRL_ATTR_FAMILY_NAME, name)], seq
    )


@dataclass(frozen=True)
class Family:
    id: int
    groups: dict[str, int]


def parse_family(message: Message) -> Family:
    family_id = first(message.attrs, CTRL_ATTR_FAMILY_ID)
    if family_id is None:
        raise NetlinkProtocolError("CTRL_CMD_GETFAMILY reply without a family id")
    groups: dict[str, int] = {}
    nested = first(message.attrs, CTRL_ATTR_MCAST_GROUPS)
    for _, group in parse_attrs(nested or b""):
        inner = parse_attrs(group)
        name, gid = first(inner, CTRL_ATTR_MCAST_GRP_NAME), first(inner, CTRL_ATTR_MCAST_GRP_ID)
        if name is not None and gid is not None:
            groups[as_str(name)] = as_u32(gid)
    return Family(as_u16(family_id), groups)


# -- the NBD family ---------------------------------------------------------------------------


def _sockets(fds: Sequence[int]) -> bytes:
    return attr_nested(
        NbdAttr.SOCKETS, [attr_nested(NBD_SOCK_ITEM, [attr_u32(NBD_SOCK_FD, fd)]) for fd in fds]
    )


@dataclass(frozen=True)
class ConnectParams:
    """NBD_CMD_CONNECT's attributes. index None: the kernel picks a free device."""

    fds: Sequence[int]
    size: int
    block_size: int
    server_flags: int
    timeout: int = 0  # seconds a request may take before its connection counts as dead
    dead_conn_timeout: int = 0  # seconds requests wait for a reconnect once all died
    backend: str = ""
    index: int | None = None
    client_flags: int = 0


def connect_request(family: int, params: ConnectParams, seq: int) -> bytes:
    attrs = []
    if params.index is not None:
        attrs.append(attr_u32(NbdAttr.INDEX, params.index))
    attrs += [
        attr_u64(NbdAttr.SIZE_BYTES, params.size),
        attr_u64(NbdAttr.BLOCK_SIZE_BYTES, params.block_size),
        attr_u64(NbdAttr.SERVER_FLAGS, params.server_flags),
    ]
    if params.timeout:
        attrs.append(attr_u64(NbdAttr.TIMEOUT, params.timeout))
    if params.dead_conn_timeout:
        attrs.append(attr_u64(NbdAttr.DEAD_CONN_TIMEOUT, params.dead_conn_timeout))
    if params.client_flags:
        attrs.append(attr_u64(NbdAttr.CLIENT_FLAGS, params.client_flags))
    if params.backend:
        attrs.append(attr_str(NbdAttr.BACKEND_IDENTIFIER, params.backend))
    attrs.append(_sockets(params.fds))
    return genl_request(family, NbdCmd.CONNECT, NBD_VERSION, attrs, seq)


def reconfigure_request(
    family: int,
    index: int,
    seq: int,
    *,
    fds: Sequence[int] = (),
    size: int | None = None,
    dead_conn_timeout: int | None = None,
    backend: str = "",
) -> bytes:
    """New sockets for dead connections, and/or a new size (NodeExpandVolume). A device
    connected with a backend identifier is reconfigured only when the same one is given."""
    attrs = [attr_u32(NbdAttr.INDEX, index)]
    if backend:
        attrs.append(attr_str(NbdAttr.BACKEND_IDENTIFIER, backend))
    if size is not None:
        attrs.append(attr_u64(NbdAttr.SIZE_BYTES, size))
    if dead_conn_timeout is not None:
        attrs.append(attr_u64(NbdAttr.DEAD_CONN_TIMEOUT, dead_conn_timeout))
    if fds:
        attrs.append(_sockets(fds))
    return genl_request(family, NbdCmd.RECONFIGURE, NBD_VERSION, attrs, seq)


def disconnect_request(family: int, index: int, seq: int) -> bytes:
    return genl_request(
        family, NbdCmd.DISCONNECT, NBD_VERSION, [attr_u32(NbdAttr.INDEX, index)], seq
    )


def status_request(family: int, seq: int, index: int | None = None) -> bytes:
    attrs = [] if index is None else [attr_u32(NbdAttr.INDEX, index)]
    return genl_request(family, NbdCmd.STATUS, NBD_VERSION, attrs, seq)


def parse_index(message: Message) -> int:
    """The device index of a connect reply or a NBD_CMD_LINK_DEAD notification."""
    index = first(message.attrs, NbdAttr.INDEX)
    if index is None:
        raise NetlinkProtocolError(f"NBD message {message.cmd} without NBD_ATTR_INDEX")
    return as_u32(index)


def parse_status(message: Message) -> dict[int, bool]:
    """{device index: configured} from a NBD_CMD_STATUS reply."""
    devices: dict[int, bool] = {}
    for kind, item in parse_attrs(first(message.attrs, NbdAttr.DEVICE_LIST) or b""):
        if kind != NBD_DEVICE_ITEM:
            continue
        inner = parse_attrs(item)
        index, connected = first(inner, NBD_DEVICE_INDEX), first(inner, NBD_DEVICE_CONNECTED)
        if index is None:
            raise NetlinkProtocolError("NBD_DEVICE_ITEM without an index")
        devices[as_u32(index)] = bool(connected and connected[0])
    return devices
