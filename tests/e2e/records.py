"""The kernel-path guests' workload: numbered, self-verifying 4 KiB records on a block device.

Owns the record format (record N sits at byte N * RECORD, its bytes a function of the volume's
tag and N, so any reader can check it without a copy of what was written), the writer loop the
guest runs on the device that NodePublishVolume bound (`python -m tests.e2e.records write ...`),
and the read-back check used both inside the guests and on the host.

The writer opens the device with O_DIRECT, and for each record: writes it, fsyncs (a FLUSH
that reaches the storage node), reads it back with O_DIRECT and compares; only then prints
`E2E-WL ACK N` on its stdout (the guest's serial console, where the host stamps each line with
its own clock). A failed call prints `E2E-WL IOERR N ERRNO` and the same record is tried again;
a read-back that differs prints `E2E-WL MISMATCH N`. It runs until the stop file exists, then
writes a JSON summary (first and last acknowledged record, counts, the longest time one record
took) and exits 0. Standard library only: it also runs under Debian's python3 in nbdsh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

RECORD = 4096
# The device's last MiB is never used by records: the fence probes write there.
RESERVED = 1024 * 1024
PREFIX = "E2E-WL"
# Seconds between tries of a record whose write failed: a bound on a failing loop, not a wait.
RETRY_PAUSE = 0.2


def record(tag: str, n: int) -> bytes:
    """The 4096 bytes of record `n` of the volume tagged `tag`."""
    header = f"NBDCSI-E2E-REC {tag} {n:012d}\n".encode()
    fill = hashlib.sha256(f"{tag}:{n}".encode()).digest() * (RECORD // 32)
    return header + fill[len(header) :]


def capacity(size: int) -> int:
    """How many records fit on a device of `size` bytes."""
    return (size - RESERVED) // RECORD


def probe_offset(size: int) -> int:
    """The block the fence probes write to: inside the reserved tail, never a record."""
    return size - RECORD


def probe_block(label: str) -> bytes:
    """What a fence probe writes: `label`, padded to a block."""
    return label.encode().ljust(RECORD, b"\0")


def check(tag: str, first: int, data: bytes) -> list[int]:
    """Records first, first+1, ... laid end to end in `data`: the numbers that are wrong."""
    return [
        first + i
        for i in range(len(data) // RECORD)
        if data[i * RECORD : (i + 1) * RECORD] != record(tag, first + i)
    ]


def _aligned(length: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT wants."""
    return mmap.mmap(-1, length)


def verify_device(path: str, tag: str, first: int, last: int, chunk: int = 256) -> list[int]:
    """Read records first..last back from the device with O_DIRECT; the numbers that differ."""
    bad: list[int] = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = _aligned(chunk * RECORD)
        n = first
        while n <= last:
            count = min(chunk, last - n + 1)
            view = memoryview(buf)[: count * RECORD]
            got = os.preadv(fd, [view], n * RECORD)
            if got != count * RECORD:
                raise OSError(f"short read of records {n}..{n + count - 1}: {got} bytes")
            bad += check(tag, n, bytes(view))
            view.release()
            n += count
    finally:
        os.close(fd)
    return bad


def write_loop(
    path: str, tag: str, first: int, stop_file: Path, say: Callable[[str], None] = print
) -> dict[str, object]:
    """Write records from `first` on until `stop_file` exists; returns the summary."""
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        limit = capacity(os.lseek(fd, 0, os.SEEK_END))
        out, back = _aligned(RECORD), _aligned(RECORD)
        n, errors, mismatches, longest = first, 0, 0, 0.0
        while not stop_file.exists():
            if n >= limit:
                say(f"{PREFIX} FULL {n}")
                errors += 1
                break
            out[:] = record(tag, n)
            started = time.monotonic()
            try:
                os.pwrite(fd, out, n * RECORD)
                os.fsync(fd)
                os.preadv(fd, [back], n * RECORD)
            except OSError as exc:
                errors += 1
                say(f"{PREFIX} IOERR {n} {exc.errno}")
                time.sleep(RETRY_PAUSE)
                continue
            if back[:] != out[:]:
                mismatches += 1
                say(f"{PREFIX} MISMATCH {n}")
                time.sleep(RETRY_PAUSE)
                continue
            longest = max(longest, time.monotonic() - started)
            say(f"{PREFIX} ACK {n}")
            n += 1
    finally:
        os.close(fd)
    return {
        "first": first,
        "last": n - 1,
        "acked": n - first,
        "errors": errors,
        "mismatches": mismatches,
        "longest_record_seconds": round(longest, 3),
    }


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write records until the stop file exists")
    w.add_argument("device")
    w.add_argument("--tag", required=True)
    w.add_argument("--first", type=int, default=0)
    w.add_argument("--stop-file", type=Path, required=True)
    w.add_argument("--summary", type=Path, required=True)
    args = p.parse_args(list(argv) if argv is not None else None)

    def say(text: str) -> None:
        print(text, flush=True)

    summary = write_loop(args.device, args.tag, args.first, args.stop_file, say)
    tmp = args.summary.with_name(args.summary.name + ".tmp")
    tmp.write_text(json.dumps(summary))
    tmp.rename(args.summary)
    say(f"{PREFIX} STOPPED {summary['last']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
