"""Server side of the NBD fixed newstyle handshake, as a pure state machine.

Owns the option haggling of shared/reference/nbd-protocol.md ("Fixed newstyle negotiation",
"Option types", "Option reply types", "Metadata querying"): bytes in, bytes out, and at the
end either the negotiated session (`Negotiated`) or a hard disconnect (`HandshakeError`).
No sockets, no asyncio, no os: the server feeds it whatever arrived and writes what it returns.

Rules of the machine (the only transitions are in TRANSITIONS below):
- the server speaks first (`greeting()`), the client answers with 32 bits of flags;
- then any number of options, each answered with one or more replies, until
  NBD_OPT_EXPORT_NAME or a successful NBD_OPT_GO enters transmission, or NBD_OPT_ABORT ends it;
- anything the spec says the server MUST drop the connection for, and any abuse (oversized
  option data, endless options), raises HandshakeError: the caller closes that connection only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from .constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_OPTION_DATA,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
)

SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
BASE_ALLOCATION_ID = 1
MAX_OPTIONS = 1024

_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class HandshakeError(Exception):
    """The session must end with a hard disconnect; the message says why (for the log)."""


class ExportView(Protocol):
    """What the handshake needs to know of an export."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def transmission_flags(self) -> int: ...
    @property
    def block_sizes(self) -> tuple[int, int, int]: ...


@dataclass(frozen=True)
class Refusal:
    """Why an export name was not granted: the option error and a message for the client.
    The message is also logged, so it never holds the requested name as sent (which may
    carry a credential): only a redacted form of it."""

    rep: Rep
    message: str


class ExportDirectory(Protocol):
    """Resolves names a client asks for. `peer` is the client's IP address."""

    def lookup(self, name: str, peer: str) -> ExportView | Refusal: ...
    def listing(self, peer: str) -> Sequence[tuple[str, str]]: ...


@dataclass
class Negotiated:
    """The outcome of a successful handshake."""

    export: ExportView
    structured_replies: bool
    meta_contexts: dict[int, str]
    no_zeroes: bool


class Phase(Enum):
    START = auto()
    AWAIT_CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TRANSMISSION = auto()
    CLOSED = auto()


class Event(Enum):
    GREETING_SENT = auto()
    CLIENT_FLAGS = auto()
    OPTION_ANSWERED = auto()
    EXPORT_CHOSEN = auto()
    ABORTED = auto()


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.START, Event.GREETING_SENT): Phase.AWAIT_CLIENT_FLAGS,
    (Phase.AWAIT_CLIENT_FLAGS, Event.CLIENT_FLAGS): Phase.OPTIONS,
    (Phase.OPTIONS, Event.OPTION_ANSWERED): Phase.OPTIONS,
    (Phase.OPTIONS, Event.EXPORT_CHOSEN): Phase.TRANSMISSION,
    (Phase.OPTIONS, Event.ABORTED): Phase.CLOSED,
}


class _Invalid(Exception):
    """An option that is known but malformed: answered NBD_REP_ERR_INVALID, not fatal."""


def option_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return _REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def _string(data: bytes, what: str) -> str:
    if len(data) > MAX_STRING:
        raise _Invalid(f"{what} longer than {MAX_STRING} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(f"{what} is not valid UTF-8") from None


class _Reader:
    """Bounds-checked reads from one option's data; overruns are NBD_REP_ERR_INVALID."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise _Invalid(f"{what} runs past the end of the option data")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self, what: str) -> int:
        value: int = _U16.unpack(self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def end(self, what: str) -> None:
        if self.pos != len(self.data):
            raise _Invalid(f"{len(self.data) - self.pos} unexpected trailing bytes in {what}")


class Handshake:
    """One connection's handshake. Feed `receive()`; stop when `phase` leaves OPTIONS."""

    def __init__(
        self,
        directory: ExportDirectory,
        peer: str,
        *,
        shutting_down: Callable[[], bool] = lambda: False,
    ) -> None:
        self.directory = directory
        self.peer = peer
        self.shutting_down = shutting_down
        self.phase = Phase.START
        self.result: Negotiated | None = None
        self.leftover = b""
        self._buf = bytearray()
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}
        self._options_seen = 0

    def _move(self, event: Event) -> None:
        try:
            self.phase = TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise HandshakeError(f"{event.name} not allowed in phase {self.phase.name}") from None

    def greeting(self) -> bytes:
        self._move(Event.GREETING_SENT)
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)

    def receive(self, data: bytes) -> bytes:
        """Consume client bytes; return the bytes to send back (possibly empty)."""
        if self.phase in (Phase.TRANSMISSION, Phase.CLOSED):
            raise HandshakeError(f"handshake data received in phase {self.phase.name}")
        self._buf += data
        if len(self._buf) > MAX_OPTION_DATA + _OPTION_HEADER.size:
            # Only reachable when one option claims more than we will ever buffer.
            raise HandshakeError("handshake receive buffer overflow")
        out: list[bytes] = []
        while self.phase in (Phase.AWAIT_CLIENT_FLAGS, Phase.OPTIONS):
            if not self._step(out):
                break
        if self.phase in (Phase.TRANSMISSION, Phase.CLOSED):
            self.leftover = bytes(self._buf)
            self._buf.clear()
        return b"".join(out)

    def _step(self, out: list[bytes]) -> bool:
        """Handle one complete unit from the buffer. False when more bytes are needed."""
        if self.phase is Phase.AWAIT_CLIENT_FLAGS:
            if len(self._buf) < 4:
                return False
            (flags,) = _U32.unpack_from(self._buf)
            del self._buf[:4]
            unknown = flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
            if unknown:
                # "the server MUST drop the TCP connection if the client sets an unknown flag"
                raise HandshakeError(f"client sent unknown flags {unknown:#x}")
            self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._move(Event.CLIENT_FLAGS)
            return True

        if len(self._buf) < _OPTION_HEADER.size:
            return False
        magic, opt, length = _OPTION_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            raise HandshakeError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise HandshakeError(f"option {opt} carries {length} bytes, limit {MAX_OPTION_DATA}")
        if len(self._buf) < _OPTION_HEADER.size + length:
            return False
        data = bytes(self._buf[_OPTION_HEADER.size : _OPTION_HEADER.size + length])
        del self._buf[: _OPTION_HEADER.size + length]
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise HandshakeError(f"more than {MAX_OPTIONS} options in one handshake")
        out.append(self._option(opt, data))
        return True

    # -- options ---------------------------------------------------------------------------

    def _option(self, opt: int, data: bytes) -> bytes:
        if opt == Opt.ABORT:
            # "The server MUST reply with NBD_REP_ACK"; any data is ignored.
            self._move(Event.ABORTED)
            return option_reply(opt, Rep.ACK)
        if opt == Opt.EXPORT_NAME:
            return self._export_name(data)
        if self.shutting_down():
            return option_reply(opt, Rep.ERR_SHUTDOWN, b"server is shutting down")
        handler = self._handlers.get(opt)
        if handler is None:
            return option_reply(opt, Rep.ERR_UNSUP, f"option {opt} is not supported".encode())
        try:
            reply = handler(self, opt, data)
        except _Invalid as exc:
            return option_reply(opt, Rep.ERR_INVALID, str(exc).encode())
        if self.phase is Phase.OPTIONS:  # NBD_OPT_GO may already have entered transmission
            self._move(Event.OPTION_ANSWERED)
        return reply

    def _export_name(self, data: bytes) -> bytes:
        # No way to report an error here: the spec says terminate the session.
        if self.shutting_down():
            raise HandshakeError("NBD_OPT_EXPORT_NAME while shutting down")
        try:
            name = _string(data, "export name")
        except _Invalid as exc:
            raise HandshakeError(str(exc)) from None
        found = self.directory.lookup(name, self.peer)
        if isinstance(found, Refusal):
            # The message names the export the way the directory allows (redacted): the name
            # itself may carry a credential, and this text reaches the log.
            raise HandshakeError(f"NBD_OPT_EXPORT_NAME refused: {found.message}")
        self._enter_transmission(found, name)
        reply = struct.pack(">QH", found.size, found.transmission_flags)
        return reply if self._no_zeroes else reply + bytes(124)

    def _enter_transmission(self, export: ExportView, requested_name: str) -> None:
        # Contexts count only if set for the export that is finally chosen.
        contexts = self._meta_contexts if self._meta_export == requested_name else {}
        self.result = Negotiated(
            export=export,
            structured_replies=self._structured,
            meta_contexts=dict(contexts),
            no_zeroes=self._no_zeroes,
        )
        self._move(Event.EXPORT_CHOSEN)

    def _list(self, opt: int, data: bytes) -> bytes:
        if data:
            raise _Invalid("NBD_OPT_LIST takes no data")
        replies = []
        for name, description in self.directory.listing(self.peer):
            payload = _U32.pack(len(name.encode())) + name.encode() + description.encode()
            replies.append(option_reply(opt, Rep.SERVER, payload))
        replies.append(option_reply(opt, Rep.ACK))
        return b"".join(replies)

    def _structured_reply(self, opt: int, data: bytes) -> bytes:
        if data:
            raise _Invalid("NBD_OPT_STRUCTURED_REPLY takes no data")
        self._structured = True
        return option_reply(opt, Rep.ACK)

    def _info_or_go(self, opt: int, data: bytes) -> bytes:
        r = _Reader(data)
        name = _string(r.take(r.u32("name length"), "export name"), "export name")
        requests = [r.u16("information request") for _ in range(r.u16("request count"))]
        r.end("NBD_OPT_INFO/GO")
        found = self.directory.lookup(name, self.peer)
        if isinstance(found, Refusal):
            return option_reply(opt, found.rep, found.message.encode())
        export_info = struct.pack(">HQH", Info.EXPORT, found.size, found.transmission_flags)
        infos = [
            option_reply(opt, Rep.INFO, export_info),
            # Sent whether asked or not: our constraints are the spec's defaults or looser.
            option_reply(opt, Rep.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, *found.block_sizes)),
        ]
        if Info.NAME in requests:
            infos.append(option_reply(opt, Rep.INFO, _U16.pack(Info.NAME) + found.name.encode()))
        if Info.DESCRIPTION in requests and found.description:
            infos.append(
                option_reply(
                    opt, Rep.INFO, _U16.pack(Info.DESCRIPTION) + found.description.encode()
                )
            )
        infos.append(option_reply(opt, Rep.ACK))
        if opt == Opt.GO:
            self._enter_transmission(found, name)
        return b"".join(infos)

    def _meta_context(self, opt: int, data: bytes) -> bytes:
        if not self._structured:
            # SET: "server SHOULD send NBD_REP_ERR_INVALID"; LIST: "MAY".
            raise _Invalid("negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts")
        r = _Reader(data)
        name = _string(r.take(r.u32("name length"), "export name"), "export name")
        queries = [
            _string(r.take(r.u32("query length"), "query"), "query")
            for _ in range(r.u32("query count"))
        ]
        r.end("meta context option")
        for q in queries:
            if ":" not in q:
                raise _Invalid(f"query {q!r} has no namespace")
        found = self.directory.lookup(name, self.peer)
        if isinstance(found, Refusal):
            return option_reply(opt, found.rep, found.message.encode())

        selecting = opt == Opt.SET_META_CONTEXT
        if selecting:
            # "replaces all previously-set metadata contexts (including when this command fails)"
            self._meta_contexts = {}
            self._meta_export = name
            # "base:" alone is a wildcard for LIST only; SET ignores it.
            wanted = BASE_ALLOCATION in queries
        else:
            wanted = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        replies = []
        if wanted:
            ctx_id = BASE_ALLOCATION_ID if selecting else 0
            if selecting:
                self._meta_contexts[ctx_id] = BASE_ALLOCATION
            replies.append(
                option_reply(opt, Rep.META_CONTEXT, _U32.pack(ctx_id) + BASE_ALLOCATION.encode())
            )
        replies.append(option_reply(opt, Rep.ACK))
        return b"".join(replies)

    _handlers: dict[int, Callable[[Handshake, int, bytes], bytes]] = {
        Opt.LIST: _list,
        Opt.STRUCTURED_REPLY: _structured_reply,
        Opt.INFO: _info_or_go,
        Opt.GO: _info_or_go,
        Opt.LIST_META_CONTEXT: _meta_context,
        Opt.SET_META_CONTEXT: _meta_context,
    }
