"""Client-side byte builders for tests, written straight from the spec's message layouts.

Deliberately independent of storage_node.nbd: a test that encoded with the code under test
would prove nothing.
"""

from __future__ import annotations

import struct

IHAVEOPT = 0x49484156454F5054
NBDMAGIC = 0x4E42444D41474943
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, opt, rep, len(data)) + data


def request(
    typ: int,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    payload: bytes = b"",
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, typ, cookie, offset, length) + payload


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, reply type, data)."""
    out = []
    while data:
        magic, opt, rep, length = struct.unpack_from(">QIII", data)
        assert magic == REPLY_MAGIC, hex(magic)
        out.append((opt, rep, data[20 : 20 + length]))
        data = data[20 + length :]
    return out
