"""Backends: where an export's bytes live, behind one small table of operations.

Owns the `Backend` interface the NBD server calls (modelled on nbdkit's plugin table: size,
capabilities, pread, pwrite, flush, trim, zero, extents, cache) and the wrappers ("filters")
that add behaviour with the same interface. The NBD layer validates every range before a
call, so backends assume offsets and lengths lie inside the export.

Errors are raised as OSError with an errno; the server maps them to NBD errors in one place
(storage_node.nbd.errors).
"""

from __future__ import annotations

from typing import Protocol


class NotFast(OSError):
    """A WRITE_ZEROES with FAST_ZERO that this backend cannot do faster than a write."""


class Backend(Protocol):
    @property
    def size(self) -> int: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def inline_safe(self) -> bool:
        """True when every operation finishes without waiting for a device (memory-backed),
        so the event loop may run it directly instead of sending it to a thread."""
        ...

    def try_pread(self, offset: int, length: int) -> bytes | None:
        """Read without blocking on a device, or None if that is not possible right now."""
        ...

    def pread(self, offset: int, length: int) -> bytes: ...
    def sendfile_fd(self) -> int | None:
        """A file descriptor whose bytes at export offsets may go out with os.sendfile, or
        None when reads must go through pread (a filter that changes data, say). The caller
        may also read that descriptor directly (the rest of a reply the socket did not take),
        and then reports the request with `sendfile_done`."""
        ...

    def sendfile_done(self, nbytes: int, elapsed_ns: int, failed: bool = False) -> None:
        """One READ of `nbytes` was served from `sendfile_fd()` in `elapsed_ns` (or failed
        midway): for the layers that count requests; nothing to do for a plain backend."""
        ...

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None: ...
    def flush(self) -> None: ...
    def trim(self, offset: int, length: int, fua: bool) -> None: ...
    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None: ...
    def extents(self, offset: int, length: int) -> list[tuple[int, int]]: ...
    def cache(self, offset: int, length: int) -> None: ...
    def close(self) -> None: ...
