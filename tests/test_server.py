"""The NBD server process under bad input, load, crashes and shutdown (real process, loopback).

Each test checks that the misbehaving connection gets what the spec says (an error reply or
a hard disconnect) while the other clients keep being served and nothing acknowledged is lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.rawnbd import RawClient
from tests.support.servers import start_storage_node

READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZERO, STATUS = range(8)
FUA, NO_HOLE, FAST_ZERO = 1, 2, 16
EINVAL, EPERM, ENOSPC, ENOTSUP, ESHUTDOWN = 22, 1, 28, 95, 108
MiB = 1 << 20


@pytest.fixture
def node(tmp_path):
    handle = start_storage_node(
        tmp_path / "node",
        ["name=disk,size=16M,description=test disk", "name=ro,size=1M,readonly"],
        extra_args=["--handshake-timeout", "2", "--shutdown-timeout", "10"],
    )
    yield handle
    handle.stop()


@pytest.fixture(params=["disk", "memory"])
def backed_node(request, tmp_path):
    """A node whose image is on disk (I/O in threads) or in memory (inline, sendfile)."""
    if request.param == "memory":
        image_dir = Path(tempfile.mkdtemp(dir="/dev/shm"))
        image = image_dir / "disk.img"
        image.write_bytes(b"")
        os.truncate(image, 64 * MiB)
        spec = f"name=disk,file={image}"
    else:
        image_dir = None
        spec = "name=disk,size=64M"
    handle = start_storage_node(tmp_path / "node", [spec])
    yield handle
    handle.stop()
    if image_dir is not None:
        shutil.rmtree(image_dir)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_sizes_round_trip_on_every_io_path(backed_node, structured):
    """Small (inline or batched), 64 KiB+ (sendfile when memory-backed), 256 KiB+ (received
    into its own buffer) and maximum-size requests, pipelined, across two connections."""
    sizes = [512, 4096, 65535, 65536, 300_000, 1 * MiB, 32 * MiB]
    writer = RawClient(backed_node.port).connect("disk", structured=structured)
    reader = RawClient(backed_node.port).connect("disk", structured=structured)
    offset = 0
    expected = {}
    for cookie, size in enumerate(sizes):
        data = os.urandom(size)
        writer.send(WRITE, cookie, offset, size, payload=data)
        expected[cookie] = (offset, data)
        offset += size
    got = {writer.reply().cookie for _ in sizes}
    assert got == set(expected)
    if structured:  # replies carry their own length: pipeline all reads
        for cookie, (off, data) in expected.items():
            reader.send(READ, cookie, off, len(data))
        for _ in expected:
            reply = reader.reply()
            assert reply.error == 0
            assert reply.data == expected[reply.cookie][1], reply.cookie
    else:  # a simple reply's length is known only from its request: one at a time
        for cookie, (off, data) in expected.items():
            assert reader.call(READ, cookie, off, len(data)).data == data


def healthy(node, export="disk", cookie=99) -> None:
    """Another client can still write and read back."""
    c = RawClient(node.port).connect(export)
    data = os.urandom(4096)
    assert c.call(WRITE, cookie, 8 * MiB, 4096, payload=data).error == 0
    assert c.call(READ, cookie + 1, 8 * MiB, 4096).data == data
    c.close()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\xff" * 4, id="unknown-client-flags"),
        pytest.param(struct.pack(">I", 3) + b"NOTMAGIC" + b"\0" * 8, id="bad-option-magic"),
        pytest.param(
            struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 1 << 30),
            id="huge-option",
        ),
        pytest.param(
            struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 4) + b"nope",
            id="export-name-unknown",
        ),
    ],
)
def test_malformed_handshake_closes_only_that_connection(node, garbage):
    bystander = RawClient(node.port).connect("disk")
    bad = RawClient(node.port)
    bad.recv_exact(18)
    bad.sock.sendall(garbage)
    assert bad.is_closed()
    assert bystander.call(FLUSH, 1).error == 0
    healthy(node)


def test_bad_request_magic_closes_only_that_connection(node):
    bystander = RawClient(node.port).connect("disk")
    bad = RawClient(node.port).connect("disk")
    bad.sock.sendall(b"\x01" * 28)
    assert bad.is_closed()
    assert bystander.call(READ, 1, 0, 512).error == 0
    healthy(node)


def test_silent_client_is_dropped_at_the_handshake_timeout(node):
    idle = RawClient(node.port)
    idle.recv_exact(18)
    assert idle.is_closed(timeout=30)
    healthy(node)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_errors_keep_the_stream_in_frame(node, structured):
    c = RawClient(node.port).connect("disk", structured=structured)
    size = c.size
    cases: list[tuple[dict[str, Any], int]] = [
        (dict(typ=READ, offset=size - 512, length=1024), EINVAL),
        (dict(typ=WRITE, offset=size - 512, length=1024, payload=b"x" * 1024), ENOSPC),
        (dict(typ=ZERO, offset=size, length=512), ENOSPC),
        (dict(typ=READ, offset=0, length=0), EINVAL),
        (dict(typ=FLUSH, offset=1, length=0), EINVAL),
        (dict(typ=READ, offset=0, length=512, flags=0x40), EINVAL),
        (dict(typ=STATUS, offset=0, length=512), EINVAL),  # no meta context negotiated
        (dict(typ=42, offset=0, length=512), EINVAL),
        (dict(typ=WRITE, offset=0, length=4096, payload=b"\xab" * 4096), 0),
    ]
    for i, (req, expected) in enumerate(cases):
        reply = c.call(cookie=i, **req)
        assert (reply.cookie, reply.error) == (i, expected), req
        if expected and structured:
            assert reply.message, "structured errors carry a message"
    assert c.call(READ, 100, 0, 4096).data == b"\xab" * 4096


def test_oversize_write_payload_is_consumed_and_refused(node):
    c = RawClient(node.port).connect("disk")
    big = 40 * MiB  # above the 32 MiB maximum payload: refused, payload read and dropped
    c.send(WRITE, 1, 0, big)
    chunk = b"\xee" * MiB
    for _ in range(big // MiB):
        c.sock.sendall(chunk)
    reply = c.reply()
    assert (reply.cookie, reply.error) == (1, EINVAL)
    assert c.call(READ, 2, 0, 4096).data == bytes(4096), "nothing of the refused write landed"


def test_readonly_export_refuses_changes(node):
    c = RawClient(node.port).connect("ro")
    assert c.flags & 2, "NBD_FLAG_READ_ONLY"
    for typ, payload in ((WRITE, b"x" * 512), (TRIM, b""), (ZERO, b"")):
        assert c.call(typ, 1, 0, 512, payload=payload).error == EPERM
    assert c.call(READ, 2, 0, 512).error == 0


def test_fast_zero_and_block_status(node):
    c = RawClient(node.port).connect("disk", meta=True)
    assert c.call(WRITE, 1, 0, 64 * 1024, payload=b"\x11" * 65536).error == 0
    assert c.call(ZERO, 2, 0, 16 * 1024, flags=FAST_ZERO).error == 0  # punching a hole is fast
    assert c.call(ZERO, 3, 16 * 1024, 16 * 1024, flags=NO_HOLE | FUA).error == 0
    assert c.call(READ, 4, 0, 64 * 1024).data == bytes(32 * 1024) + b"\x11" * 32 * 1024
    status = c.call(STATUS, 5, 0, 1 * MiB)
    assert status.chunks is not None
    (ctx,) = struct.unpack(">I", status.chunks[0][1][:4])
    body = status.chunks[0][1][4:]
    extents = [struct.unpack(">II", body[i : i + 8]) for i in range(0, len(body), 8)]
    assert ctx == 1
    assert extents[0] == (16 * 1024, 3), "punched: hole and zero"
    assert sum(length for length, _ in extents) == 1 * MiB
    assert sum(n for n, flags in extents if flags == 0) >= 16 * 1024, "the written data"
    one = c.call(STATUS, 6, 0, 8192, flags=8)  # REQ_ONE
    assert one.chunks is not None
    assert len(one.chunks[0][1]) == 4 + 8


def test_multi_conn_writes_are_visible_and_flushed_across_connections(node):
    writers = [RawClient(node.port).connect("disk") for _ in range(4)]  # spread over workers
    for i, c in enumerate(writers):
        assert c.call(WRITE, i, i * MiB, 4096, payload=bytes([i + 1]) * 4096).error == 0
    assert writers[0].call(FLUSH, 10).error == 0
    for i in range(4):
        for c in writers:
            assert c.call(READ, 20, i * MiB, 4096).data == bytes([i + 1]) * 4096


def test_flooding_client_does_not_starve_others_and_stays_bounded(node):
    flood = RawClient(node.port).connect("disk")
    # Up to 2 million pipelined 64 KiB reads whose replies are never read: the server must
    # stop reading from this client instead of queueing 128 GB of replies. Kernel socket
    # buffers take a few MB of requests; after that sendall times out.
    batch = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, READ, i, 0, 65536) for i in range(1000))
    flood.sock.settimeout(2)
    sent = 0
    try:
        for _ in range(2000):
            flood.sock.sendall(batch)
            sent += 1
    except TimeoutError:
        pass  # the server stopped reading: backpressure works
    assert sent < 2000, "the server kept reading replies it could not send"
    for _ in range(3):
        healthy(node)
    rss = sum(_rss_kib(pid) for pid in _tree(node.proc.pid))
    assert rss < 1_000_000, f"server processes use {rss} KiB while a client floods"


def test_disconnect_waits_for_inflight_then_closes(node):
    c = RawClient(node.port).connect("disk")
    c.send(WRITE, 1, 0, MiB, payload=b"\x42" * MiB)
    c.send(DISC)
    assert c.reply().error == 0
    assert c.is_closed()
    assert RawClient(node.port).connect("disk").call(READ, 1, 0, MiB).data == b"\x42" * MiB


def test_worker_crash_is_replaced_and_data_survives(node):
    c = RawClient(node.port).connect("disk")
    assert c.call(WRITE, 1, 0, 4096, payload=b"\x77" * 4096).error == 0
    assert c.call(FLUSH, 2).error == 0
    workers = _tree(node.proc.pid)[1:]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        len(_tree(node.proc.pid)) < 3 or workers[0] in _tree(node.proc.pid)
    ):
        time.sleep(0.1)
    assert len(_tree(node.proc.pid)) == 3, "a new worker replaced the dead one"
    for _ in range(4):  # round-robin reaches both workers
        assert RawClient(node.port).connect("disk").call(READ, 1, 0, 4096).data == b"\x77" * 4096


def test_graceful_shutdown_finishes_inflight_and_leaves_new_unanswered(node):
    """Requests read after SIGTERM get no reply at all (not NBD_ESHUTDOWN, which the kernel's
    client turns into an I/O error in the VM): a reconnecting client sends them again."""
    c = RawClient(node.port).connect("disk")
    payloads = {}
    for i in range(64):
        payloads[i] = bytes([i]) * (256 * 1024)
        c.send(WRITE, i, i * 256 * 1024, 256 * 1024, payload=payloads[i])
    node.proc.send_signal(signal.SIGTERM)
    extra = 64
    try:
        for extra in range(64, 1000):
            c.send(READ, extra, 0, 4096)
            time.sleep(0.001)
    except OSError:
        pass
    replies = {}
    try:
        while True:
            r = c.reply()  # structured: READ data comes in chunks
            replies[r.cookie] = r.error
    except (ConnectionError, OSError):
        pass
    assert node.proc.wait(30) == 0
    assert set(replies.values()) == {0}, replies
    assert all(replies.get(i) == 0 for i in payloads), "in-flight writes finished"
    image = (node.data_dir / "images" / "disk.img").read_bytes()
    for i, data in payloads.items():
        if replies.get(i) == 0:
            assert image[i * 256 * 1024 : (i + 1) * 256 * 1024] == data


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_gives_enospc_and_keeps_serving(tmp_path, small_fs):
    image = small_fs / "thin.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)  # thin: 16 MiB promised on a 2 MiB filesystem
    node = start_storage_node(tmp_path / "node", [f"name=thin,file={image}", "name=disk,size=16M"])
    try:
        c = RawClient(node.port).connect("thin")
        errors = [c.call(WRITE, i, i * MiB, MiB, payload=b"\x55" * MiB).error for i in range(6)]
        assert errors[0] == 0
        assert ENOSPC in errors, errors
        assert c.call(READ, 50, 0, MiB).data == b"\x55" * MiB, "acknowledged data intact"
        assert c.call(TRIM, 51, MiB, 5 * MiB).error == 0  # freeing space works
        assert c.call(WRITE, 52, 2 * MiB, MiB, payload=b"\x66" * MiB).error == 0
        healthy(node)
    finally:
        node.stop()


def _tree(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout.split()
    return [pid, *(int(p) for p in out)]


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def test_reads_are_served_before_writes_that_arrived_with_them(tmp_path):
    """Request classes: within one turn, reads go first; writes, FLUSH and FUA keep their
    arrival order. With an image in memory every request of the turn completes inline, so the
    replies come back in the order the server ran them."""
    image_dir = Path(tempfile.mkdtemp(dir="/dev/shm"))
    image = image_dir / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * MiB)
    node = start_storage_node(tmp_path / "node", [f"name=disk,file={image}"])
    try:
        c = RawClient(node.port).connect("disk")
        burst = b"".join(
            [
                struct.pack(">IHHQQI", 0x25609513, 0, WRITE, 1, 0, 4096) + b"w" * 4096,
                struct.pack(">IHHQQI", 0x25609513, 0, FLUSH, 2, 0, 0),
                struct.pack(">IHHQQI", 0x25609513, 1, WRITE, 3, 4096, 4096) + b"f" * 4096,
                struct.pack(">IHHQQI", 0x25609513, 0, READ, 4, 8192, 4096),
            ]
        )
        c.sock.sendall(burst)
        assert [c.reply().cookie for _ in range(4)] == [4, 1, 2, 3]
    finally:
        node.stop()
        shutil.rmtree(image_dir)
