"""Image file operations of the control path: create, clone, copy, remove, measure.

Owns how one image becomes another. `clone` shares blocks with FICLONE (reflink: instant,
XFS and btrfs) and otherwise copies only the allocated ranges (SEEK_DATA/SEEK_HOLE plus
copy_file_range), so holes stay holes. Every new file is written under a temporary name and
renamed into place after fsync, so a crash never leaves a half-made image under a real name.
All of these block: callers run them in an executor or in a low-priority child process
(`python -m storage_node.files copy SRC DST`, used for background copies).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

FICLONE = 0x40049409
PR_SET_PDEATHSIG = 1
TMP_SUFFIX = ".tmp"
_CHUNK = 8 * 1024 * 1024


def temporary(final: Path) -> Path:
    """A temporary name next to `final`, unique to this attempt: a copy left running by a
    crashed node can never write into, or rename, the file of a later attempt."""
    return final.with_name(f"{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


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


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy the allocated ranges of src into a new dst of the same size."""
    with open(src, "rb") as s, _create(dst) as d:
        size = os.fstat(s.fileno()).st_size
        os.ftruncate(d.fileno(), size)
        pos = 0
        while pos < size:
            try:
                data = os.lseek(s.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(s.fileno(), data, os.SEEK_HOLE)
            off = data
            while off < hole:
                n = os.copy_file_range(s.fileno(), d.fileno(), min(_CHUNK, hole - off), off, off)
                if n == 0:
                    break
                off += n
            pos = hole
        os.fsync(d.fileno())


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
