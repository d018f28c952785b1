"""Wrappers that add behaviour to a backend while keeping its interface.

Owns cross-cutting policies that must not become `if`s in the server loop. `ReadOnly` refuses
every change even if a request slipped past the protocol's checks; more (QoS, statistics,
fault injection) join here with the same shape.
"""

from __future__ import annotations

import errno

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
