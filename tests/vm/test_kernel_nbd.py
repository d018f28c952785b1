"""Real-kernel and QEMU-client tests of the NBD server, each inside a qemu-system guest (TCG).

Owns two end-to-end paths the CSI driver depends on:

- the Linux kernel NBD client (Debian's kernel, driven by Debian's nbd-client, one and two
  connections) reaching the server through QEMU's guestfwd, as the CSI node plugin will;
- QEMU's own NBD block driver (`-drive file=nbd://...`) serving a guest's virtio disk.

Each test writes a pattern the host generated (deterministic seed) at offsets that include the
first and the last block, reads it back through the device with O_DIRECT, and after the guest and
then the server (SIGTERM) have stopped, compares the whole image file with what it must now hold.
Server under test: see conftest.py (NBD_VM_SERVER). Run with `pytest -m vm tests/vm`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vm.conftest import ServedExport
from tests.vm.guest import GUEST_NBD_ADDR, GUEST_NBD_PORT, GuestImage, GuestResult

pytestmark = pytest.mark.vm

BLOCK = 4096  # nbd-client -b; every region is aligned to it (O_DIRECT needs that)
CHUNK = 256 * 1024
KIB, MIB = 1024, 1024 * 1024
# Guests only ever see the block device; the host sees the file. Regions avoid each other.
LAYOUT = (
    (0, 64 * KIB),  # first blocks (where a partition table would go)
    (1 * MIB + 12 * KIB, 192 * KIB),  # block-aligned but not MiB-aligned
    (31 * MIB + 8 * KIB, 2 * MIB),  # across the 32 MiB boundary
    (64 * MIB - 128 * KIB, 128 * KIB),  # the last bytes of the export
)


@dataclass(frozen=True)
class Region:
    name: str
    offset: int
    data: bytes
    skip: int  # where the region starts in the data file the guest receives, in bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def make_regions(seed: int, size: int) -> list[Region]:
    rng = random.Random(seed)
    regions, skip = [], 0
    for i, (offset, length) in enumerate(LAYOUT):
        assert offset % BLOCK == 0 and length % BLOCK == 0 and offset + length <= size
        regions.append(Region(f"r{i}", offset, rng.randbytes(length), skip))
        skip += length
    return regions


def write_data_file(path: Path, regions: list[Region]) -> Path:
    path.write_bytes(b"".join(r.data for r in regions))
    return path


# -- guest scripts -------------------------------------------------------------------------------
# Helpers shared by the guest scripts; offsets and lengths in bytes, I/O in chunks of up to
# 256 KiB (each request is a round trip through QEMU's user network, so 4 KiB requests would
# make the test slow, not better). `put MASK SKIP OFFSET LENGTH...` copies regions of the host's
# data file onto $DEV with O_DIRECT and an fsync (NBD FLUSH) per region, pinned to the CPUs in
# MASK; `digest OFFSET LENGTH` prints the sha256 of a region read back with O_DIRECT.
GUEST_HELPERS = f"""
set -e
put() {{
    mask=$1; shift
    while [ $# -gt 0 ]; do
        if ! taskset "$mask" dd if=data of="$DEV" bs={CHUNK} skip="$1" seek="$2" count="$3" \\
                iflag=skip_bytes,count_bytes oflag=direct,seek_bytes conv=fsync 2>/tmp/dd.err.$mask
        then
            echo "write at byte $2 failed:"; cat /tmp/dd.err.$mask; return 1
        fi
        shift 3
    done
}}
digest() {{
    dd if="$DEV" bs={CHUNK} skip="$1" count="$2" iflag=direct,skip_bytes,count_bytes 2>/dev/null \\
        | sha256sum | cut -c1-64
}}
"""


def _put_args(regions: list[Region]) -> str:
    return " ".join(f"{r.skip} {r.offset} {len(r.data)}" for r in regions)


def _digest_lines(tag: str, regions: list[Region]) -> str:
    return "\n".join(f'echo "{tag} {r.name} $(digest {r.offset} {len(r.data)})"' for r in regions)


def kernel_client_script(export: str, regions: list[Region], connections: int) -> str:
    """Attach with nbd-client, write, read back, detach, attach again (one connection), re-read.

    With two connections the regions are split between two writers pinned to CPU 0 and CPU 1:
    the kernel maps each CPU to its own hardware queue and each queue to its own socket, so both
    connections carry writes. The script prints each queue's run counter around the writes.
    """
    attach = f"nbd-client -N {export} {GUEST_NBD_ADDR} {GUEST_NBD_PORT} $DEV -b {BLOCK}"
    if connections == 1:
        writes = f"put 1 {_put_args(regions)}"
    else:
        writes = f"""
put 1 {_put_args(regions[0::2])} & w0=$!
put 2 {_put_args(regions[1::2])} & w1=$!
wait $w0 || {{ echo "writer on CPU 0 failed"; exit 1; }}
wait $w1 || {{ echo "writer on CPU 1 failed"; exit 1; }}
"""
    return f"""DEV=/dev/nbd0
{GUEST_HELPERS}
detach() {{
    nbd-client -d $DEV
    # The device is free for the next attach once the kernel drops its pid (bounded at 60 s,
    # for a stuck device only: the next step needs the device free, so not free is a failure).
    n=0
    while [ -e /sys/block/nbd0/pid ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
    [ ! -e /sys/block/nbd0/pid ] || {{ echo "nbd0 still attached after nbd-client -d"; exit 1; }}
}}
runs() {{
    for q in $(seq 0 {connections - 1}); do
        echo "RUNS-$1 hctx$q $(cat /sys/kernel/debug/block/nbd0/hctx$q/run)"
    done
}}
mount -t debugfs debugfs /sys/kernel/debug
{attach} -C {connections}
echo "INFO size $(blockdev --getsize64 $DEV)"
echo "INFO hwqueues $(ls /sys/block/nbd0/mq | wc -l)"
runs before
{writes}
runs after
sync
blockdev --flushbufs $DEV
{_digest_lines("READ", regions)}
detach
{attach}
{_digest_lines("REREAD", regions)}
detach
"""


def drive_client_script(regions: list[Region]) -> str:
    """Find the NBD-backed virtio disk (the one without a serial), write, read back."""
    return f"""DEV=
for d in /sys/block/vd*; do
    [ -n "$(cat $d/serial)" ] || DEV=/dev/${{d##*/}}
done
{GUEST_HELPERS}
[ -n "$DEV" ] || {{ echo "no virtio disk without a serial"; ls /sys/block; exit 1; }}
echo "INFO size $(blockdev --getsize64 $DEV)"
put 1 {_put_args(regions)}
sync
blockdev --flushbufs $DEV
{_digest_lines("READ", regions)}
"""


# -- host-side checks ----------------------------------------------------------------------------


def assert_guest_ok(result: GuestResult) -> None:
    assert not result.timed_out, result.explain()
    assert result.exit_code == 0, result.explain()


def assert_digests(result: GuestResult, tag: str, regions: list[Region]) -> None:
    got = result.tagged(tag)
    want = {r.name: r.sha256 for r in regions}
    assert got == want, f"{tag}: guest read back other bytes\n{result.explain()}"


def assert_image_holds(image: Path, size: int, regions: list[Region]) -> None:
    """The file is exactly `size` bytes: the regions, and zeros everywhere else."""
    expected = bytearray(size)
    for r in regions:
        expected[r.offset : r.offset + len(r.data)] = r.data
    actual = image.read_bytes()
    assert len(actual) == size, f"{image} is {len(actual)} bytes, export size is {size}"
    if actual != expected:
        block = next(
            i for i in range(0, size, BLOCK) if actual[i : i + BLOCK] != expected[i : i + BLOCK]
        )
        first = next(i for i in range(block, block + BLOCK) if actual[i] != expected[i])
        where = [r.name for r in regions if r.offset <= first < r.offset + len(r.data)]
        pytest.fail(f"{image} differs first at byte {first} ({where or 'outside every region'})")


def stop_server(export: ServedExport) -> None:
    rc = export.stop()
    assert rc == 0, f"{export.kind} exited with {rc} on SIGTERM\n{export.handle.log_text()[-3000:]}"


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [1, 2], ids=["one-connection", "multi-conn"])
def test_kernel_client_writes_reach_the_image(
    guest_image: GuestImage, nbd_export: ServedExport, tmp_path: Path, connections: int
) -> None:
    regions = make_regions(seed=1000 + connections, size=nbd_export.size)
    data = write_data_file(tmp_path / "pattern.bin", regions)

    result = guest_image.run(
        kernel_client_script(nbd_export.name, regions, connections),
        tmp_path / "guest",
        nbd_port=nbd_export.port,
        files={"data": data},
        cpus=connections,
    )

    assert_guest_ok(result)
    info = result.tagged("INFO")
    assert info.get("size") == str(nbd_export.size), result.explain()
    assert info.get("hwqueues") == str(connections), result.explain()
    before, after = result.tagged("RUNS-before"), result.tagged("RUNS-after")
    for q in range(connections):
        # Each hardware queue is one socket: every connection must have carried writes.
        runs = (int(before.get(f"hctx{q}", -1)), int(after.get(f"hctx{q}", -1)))
        assert -1 < runs[0] < runs[1], f"hctx{q} runs {runs}\n{result.explain()}"
    assert_digests(result, "READ", regions)
    assert_digests(result, "REREAD", regions)

    stop_server(nbd_export)
    assert_image_holds(nbd_export.image, nbd_export.size, regions)


def test_qemu_drive_client_writes_reach_the_image(
    guest_image: GuestImage, nbd_export: ServedExport, tmp_path: Path
) -> None:
    regions = make_regions(seed=2000, size=nbd_export.size)
    data = write_data_file(tmp_path / "pattern.bin", regions)
    uri = f"nbd://127.0.0.1:{nbd_export.port}/{nbd_export.name}"

    result = guest_image.run(
        drive_client_script(regions),
        tmp_path / "guest",
        drives=[f"file={uri},format=raw,if=virtio,cache=none"],
        files={"data": data},
    )

    assert_guest_ok(result)
    assert result.tagged("INFO").get("size") == str(nbd_export.size), result.explain()
    assert_digests(result, "READ", regions)

    stop_server(nbd_export)
    assert_image_holds(nbd_export.image, nbd_export.size, regions)
