"""Client side of the NBD fixed newstyle handshake, as a pure state machine.

Owns what the node plugin says to a storage node before it hands a socket to the kernel
(shared/reference/nbd-protocol.md, "Fixed newstyle negotiation", "Option types", "Option reply
types"): bytes in, bytes out, and at the end the export's size, transmission flags and block
size constraints (`ExportInfo`). No sockets, no asyncio, no os: `csi/nbd_dial.py` drives it.

Rules of the machine (the only transitions are in TRANSITIONS below):
- the server speaks first: NBDMAGIC, IHAVEOPT, 16 bits of handshake flags; a server without
  FIXED_NEWSTYLE is refused (the old styles cannot carry NBD_OPT_GO);
- the client answers with its flags and, in the same write, one option: NBD_OPT_GO (`go`, to
  enter transmission) or NBD_OPT_INFO (`query`, to learn the size without connecting), with the
  export name and a request for NBD_INFO_BLOCK_SIZE;
- the server answers with NBD_REP_INFO replies and then NBD_REP_ACK; NBD_INFO_EXPORT is the
  one info the spec says a server MUST send, so an ACK without it is a protocol error;
- NBD_REP_ERR_UNSUP to NBD_OPT_GO means a server older than GO: the client falls back to
  NBD_OPT_EXPORT_NAME, whose reply is size, flags and (unless NO_ZEROES) 124 zero bytes;
- after a query's ACK the client sends NBD_OPT_ABORT and is done (it reads no more);
- any other error reply ends the handshake with `HandshakeRefused`; broken framing, unexpected
  reply types and bytes after the end raise `HandshakeProtocolError`.

The export name carries the attachment's credential (docs/csi-driver.md): it never appears in
an exception message, even when the server echoes it back in its own error text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, auto

from storage_node.nbd.constants import (
    IHAVEOPT,
    MAX_OPTION_DATA,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)

# "Values": the oldstyle negotiation sends this instead of IHAVEOPT.
OLDSTYLE_MAGIC = 0x00420281861253
# The kernel accepts block sizes that are powers of two from 512 bytes up to the page size.
KERNEL_MIN_BLOCK = 512
KERNEL_MAX_BLOCK = 4096

_GREETING = struct.Struct(">QQH")
_REPLY_HEADER = struct.Struct(">QIII")
_OPTION_HEADER = struct.Struct(">QII")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_EXPORT_NAME_ZEROES = 124
# More than any honest handshake sends (a greeting, a few infos, an ACK): a server that keeps
# replying is cut off here, whatever the deadline of the caller.
MAX_HANDSHAKE_BYTES = 1 << 20


class HandshakeError(Exception):
    """The handshake failed; the message says why and never holds the export name."""


class HandshakeRefused(HandshakeError):
    """The server answered the option with an error reply (`rep`), e.g. an unknown export."""

    def __init__(self, rep: int, message: str) -> None:
        super().__init__(message)
        self.rep = rep


class HandshakeProtocolError(HandshakeError):
    """The server broke the protocol; the connection is useless."""


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learned about the export."""

    size: int
    flags: TransmissionFlag
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    @property
    def multi_conn(self) -> bool:
        """The server allows several connections to the export ("NBD_FLAG_CAN_MULTI_CONN")."""
        return bool(self.flags & TransmissionFlag.CAN_MULTI_CONN)

    def kernel_block_size(self) -> int:
        """The block size to give the kernel: the smallest power of two it accepts that is at
        least the server's minimum (512 where the server takes any size, which is what guests
        expect of a disk). Raises HandshakeError when the server needs more than a page."""
        block = KERNEL_MIN_BLOCK
        while block < self.min_block:
            block *= 2
        if block > KERNEL_MAX_BLOCK:
            raise HandshakeError(
                f"the export's minimum block size {self.min_block} is larger than the "
                f"kernel's maximum {KERNEL_MAX_BLOCK}"
            )
        return block


class Mode(Enum):
    GO = auto()  # enter transmission: the socket is then handed to the kernel
    QUERY = auto()  # NBD_OPT_INFO then NBD_OPT_ABORT: only learn the export's size


class State(Enum):
    GREETING = auto()  # waiting for the server's greeting
    OPTION_REPLIES = auto()  # NBD_OPT_GO/INFO sent, reading its replies
    EXPORT_NAME_REPLY = auto()  # fell back to NBD_OPT_EXPORT_NAME, reading its reply
    DONE = auto()


TRANSITIONS: dict[State, frozenset[State]] = {
    State.GREETING: frozenset({State.OPTION_REPLIES}),
    State.OPTION_REPLIES: frozenset({State.EXPORT_NAME_REPLY, State.DONE}),
    State.EXPORT_NAME_REPLY: frozenset({State.DONE}),
    State.DONE: frozenset(),
}


def _option(opt: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


class ClientHandshake:
    """Feed it what the server sent (`receive`), write what it returns, until `done`."""

    def __init__(self, export_name: str, mode: Mode = Mode.GO) -> None:
        name = export_name.encode()
        if len(name) > 4096:
            raise ValueError("export name longer than 4096 bytes")
        self._name = name
        self._secret = export_name
        self.mode = mode
        self.state = State.GREETING
        self._buffer = bytearray()
        self._no_zeroes = False
        self._size: int | None = None
        self._flags = TransmissionFlag(0)
        self._blocks: tuple[int, int, int] | None = None
        self._received = 0

    # -- public ---------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    @property
    def info(self) -> ExportInfo:
        if not self.done or self._size is None:
            raise RuntimeError("the handshake has not finished")
        if self._blocks is None:
            return ExportInfo(self._size, self._flags)
        return ExportInfo(self._size, self._flags, *self._blocks)

    @property
    def option(self) -> Opt:
        return Opt.GO if self.mode is Mode.GO else Opt.INFO

    def receive(self, data: bytes) -> bytes:
        """Consume bytes from the server; return the bytes to send (possibly empty)."""
        if self.done:
            if data:
                raise HandshakeProtocolError("the server sent data after the handshake ended")
            return b""
        self._received += len(data)
        if self._received > MAX_HANDSHAKE_BYTES:
            raise HandshakeProtocolError(
                f"the server sent more than {MAX_HANDSHAKE_BYTES} bytes without ending the "
                "handshake"
            )
        self._buffer += data
        out: list[bytes] = []
        while not self.done and self._step(out):
            pass
        if self.done and self._buffer:
            raise HandshakeProtocolError(
                f"the server sent {len(self._buffer)} unexpected bytes after the handshake"
            )
        return b"".join(out)

    # -- the machine ----------------------------------------------------------------------

    def _move(self, state: State) -> None:
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"no transition {self.state.name} -> {state.name}")
        self.state = state

    def _take(self, n: int) -> bytes | None:
        if len(self._buffer) < n:
            return None
        chunk = bytes(self._buffer[:n])
        del self._buffer[:n]
        return chunk

    def _step(self, out: list[bytes]) -> bool:
        """Handle one complete message if it has arrived; False when more bytes are needed."""
        if self.state is State.GREETING:
            return self._greeting(out)
        if self.state is State.OPTION_REPLIES:
            return self._option_reply(out)
        return self._export_name_reply()

    def _greeting(self, out: list[bytes]) -> bool:
        if len(self._buffer) >= 16:
            magic, second = struct.unpack_from(">QQ", self._buffer)
            if magic != NBDMAGIC:
                raise HandshakeProtocolError(f"not an NBD server (magic {magic:#x})")
            if second == OLDSTYLE_MAGIC:
                raise HandshakeProtocolError("the server speaks the oldstyle handshake only")
            if second != IHAVEOPT:
                raise HandshakeProtocolError(f"bad newstyle magic {second:#x}")
        chunk = self._take(_GREETING.size)
        if chunk is None:
            return False
        _, _, flags = _GREETING.unpack(chunk)
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise HandshakeProtocolError("the server does not speak the fixed newstyle handshake")
        client = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
            self._no_zeroes = True
        out.append(struct.pack(">I", client))
        # Option data: name length, name, then the infos asked for ("NBD_OPT_INFO and GO").
        data = (
            struct.pack(">I", len(self._name)) + self._name + struct.pack(">HH", 1, Info.BLOCK_SIZE)
        )
        out.append(_option(self.option, data))
        self._move(State.OPTION_REPLIES)
        return True

    def _option_reply(self, out: list[bytes]) -> bool:
        if len(self._buffer) < _REPLY_HEADER.size:
            return False
        magic, opt, rep, length = _REPLY_HEADER.unpack_from(self._buffer)
        if magic != OPTION_REPLY_MAGIC:
            raise HandshakeProtocolError(f"bad option reply magic {magic:#x}")
        if opt != self.option:
            raise HandshakeProtocolError(f"reply to option {opt}, expected {int(self.option)}")
        if length > MAX_OPTION_DATA:
            raise HandshakeProtocolError(f"option reply of {length} bytes is too long")
        chunk = self._take(_REPLY_HEADER.size + length)
        if chunk is None:
            return False
        data = chunk[_REPLY_HEADER.size :]
        if rep == Rep.INFO:
            self._info(data)
        elif rep == Rep.ACK:
            if length:
                raise HandshakeProtocolError("NBD_REP_ACK with data")
            if self._size is None:
                raise HandshakeProtocolError("NBD_REP_ACK before NBD_INFO_EXPORT")
            if self.mode is Mode.QUERY:
                out.append(_option(Opt.ABORT))
            self._move(State.DONE)
        elif rep == Rep.ERR_UNSUP and self.mode is Mode.GO and self._size is None:
            # A server without NBD_OPT_GO: the old way in ("NBD_OPT_EXPORT_NAME").
            out.append(_option(Opt.EXPORT_NAME, self._name))
            self._move(State.EXPORT_NAME_REPLY)
        elif rep & (1 << 31):
            raise HandshakeRefused(rep, self._refusal(rep, data))
        else:
            raise HandshakeProtocolError(f"unexpected option reply type {rep}")
        return True

    def _info(self, data: bytes) -> None:
        if len(data) < 2:
            raise HandshakeProtocolError("NBD_REP_INFO without an info type")
        (kind,) = struct.unpack_from(">H", data)
        if kind == Info.EXPORT:
            if len(data) != _INFO_EXPORT.size:
                raise HandshakeProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes")
            _, size, flags = _INFO_EXPORT.unpack(data)
            self._size, self._flags = size, TransmissionFlag(flags)
        elif kind == Info.BLOCK_SIZE:
            if len(data) != _INFO_BLOCK_SIZE.size:
                raise HandshakeProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
            _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(data)
            if not minimum or minimum & (minimum - 1) or minimum > preferred:
                raise HandshakeProtocolError(f"bad block sizes {minimum}/{preferred}/{maximum}")
            self._blocks = (minimum, preferred, maximum)
        # Other infos (name, description) were not asked for; the spec lets servers send them.

    def _export_name_reply(self) -> bool:
        need = _EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else _EXPORT_NAME_ZEROES)
        chunk = self._take(need)
        if chunk is None:
            return False
        size, flags = _EXPORT_NAME_REPLY.unpack_from(chunk)
        self._size, self._flags = size, TransmissionFlag(flags)
        self._move(State.DONE)
        return True

    def _refusal(self, rep: int, data: bytes) -> str:
        try:
            name = Rep(rep).name
        except ValueError:
            name = f"error {rep:#x}"
        text = data[:512].decode("utf-8", "replace")
        if self._secret:
            text = text.replace(self._secret, "<export>")
        return f"server refused the export: {name}" + (f" ({text})" if text else "")
