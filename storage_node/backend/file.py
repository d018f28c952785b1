"""A sparse image file as a backend.

Owns the mapping of NBD operations onto one regular file: pread/pwrite, fdatasync for FLUSH
and RWF_DSYNC for FUA, hole punching for TRIM and WRITE_ZEROES, SEEK_DATA/SEEK_HOLE for
base:allocation, posix_fadvise for CACHE. Every connection to an export, in every worker
process, writes through the same inode's page cache, so one fdatasync on any of them makes
all completed writes durable: that is what lets the server advertise CAN_MULTI_CONN.

While a live copy of the volume runs (a snapshot or clone without reflink,
storage_node.files.LiveCopy), every write, trim and zero also marks the chunks it changed in
the copy's shared dirty map (`track`), after the change is in the file and before the
request completes: whatever the copy read before that is copied again.

Zero detection (`zero_detection`, on for volumes): a WRITE whose payload is all zeroes, or the
64 KiB-aligned zero runs inside a large WRITE, become hole punches instead of data
(`zero_runs`; docs/storage-node.md, "Thin writes"). Reads return the same zeroes, FUA is kept
with one fdatasync, and the whole range is marked changed for live copies like any write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import struct
import threading

from ..nbd.constants import State
from . import NotFast

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# statfs f_type of filesystems that live in memory: I/O on them never waits for a device.
_MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}
_ZERO_CHUNK = bytes(1 << 20)
MAX_EXTENTS = 4096

# Zero detection: a WRITE of zeroes aligned to ZERO_BLOCK is punched whole; inside a WRITE of at
# least ZERO_SCAN bytes that also holds data, runs of zeroes made of whole ZERO_RUN-aligned
# ZERO_RUN blocks are punched and the rest written (smaller runs stay data: punching them
# would cost a fallocate each and fragment the file for little space).
ZERO_BLOCK = 4096
ZERO_RUN = 64 << 10
ZERO_SCAN = 2 * ZERO_RUN


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _try_fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate, or False when the filesystem does not support this mode."""
    try:
        _fallocate(fd, mode, offset, length)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        return False
    return True


def punch_hole(fd: int, offset: int, length: int) -> None:
    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def is_zero(view: memoryview) -> bool:
    """Whether every byte is zero: memcmp against a zero buffer (bytes.startswith), which
    stops at the first byte that differs."""
    step = len(_ZERO_CHUNK)
    return all(_ZERO_CHUNK.startswith(view[pos : pos + step]) for pos in range(0, len(view), step))


def zero_runs(data: memoryview, offset: int) -> list[tuple[int, int]]:
    """The ranges [start, end) of a WRITE's payload (written at `offset`) to punch rather than
    write, in order, or [] for a plain write. Costs two byte reads for a small payload whose
    first or last byte is not zero (the common case), and two per ZERO_RUN block of a large
    one; a memcmp only where both are zero."""
    n = len(data)
    if n < ZERO_BLOCK:
        return []
    if not data[0] and not data[n - 1] and not (offset | n) % ZERO_BLOCK and is_zero(data):
        return [(0, n)]
    if n < ZERO_SCAN:
        return []
    runs: list[tuple[int, int]] = []
    pos = -offset % ZERO_RUN
    while pos + ZERO_RUN <= n:
        end = pos + ZERO_RUN
        if not data[pos] and not data[end - 1] and is_zero(data[pos:end]):
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((pos, end))
        pos = end
    return runs


def _pwrite_all(fd: int, view: memoryview, offset: int, flags: int = 0) -> None:
    while view:
        n = os.pwritev(fd, [view], offset, flags)
        view = view[n:]
        offset += n


class DirtyMap:
    """A live copy's map, shared by every NBD process through a file: two halves of one
    byte per chunk (a byte, not a bit: processes set them without read-modify-write). Writers
    mark the half the copy named last (`half`); the copy reads and clears the other one."""

    def __init__(self, path: str, chunk: int, chunks: int, half: int = 0) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.map = mmap.mmap(fd, 2 * chunks)
        finally:
            os.close(fd)
        self.chunk, self.chunks, self.half = chunk, chunks, half

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset // self.chunk
        last = min((offset + length - 1) // self.chunk, self.chunks - 1)
        if first > last:
            return
        base = self.half * self.chunks
        self.map[base + first : base + last + 1] = b"\x01" * (last - first + 1)

    def close(self) -> None:
        self.map.close()


def filesystem_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    f_type: int = struct.unpack_from("l", buf)[0]
    return f_type & 0xFFFFFFFF


class FileBackend:
    def __init__(self, path: str, *, readonly: bool = False, zero_detection: bool = False) -> None:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.path = path
        self._fd = os.open(path, flags)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        self._size = st.st_size
        self._readonly = readonly
        self._memory = filesystem_type(self._fd) in _MEMORY_FILESYSTEMS
        self._nowait_reads = not self._memory
        self._can_punch = True
        self._can_zero_range = True
        self.zero_detection = zero_detection and not readonly
        self._maps: dict[str, DirtyMap] = {}  # live copies in progress, by name
        self._maps_lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    def refresh(self) -> None:
        """Take the file's current size (after the volume was expanded)."""
        self._size = os.fstat(self._fd).st_size

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def inline_safe(self) -> bool:
        return self._memory

    def try_pread(self, offset: int, length: int) -> bytes | None:
        if self._memory:
            return self.pread(offset, length)
        if not self._nowait_reads:
            return None
        buf = bytearray(length)
        try:
            got = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self._nowait_reads = False
            return None
        # A short read means part of the range is not cached: let a thread do it.
        return bytes(buf) if got == length else None

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        while len(data) < length:  # short reads only happen on signals or odd filesystems
            more = os.pread(self._fd, length - len(data), offset + len(data))
            if not more:  # the file shrank under us: what is missing reads as zero
                return data + bytes(length - len(data))
            data += more
        return data

    def sendfile_fd(self) -> int | None:
        return self._fd

    def sendfile_done(self, nbytes: int, elapsed_ns: int, failed: bool = False) -> None:
        pass

    # -- live copies -------------------------------------------------------------------------

    def track(self, name: str, path: str, chunk: int, chunks: int, half: int = 0) -> None:
        dirty = DirtyMap(path, chunk, chunks, half)
        with self._maps_lock:
            self._maps[name] = dirty

    def track_switch(self, name: str, half: int) -> None:
        with self._maps_lock:
            dirty = self._maps.get(name)
            if dirty is not None:
                dirty.half = half

    def untrack(self, name: str) -> None:
        with self._maps_lock:
            dirty = self._maps.pop(name, None)
        if dirty is not None:
            dirty.close()

    def _changed(self, offset: int, length: int) -> None:
        """After a change is in the file: mark it for the live copies. Unlocked emptiness
        check first: a map added after it means the change was in before the copy began."""
        if self._maps:
            with self._maps_lock:
                for dirty in self._maps.values():
                    dirty.mark(offset, length)

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        view = memoryview(data)
        if self.zero_detection and self._can_punch:
            runs = zero_runs(view, offset)
            if runs:
                return self._write_sparse(view, offset, fua, runs)
        try:
            _pwrite_all(self._fd, view, offset, os.RWF_DSYNC if fua else 0)
        finally:
            self._changed(offset, len(view))  # also a partial write (ENOSPC)

    def _write_sparse(
        self, view: memoryview, offset: int, fua: bool, runs: list[tuple[int, int]]
    ) -> None:
        """A WRITE with its zero `runs` punched instead of written (written after all where
        the filesystem cannot punch). FUA: one fdatasync once all of it is in the file."""
        try:
            pos = 0
            for start, end in [*runs, (len(view), len(view))]:
                if start > pos:
                    _pwrite_all(self._fd, view[pos:start], offset + pos)
                if end > start and not self._punch(offset + start, end - start):
                    _pwrite_all(self._fd, view[start:end], offset + start)
                pos = end
        finally:
            self._changed(offset, len(view))
        self._after_write(fua)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def _punch(self, offset: int, length: int) -> bool:
        """Punch a hole (reads back as zeroes); False where the filesystem cannot."""
        if self._can_punch:
            self._can_punch = _try_fallocate(
                self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length
            )
        return self._can_punch

    def _zero_range(self, offset: int, length: int) -> bool:
        """Zero a range, keeping it allocated; False where the filesystem cannot."""
        if self._can_zero_range:
            self._can_zero_range = _try_fallocate(
                self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length
            )
        return self._can_zero_range

    def trim(self, offset: int, length: int, fua: bool) -> None:
        # TRIM is a hint: a filesystem that cannot punch holes just keeps the data.
        try:
            self._punch(offset, length)
        finally:
            self._changed(offset, length)
        self._after_write(fua)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        try:
            self._zero(offset, length, may_trim, fast, fua)
        finally:
            self._changed(offset, length)

    def _zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        if (may_trim and self._punch(offset, length)) or self._zero_range(offset, length):
            return self._after_write(fua)
        if self._punch(offset, length):
            # NO_HOLE without ZERO_RANGE (tmpfs): punch, then allocate the range again.
            _fallocate(self._fd, FALLOC_FL_KEEP_SIZE, offset, length)
            return self._after_write(fua)
        if fast:
            raise NotFast(errno.EOPNOTSUPP, "zeroing here is no faster than writing")
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.pwrite(memoryview(_ZERO_CHUNK)[:n], offset, False)
            offset += n
        self._after_write(fua)

    def _after_write(self, fua: bool) -> None:
        if fua:
            self.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents from offset, at least one, covering at most `length`."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < MAX_EXTENTS:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: only a hole from pos to the end
                    raise
                data = end
            if data > pos:
                stop = min(data, end)
                out.append((stop - pos, State.HOLE | State.ZERO))
            else:
                stop = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
                out.append((stop - pos, State.DATA))
            pos = stop
        return out

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for name in list(self._maps):
            self.untrack(name)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
