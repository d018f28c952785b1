"""Which files ImportImage may read, and what they are, without letting an image choose.

Owns the safety of golden image imports (docs/storage-node-api.md, "Golden images"). A request
names a file; it is read only when it resolves (symlinks and `..` included) to a regular file
inside the node's `--import-dir`. The file is opened once and every later step works on that
open file (`/dev/fd/N` for qemu-img), so swapping a path component for a symlink after the
check changes nothing. The format is the one asked for, or detected here from the magic
number (qcow2 or else raw): never qemu's probing. A qcow2 with a backing file or an external
data file is refused: either would make the golden image, and every clone of it, read some
other file on the node (another tenant's volume). The conversion opens the qcow2 with its
backing forced off as a second fence. Blocking: callers run these in an executor.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import FailedPrecondition, InvalidArgument

QCOW2_MAGIC = b"QFI\xfb"
# qcow2 header (docs/interop/qcow2.txt in QEMU): backing_file_offset at 8 (u64), version at 4;
# version 3 adds incompatible_features at 72, whose bit 2 is "external data file".
_QCOW2_HEADER = 104
_EXTERNAL_DATA_FILE = 1 << 2
INFO_TIMEOUT = 60.0


@dataclass(frozen=True)
class Source:
    """An opened import file: its descriptor, its resolved path and its format."""

    fd: int
    path: Path
    fmt: str

    @property
    def proc_path(self) -> str:
        """The open file as a path a child given `pass_fds=[fd]` can open."""
        return f"/dev/fd/{self.fd}"


def disabled() -> FailedPrecondition:
    return FailedPrecondition(
        "ImportImage is disabled on this storage node: start it with --import-dir DIR and "
        "put the image files in DIR"
    )


@contextlib.contextmanager
def open_source(import_dir: Path | None, requested: str, fmt: str) -> Iterator[Source]:
    """Open `requested` if it is a regular file inside `import_dir`, and check its format.
    Raises InvalidArgument (FailedPrecondition when imports are disabled)."""
    if import_dir is None:
        raise disabled()
    if not os.path.isabs(requested):
        raise InvalidArgument(f"path must be absolute, got {requested!r}")
    base = Path(os.path.realpath(import_dir))
    resolved = Path(os.path.realpath(requested))
    if not _inside(resolved, base):
        raise InvalidArgument(
            f"{requested} is not inside the import directory {base}: ImportImage reads only "
            "files there (symlinks and '..' leading out of it are refused)"
        )
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"{requested} is not a file on this storage node") from None
    except OSError as exc:
        raise InvalidArgument(f"{requested} cannot be opened: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{requested} is not a regular file")
        # What was opened, not what the path says now: a directory swapped for a symlink
        # between the check above and the open is caught here.
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not _inside(opened, base):
            raise InvalidArgument(f"{requested} is not inside the import directory {base}")
        yield Source(fd, opened, check_format(fd, fmt, requested))
    finally:
        os.close(fd)


def _inside(path: Path, base: Path) -> bool:
    return path != base and path.is_relative_to(base)


def check_format(fd: int, fmt: str, what: str) -> str:
    """The format to read the file as: `fmt`, or from the magic number when it is empty.
    A qcow2 must stand alone (no backing file, no external data file)."""
    header = os.pread(fd, _QCOW2_HEADER, 0)
    is_qcow2 = header[:4] == QCOW2_MAGIC
    if not fmt:
        fmt = "qcow2" if is_qcow2 else "raw"
    if fmt == "qcow2":
        if not is_qcow2 or len(header) < 72:
            raise InvalidArgument(f"{what} is not a qcow2 image (no qcow2 header)")
        version = int.from_bytes(header[4:8], "big")
        if int.from_bytes(header[8:16], "big") != 0:
            raise InvalidArgument(
                f"{what} has a backing file: images with a backing file are refused "
                "(flatten it first: qemu-img convert -O qcow2 SRC DST)"
            )
        features = int.from_bytes(header[72:80], "big") if version >= 3 else 0
        if features & _EXTERNAL_DATA_FILE:
            raise InvalidArgument(
                f"{what} has an external data file: such images are refused "
                "(convert it to a standalone image first)"
            )
    return fmt


def inspect(source: Source) -> int:
    """`qemu-img info` on the open file with its format given: qemu's own view must agree that
    the image stands alone. Returns the virtual size."""
    argv = ["qemu-img", "info", "--output=json", "-f", source.fmt, source.proc_path]
    result = subprocess.run(
        argv,
        pass_fds=[source.fd],
        capture_output=True,
        text=True,
        timeout=INFO_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise InvalidArgument(
            f"{source.path.name} is not a valid {source.fmt} image: {result.stderr.strip()[-300:]}"
        )
    info = json.loads(result.stdout)
    data = info.get("format-specific", {}).get("data", {})
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InvalidArgument(f"{source.path.name} has a backing file: refused")
    if data.get("data-file"):
        raise InvalidArgument(f"{source.path.name} has an external data file: refused")
    return int(info["virtual-size"])


def qemu_source(source: Source) -> list[str]:
    """qemu-img arguments that read the open file as its format and nothing else."""
    if source.fmt == "qcow2":
        spec = {
            "driver": "qcow2",
            "backing": None,
            "file": {"driver": "file", "filename": source.proc_path},
        }
        return ["json:" + json.dumps(spec)]
    return ["-f", source.fmt, source.proc_path]
