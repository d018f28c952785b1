"""Write load and checker for tests/test_durability.py; runs under Debian's python3.

Owns: the two halves of the durability check, both speaking NBD through libnbd (`import nbd`,
which only Debian's /usr/bin/python3 has):

  write   fills one region of the export with self-describing 4 KiB blocks, several aio writes
          in flight, an NBD_CMD_FLUSH after every N completed writes and some writes with FUA.
          When a flush completes, the writes it covers are appended to the log and fsync'd.
          Covered means: the write's reply had arrived before the flush was sent (spec,
          NBD_CMD_FLUSH), or the write carried FUA and its reply has arrived. It runs until the
          server dies under it or the region is full, never for a set time: the test kills the
          server when the log shows the progress it wants, however slow the machine.
  verify  reads the log and checks, through a fresh connection, that every covered block
          reads back exactly, and that every other block it is told about is either all zeros
          (never reached the file) or exactly what was written (never torn, never misplaced).

Block b written in generation g holds MAGIC, g, b, then bytes derived from (g, b), so a block
read back names the write it came from.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import struct
import sys
from collections.abc import Iterator
from typing import Any

BLOCK = 4096
MAGIC = b"NBDCSIDU"
HEADER = struct.Struct("<8sQQ")


def block_bytes(generation: int, block: int) -> bytes:
    header = HEADER.pack(MAGIC, generation, block)
    fill = hashlib.blake2b(header, digest_size=64).digest()
    body = fill * ((BLOCK - len(header)) // len(fill) + 1)
    return header + body[: BLOCK - len(header)]


def load_nbd() -> Any:
    # Imported by name: the module exists only for Debian's interpreter, not for mypy's.
    return importlib.import_module("nbd")


class Log:
    """Append-only JSON lines, each fsync'd before the writer goes on."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def append(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def write(args: argparse.Namespace) -> int:
    nbd = load_nbd()
    h = nbd.NBD()
    h.connect_uri(args.uri)
    log = Log(args.log)
    print("connected", flush=True)

    gen, first, end = args.generation, args.first_block, args.first_block + args.blocks
    writes: dict[int, tuple[int, bool, bytes]] = {}  # cookie -> (block, fua, buffer kept alive)
    flushes: dict[int, int] = {}  # cookie -> index of the snapshot it covers
    snapshots: list[list[int]] = []  # blocks completed between two flush submissions
    completed_since_flush: list[int] = []
    logged_snapshots = 0
    stats = {"issued": 0, "completed": 0, "flushes": 0, "covered": 0}
    next_block = first
    reason = ""
    try:
        while True:
            while len(writes) < args.in_flight and next_block < end:
                fua = args.fua_every > 0 and next_block % args.fua_every == 0
                buf = block_bytes(gen, next_block)
                cookie = h.aio_pwrite(buf, next_block * BLOCK, flags=nbd.CMD_FLAG_FUA if fua else 0)
                writes[cookie] = (next_block, fua, buf)
                next_block += 1
                stats["issued"] += 1
            if not writes and not flushes:
                reason = "region full"
                break
            h.poll(1000)

            durable_now: list[int] = []
            for cookie in [c for c in writes if h.aio_command_completed(c)]:
                block, fua, _ = writes.pop(cookie)
                stats["completed"] += 1
                # A FUA write is durable once its reply is in; any other waits for a flush.
                (durable_now if fua else completed_since_flush).append(block)
            if len(completed_since_flush) >= args.flush_every or (
                next_block >= end and not writes and completed_since_flush
            ):
                snapshots.append(completed_since_flush)
                completed_since_flush = []
                flushes[h.aio_flush()] = len(snapshots) - 1
            newest_done = -1
            for cookie in [c for c in flushes if h.aio_command_completed(c)]:
                newest_done = max(newest_done, flushes.pop(cookie))
                stats["flushes"] += 1
            # A completed flush covers its own snapshot and every earlier one.
            while logged_snapshots <= newest_done:
                durable_now.extend(snapshots[logged_snapshots])
                snapshots[logged_snapshots] = []
                logged_snapshots += 1
            if durable_now:
                log.append({"gen": gen, "blocks": sorted(durable_now)})
                stats["covered"] += len(durable_now)
    except nbd.Error as e:
        # The expected end: the server was killed under us.
        reason = f"connection lost: {e.string}"
    finally:
        log.close()
    print(json.dumps({"reason": reason, "next_block": next_block, **stats}), flush=True)
    return 0


def covered_blocks(log_path: str) -> dict[int, int]:
    """block -> generation for every write the log says is durable."""
    covered: dict[int, int] = {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            for b in record["blocks"]:
                covered[b] = record["gen"]
    return covered


def runs(blocks: list[int], max_blocks: int) -> Iterator[tuple[int, int]]:
    """Contiguous (first, count) runs of sorted block numbers, at most max_blocks long."""
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1 and j + 1 - i < max_blocks:
            j += 1
        yield blocks[i], j - i + 1
        i = j + 1


def verify(args: argparse.Namespace) -> int:
    nbd = load_nbd()
    covered = covered_blocks(args.log)
    # Blocks the last generation may have written but not had covered: zero or exact.
    maybe: dict[int, int] = {}
    for spec in args.maybe or []:
        gen, first, count = (int(x) for x in spec.split(":"))
        maybe.update({b: gen for b in range(first, first + count) if b not in covered})

    h = nbd.NBD()
    h.connect_uri(args.uri)
    zero = bytes(BLOCK)
    bad: list[dict[str, Any]] = []
    counts = {"covered": len(covered), "maybe_written": 0, "maybe_zero": 0}
    for first, count in runs(sorted(covered.keys() | maybe.keys()), 256):
        data = h.pread(count * BLOCK, first * BLOCK)
        for i in range(count):
            b = first + i
            got = bytes(data[i * BLOCK : (i + 1) * BLOCK])
            if b in covered:
                if got != block_bytes(covered[b], b):
                    bad.append(describe(b, covered[b], got, "covered by a flush"))
            elif got == zero:
                counts["maybe_zero"] += 1
            elif got == block_bytes(maybe[b], b):
                counts["maybe_written"] += 1
            else:
                bad.append(describe(b, maybe[b], got, "not covered, but neither zero nor exact"))
    h.shutdown()
    print(json.dumps({**counts, "bad": len(bad), "first_bad": bad[:10]}), flush=True)
    return 1 if bad else 0


def describe(block: int, gen: int, got: bytes, why: str) -> dict[str, Any]:
    magic, g, b = HEADER.unpack(got[: HEADER.size])
    return {
        "block": block,
        "expected_gen": gen,
        "why": why,
        "found": {"magic": magic.hex(), "gen": g, "block": b, "zero": got == bytes(BLOCK)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("write")
    w.add_argument("uri")
    w.add_argument("log")
    w.add_argument("--generation", type=int, required=True)
    w.add_argument("--first-block", type=int, required=True)
    w.add_argument("--blocks", type=int, required=True)
    w.add_argument("--in-flight", type=int, default=16)
    w.add_argument("--flush-every", type=int, default=32)
    w.add_argument("--fua-every", type=int, default=7)
    v = sub.add_parser("verify")
    v.add_argument("uri")
    v.add_argument("log")
    v.add_argument("--maybe", action="append", metavar="GEN:FIRST:COUNT")
    args = p.parse_args(argv)
    return write(args) if args.mode == "write" else verify(args)


if __name__ == "__main__":
    sys.exit(main())
