"""Quality of service: IOPS and bandwidth limits per volume and per tenant.

Owns the rate limiters. Each limited volume and tenant has a slot in one shared-memory file
(mapped by every NBD process of the node) holding two "theoretical arrival times" (GCRA, the
token bucket written as one timestamp): one for operations, one for bytes. Admitting a request
reserves its cost in every bucket that applies and returns how long it must wait; the server
delays it that long (a timer, not a busy loop). A slot is updated under a byte-range lock on
that slot, so limits hold across worker processes; volumes without limits never touch it.

Costs by request class: READ and WRITE cost one operation and their length in bytes;
WRITE_ZEROES and TRIM one operation (no data moves); FLUSH and CACHE one operation;
BLOCK_STATUS nothing (metadata). Bursts of up to BURST_SECONDS of the rate pass undelayed.
"""

from __future__ import annotations

import fcntl
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


class SharedBuckets:
    """The slots file. `path` is created (zeroed) by the main process, mapped by all."""

    def __init__(self, path: Path, create: bool = False) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        self.fd = os.open(path, flags, 0o600)
        if create:
            os.ftruncate(self.fd, SLOTS * SLOT.size)
        self.map = mmap.mmap(self.fd, SLOTS * SLOT.size, mmap.MAP_SHARED)

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

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


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
