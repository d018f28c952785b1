"""Image files the catalogue does not know: kept aside, never deleted by the node.

Owns DATA/quarantine/: files found without a catalogue row are moved there (a rename on the
same filesystem: instant, nothing copied), one directory per event named by its UTC time,
keeping the directory they came from (`quarantine/20260102T030405Z/volumes/vol-....img`).
Only an administrator removes them (`python -m storage_node quarantine purge ...`); the node
reports how many there are and their size (metrics `nbdcsi_node_quarantined_files` and
`nbdcsi_node_quarantined_bytes`). Plain functions on paths; callers run them off the event
loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from . import files

log = logging.getLogger("storage_node.quarantine")

DIRNAME = "quarantine"
# Where images live: command-line exports, volumes, snapshots, golden images.
IMAGE_DIRS = ("images", "volumes", "snapshots", "golden-images")


def root(data_dir: Path) -> Path:
    return data_dir / DIRNAME


def image_files(data_dir: Path) -> list[Path]:
    """Every file in the image directories (temporaries included)."""
    found: list[Path] = []
    for sub in IMAGE_DIRS:
        d = data_dir / sub
        if d.is_dir():
            found += sorted(p for p in d.iterdir() if p.is_file())
    return found


def move(data_dir: Path, paths: Iterable[Path], reason: str) -> Path | None:
    """Move paths (under data_dir) into a new quarantine batch; returns the batch directory."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    batch = root(data_dir) / stamp
    n = 1
    while batch.exists():
        n += 1
        batch = root(data_dir) / f"{stamp}-{n}"
    for p in paths:
        dest = batch / p.relative_to(data_dir)
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(p, dest)
        log.warning("quarantined %s to %s (%s)", p.relative_to(data_dir), dest, reason)
    for d in {p.parent for p in paths} | {batch}:
        files.fsync_dir(d)
    for d in {(batch / p.relative_to(data_dir)).parent for p in paths}:
        files.fsync_dir(d)
    files.fsync_dir(root(data_dir))
    return batch


def batches(data_dir: Path) -> list[Path]:
    r = root(data_dir)
    return sorted(p for p in r.iterdir() if p.is_dir()) if r.is_dir() else []


def totals(data_dir: Path) -> tuple[int, int]:
    """(files, bytes on disk) in the quarantine."""
    count = size = 0
    for batch in batches(data_dir):
        for p in batch.rglob("*"):
            if p.is_file():
                count += 1
                size += files.allocated_bytes(p)
    return count, size


def main(argv: list[str]) -> int:
    """`python -m storage_node quarantine [--data-dir DIR] list | purge (BATCH... | --all)`"""
    p = argparse.ArgumentParser(
        prog="python -m storage_node quarantine",
        description="List or remove the image files a storage node set aside because its "
        "catalogue had no row for them (docs/storage-node-api.md, Crash safety).",
    )
    p.add_argument("--data-dir", default="nbd-csi-data", type=Path)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every batch with its files and sizes")
    purge = sub.add_parser("purge", help="delete batches for good")
    purge.add_argument("batch", nargs="*", help="batch names as `list` shows them")
    purge.add_argument("--all", action="store_true", help="every batch")
    args = p.parse_args(argv)
    data_dir: Path = args.data_dir.absolute()
    if args.command == "list":
        for batch in batches(data_dir):
            print(batch.name)
            for f in sorted(x for x in batch.rglob("*") if x.is_file()):
                st = f.stat()
                print(f"  {f.relative_to(batch)}  size {st.st_size}  on disk {st.st_blocks * 512}")
        count, size = totals(data_dir)
        print(f"{count} file(s), {size} bytes on disk, in {root(data_dir)}")
        return 0
    if args.all == bool(args.batch):
        p.error("purge takes batch names or --all (not both)")
    known = {b.name: b for b in batches(data_dir)}
    chosen = list(known.values()) if args.all else []
    for name in args.batch:
        if name not in known:
            p.error(f"no quarantine batch {name!r} in {root(data_dir)}")
        chosen.append(known[name])
    for batch in chosen:
        shutil.rmtree(batch)
        print(f"removed {batch}")
    return 0
