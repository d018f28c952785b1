"""Real filesystems for tests that depend on one (reflink on XFS, ext4's file size limit, a
full disk): mounted on a loop device over a sparse file in the test's directory, unmounted
after. Needs root; without it, or when the kernel refuses the mount, the test is skipped
(which the suite turns into a failure under NBD_CSI_NO_SKIP)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(mountpoint: Path, *argv: str) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    result = subprocess.run(["mount", *argv, str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(argv)}): {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
                break
            subprocess.run(["sleep", "0.1"], check=False)
        else:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@contextlib.contextmanager
def loop_filesystem(workdir: Path, fstype: str, size: int, *mkfs_args: str) -> Iterator[Path]:
    """A fresh `fstype` filesystem of `size` bytes (`mkfs.FSTYPE -q MKFS_ARGS`), mounted at
    WORKDIR/mnt for the block."""
    mkfs = f"mkfs.{fstype}"
    if shutil.which(mkfs) is None and shutil.which(mkfs, path="/usr/sbin:/sbin") is None:
        pytest.skip(f"{mkfs} is missing")
    backing = workdir / f"{fstype}.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    subprocess.run([mkfs, "-q", *mkfs_args, str(backing)], check=True)
    with mounted(workdir / "mnt", "-o", "loop", str(backing)) as mnt:
        yield mnt
