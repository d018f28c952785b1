"""Quality of service: IOPS and bandwidth limits per volume and per tenant.

Owns the rate limiters. Each limited volume and tenant has a slot in one shared-memory file
(mapped by every NBD process of the node) holding two "theoretical arrival times" (GCRA, the
token bucket written as one timestamp): one for operations, one for bytes. Admitting a request
reserves its cost in every bucket that applies; if it must wait, it gets a `Hold` (a timer,
not a busy loop) that runs it when every bucket lets it go. A slot is updated under a
byte-range lock on that slot, so limits hold across worker processes; volumes without limits
never touch it. A process does not lock the slot per request: it takes CHUNK_SECONDS of the
rate at a time (at least the request's cost) and admits locally until that is used
(`Allowance`); a chunk belongs to the limit it was taken under and is dropped when the limit
changes. Every request admitted was reserved in the shared bucket, so limits stay exact
across processes over a second (a process may be one chunk, 5 ms of the rate, ahead).

Every limit the main process hands out carries a generation (storage_node.dataplane numbers
them): a slot remembers the generation it was last charged under, and the first request under
a newer one starts the slot clean. So a changed limit applies from the next request, without
the debt run up under the old one, and a slot freed by a deleted volume and given to another
starts clean, with no lock taken by the main process and no race with requests in flight. A
process the change has not reached yet (one control message behind) neither waits for nor
adds to the new generation's bucket. Requests already waiting when a limit changes are
charged under the new limit at once, in arrival order, and go as it allows: at once after a
raise (`VolumeQos._recharge`).

The same file carries an activity board: which tenants each NBD process saw recently, so
that fair sharing between tenants (storage_node.nbd.server) knows when tenants compete
anywhere on the node, not only inside one process.

Costs by request class: READ and WRITE cost one operation and their length in bytes;
WRITE_ZEROES and TRIM one operation (no data moves); FLUSH and CACHE one operation;
BLOCK_STATUS nothing (metadata). A request waits only while the bucket is more than
BURST_SECONDS in debt: a request to an idle volume never waits, whatever its limit, and
bursts of up to BURST_SECONDS of the rate (plus that one request) pass undelayed.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .nbd.transmission import BLOCK_STATUS, READ, WRITE

SLOT = struct.Struct("=ddQ")  # theoretical arrival times (operations, bytes), generation
SLOTS = 65536
BURST_SECONDS = 0.05
MIN_WAIT = 1e-6  # shorter waits are float rounding of the sums above, not a limit: none
# A process takes budget from a shared bucket this many seconds of the rate at a time (at
# least one request's cost) and admits locally until it is used: one lock per chunk, not per
# request. Low rates (under 1 / CHUNK_SECONDS per second) take one request at a time.
CHUNK_SECONDS = 0.005
# The activity board, after the slots: per NBD process, when it last wrote and which tenants
# (64-bit hashes) it saw recently. Each process writes only its own entry, so no lock.
BOARD_TENANTS = 8
BOARD_ENTRY = struct.Struct(f"=dQ{BOARD_TENANTS}Q")  # time, count, hashes
BOARD_ENTRIES = 64
FILE_SIZE = SLOTS * SLOT.size + BOARD_ENTRIES * BOARD_ENTRY.size


class SharedBuckets:
    """The slots file. `path` is created (zeroed) by the main process, mapped by all."""

    def __init__(self, path: Path, create: bool = False) -> None:
        if create:
            # A new file renamed into place, never the old one truncated: processes of a
            # previous run that still serve (a restart) keep their own, whole file, and never
            # see it shrink under their mapping (SIGBUS) or their slots zeroed.
            fresh = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(fresh, os.O_RDWR | os.O_CLOEXEC | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, FILE_SIZE)
            os.replace(fresh, path)
            self.fd = fd
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.map = mmap.mmap(self.fd, FILE_SIZE, mmap.MAP_SHARED)

    def reserve(
        self,
        slot: int,
        generation: int,
        now: float,
        ops_rate: int,
        ops: int,
        byte_rate: int,
        nbytes: int,
    ) -> float:
        """Reserve `ops` and `nbytes` in one slot under limit `generation`; return the seconds
        to wait (0: go now). A newer generation than the slot's starts the slot clean; an
        older one (a process not yet told of a change) is neither charged nor held."""
        offset = slot * SLOT.size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, SLOT.size, offset, os.SEEK_SET)
        try:
            tat_ops, tat_bytes, current = SLOT.unpack_from(self.map, offset)
            if generation < current:
                return 0.0
            if generation > current:
                tat_ops = tat_bytes = 0.0
            wait = 0.0
            # GCRA: a request may start once the bucket's debt (tat - now) is within the
            # burst; then its cost is added. So a request to an idle bucket never waits.
            if ops_rate and ops:
                start = max(tat_ops, now)
                wait = max(wait, start - now - BURST_SECONDS)
                tat_ops = start + ops / ops_rate
            if byte_rate and nbytes:
                start = max(tat_bytes, now)
                wait = max(wait, start - now - BURST_SECONDS)
                tat_bytes = start + nbytes / byte_rate
            SLOT.pack_into(self.map, offset, tat_ops, tat_bytes, generation)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, SLOT.size, offset, os.SEEK_SET)
        return wait if wait >= MIN_WAIT else 0.0

    def publish_tenants(self, entry: int, now: float, tenants: list[str]) -> None:
        """Say which tenants this process (board entry `entry`) saw active just now."""
        hashes = [_tenant_hash(t) for t in tenants[:BOARD_TENANTS]]
        hashes += [0] * (BOARD_TENANTS - len(hashes))
        offset = SLOTS * SLOT.size + (entry % BOARD_ENTRIES) * BOARD_ENTRY.size
        BOARD_ENTRY.pack_into(self.map, offset, now, len(tenants), *hashes)

    def active_tenants(self, now: float, window: float) -> int:
        """Distinct tenants active on the whole node (every process) within `window`."""
        seen: set[int] = set()
        extra = 0
        base = SLOTS * SLOT.size
        for i in range(BOARD_ENTRIES):
            when, count, *hashes = BOARD_ENTRY.unpack_from(self.map, base + i * BOARD_ENTRY.size)
            if when and now - when < window:
                seen.update(h for h in hashes[:count] if h)
                extra += max(count - BOARD_TENANTS, 0)
        return len(seen) + extra

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def _tenant_hash(tenant: str) -> int:
    return int.from_bytes(hashlib.blake2b(tenant.encode(), digest_size=8).digest(), "little") or 1


@dataclass(frozen=True)
class Limit:
    slot: int
    iops: int = 0
    bps: int = 0
    generation: int = 0  # numbered by the main process; a new one per change or new slot

    @property
    def active(self) -> bool:
        return bool(self.iops or self.bps)


class Hold:
    """A request that must wait: when each of its buckets lets it go (monotonic deadlines,
    the volume's and the tenant's), and what to call then. Made by `VolumeQos.admit`; runs on
    its process's event loop once `start`ed."""

    __slots__ = ("_handle", "_qos", "_run", "_since", "deadlines", "nbytes")

    def __init__(self, qos: VolumeQos, nbytes: int, now: float, waits: list[float]) -> None:
        self._qos = qos
        self.nbytes = nbytes
        self._since = now
        self.deadlines = [now + w for w in waits]
        self._handle: asyncio.TimerHandle | None = None
        self._run: Callable[[], None] | None = None

    @property
    def wait(self) -> float:
        """Seconds from its admission until it may run."""
        return max(self.deadlines) - self._since

    def start(self, run: Callable[[], None]) -> None:
        """Call `run()` when every bucket lets the request go (sooner if a limit is raised)."""
        self._run = run
        self._qos._holds[self] = None
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        delay = max(max(self.deadlines) - time.monotonic(), 0.0)
        self._handle = asyncio.get_running_loop().call_later(delay, self._go)

    def _go(self) -> None:
        self._qos._holds.pop(self, None)
        if self._qos.on_throttle is not None:
            self._qos.on_throttle(time.monotonic() - self._since)
        assert self._run is not None
        self._run()


class Allowance:
    """Budget one process took from one shared bucket and has not used yet: operations,
    bytes, and from when it may be used (the wait the bucket gave when it was taken). Belongs
    to one limit (generation): dropped when the limit changes."""

    __slots__ = ("nbytes", "ops", "ready")

    def __init__(self) -> None:
        self.ops = 0
        self.nbytes = 0
        self.ready = 0.0


@dataclass
class VolumeQos:
    """The limits that apply to one volume: its own and its tenant's. Shared by every export
    (attachment) of the volume in a process, so a live change applies to open connections.
    Requests that wait are `Hold`s; a changed limit takes them over at once (`_recharge`).
    Lives on its process's event loop."""

    tenant: str
    buckets: SharedBuckets | None = None
    volume: Limit | None = None
    tenant_limit: Limit | None = None
    on_throttle: Callable[[float], None] | None = None  # told of every time held (metrics)
    _holds: dict[Hold, None] = field(default_factory=dict, repr=False)  # in arrival order
    # What this process took from the volume's and the tenant's bucket and has not used yet.
    _allowances: list[Allowance] = field(
        default_factory=lambda: [Allowance(), Allowance()], repr=False
    )

    # Whether any limit applies: read per request, so kept up to date by the setters rather
    # than computed each time.
    limited: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._update_limited()

    def _update_limited(self) -> None:
        self.limited = self.buckets is not None and any(
            lim is not None and lim.active for lim in (self.volume, self.tenant_limit)
        )

    def admit(self, typ: int, length: int) -> Hold | None:
        """None: the request runs now. Else a Hold saying how long it must wait."""
        if not self.limited or typ == BLOCK_STATUS:
            return None
        nbytes = length if typ in (READ, WRITE) else 0
        now = time.monotonic()
        volume_wait = self._take(0, self.volume, now, nbytes)
        tenant_wait = self._take(1, self.tenant_limit, now, nbytes)
        if volume_wait or tenant_wait:
            return Hold(self, nbytes, now, [volume_wait, tenant_wait])
        return None

    def _take(self, which: int, lim: Limit | None, now: float, nbytes: int) -> float:
        """Admit one request's cost from this process's allowance for one bucket, taking a
        new chunk from the shared bucket when it is short; the seconds to wait (0: go)."""
        if lim is None or not lim.active or self.buckets is None:
            return 0.0
        have = self._allowances[which]
        take_ops = max(1, int(lim.iops * CHUNK_SECONDS)) if lim.iops and have.ops < 1 else 0
        take_bytes = 0
        if lim.bps and nbytes > have.nbytes:
            take_bytes = max(int(lim.bps * CHUNK_SECONDS), nbytes - have.nbytes)
        if take_ops or take_bytes:
            wait = self.buckets.reserve(
                lim.slot, lim.generation, now, lim.iops, take_ops, lim.bps, take_bytes
            )
            have.ops += take_ops
            have.nbytes += take_bytes
            if wait:
                have.ready = max(have.ready, now + wait)
        if lim.iops:
            have.ops -= 1
        if lim.bps:
            have.nbytes -= nbytes
        wait = have.ready - now
        return wait if wait >= MIN_WAIT else 0.0

    def _reserve(self, lim: Limit | None, now: float, nbytes: int) -> float:
        if lim is None or not lim.active or self.buckets is None:
            return 0.0
        return self.buckets.reserve(lim.slot, lim.generation, now, lim.iops, 1, lim.bps, nbytes)

    def set_volume_limit(self, limit: Limit | None) -> None:
        if limit != self.volume:
            self.volume = limit
            self._update_limited()
            self._recharge(0, limit)

    def set_tenant_limit(self, limit: Limit | None) -> None:
        if limit != self.tenant_limit:
            self.tenant_limit = limit
            self._update_limited()
            self._recharge(1, limit)

    def _recharge(self, which: int, limit: Limit | None) -> None:
        """A limit changed: the waiting requests' debt in its bucket is gone. Each is charged
        under the new limit instead, in arrival order (its wait for the other bucket stays),
        and goes when both let it."""
        self._allowances[which] = Allowance()  # taken under the old limit: gone with it
        now = time.monotonic()
        for hold in list(self._holds):
            hold.deadlines[which] = now + self._reserve(limit, now, hold.nbytes)
            hold._schedule()
