"""Snapshots and clones of a volume that is being written: one point in time, and the
volume's I/O held only briefly (docs/storage-node-api.md, "Live snapshots and clones").

A writer sends numbered 4 KiB records to the volume over NBD, one at a time, until the test
tells it to stop; meanwhile the test takes a snapshot and a clone of the volume. Each copy
must hold exactly the records 0..K-1 for some K (a prefix of the writes: every record before
K in its place, none after), on ext4 (no reflink: the copy runs while writes go on, with
change tracking and a short held catch-up) and on XFS (reflink). The copy's point in time
must lie inside the call; on ext4, most records acknowledged during the call must be in the
copy (the writes went on while it copied, instead of waiting for it). The longest write
stall of each copy is printed, with the node's log line saying how long it held the I/O.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import ApiNode, api_node
from tests.support.filesystems import loop_filesystem
from tests.support.qemu_io import qemu_io
from tests.support.rawnbd import RawClient

pytestmark = pytest.mark.slow

MiB = 1 << 20
BLOCK = 4096
SIZE = 256 * MiB
BLOCKS = SIZE // BLOCK
STRIDE = 7919  # prime: record k lands on block k * STRIDE % BLOCKS, all over the volume
MAGIC = 0x5EC0_5EC0_5EC0_5EC0
PREFILL = 0xAA
WRITE = 1


def block_of(k: int) -> int:
    return k * STRIDE % BLOCKS


def record(k: int) -> bytes:
    head = struct.pack(">QQ", MAGIC, k)
    return head + bytes([k % 251]) * (BLOCK - len(head))


@dataclass
class Writer:
    """Writes record after record (queue depth 1) until stopped; keeps each one's times."""

    client: RawClient
    stop: threading.Event = field(default_factory=threading.Event)
    sent: list[float] = field(default_factory=list)
    acked: list[float] = field(default_factory=list)
    error: BaseException | None = None
    progress: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        try:
            k = 0
            while not self.stop.is_set():
                self.sent.append(time.monotonic())
                reply = self.client.call(WRITE, k, block_of(k) * BLOCK, BLOCK, payload=record(k))
                assert reply.error == 0, reply.error
                self.acked.append(time.monotonic())
                k += 1
                with self.progress:
                    self.progress.notify_all()
        except BaseException as exc:
            self.error = exc

    def wait_for(self, n: int) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: len(self.acked) >= n or self.error, 120)
        assert self.error is None, self.error


def point_in_time(image: Path) -> int:
    """K such that the image holds exactly records 0..K-1; fails if it is not a prefix."""
    data = image.read_bytes()
    assert len(data) >= SIZE
    found: dict[int, int] = {}
    for b in range(BLOCKS):
        magic, k = struct.unpack_from(">QQ", data, b * BLOCK)
        if magic == MAGIC:
            found[b] = k
        else:
            assert data[b * BLOCK : (b + 1) * BLOCK] == bytes([PREFILL]) * BLOCK, f"block {b}"
    count = max(found.values()) + 1 if found else 0
    # Records never wrap within a test (far fewer than BLOCKS): each block holds at most one.
    assert count < BLOCKS
    for k in range(count):
        b = block_of(k)
        assert found.get(b) == k, f"record {k} missing from block {b}: a hole in the prefix"
        assert data[b * BLOCK : (b + 1) * BLOCK] == record(k), f"record {k} torn"
    assert len(found) == count
    return count


@dataclass
class Taken:
    what: str
    image: Path
    start: float
    end: float


def take(writer: Writer, what: str, call: Callable[[], Path]) -> Taken:
    writer.wait_for(len(writer.acked) + 100)  # the writer is in full swing
    start = time.monotonic()
    image = call()
    end = time.monotonic()
    writer.wait_for(len(writer.acked) + 100)  # and keeps going after
    return Taken(what, image, start, end)


def check(writer: Writer, t: Taken, copies: bool) -> None:
    k = point_in_time(t.image)
    acked_before = sum(1 for a in writer.acked if a < t.start)
    sent_before_end = sum(1 for s in writer.sent if s < t.end)
    # The point in time lies inside the call.
    assert acked_before <= k <= sent_before_end, (acked_before, k, sent_before_end)
    # Records acknowledged during the call: in the copy, or after its point in time.
    during = [i for i, a in enumerate(writer.acked) if t.start <= a <= t.end]
    inside = sum(1 for i in during if i < k)
    after = len(during) - inside
    stalls = [
        a - s
        for s, a in zip(writer.sent, writer.acked, strict=False)
        if t.start <= a and s <= t.end
    ]
    print(
        f"{t.what}: call {1000 * (t.end - t.start):.0f} ms, point in time after record "
        f"{k - 1}; {len(during)} writes acknowledged during the call, {inside} of them in "
        f"the copy; longest write stall {1000 * max(stalls):.1f} ms"
    )
    if copies:
        # Held for the whole copy, the writes of the call that are in the copy are only those
        # of the moments before the hold began (49 with the old code on an idle machine),
        # and the rest wait for the copy; copying while writes go on, every write of the
        # copy's passes is in it (1458 on the same machine, 2000 to 30000 when loaded). What
        # comes after the point in time depends on the filesystem's fsync (ext4's journal
        # also waits for the volume's own writeback), so it is printed, not compared. Where
        # blocks are shared the call is too short for these counts to say anything.
        assert inside >= 200, (inside, after)


def run_scenario(node: ApiNode, data: Path, copies: bool) -> None:
    api = node.api
    vol = api.create_volume("live", SIZE)
    att = api.publish(vol.id)
    qemu_io(att.uri, f"write -P {PREFILL} 0 {SIZE}", "flush")
    client = RawClient(node.nbd_port, timeout=120).connect(att.export_name)
    writer = Writer(client)
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    try:

        def snapshot() -> Path:
            snap = api.CreateSnapshot(pb.CreateSnapshotRequest(name="live-snap", volume_id=vol.id))
            assert snap.ready
            return data / "snapshots" / f"{snap.id}.img"

        def clone() -> Path:
            c = api.create_volume("live-clone", SIZE, volume_id=vol.id)
            assert c.state == pb.VOLUME_STATE_READY
            return data / "volumes" / f"{c.id}.img"

        taken = [take(writer, "snapshot", snapshot), take(writer, "clone", clone)]
    finally:
        writer.stop.set()
        thread.join(120)
        client.close()
    assert writer.error is None, writer.error
    for t in taken:
        check(writer, t, copies)
    held = [line for line in node.log_text().splitlines() if "live copy of" in line]
    print("\n".join(held))
    assert len(held) == 2, node.log_text()[-4000:]


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    with loop_filesystem(tmp_path, "ext4", 1024 * MiB) as mnt:
        yield mnt


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    with loop_filesystem(tmp_path, "xfs", 1024 * MiB, "-m", "reflink=1") as mnt:
        yield mnt


def test_live_snapshot_and_clone_on_ext4(ext4: Path) -> None:
    with api_node(ext4 / "node", workers=2) as node:
        run_scenario(node, ext4 / "node", copies=True)
    assert not list((ext4 / "node").rglob("*.tmp"))
    assert not list((ext4 / "node" / "copy-maps").iterdir())


def test_live_snapshot_and_clone_on_xfs(xfs: Path) -> None:
    with api_node(xfs / "node", workers=2) as node:
        run_scenario(node, xfs / "node", copies=False)
