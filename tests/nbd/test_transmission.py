"""Transmission framing and request validation ("Request types", "Error values")."""

from __future__ import annotations

import struct

import pytest

from storage_node.nbd.constants import MAX_PAYLOAD, Errno
from storage_node.nbd.transmission import (
    ProtocolError,
    Request,
    RequestParser,
    block_status_chunk,
    check,
    error_chunk,
    read_chunk_header,
    simple_reply,
)

from .wire import request

READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZERO, STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
SIZE = 1 << 20


def parse_all(data: bytes, parser: RequestParser | None = None) -> tuple[list[Request], int]:
    parser = parser or RequestParser()
    out: list[Request] = []
    consumed = parser.parse(memoryview(data), out)
    return out, consumed


def test_parses_pipelined_requests_and_write_payloads():
    stream = (
        request(READ, 1, 0, 4096)
        + request(WRITE, 2, 512, 3, payload=b"abc")
        + request(FLUSH, 3)
        + request(WRITE, 4, 0, 5, payload=b"xy")  # incomplete payload
    )
    reqs, consumed = parse_all(stream)
    assert [(r.type, r.cookie, r.offset, r.length) for r in reqs] == [
        (READ, 1, 0, 4096),
        (WRITE, 2, 512, 3),
        (FLUSH, 3, 0, 0),
    ]
    assert reqs[1].payload is not None and bytes(reqs[1].payload) == b"abc"
    assert consumed == len(stream) - 30  # the incomplete WRITE stays, header and all


def test_byte_at_a_time_yields_the_same_requests():
    stream = request(WRITE, 7, 0, 4, payload=b"data") + request(READ, 8, 4, 4)
    parser = RequestParser()
    buf = b""
    got = []
    for b in stream:
        buf += bytes([b])
        out: list[Request] = []
        buf = buf[parser.parse(memoryview(buf), out) :]
        got += [(r.type, r.cookie, bytes(r.payload) if r.payload else None) for r in out]
    assert got == [(WRITE, 7, b"data"), (READ, 8, None)]
    assert buf == b""


def test_oversize_write_payload_is_consumed_without_buffering():
    big = MAX_PAYLOAD + 1
    parser = RequestParser()
    reqs, consumed = parse_all(request(WRITE, 9, 0, big) + b"z" * 1000, parser)
    assert [(r.cookie, r.payload) for r in reqs] == [(9, None)] and consumed == 1028
    # the rest of the payload is dropped as it arrives, then framing resumes
    out: list[Request] = []
    rest = b"z" * (big - 1000) + request(FLUSH, 10)
    assert parser.parse(memoryview(rest), out) == len(rest)
    assert [r.cookie for r in out] == [10]


def test_bad_magic_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="magic"):
        parse_all(b"\0" * 28)


def test_wanted_asks_for_a_whole_write():
    assert RequestParser.wanted(memoryview(b"")) == 28
    assert RequestParser.wanted(memoryview(request(WRITE, 1, 0, 100))) == 128
    assert RequestParser.wanted(memoryview(request(READ, 1, 0, 100))) == 28


def req(typ, offset=0, length=4096, flags=0):
    return Request(flags, typ, 1, offset, length, None)


@pytest.mark.parametrize(
    ("request_", "readonly", "status_ok", "expected"),
    [
        pytest.param(req(READ), False, False, Errno.OK, id="read-ok"),
        pytest.param(req(READ, SIZE - 4096), False, False, Errno.OK, id="read-last-block"),
        pytest.param(req(READ, SIZE - 4095), False, False, Errno.EINVAL, id="read-past-end"),
        pytest.param(req(WRITE, SIZE - 4095), False, False, Errno.ENOSPC, id="write-past-end"),
        pytest.param(req(ZERO, SIZE, 1), False, False, Errno.ENOSPC, id="zero-past-end"),
        pytest.param(req(TRIM, SIZE, 1), False, False, Errno.EINVAL, id="trim-past-end"),
        pytest.param(req(READ, 2**64 - 1, 2), False, False, Errno.EINVAL, id="offset-overflow"),
        pytest.param(req(WRITE), True, False, Errno.EPERM, id="write-readonly"),
        pytest.param(req(TRIM), True, False, Errno.EPERM, id="trim-readonly"),
        pytest.param(req(ZERO), True, False, Errno.EPERM, id="zero-readonly"),
        pytest.param(req(FLUSH, 0, 0), True, False, Errno.OK, id="flush-readonly"),
        pytest.param(req(FLUSH, 0, 1), False, False, Errno.EINVAL, id="flush-with-length"),
        pytest.param(req(READ, 0, 0), False, False, Errno.EINVAL, id="read-zero-length"),
        pytest.param(req(READ, 0, MAX_PAYLOAD + 1), False, False, Errno.EINVAL, id="read-oversize"),
        pytest.param(
            req(ZERO, 0, SIZE, FAST_ZERO | NO_HOLE | FUA),
            False,
            False,
            Errno.OK,
            id="zero-all-flags",
        ),
        pytest.param(req(READ, flags=NO_HOLE), False, False, Errno.EINVAL, id="read-no-hole"),
        pytest.param(req(READ, flags=DF), False, False, Errno.EINVAL, id="df-not-advertised"),
        pytest.param(req(WRITE, flags=FUA), False, False, Errno.OK, id="write-fua"),
        pytest.param(req(STATUS), False, False, Errno.EINVAL, id="status-without-context"),
        pytest.param(req(STATUS, flags=REQ_ONE), False, True, Errno.OK, id="status-req-one"),
        pytest.param(req(9), False, False, Errno.EINVAL, id="unknown-command"),
        pytest.param(req(READ, flags=0x100), False, False, Errno.EINVAL, id="unknown-flag"),
    ],
)
def test_check(request_, readonly, status_ok, expected):
    err, message = check(request_, SIZE, readonly, status_ok)
    assert err == expected
    assert bool(message) == (err != Errno.OK)


def test_reply_encodings():
    assert simple_reply(0x0102, 22) == struct.pack(">IIQ", 0x67446698, 22, 0x0102)
    assert read_chunk_header(5, 4096, 10) == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 5, 18, 4096)
    assert (
        error_chunk(5, 28, "full")
        == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 5, 10, 28, 4) + b"full"
    )
    assert block_status_chunk(5, 1, [(4096, 3), (8192, 0)]) == struct.pack(
        ">IHHQIIIIII", 0x668E33EF, 1, 5, 5, 20, 1, 4096, 3, 8192, 0
    )
