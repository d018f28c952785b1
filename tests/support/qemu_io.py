"""qemu-io, Debian's QEMU block I/O tool, as the tests' independent NBD client: run commands
against a URI and fail the test on a non-zero exit or a "failed" in its output."""

from __future__ import annotations

import subprocess


def qemu_io(uri: str, *commands: str, fmt: str = "raw", read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", fmt, *(["-r"] if read_only else [])]
    for c in commands:
        argv += ["-c", c]
    result = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"qemu-io {commands}: {result.stdout}{result.stderr}"
    assert "failed" not in result.stdout, result.stdout
    return result.stdout
