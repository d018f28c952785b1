"""Image file operations of the control path: create, clone, copy, remove, measure.

Owns how one image becomes another. `clone` shares blocks with FICLONE (reflink: instant,
XFS and btrfs) and otherwise copies only the allocated ranges (SEEK_DATA/SEEK_HOLE plus
copy_file_range), so holes stay holes. Every new file is written under a temporary name and
renamed into place after fsync, so a crash never leaves a half-made image under a real name.
`LiveCopy` copies an image that is being written (snapshots and clones of a volume in use),
catching up what changes during the copy.
All of these block: callers run them in an executor or in a low-priority child process
(`python -m storage_node.files copy SRC DST`, used for background copies).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from .backend.file import punch_hole

FICLONE = 0x40049409
PR_SET_PDEATHSIG = 1
TMP_SUFFIX = ".tmp"
_CHUNK = 8 * 1024 * 1024
_TEMPORARY = re.compile(r"^.+\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX) + "$")


def temporary(final: Path) -> Path:
    """A temporary name next to `final`, unique to this attempt: a copy left running by a
    crashed node can never write into, or rename, the file of a later attempt."""
    return final.with_name(f"{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temporary(path: Path) -> bool:
    """A name `temporary` made: a copy or a new file not yet renamed into place."""
    return bool(_TEMPORARY.match(path.name))


def max_file_size(directory: Path) -> int:
    """The largest file the filesystem of `directory` allows, in whole 4 KiB blocks (ext4
    with 4 KiB blocks: 16 TiB - 4 KiB), found by growing an empty sparse file: ftruncate
    fails with EFBIG (or EINVAL) past the limit, and allocates nothing below it."""
    probe = temporary(directory / ".max-file-size")
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.unlink(probe)
        low, high = 0, 1 << 51  # in blocks: 2^63 bytes, the largest off_t, is the ceiling
        while high - low > 1:
            mid = (low + high) // 2
            try:
                os.ftruncate(fd, mid * 4096)
                low = mid
            except OSError as exc:
                if exc.errno not in (errno.EFBIG, errno.EINVAL):
                    raise
                high = mid
        return low * 4096
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _create(path: Path) -> BinaryIO:
    """A new file for the node alone (0600, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def create_sparse(path: Path, size: int) -> None:
    tmp = temporary(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    _commit(tmp, path)


def try_reflink(src: Path, dst: Path) -> bool:
    """Share all of src's blocks with a new dst; False where the filesystem cannot."""
    with open(src, "rb") as s, _create(dst) as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                return False
            raise
        os.fsync(d.fileno())
    return True


def _copy_allocated(s: int, d: int, start: int, end: int) -> int:
    """Copy the allocated ranges of fd s within [start, end) to the same offsets of fd d;
    returns the bytes copied. Holes are skipped (d keeps what it has there)."""
    copied = 0
    pos = start
    while pos < end:
        try:
            data = os.lseek(s, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(s, data, os.SEEK_HOLE), end)
        off = data
        while off < hole:
            n = os.copy_file_range(s, d, min(_CHUNK, hole - off), off, off)
            if n == 0:
                break
            off += n
            copied += n
        pos = hole
    return copied


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy the allocated ranges of src into a new dst of the same size."""
    with open(src, "rb") as s, _create(dst) as d:
        size = os.fstat(s.fileno()).st_size
        os.ftruncate(d.fileno(), size)
        _copy_allocated(s.fileno(), d.fileno(), 0, size)
        os.fsync(d.fileno())


# Dirty-map granularity: a block (4 KiB, what a guest writes most) for volumes up to 16 GiB,
# coarser above, so a map half never exceeds 4 Mi chunks (4 MiB).
MIN_MAP_CHUNK = 4096
MAX_MAP_CHUNKS = 1 << 22
_DIRTY_RUN = re.compile(rb"[^\x00]+")


def map_geometry(size: int) -> tuple[int, int]:
    """(chunk, chunks) of a dirty map for a file of `size` bytes."""
    chunk = MIN_MAP_CHUNK
    while size > chunk * MAX_MAP_CHUNKS:
        chunk *= 2
    return chunk, max(1, -(-size // chunk))


class LiveCopy:
    """A point-in-time copy of an image that is being written, without holding its I/O for
    the copy: the first pass copies while writes go on, every NBD process marks what it
    changes in a shared dirty map (storage_node.backend.file.DirtyMap) and each catch-up pass
    copies the marked chunks again (a chunk marked is punched in the copy, then its
    allocated ranges copied, so trims and zeroes are copied too). Only the last catch-up runs
    with the volume's requests held. Blocking methods: run them in an executor.

    The map (a file next to nothing the catalogue knows, under DATA/copy-maps) has two halves;
    writers mark the half named last, the copy reads and clears the other one, so no mark
    made during a pass is lost."""

    def __init__(self, src: Path, dst: Path, map_path: Path) -> None:
        self.src, self.dst, self.map_path = src, dst, map_path
        self.tmp = temporary(dst)
        self.size = os.stat(src).st_size
        self.chunk, self.chunks = map_geometry(self.size)
        map_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(map_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Allocated now: a full filesystem fails here, never as SIGBUS in a writer.
            os.posix_fallocate(fd, 0, 2 * self.chunks)
            self.map = mmap.mmap(fd, 2 * self.chunks)
        except BaseException:
            os.close(fd)
            map_path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._s = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        self._d = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def first_pass(self) -> int:
        os.ftruncate(self._d, self.size)
        return _copy_allocated(self._s, self._d, 0, self.size)

    def catch_up(self, half: int) -> int:
        """Copy the chunks marked in `half` (no writer may mark it now) and clear them;
        returns the bytes of those chunks."""
        base = half * self.chunks
        view = memoryview(self.map)[base : base + self.chunks]
        total = 0
        try:
            for run in _DIRTY_RUN.finditer(view):
                start = run.start() * self.chunk
                end = min(run.end() * self.chunk, self.size)
                punch_hole(self._d, start, end - start)
                _copy_allocated(self._s, self._d, start, end)
                total += end - start
                view[run.start() : run.end()] = bytes(run.end() - run.start())
        finally:
            view.release()
        return total

    def sync(self) -> None:
        os.fsync(self._d)

    def commit(self, size: int | None = None) -> None:
        """Grow to `size`, make it durable and rename it into place."""
        if size is not None and size > self.size:
            os.ftruncate(self._d, size)
        os.fsync(self._d)
        self.close()
        _commit(self.tmp, self.dst)

    def close(self) -> None:
        """Release the map and the descriptors; remove the map (the copy stays as it is)."""
        for fd in (self._s, self._d):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._s = self._d = -1
        if not self.map.closed:
            self.map.close()
        self.map_path.unlink(missing_ok=True)

    def abort(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)


def clone(src: Path, dst: Path, size: int | None = None) -> bool:
    """Make dst a point-in-time copy of src (grown to `size`). True if it was a reflink."""
    tmp = temporary(dst)
    try:
        shared = try_reflink(src, tmp)
        if not shared:
            sparse_copy(src, tmp)
        if size is not None and size > os.stat(tmp).st_size:
            os.truncate(tmp, size)
    except BaseException:
        # A failed copy (ENOSPC, say) leaves no temporary behind to hold the space.
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, dst)
    return shared


def copy_in_background(src: Path, dst: Path, size: int | None = None) -> None:
    """`clone` in a child process at the lowest CPU and I/O priority, so VM I/O goes first."""
    argv = [sys.executable, "-m", "storage_node.files", "copy", str(src), str(dst)]
    if size is not None:
        argv.append(str(size))
    result = subprocess.run(_lowest_priority(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(f"copying {src.name} failed: {result.stderr.strip()[-500:]}")


def convert_image(source: list[str], dst: Path, pass_fds: tuple[int, ...] = ()) -> None:
    """A raw image, with qemu-img at the lowest priority, from `source`: qemu-img arguments
    that name the input and its format (storage_node.imports.qemu_source: never probed)."""
    tmp = temporary(dst)
    argv = ["qemu-img", "convert", "-O", "raw", "-S", "4k", *source, str(tmp)]
    result = subprocess.run(
        _lowest_priority(argv), capture_output=True, text=True, check=False, pass_fds=pass_fds
    )
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"qemu-img convert failed: {result.stderr.strip()[-500:]}")
    with open(tmp, "rb+") as f:
        os.fchmod(f.fileno(), 0o600)  # qemu-img creates it 0666 less the umask
        os.fsync(f.fileno())
    _commit(tmp, dst)


def _lowest_priority(argv: list[str]) -> list[str]:
    """Run argv at the lowest CPU and I/O priority. Commands, not a preexec_fn: a fork
    handler in a process that runs gRPC threads is best avoided."""
    return ["nice", "-n", "19", "ionice", "-c", "3", *argv]


def remove(path: Path) -> None:
    for p in (path, *path.parent.glob(f"{path.name}.*{TMP_SUFFIX}")):
        p.unlink(missing_ok=True)
    fsync_dir(path.parent)


def allocated_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def image_size(path: Path) -> int:
    return os.stat(path).st_size


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "copy":
        # Die with the node: a copy outliving a crash would only waste I/O.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            clone(Path(argv[1]), Path(argv[2]), int(argv[3]) if len(argv) > 3 else None)
        except OSError as exc:
            # One line for the volume's error field: no traceback, no directory names.
            name = Path(exc.filename).name if exc.filename else ""
            print(f"{exc.strerror or exc}{f': {name}' if name else ''}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m storage_node.files copy SRC DST [SIZE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
