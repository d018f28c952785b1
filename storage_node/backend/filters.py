"""Wrappers that add behaviour to a backend while keeping its interface.

Owns cross-cutting policies that must not become `if`s in the server loop. `ReadOnly` refuses
every change even if a request slipped past the protocol's checks; `Stats` counts requests,
bytes, errors and latency per request type for the metrics (storage_node.metrics); more
(fault injection) join here with the same shape.
"""

from __future__ import annotations

import errno
import os
from bisect import bisect_left
from threading import get_ident
from time import perf_counter_ns

from . import Backend


class Filter:
    """Passes every operation to the backend below. Subclasses override what they change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def readonly(self) -> bool:
        return self.inner.readonly

    @property
    def inline_safe(self) -> bool:
        return self.inner.inline_safe

    def try_pread(self, offset: int, length: int) -> bytes | None:
        return self.inner.try_pread(offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def sendfile_fd(self) -> int | None:
        return self.inner.sendfile_fd()

    def sendfile_done(self, nbytes: int, elapsed_ns: int, failed: bool = False) -> None:
        self.inner.sendfile_done(nbytes, elapsed_ns, failed)

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        self.inner.pwrite(data, offset, fua)

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.inner.trim(offset, length, fua)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self.inner.zero(offset, length, may_trim, fast, fua)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self.inner.extents(offset, length)

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def close(self) -> None:
        self.inner.close()


class ReadOnly(Filter):
    @property
    def readonly(self) -> bool:
        return True

    def _refuse(self) -> None:
        raise OSError(errno.EROFS, "export is read-only")

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        self._refuse()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._refuse()

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self._refuse()


# Request types as the metrics label them; the index is a request type's row in `Stats`.
OPS = ("read", "write", "flush", "trim", "zero", "block_status", "cache")
READ, WRITE, FLUSH, TRIM, ZERO, BLOCK_STATUS, CACHE = range(len(OPS))
# Upper bounds (seconds) of the latency histogram's buckets; one more bucket holds the rest.
LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 250e-3,
    1.0, 5.0,
)  # fmt: skip
_BOUNDS_NS = [round(b * 1e9) for b in LATENCY_BUCKETS]
# One row of counters per request type: requests started, bytes, errors, total latency (ns),
# then one count per latency bucket. Requests finished = the sum of the bucket counts.
STARTED, BYTES, ERRORS, LATENCY_NS, FIRST_BUCKET = range(5)
ROW = FIRST_BUCKET + len(_BOUNDS_NS) + 1
# A snapshot is the rows one after another, then the nanoseconds throttled by QoS.
THROTTLED_NS = ROW * len(OPS)
SNAPSHOT_LEN = THROTTLED_NS + 1


class Stats(Filter):
    """Counts what reaches the backend, per request type: requests, bytes, errors, latency
    (the backend call's duration, in fixed buckets), requests in flight, and the time QoS held
    requests back (`throttled`). Requests refused before the backend (range checks, a
    read-only export) are not counted.

    Requests run on the event loop and in I/O threads at once. Rather than take a lock twice
    per request, every thread counts in a shard of its own (one writer per counter); a
    snapshot sums the shards. Each counter only grows, so a snapshot taken while requests run
    is at worst a moment behind. `epoch` names this object: counters that belong to another
    epoch started again from zero (storage_node.metrics keeps exported totals monotonic).
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.epoch = os.urandom(8).hex()
        self._shards: dict[int, list[list[int]]] = {}

    def _new_shard(self) -> list[list[int]]:
        """This thread's rows: one per request type, then [throttled ns]."""
        shard = [[0] * ROW for _ in OPS] + [[0]]
        self._shards[get_ident()] = shard  # one dict assignment: atomic
        return shard

    @staticmethod
    def _finish(row: list[int], start: int, nbytes: int) -> None:
        elapsed = perf_counter_ns() - start
        row[BYTES] += nbytes
        row[LATENCY_NS] += elapsed
        row[FIRST_BUCKET + bisect_left(_BOUNDS_NS, elapsed)] += 1

    @staticmethod
    def _failed(row: list[int], start: int) -> None:
        elapsed = perf_counter_ns() - start
        row[ERRORS] += 1
        row[LATENCY_NS] += elapsed
        row[FIRST_BUCKET + bisect_left(_BOUNDS_NS, elapsed)] += 1

    def throttled(self, seconds: float) -> None:
        """QoS held a request back for this long (called by the QoS code, any thread)."""
        (self._shards.get(get_ident()) or self._new_shard())[-1][0] += round(seconds * 1e9)

    def activity(self) -> int:
        """A number that changes whenever a request starts or ends (or QoS throttles one):
        much cheaper than `snapshot`, to skip volumes that were idle since the last look."""
        total = 0
        for shard in list(self._shards.values()):
            total += shard[-1][0] + sum(row[STARTED] + row[LATENCY_NS] for row in shard[:-1])
        return total

    def snapshot(self) -> list[int]:
        """Every counter summed over the threads, laid out as described at THROTTLED_NS."""
        shards = list(self._shards.values())
        total: list[int] = []
        for op in range(len(OPS) + 1):  # the rows, then [throttled ns]
            total.extend(map(sum, zip(*(shard[op] for shard in shards), strict=True)))
        return total or [0] * SNAPSHOT_LEN

    # -- the backend's operations, counted ---------------------------------------------------

    # Stats leaves the data alone, so large reads of a memory-backed image may go out with
    # os.sendfile (sendfile_fd passes through); the server reports each such READ with
    # sendfile_done, which counts it as pread would have.

    def sendfile_done(self, nbytes: int, elapsed_ns: int, failed: bool = False) -> None:
        row = (self._shards.get(get_ident()) or self._new_shard())[READ]
        row[STARTED] += 1
        if failed:
            row[ERRORS] += 1
        else:
            row[BYTES] += nbytes
        row[LATENCY_NS] += elapsed_ns
        row[FIRST_BUCKET + bisect_left(_BOUNDS_NS, elapsed_ns)] += 1
        self.inner.sendfile_done(nbytes, elapsed_ns, failed)

    def try_pread(self, offset: int, length: int) -> bytes | None:
        row = (self._shards.get(get_ident()) or self._new_shard())[READ]
        start = perf_counter_ns()
        try:
            data = self.inner.try_pread(offset, length)
        except BaseException:
            row[STARTED] += 1
            self._failed(row, start)
            raise
        if data is not None:  # else the server calls pread later, which counts it
            row[STARTED] += 1
            self._finish(row, start, length)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        row = (self._shards.get(get_ident()) or self._new_shard())[READ]
        row[STARTED] += 1
        start = perf_counter_ns()
        try:
            data = self.inner.pread(offset, length)
        except BaseException:
            self._failed(row, start)
            raise
        # _finish, inlined on the two hottest paths (a call costs about 80 ns here).
        elapsed = perf_counter_ns() - start
        row[BYTES] += length
        row[LATENCY_NS] += elapsed
        row[FIRST_BUCKET + bisect_left(_BOUNDS_NS, elapsed)] += 1
        return data

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        row = (self._shards.get(get_ident()) or self._new_shard())[WRITE]
        row[STARTED] += 1
        start = perf_counter_ns()
        try:
            self.inner.pwrite(data, offset, fua)
        except BaseException:
            self._failed(row, start)
            raise
        elapsed = perf_counter_ns() - start
        row[BYTES] += len(data)
        row[LATENCY_NS] += elapsed
        row[FIRST_BUCKET + bisect_left(_BOUNDS_NS, elapsed)] += 1

    def flush(self) -> None:
        row = (self._shards.get(get_ident()) or self._new_shard())[FLUSH]
        row[STARTED] += 1
        start = perf_counter_ns()
        try:
            self.inner.flush()
        except BaseException:
            self._failed(row, start)
            raise
        self._finish(row, start, 0)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        row = (self._shards.get(get_ident()) or self._new_shard())[TRIM]
        row[STARTED] += 1
        start = perf_counter_ns()
        try:
            self.inner.trim(offset, length, fua)
        except BaseException:
            self._failed(row, start)
            raise
        self._finish(row, start, length)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        row = (self._shards.get(get_ident()) or self._new_shard())[ZERO]
        row[STARTED] += 1
        start = perf_counter_ns()
        try:
            self.inner.zero(offset, length, may_trim, fast, fua)
        except BaseException:
            self._failed(row, start)
            raise
        self._finish(row, start, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        row = (self._shards.get(get_ident()) or self._new_shard())[BLOCK_STATUS]
        row[STARTED] += 1
        start = perf_counter_ns()
        try:
            extents = self.inner.extents(offset, length)
        except BaseException:
            self._failed(row, start)
            raise
        self._finish(row, start, 0)
        return extents

    def cache(self, offset: int, length: int) -> None:
        row = (self._shards.get(get_ident()) or self._new_shard())[CACHE]
        row[STARTED] += 1
        start = perf_counter_ns()
        try:
            self.inner.cache(offset, length)
        except BaseException:
            self._failed(row, start)
            raise
        self._finish(row, start, length)
