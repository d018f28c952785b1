"""The NBD server: connections, buffers, dispatch to backends, shutdown.

Owns the asyncio side of NBD for one process: a `Connection` per client (an
asyncio.BufferedProtocol reading into one buffer: 4 KiB in the handshake, full size after a
successful GO), the handshake timeout and the request payload deadline, the per-connection
caps (requests in flight, buffered bytes), this process's share of the node's buffer budget
(backpressure when it is full), and the ordered shutdown (stop accepting, leave new requests
unanswered, finish in flight, flush, close).
The wire format lives in handshake.py and transmission.py; bytes on disk in backends.

Where I/O runs (shared/PERFORMANCE.md):
- a backend that is `inline_safe` (memory-backed) runs every operation on the event loop;
- otherwise reads are first tried without blocking (RWF_NOWAIT: page-cache hits run inline),
  and everything else that arrived in one wake-up goes to a thread as one job, so a slow
  device never stalls the loop and costs one thread hop per batch, not per request;
- FLUSH runs in its own job so later writes keep flowing while fdatasync waits.
Replies produced in one wake-up are written with one writelines().
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import cast

from ..exports import Export, ExportRegistry, normalize_peer
from ..qos import Hold, SharedBuckets
from .constants import MAX_PAYLOAD, CmdFlag, Errno
from .errors import nbd_errno, nbd_message
from .handshake import Handshake, HandshakeError, Negotiated, Phase
from .transmission import (
    BLOCK_STATUS,
    CACHE,
    DISC,
    FLUSH,
    READ,
    REQUEST_SIZE,
    TRIM,
    WRITE,
    WRITE_ZEROES,
    ProtocolError,
    Request,
    RequestParser,
    block_status_chunk,
    check,
    error_reply,
    read_chunk_header,
    simple_reply,
)

log = logging.getLogger("storage_node.nbd")

# Receive buffer while the handshake runs: the handshake keeps partial options itself, so
# this only has to take one read; the transmission buffer is allocated after a successful GO.
HANDSHAKE_BUFFER = 4096
INITIAL_BUFFER = 256 * 1024
MAX_BUFFER = 2 * (MAX_PAYLOAD + REQUEST_SIZE)
MAX_INFLIGHT = 128
WRITE_HIGH_WATER = 16 * 1024 * 1024
# READs at least this large from memory-backed images go out with os.sendfile.
SENDFILE_MIN = 64 * 1024
# WRITEs at least this large are received into their own buffer and written from a thread.
DIRECT_WRITE_MIN = 256 * 1024
# Payload buffers kept for reuse per connection (bytes): a fresh one costs page faults.
PAYLOAD_POOL_BYTES = 64 * 1024 * 1024
# While more than one tenant was active on the node in the last ACTIVE_TENANT_WINDOW
# seconds, a connection takes at most SHARED_TURN requests per turn of the event loop, and a
# connection with more waiting pauses SHARED_TURN_PAUSE between turns. Processes compare
# notes on the activity board every BOARD_PERIOD.
ACTIVE_TENANT_WINDOW = 0.05
BOARD_PERIOD = 0.01
SHARED_TURN = 2
SHARED_TURN_PAUSE = 0.0005
# Unparsed bytes a connection waiting for its turn may buffer before we stop reading it.
TURN_BACKLOG = 64 * 1024
# Reply bytes one connection may have queued before we stop taking its READs.
READ_BUDGET = 64 * 1024 * 1024
# The process's share of the node's buffer budget is never below this: two requests of the
# largest size always fit, so any request can be served once others drain.
MIN_PROCESS_BUDGET = 2 * MAX_PAYLOAD
# Over budget, a connection holding less than this may still take requests up to it: small
# I/O of every client keeps flowing while large buffers wait for the budget to drain.
SMALL_SHARE = 1024 * 1024
# While connections wait for the budget, it is recomputed this often (queued replies drain
# without telling us).
BUDGET_RECHECK = 0.02
# After this many connections closed, give freed heap memory back to the system.
TRIM_AFTER_CLOSED = 32
TRIM_DELAY = 1.0

Replies = list[bytes | memoryview]
_U16 = struct.Struct(">H")  # the command type, at offset 6 of a request
# Command flags as plain ints: testing an IntFlag member costs three Python calls per request.
_FUA, _NO_HOLE, _FAST_ZERO = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.FAST_ZERO)


@dataclass(slots=True)
class IncomingWrite:
    """A large WRITE whose payload is being received into a buffer of its own."""

    head: Request
    payload: bytearray
    filled: int


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer, peer: str | None = None) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = peer or "?"
        self._given_peer = peer is not None
        self.handshake: Handshake | None = None
        self.session: Negotiated | None = None
        self.export: Export | None = None
        self._buf = bytearray(HANDSHAKE_BUFFER)  # grown after a successful GO
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._parser = RequestParser()
        self._inflight = 0
        self._reading_paused = False
        self._writing_paused = False
        self._disconnecting = False
        self._timer: asyncio.TimerHandle | None = None
        self._sock_fd = -1
        self._direct: IncomingWrite | None = None
        self._payload_pool: list[bytearray] = []
        self._held: list[Request] = []
        self._next_turn = False
        # Node buffer budget (NbdServer.charge): bytes this connection is charged for, and
        # the size of its reply queue when last looked at.
        self._charged = 0
        self._queued = 0
        self._budget_blocked = False
        # When the request being received began arriving (payload deadline); None: between
        # requests, or not reading.
        self._partial_since: float | None = None

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check.
        self.transport = transport = cast(asyncio.Transport, transport)
        if not self._given_peer:
            peer = transport.get_extra_info("peername")
            self.peer = normalize_peer(str(peer[0])) if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A client host that vanished must not pin its connection forever.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._sock_fd = sock.fileno() if sock is not None else -1
        self.server.connections.add(self)
        self.server.start_sweeping()
        self.handshake = Handshake(
            self.server.registry, self.peer, shutting_down=lambda: self.server.shutting_down
        )
        transport.write(self.handshake.greeting())
        self._timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self._handshake_timed_out
        )

    def connection_lost(self, exc: Exception | None) -> None:
        log.debug("%s: connection closed (%s)", self.peer, exc or "cleanly")
        self.server.connections.discard(self)
        if self.server.on_closed is not None:
            self.server.on_closed(self.peer)
        if self._timer is not None:
            self._timer.cancel()
        self.transport = None
        # Buffers still owned by requests in flight are released as those finish; the rest
        # goes now, and so does this connection's share of the budget.
        self._payload_pool.clear()
        self._direct = None
        self._held.clear()
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self.server.charge(-self._charged, -self._queued)
        self._charged = self._queued = 0
        self._budget_blocked = False
        self.server.budget_waiters.discard(self)
        self.server.connection_closed()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            return memoryview(self._direct.payload)[self._direct.filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self.session is not None:
            head = self._parser.incomplete_write(
                self._view[self._start : self._end], DIRECT_WRITE_MIN
            )
            if head is not None:
                return self._begin_direct(head)
        want = self._parser.wanted(self._view[self._start : self._end])
        if len(self._buf) - self._end < max(want - (self._end - self._start), 4096):
            self._make_room(want)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            incoming = self._direct
            incoming.filled += nbytes
            if incoming.filled < incoming.head.length:
                self._mark_partial()
                return
            self._direct = None
            write = incoming.head._replace(payload=memoryview(incoming.payload))
            self._guarded(lambda: self._run([write]))
            self._mark_partial()
            return
        self._end += nbytes
        self._guarded(self._received)
        self._mark_partial()

    def _received(self) -> None:
        if self.session is None:
            self._feed_handshake()
        if self.session is not None:
            self._process()
            self._wait_for_write_budget()

    def _charge(self, nbytes: int) -> None:
        """Count `nbytes` (negative: release) of buffers against the node's budget."""
        if self.transport is None and nbytes > 0:
            return  # closed: connection_lost released everything
        nbytes = max(nbytes, -self._charged)
        self._charged += nbytes
        self.server.charge(nbytes, 0)

    def _sample_queue(self, size: int | None = None) -> int:
        """Bring the budget's view of this connection's reply queue up to date."""
        if self.transport is None:
            return 0
        if size is None:
            size = self.transport.get_write_buffer_size()
        if size != self._queued:
            self.server.charge(0, size - self._queued)
            self._queued = size
        return size

    def _drop_pool(self) -> None:
        """Give up the buffers kept for reuse: the node is short of them."""
        if self._payload_pool:
            released = sum(map(len, self._payload_pool))
            self._payload_pool.clear()
            self._charge(-released)

    def _block_on_budget(self) -> None:
        """Stop reading this connection until the node's budget has room (backpressure)."""
        if not self._budget_blocked:
            self._budget_blocked = True
            self.server.budget_waiters.add(self)
            self.server.recheck_budget_soon()
        self._update_reading()

    def _wait_for_write_budget(self) -> None:
        """A large WRITE has begun arriving: receive its payload only if the budget allows."""
        if self._direct is not None or self._start == self._end or self.transport is None:
            return
        head = self._parser.incomplete_write(self._view[self._start : self._end], DIRECT_WRITE_MIN)
        if head is None or self.server.room() > 0:
            return
        if any(len(b) == head.length for b in self._payload_pool):
            return  # a pooled buffer fits, and it is already counted
        self._drop_pool()
        holding = self._queued + self._charged
        if self.server.room() <= 0 and head.length > SMALL_SHARE - holding:
            self._block_on_budget()

    def _mark_partial(self) -> None:
        """Start (or stop) the clock for the request being received (--payload-timeout)."""
        partial = (
            self.session is not None
            and not self._reading_paused
            and not self._next_turn
            and (self._direct is not None or self._start < self._end or self._parser.midway)
        )
        if not partial:
            self._partial_since = None
        elif self._partial_since is None:
            self._partial_since = time.monotonic()

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step of this connection; a failure ends this connection only."""
        try:
            step()
        except (HandshakeError, ProtocolError) as exc:
            self._hard_disconnect(str(exc))
        except Exception:
            log.exception("%s: unexpected failure, dropping this connection", self.peer)
            self._hard_disconnect("internal error")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # -- buffer ----------------------------------------------------------------------------

    def _make_room(self, want: int) -> None:
        """Move unconsumed bytes to the front; grow the buffer to hold several requests of the
        largest size seen, so large writes are received in big reads and rarely moved."""
        pending = self._end - self._start
        size = len(self._buf)
        if want * 4 > size:
            size = min(max(want * 4, size * 2), MAX_BUFFER)
        if size != len(self._buf):
            new = bytearray(size)
            new[:pending] = self._view[self._start : self._end]
            self._buf, self._view = new, memoryview(new)
        elif self._start:
            self._view[:pending] = self._view[self._start : self._end]
        self._start, self._end = 0, pending

    def _begin_direct(self, head: Request) -> memoryview:
        """Receive a large WRITE's payload straight into a buffer of its own, which then goes
        to an I/O thread as is: no copy, and the loop keeps receiving while it is written."""
        pool = self._payload_pool
        payload = next((b for b in pool if len(b) == head.length), None)
        if payload is None:
            payload = bytearray(head.length)
            self._charge(head.length)
        else:
            pool.remove(payload)
        got = self._end - self._start - REQUEST_SIZE
        payload[:got] = self._view[self._start + REQUEST_SIZE : self._end]
        self._start = self._end = 0
        self._direct = IncomingWrite(head, payload, got)
        return memoryview(payload)[got:]

    # -- handshake -------------------------------------------------------------------------

    def _feed_handshake(self) -> None:
        assert self.handshake is not None and self.transport is not None
        data = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        out = self.handshake.receive(data)
        if out:
            self.transport.write(out)
        if self.handshake.phase is Phase.CLOSED:
            self.transport.close()
        elif self.handshake.phase is Phase.TRANSMISSION:
            assert self.handshake.result is not None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.session = self.handshake.result
            assert isinstance(self.session.export, Export)
            self.export = self.session.export
            leftover = self.handshake.leftover
            self.handshake = None
            # Only now, after a successful GO, does the connection get a full-size buffer.
            self._buf = bytearray(max(INITIAL_BUFFER, 2 * len(leftover)))
            self._view = memoryview(self._buf)
            self._buf[: len(leftover)] = leftover
            self._start, self._end = 0, len(leftover)
            log.info("%s: connected to export %s", self.peer, self.export.display_name)

    def _handshake_timed_out(self) -> None:
        self._hard_disconnect(f"handshake not finished in {self.server.handshake_timeout}s")

    # -- transmission ----------------------------------------------------------------------

    def _process(self) -> None:
        assert self.transport is not None and self.export is not None
        if self._next_turn:
            # Our next turn is already queued. libuv reads a busy socket many times per
            # wake-up; taking a turn on each read would let one connection run far ahead of
            # the others, so bytes just wait in the buffer until the turn comes.
            self._update_reading()
            return
        budget = MAX_INFLIGHT - self._inflight
        if budget <= 0 or self._writing_paused or self._disconnecting:
            return  # _update_reading pauses the socket; _resume() parses the rest later
        # Fair share: while several tenants are active in this process, each connection takes
        # only a few requests per turn, so no tenant's request waits behind a long run of
        # another's; what is left is taken on the next turn of the event loop.
        limit = min(budget, self.server.turn_size(self.export.tenant))
        queued = self._sample_queue()
        read_room = max(READ_BUDGET - queued, 0)
        # The node's budget: over it, a connection holding little may still take small
        # requests; anything larger waits until the budget drains (_block_on_budget).
        strict = False
        if self.server.room() <= 0:
            self._drop_pool()
        room = self.server.room()
        if room > 0:
            read_room = min(read_room, room)
        else:
            holding = queued + self._charged
            if holding >= SMALL_SHARE:
                self._block_on_budget()
                return
            read_room = min(read_room, SMALL_SHARE - holding)
            strict = True
        requests: list[Request] = []
        consumed = self._parser.parse(
            self._view[self._start : self._end],
            requests,
            max_requests=limit,
            max_read_bytes=read_room,
            strict=strict,
        )
        self._start += consumed
        if strict and not requests and self._read_is_next():
            self._block_on_budget()  # a large READ is next: it waits for room
            return
        if len(requests) == limit and self._start < self._end and not self._next_turn:
            self._next_turn = True
            loop = asyncio.get_running_loop()
            if limit == SHARED_TURN:
                # A deep queue while other tenants are active: leave the CPU to them for a
                # moment, so their requests (and their clients) are not kept waiting.
                loop.call_later(SHARED_TURN_PAUSE, self._take_turn)
            else:
                loop.call_soon(self._take_turn)
        self._run(requests)

    def _read_is_next(self) -> bool:
        """True when the next request in the buffer is a READ whose header has arrived."""
        start = self._start
        return (
            self._end - start >= REQUEST_SIZE and _U16.unpack_from(self._buf, start + 6)[0] == READ
        )

    def _take_turn(self) -> None:
        self._next_turn = False
        if self.transport is not None and self.session is not None:
            self._guarded(self._process)

    def _run(self, requests: list[Request], admitted: bool = False) -> None:
        """Dispatch requests; write what finished now in one go; send the rest to a thread.
        Requests go in the order of their class (_request_class), stable within a class."""
        assert self.export is not None
        if len(requests) > 1:
            requests.sort(key=_request_class)
        if self._held or (self.export.volume_id and self.export.volume_id in self.server.held):
            self._held.extend(requests)  # the volume is quiesced: keep them for release()
            self._update_reading()
            return
        out: Replies = []
        batch: list[Request] = []
        for req in requests:
            if self._disconnecting:
                break  # "A client MUST NOT send anything to the server after NBD_CMD_DISC"
            self._dispatch(req, out, batch, admitted)
        if batch:
            self._submit(batch)
        if out and self.transport is not None:
            self.transport.writelines(out)
        self._update_reading()
        self._maybe_finish_disconnect()

    def _dispatch(
        self, req: Request, out: Replies, batch: list[Request], admitted: bool = False
    ) -> None:
        assert self.session is not None and self.export is not None
        structured = self.session.structured_replies
        if req.type == DISC:
            self._disconnecting = True
            return
        if self.server.shutting_down:
            # Not executed, not answered: the connection closes once the requests in flight
            # are done, and a client that reconnects (the kernel's NBD client, QEMU with
            # reconnect-delay) sends unanswered requests again to the restarted node. An
            # NBD_ESHUTDOWN reply instead would reach the VM as an I/O error.
            return
        err, message = check(
            req, self.export.size, self.export.readonly, bool(self.session.meta_contexts)
        )
        if err:
            log.debug("%s: rejected request %s: %s", self.peer, req[:5], message)
            out.append(error_reply(req.cookie, err, message, structured))
            return
        qos = self.export.qos
        if not admitted and qos is not None and qos.limited:
            hold = qos.admit(req.type, req.length)
            if hold is not None:
                self._delay(req, hold)
                return
        backend = self.export.backend
        if req.type == WRITE and self._owns(req):
            batch.append(req)  # received into its own buffer: write it from a thread
            return
        if backend.inline_safe:
            if req.type == READ and req.length >= SENDFILE_MIN and self._sendfile(req, out):
                return
            out.extend(self._execute(req))
            return
        if req.type == READ:
            data = backend.try_pread(req.offset, req.length)
            if data is not None:
                out.extend(self._read_reply(req, data))
                return
        elif req.type == WRITE:
            assert req.payload is not None
            req = req._replace(payload=memoryview(bytes(req.payload)))  # buffer gets reused
        elif req.type == FLUSH:
            self._submit([req])  # alone, so the writes behind it are not held up
            return
        batch.append(req)

    def _delay(self, req: Request, hold: Hold) -> None:
        """Run a request later, as QoS asks; it counts as in flight meanwhile."""
        if req.type == WRITE and not self._owns(req):
            assert req.payload is not None
            req = req._replace(payload=memoryview(bytes(req.payload)))  # buffer gets reused
        self._inflight += 1
        hold.start(lambda: self._run_delayed(req))

    def _run_delayed(self, req: Request) -> None:
        self._inflight -= 1
        if self.transport is None:
            return
        self._guarded(lambda: self._run([req], admitted=True))
        self._update_reading()
        self._maybe_finish_disconnect()
        self.server.request_done()

    def _owns(self, req: Request) -> bool:
        """True when a WRITE's payload lives in a buffer of its own (see _begin_direct)."""
        return (
            req.payload is not None
            and isinstance(req.payload.obj, bytearray)
            and (req.payload.obj is not self._buf)
        )

    def _submit(self, batch: list[Request]) -> None:
        self._inflight += len(batch)
        loop = asyncio.get_running_loop()
        # Replies of READs run in a thread exist only later: count them now.
        reserved = sum(
            r.length for r in batch if r.type == READ or (r.type == WRITE and not self._owns(r))
        )
        self._charge(reserved)
        fut = loop.run_in_executor(self.server.executor, self._execute_batch, batch)
        fut.add_done_callback(lambda f: self._batch_done(f, batch, reserved))

    def _execute_batch(self, batch: list[Request]) -> Replies:
        out: Replies = []
        for req in batch:
            out.extend(self._execute(req))
        return out

    def _batch_done(
        self, fut: asyncio.Future[Replies], batch: list[Request], reserved: int = 0
    ) -> None:
        self._inflight -= len(batch)
        released = reserved
        for req in batch:
            if req.type == WRITE and self._owns(req):
                assert req.payload is not None
                buf = cast(bytearray, req.payload.obj)
                # Kept for the next large WRITE unless the node is short of buffers.
                if (
                    self.transport is not None
                    and self.server.room() > 0
                    and sum(map(len, self._payload_pool)) + len(buf) <= PAYLOAD_POOL_BYTES
                ):
                    self._payload_pool.append(buf)
                else:
                    released += len(buf)
        self._charge(-released)
        if self.transport is None:
            return
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:  # _execute catches everything; this is a bug, not an I/O error
            log.error("%s: batch failed: %r", self.peer, exc)
            self._hard_disconnect("internal error")
            return
        self.transport.writelines(fut.result())
        self._update_reading()
        self._maybe_finish_disconnect()
        self.server.request_done()

    def _execute(self, req: Request) -> Replies:
        """Run one valid request against the backend and build its reply. Any thread."""
        assert self.export is not None and self.session is not None
        backend = self.export.backend
        fua = bool(req.flags & _FUA)
        try:
            typ = req.type
            if typ == READ:
                return self._read_reply(req, backend.pread(req.offset, req.length))
            if typ == WRITE:
                assert req.payload is not None
                backend.pwrite(req.payload, req.offset, fua)
            elif typ == FLUSH:
                backend.flush()
            elif typ == TRIM:
                backend.trim(req.offset, req.length, fua)
            elif typ == WRITE_ZEROES:
                backend.zero(
                    req.offset,
                    req.length,
                    may_trim=not req.flags & _NO_HOLE,
                    fast=bool(req.flags & _FAST_ZERO),
                    fua=fua,
                )
            elif typ == CACHE:
                backend.cache(req.offset, req.length)
            elif typ == BLOCK_STATUS:
                return self._block_status(req)
            return [simple_reply(req.cookie)]
        except Exception as exc:
            err = nbd_errno(exc)
            if err == Errno.ENOTSUP:
                log.debug("%s: %s", self.peer, exc)
            else:
                log.warning(
                    "%s: export %s: request %s failed: %r",
                    self.peer,
                    self.export.display_name,
                    req[:5],
                    exc,
                )
            # The detail is in the log above; the client gets a fixed text per error value.
            return [error_reply(req.cookie, err, nbd_message(err), self.session.structured_replies)]

    def _sendfile(self, req: Request, out: Replies) -> bool:
        """Send a large READ from a memory-backed image with os.sendfile, with no copy through
        Python. Only while the transport has nothing queued, so bytes stay in order; if the
        socket fills up midway, the rest is read from the same descriptor and goes through the
        transport as ordinary data. The backend is told of the request once, when its bytes
        are all sent or queued (`sendfile_done`: Stats counts it there, as pread would).
        False when this path cannot be used; the caller then reads the ordinary way."""
        assert self.transport is not None and self.export is not None
        backend = self.export.backend
        file_fd = backend.sendfile_fd()
        if file_fd is None or self._sock_fd < 0:
            return False
        if out:
            self.transport.writelines(out)
            out.clear()
        if self.transport.get_write_buffer_size():
            return False
        assert self.session is not None
        if self.session.structured_replies:
            header = read_chunk_header(req.cookie, req.offset, req.length)
        else:
            header = simple_reply(req.cookie)
        start = time.perf_counter_ns()
        try:
            sent = os.write(self._sock_fd, header)
        except BlockingIOError:
            return False
        offset, remaining = req.offset, req.length
        try:
            if sent < len(header):
                out.append(header[sent:])
            else:
                while remaining:
                    n = os.sendfile(self._sock_fd, file_fd, offset, remaining)
                    if n == 0:
                        break
                    offset += n
                    remaining -= n
        except BlockingIOError:
            pass
        except OSError as exc:
            # A failed send or a file read error: part of the reply may be on the wire.
            backend.sendfile_done(req.length, time.perf_counter_ns() - start, failed=True)
            self._hard_disconnect(f"read failed after the reply started: {exc}")
            return True
        try:
            if remaining:
                out.append(_pread_full(file_fd, offset, remaining))
        except OSError as exc:
            backend.sendfile_done(req.length, time.perf_counter_ns() - start, failed=True)
            # Part of a successful reply is on the wire: only a hard disconnect is left.
            self._hard_disconnect(f"read failed after the reply started: {exc}")
            return True
        backend.sendfile_done(req.length, time.perf_counter_ns() - start)
        return True

    def _read_reply(self, req: Request, data: bytes) -> Replies:
        assert self.session is not None
        if self.session.structured_replies:
            return [read_chunk_header(req.cookie, req.offset, len(data)), data]
        return [simple_reply(req.cookie), data]

    def _block_status(self, req: Request) -> Replies:
        assert self.session is not None and self.export is not None
        extents = self.export.backend.extents(req.offset, req.length)
        if req.flags & CmdFlag.REQ_ONE:
            extents = extents[:1]
        chunks: Replies = []
        ids = list(self.session.meta_contexts)
        for i, ctx_id in enumerate(ids):
            chunks.append(block_status_chunk(req.cookie, ctx_id, extents, done=i == len(ids) - 1))
        return chunks

    # -- flow control and ending -------------------------------------------------------------

    def _update_reading(self) -> None:
        if self.transport is None:
            return
        queued = self._sample_queue()
        busy = (
            bool(self._held)
            or self._budget_blocked
            or (self._next_turn and self._end - self._start > TURN_BACKLOG)
            or self._inflight >= MAX_INFLIGHT
            or self._writing_paused
            or self._disconnecting
            or queued > READ_BUDGET
        )
        if busy and not self._reading_paused:
            self._reading_paused = True
            self._partial_since = None  # our pause: the client is not late
            self.transport.pause_reading()
        elif not busy and self._reading_paused and self._inflight <= MAX_INFLIGHT // 2:
            self._reading_paused = False
            self.transport.resume_reading()
            self._mark_partial()
            if self._start < self._end and self.session is not None:
                # Requests left in the buffer when we stopped parsing: take them now.
                asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self.buffer_updated(0)

    @property
    def idle(self) -> bool:
        return self._inflight == 0

    def release(self) -> None:
        """Run the requests held while the volume was quiesced."""
        held, self._held = self._held, []
        if held and self.transport is not None:
            self._run(held)
        self._update_reading()

    def _maybe_finish_disconnect(self) -> None:
        # NBD_CMD_DISC: "The server MUST handle all outstanding requests ... and close".
        if self._disconnecting and self._inflight == 0 and self.transport is not None:
            self.transport.close()

    def _hard_disconnect(self, reason: str) -> None:
        if self.transport is not None:
            log.warning("%s: closing connection: %s", self.peer, reason)
            self.transport.abort()
            self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class NbdServer:
    """All NBD connections of one process, and the executor their blocking I/O runs on."""

    def __init__(
        self,
        registry: ExportRegistry,
        executor: Executor,
        *,
        handshake_timeout: float = 10.0,
        on_closed: Callable[[str], None] | None = None,
        board: SharedBuckets | None = None,
        board_entry: int = 0,
        budget: int = 0,
        payload_timeout: float = 30.0,
    ) -> None:
        self.registry = registry
        # Told the peer address of every closed connection (load balancing, per-peer caps).
        self.on_closed = on_closed
        self.executor = executor
        self.handshake_timeout = handshake_timeout
        # This process's share of the node's buffer budget (0: unlimited): WRITE payload
        # buffers, READ replies queued or being read. (Receive buffers are not counted: they
        # are at most about 1 MiB per connection, large WRITEs going to buffers of their own.)
        self.budget = max(budget, MIN_PROCESS_BUDGET) if budget > 0 else 0
        self.payload_timeout = payload_timeout
        self.charged = 0  # buffers (exact)
        self.queued = 0  # reply bytes queued in transports (as last sampled)
        self.budget_waiters: set[Connection] = set()
        self._recheck: asyncio.TimerHandle | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._closed_since_trim = 0
        self._trim: asyncio.TimerHandle | None = None
        self.connections: set[Connection] = set()
        self.held: set[str] = set()  # volumes whose requests wait (quiesce for a snapshot)
        self._tenant_seen: dict[str, float] = {}
        self.board = board
        self.board_entry = board_entry
        self._board_due = 0.0
        self._contended = False
        self.shutting_down = False
        self._idle_waiters: list[Callable[[], None]] = []
        registry.subscribe_removed(self._export_removed)

    def protocol(self) -> Connection:
        return Connection(self)

    async def adopt(self, sock: socket.socket, peer: str | None = None) -> None:
        """Serve a connection accepted elsewhere (the acceptor process hands them over, with
        the peer address it counted the connection under)."""
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: Connection(self, peer), sock)

    # -- the buffer budget -----------------------------------------------------------------

    def charge(self, buffers: int, queued: int) -> None:
        self.charged += buffers
        self.queued += queued
        if (buffers < 0 or queued < 0) and self.budget_waiters:
            self.recheck_budget_soon(0.0)

    def room(self) -> int:
        """Bytes left in this process's budget (may be negative); huge when unlimited."""
        if not self.budget:
            return 1 << 62
        return self.budget - self.charged - self.queued

    def recheck_budget_soon(self, delay: float = BUDGET_RECHECK) -> None:
        if self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(delay, self._recheck_budget)

    def _recheck_budget(self) -> None:
        """Reply queues drain without a callback: look at them all, then let waiting
        connections read again if there is room."""
        self._recheck = None
        for conn in self.connections:
            conn._sample_queue()
        if self.room() <= 0:
            for conn in self.connections:
                conn._drop_pool()
        if self.room() > 0:
            waiting, self.budget_waiters = self.budget_waiters, set()
            for conn in waiting:
                conn._budget_blocked = False
                conn._update_reading()
        if self.budget_waiters:
            self.recheck_budget_soon()

    # -- deadlines and memory ----------------------------------------------------------------

    def start_sweeping(self) -> None:
        if self._sweep is None:
            period = min(1.0, self.payload_timeout / 4)
            self._sweep = asyncio.get_running_loop().call_later(period, self._sweep_now)

    def _sweep_now(self) -> None:
        """Drop connections whose request stopped arriving midway (--payload-timeout): a
        half-sent WRITE must not pin its buffer for ever."""
        self._sweep = None
        now = time.monotonic()
        for conn in list(self.connections):
            since = conn._partial_since
            late = since is not None and now - since > self.payload_timeout
            if late and not conn._reading_paused:
                conn._hard_disconnect(f"request not received within {self.payload_timeout:g}s")
        if self.connections:
            self.start_sweeping()

    def connection_closed(self) -> None:
        """After a burst of closed connections, give their freed heap back to the system:
        glibc keeps freed memory in its arenas otherwise, and a node that once held many
        connections would stay that large."""
        self._closed_since_trim += 1
        if self._trim is None and (
            self._closed_since_trim >= TRIM_AFTER_CLOSED or not self.connections
        ):
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_heap)

    def _trim_heap(self) -> None:
        self._trim = None
        self._closed_since_trim = 0
        asyncio.get_running_loop().run_in_executor(self.executor, _malloc_trim)

    def _export_removed(self, export: Export) -> None:
        for conn in list(self.connections):
            if conn.export is export:
                conn._hard_disconnect(f"export {export.display_name} was removed")

    def turn_size(self, tenant: str) -> int:
        """How many requests a connection of `tenant` may take in one turn of the loop: few
        while tenants compete anywhere on the node, all it has otherwise. Every BOARD_PERIOD
        this process publishes its recently active tenants on the shared activity board and
        counts the distinct ones across all processes."""
        now = time.monotonic()
        self._tenant_seen[tenant] = now
        if now >= self._board_due:
            self._board_due = now + BOARD_PERIOD
            recent = []
            for t, last in list(self._tenant_seen.items()):
                if now - last < ACTIVE_TENANT_WINDOW:
                    recent.append(t)
                else:
                    del self._tenant_seen[t]
            if self.board is not None:
                self.board.publish_tenants(self.board_entry, now, recent)
                self._contended = self.board.active_tenants(now, ACTIVE_TENANT_WINDOW) > 1
            else:
                self._contended = len(recent) > 1
        return SHARED_TURN if self._contended else MAX_INFLIGHT

    def volume_connections(self, volume_id: str) -> list[Connection]:
        return [c for c in self.connections if c.export and c.export.volume_id == volume_id]

    async def quiesce(self, volume_id: str, timeout: float = 30.0) -> None:
        """Hold new requests to a volume and wait until those in flight are done."""
        self.held.add(volume_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(c.idle for c in self.volume_connections(volume_id)):
            if loop.time() > deadline:
                self.resume(volume_id)
                raise TimeoutError(f"volume {volume_id} still busy after {timeout}s")
            await asyncio.sleep(0.005)

    def resume(self, volume_id: str) -> None:
        self.held.discard(volume_id)
        for conn in self.volume_connections(volume_id):
            conn.release()

    def request_done(self) -> None:
        if self._idle_waiters and all(c.idle for c in self.connections):
            for wake in self._idle_waiters:
                wake()
            self._idle_waiters.clear()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """New requests are left unanswered; in-flight ones finish; exports are flushed; then
        every connection closes (clients that reconnect resend what was not answered)."""
        self.shutting_down = True
        loop = asyncio.get_running_loop()
        for handle in (self._recheck, self._sweep, self._trim):
            if handle is not None:
                handle.cancel()
        self._recheck = self._sweep = self._trim = None
        if not all(c.idle for c in self.connections):
            done: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not done.done():
                    done.set_result(None)

            self._idle_waiters.append(wake)
            try:
                await asyncio.wait_for(done, timeout)
            except TimeoutError:
                log.warning("shutdown: requests still in flight after %.0fs", timeout)
        for export in self.registry:
            if not export.readonly:
                try:
                    await loop.run_in_executor(self.executor, export.backend.flush)
                except OSError as exc:
                    log.error("shutdown: flushing export %s failed: %s", export.display_name, exc)
        for conn in list(self.connections):
            conn.close()


def _pread_full(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes of `fd` at `offset`; past the end of the file reads as zeros."""
    data = os.pread(fd, length, offset)
    while len(data) < length:  # short reads only happen on signals or odd filesystems
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            return data + bytes(length - len(data))
        data += more
    return data


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def _request_class(req: Request) -> int:
    """Scheduling class within one turn: 0 reads (a guest waits on them), 1 writes, FLUSH and
    FUA in arrival order (the spec would allow moving FLUSH ahead of unanswered writes, but a
    careless client could then lose data it believed flushed), 2 hints (CACHE, BLOCK_STATUS).
    Background copies are not here at all: they run in a child process at idle priority."""
    if req.type == READ:
        return 0
    if req.type in (CACHE, BLOCK_STATUS):
        return 2
    return 1
