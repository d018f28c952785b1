"""NBD transmission phase framing: requests in, replies out. Pure: no sockets, no os.

Owns shared/reference/nbd-protocol.md "Request message", "Simple reply message",
"Structured reply chunk message", "Request types" (which flags each command takes) and
"Error values" (which errno each invalid request gets). Requests are validated here, at the
edge, so backends may assume every range they see is inside the export.

The parser works on a buffer the caller owns and hands out memoryview slices of WRITE
payloads, so the hot path copies nothing. A WRITE whose length is beyond MAX_PAYLOAD is
never buffered: its payload is consumed and dropped as it arrives, keeping the stream in frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

from .constants import (
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
)

REQUEST = struct.Struct(">IHHQQI")
REQUEST_SIZE = REQUEST.size  # 28
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")
_ERROR_PAYLOAD = struct.Struct(">IH")
_U32 = struct.Struct(">I")
_EXTENT = struct.Struct(">II")

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = (int(c) for c in Cmd)

# "Command flags": which flags each command may carry (FUA is valid on every command once
# NBD_FLAG_SEND_FUA is advertised, which we always do).
# Plain ints: the complement of an IntFlag keeps only the defined bits, hiding unknown ones.
_ALLOWED_FLAGS: dict[int, int] = {
    READ: int(CmdFlag.FUA),
    WRITE: int(CmdFlag.FUA),
    DISC: int(CmdFlag.FUA),
    FLUSH: int(CmdFlag.FUA),
    TRIM: int(CmdFlag.FUA),
    CACHE: int(CmdFlag.FUA),
    WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
    BLOCK_STATUS: int(CmdFlag.FUA | CmdFlag.REQ_ONE),
}
# Commands with a data range, and the error for a range past the end ("Error values": writes
# get ENOSPC, everything else EINVAL).
_PAST_END: dict[int, Errno] = {
    READ: Errno.EINVAL,
    WRITE: Errno.ENOSPC,
    TRIM: Errno.EINVAL,
    CACHE: Errno.EINVAL,
    WRITE_ZEROES: Errno.ENOSPC,
    BLOCK_STATUS: Errno.EINVAL,
}
_MODIFIES = frozenset({WRITE, TRIM, WRITE_ZEROES})


class ProtocolError(Exception):
    """The stream is out of frame; the only answer is a hard disconnect."""


class Request(NamedTuple):
    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: memoryview | None  # WRITE only; None when the payload was too big to keep


def check(req: Request, size: int, readonly: bool, block_status_ok: bool) -> tuple[Errno, str]:
    """Validate one request against the export. (Errno.OK, "") when it may proceed."""
    typ, flags, offset, length = req.type, req.flags, req.offset, req.length
    allowed = _ALLOWED_FLAGS.get(typ)
    if allowed is None:
        return Errno.EINVAL, f"unknown command {typ}"
    if flags & ~allowed:
        return Errno.EINVAL, f"flags {flags & ~allowed:#x} are not valid for command {typ}"
    if typ in _MODIFIES and readonly:
        return Errno.EPERM, "export is read-only"
    if typ == FLUSH:
        if offset or length:
            return Errno.EINVAL, "FLUSH must have zero offset and length"
        return Errno.OK, ""
    if typ == DISC:
        return Errno.OK, ""
    if typ == BLOCK_STATUS and not block_status_ok:
        return Errno.EINVAL, "BLOCK_STATUS needs a metadata context set with SET_META_CONTEXT"
    if length == 0:
        return Errno.EINVAL, "zero-length request"
    if typ in (READ, WRITE) and length > MAX_PAYLOAD:
        return Errno.EINVAL, f"{length} bytes is above the maximum payload {MAX_PAYLOAD}"
    if offset + length > size:
        return _PAST_END[typ], f"range {offset}+{length} is beyond the export size {size}"
    return Errno.OK, ""


class RequestParser:
    """Splits the request stream. Stateful only for dropping an oversize WRITE's payload."""

    __slots__ = ("_discard",)

    def __init__(self) -> None:
        self._discard = 0

    def parse(
        self,
        view: memoryview,
        out: list[Request],
        max_requests: int = 1 << 30,
        max_read_bytes: int = 1 << 62,
        strict: bool = False,
    ) -> int:
        """Append complete requests in `view` to `out`; return the bytes consumed.

        A WRITE whose payload has not fully arrived is left unconsumed (header included).
        Parsing stops after `max_requests`, or once the READs taken would make more than
        `max_read_bytes` of replies (at least one request is always taken, unless `strict`),
        so a stream of tiny requests cannot make the server produce unbounded output in one go.
        """
        n = len(view)
        pos = 0
        if self._discard:
            pos = min(self._discard, n)
            self._discard -= pos
        unpack = REQUEST.unpack_from
        taken = 0
        while n - pos >= REQUEST_SIZE and len(out) < max_requests:
            magic, flags, typ, cookie, offset, length = unpack(view, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#010x}")
            if typ == READ:
                taken += length
                if taken > max_read_bytes and (out or strict):
                    break
            if typ == WRITE:
                if length > MAX_PAYLOAD:
                    pos += REQUEST_SIZE
                    skip = min(length, n - pos)
                    pos += skip
                    self._discard = length - skip
                    out.append(Request(flags, typ, cookie, offset, length, None))
                    if self._discard:
                        break
                    continue
                end = pos + REQUEST_SIZE + length
                if end > n:
                    break
                out.append(Request(flags, typ, cookie, offset, length, view[end - length : end]))
                pos = end
            else:
                out.append(Request(flags, typ, cookie, offset, length, None))
                pos += REQUEST_SIZE
        return pos

    @property
    def midway(self) -> bool:
        """True while an oversize WRITE's payload is still being dropped."""
        return self._discard > 0

    @staticmethod
    def incomplete_write(view: memoryview, min_length: int) -> Request | None:
        """The WRITE at the start of `view` if its payload (of at least `min_length` bytes, at
        most MAX_PAYLOAD) has not fully arrived; its payload field is None."""
        if len(view) < REQUEST_SIZE:
            return None
        magic, flags, typ, cookie, offset, length = REQUEST.unpack_from(view, 0)
        if (
            magic != REQUEST_MAGIC
            or typ != WRITE
            or not min_length <= length <= MAX_PAYLOAD
            or len(view) >= REQUEST_SIZE + length
        ):
            return None
        return Request(flags, typ, cookie, offset, length, None)

    @staticmethod
    def wanted(view: memoryview) -> int:
        """Contiguous bytes needed to complete the request at the start of `view`."""
        if len(view) < REQUEST_SIZE:
            return REQUEST_SIZE
        _, _, typ, _, _, length = REQUEST.unpack_from(view, 0)
        if typ == WRITE and length <= MAX_PAYLOAD:
            return REQUEST_SIZE + length
        return REQUEST_SIZE


# -- replies -------------------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def read_chunk_header(cookie: int, offset: int, length: int) -> bytes:
    """Header of a final NBD_REPLY_TYPE_OFFSET_DATA chunk; `length` data bytes follow."""
    return _CHUNK_OFFSET.pack(
        STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.OFFSET_DATA, cookie, length + 8, offset
    )


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[:4096]
    payload = _ERROR_PAYLOAD.pack(error, len(text)) + text
    return (
        _CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.ERROR, cookie, len(payload))
        + payload
    )


def error_reply(cookie: int, error: int, message: str, structured: bool) -> bytes:
    """An error for any command: a chunk with the message when structured replies are on."""
    return error_chunk(cookie, error, message) if structured else simple_reply(cookie, error)


def block_status_chunk(
    cookie: int, context_id: int, extents: Iterable[tuple[int, int]], done: bool = True
) -> bytes:
    body = b"".join(_EXTENT.pack(length, flags) for length, flags in extents)
    flags = ReplyFlag.DONE if done else 0
    return (
        _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, ReplyType.BLOCK_STATUS, cookie, 4 + len(body))
        + _U32.pack(context_id)
        + body
    )
