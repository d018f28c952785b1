"""Quality of service: IOPS and bandwidth limits per volume and per tenant.

Owns the rate limiters. Each limited volume and tenant has a slot in one shared-memory file
(mapped by every NBD process of the node) holding two "theoretical arrival times" (GCRA, the
token bucket written as one timestamp): one for operations, one for bytes. Admitting a request
reserves its cost in every bucket that applies and returns how long it must wait; the server
delays it that long (a timer, not a busy loop). A slot is updated under a byte-range lock on
that slot, so limits hold across worker processes; volumes without limits never touch it.

The same file carries an activity board: which tenants each NBD process saw recently, so
that fair sharing between tenants (storage_node.nbd.server) knows when tenants compete
anywhere on the node, not only inside one process.

Costs by request class: READ and WRITE cost one operation and their length in bytes;
WRITE_ZEROES and TRIM one operation (no data moves); FLUSH and CACHE one operation;
BLOCK_STATUS nothing (metadata). Bursts of up to BURST_SECONDS of the rate pass undelayed.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .nbd.transmission import BLOCK_STATUS, READ, WRITE

SLOT = struct.Struct("=dd")  # theoretical arrival time: operations, bytes
SLOTS = 65536
BURST_SECONDS = 0.05
# The activity board, after the slots: per NBD process, when it last wrote and which tenants
# (64-bit hashes) it saw recently. Each process writes only its own entry, so no lock.
BOARD_TENANTS = 8
BOARD_ENTRY = struct.Struct(f"=dQ{BOARD_TENANTS}Q")  # time, count, hashes
BOARD_ENTRIES = 64
FILE_SIZE = SLOTS * SLOT.size + BOARD_ENTRIES * BOARD_ENTRY.size


class SharedBuckets:
    """The slots file. `path` is created (zeroed) by the main process, mapped by all."""

    def __init__(self, path: Path, create: bool = False) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        self.fd = os.open(path, flags, 0o600)
        if create:
            os.ftruncate(self.fd, FILE_SIZE)
        self.map = mmap.mmap(self.fd, FILE_SIZE, mmap.MAP_SHARED)

    def reserve(
        self, slot: int, now: float, ops_rate: int, ops: int, byte_rate: int, nbytes: int
    ) -> float:
        """Reserve `ops` and `nbytes` in one slot; return the seconds to wait (0: go now)."""
        offset = slot * SLOT.size
        fcntl.lockf(self.fd, fcntl.LOCK_EX, SLOT.size, offset, os.SEEK_SET)
        try:
            tat_ops, tat_bytes = SLOT.unpack_from(self.map, offset)
            wait = 0.0
            if ops_rate and ops:
                tat_ops = max(tat_ops, now) + ops / ops_rate
                wait = max(wait, tat_ops - now - BURST_SECONDS)
            if byte_rate and nbytes:
                tat_bytes = max(tat_bytes, now) + nbytes / byte_rate
                wait = max(wait, tat_bytes - now - BURST_SECONDS)
            SLOT.pack_into(self.map, offset, tat_ops, tat_bytes)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, SLOT.size, offset, os.SEEK_SET)
        return wait

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


@dataclass
class Limit:
    slot: int
    iops: int = 0
    bps: int = 0

    @property
    def active(self) -> bool:
        return bool(self.iops or self.bps)


@dataclass
class VolumeQos:
    """The limits that apply to one volume: its own and its tenant's. Shared by every export
    (attachment) of the volume in a process, so a live change applies to open connections."""

    tenant: str
    buckets: SharedBuckets | None = None
    volume: Limit | None = None
    tenant_limit: Limit | None = None
    on_throttle: Callable[[float], None] | None = None  # told of every wait (metrics)

    @property
    def limited(self) -> bool:
        return self.buckets is not None and any(
            lim is not None and lim.active for lim in (self.volume, self.tenant_limit)
        )

    def admit(self, typ: int, length: int) -> float:
        """Seconds this request must wait before it runs."""
        if not self.limited or typ == BLOCK_STATUS:
            return 0.0
        assert self.buckets is not None
        nbytes = length if typ in (READ, WRITE) else 0
        now = time.monotonic()
        wait = 0.0
        for lim in (self.volume, self.tenant_limit):
            if lim is not None and lim.active:
                wait = max(wait, self.buckets.reserve(lim.slot, now, lim.iops, 1, lim.bps, nbytes))
        if wait > 0 and self.on_throttle is not None:
            self.on_throttle(wait)
        return wait
