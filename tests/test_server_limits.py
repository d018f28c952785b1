"""What one client, or many, may cost a storage node: secrets, error texts, memory.

Real storage node processes on loopback, real clients (qemu-io, nbdsh) for the legitimate
traffic, raw sockets for the stalled or flooding kind. Memory is the RSS of the node's
processes from /proc; the bounds asserted are generous ones derived from the configured caps
(what the node could hold without the caps is several times larger), never timings.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage_node.exports import Export, normalize_peer
from tests.clients.targets import debian_python_env
from tests.nbd.wire import go_data, option
from tests.support.api import ApiNode, api_node, poll
from tests.support.qemu_io import qemu_io
from tests.support.rawnbd import RawClient, closed_by_server
from tests.support.servers import ServerHandle, free_port, start_storage_node

KiB, MiB = 1 << 10, 1 << 20
READ, WRITE, FLUSH = 0, 1, 3
ENOSPC = 28
OPT_EXPORT_NAME, OPT_GO = 1, 7
REP_ERR_UNKNOWN = (1 << 31) + 6
REQUEST_MAGIC = 0x25609513


# ---- helpers -----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout.split()
    return [int(p) for p in out]


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def workers(handle: ServerHandle) -> list[int]:
    """The NBD worker processes (they hold the connections and their buffers)."""
    return _children(handle.proc.pid)


def nbdsh_round_trip(uri: str, offset: int, length: int) -> None:
    """A real client (libnbd) writes a pattern and reads it back."""
    script = (
        f"buf = bytes([0x5a]) * {length}\n"
        f"h.pwrite(buf, {offset})\n"
        f"assert h.pread({length}, {offset}) == buf\n"
        "h.flush()\n"
    )
    result = subprocess.run(
        ["nbdsh", "-u", uri, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=debian_python_env(),
    )
    assert result.returncode == 0, result.stderr


def handshake_to(port: int, source: str) -> socket.socket | None:
    """Connect from `source` and read the greeting; None when the node closed at once."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    greeting = b""
    try:
        while len(greeting) < 18:
            chunk = sock.recv(18 - len(greeting))
            if not chunk:
                break
            greeting += chunk
    except ConnectionResetError:
        greeting = b""
    if len(greeting) < 18:
        sock.close()
        return None
    return sock


# ---- credentials ---------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiNode]:
    metrics_port = free_port()
    with api_node(
        tmp_path / "node",
        workers=2,
        extra_args=["--log-level", "DEBUG", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
    ) as n:
        n.metrics_port = metrics_port  # type: ignore[attr-defined]
        yield n


def test_no_credential_in_logs_replies_or_metrics(api: ApiNode) -> None:
    """Refused (wrong credential, wrong address, old-style EXPORT_NAME), accepted and revoked
    handshakes: the credential appears in no log line, no reply text and no metric."""
    vol = api.api.create_volume("secret-vol", 4 * MiB)
    att = api.api.publish(vol.id, address="127.0.0.1")
    volume, _, credential = att.export_name.partition(".")
    assert volume == vol.id and len(credential) >= 16
    wrong = f"{vol.id}.{'W' * 32}"
    replies: list[bytes] = []

    # Refused: a wrong credential, and the right one from another address (GO and INFO).
    for name, source in ((wrong, "127.0.0.1"), (att.export_name, "127.0.0.2")):
        c = RawClient(api.nbd_port, source=source)
        c.greet()
        got = c.option(OPT_GO, go_data(name))
        assert got[-1][0] == REP_ERR_UNKNOWN
        replies += [data for _, data in got]
        c.close()
    # Refused, old style: NBD_OPT_EXPORT_NAME can only be answered by closing.
    for name, source in ((wrong, "127.0.0.1"), (att.export_name, "127.0.0.2")):
        c = RawClient(api.nbd_port, source=source)
        c.greet()
        c.sock.sendall(option(OPT_EXPORT_NAME, name.encode()))
        assert c.is_closed()
    # Accepted, by a real client, then revoked while connected.
    uri = f"nbd://127.0.0.1:{api.nbd_port}/{att.export_name}"
    qemu_io(uri, "write -P 0x11 0 64k", "read -P 0x11 0 64k")
    live = RawClient(api.nbd_port).connect(att.export_name)
    assert live.call(READ, 1, 0, 4096).error == 0
    api.api.unpublish(vol.id)
    assert live.is_closed()
    # Refused after revocation.
    c = RawClient(api.nbd_port)
    c.greet()
    got = c.option(OPT_GO, go_data(att.export_name))
    assert got[-1][0] == REP_ERR_UNKNOWN
    replies += [data for _, data in got]
    c.close()

    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{api.metrics_port}/metrics",  # type: ignore[attr-defined]
        timeout=30,
    ).read()
    log = api.log_text()
    # The node did log these handshakes (so the check below looks at real lines) ...
    assert "refused" in log and "(attachment)" in log and "was removed" in log
    for secret in (credential, "W" * 32):
        assert secret not in log, [line for line in log.splitlines() if secret in line]
        assert not any(secret.encode() in r for r in replies)
        assert secret.encode() not in metrics


# ---- error replies -----------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_error_reply_carries_a_fixed_text_and_the_log_the_detail(
    tmp_path: Path, small_fs: Path
) -> None:
    image = small_fs / "thin.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)  # 16 MiB promised on a 2 MiB filesystem
    node = start_storage_node(tmp_path / "node", [f"name=thin,file={image}"])
    try:
        c = RawClient(node.port).connect("thin")
        errors = [c.call(WRITE, i, i * MiB, MiB, payload=b"\x55" * MiB) for i in range(6)]
        failed = [r for r in errors if r.error]
        assert failed and all(r.error == ENOSPC for r in failed)
        for r in failed:
            assert r.message == "no space left on the volume", r.message
        assert "No space left on device" in node.log_text()  # the detail is logged
    finally:
        node.stop()


# ---- IPv4 clients of a dual-stack listener -------------------------------------------------


def test_ipv4_mapped_peers_match_ipv4_attachments(tmp_path: Path) -> None:
    """An IPv6 listener sees IPv4 clients as ::ffff:a.b.c.d; attachments bound to a.b.c.d
    must still open. (`::ffff:127.0.0.1` is the loopback-only way to get such a listener.)"""
    port = free_port()
    with api_node(
        tmp_path / "node", nbd_port=port, extra_args=["--nbd-listen", f"[::ffff:127.0.0.1]:{port}"]
    ) as n:
        vol = n.api.create_volume("dual", 4 * MiB)
        att = n.api.publish(vol.id, address="127.0.0.1")
        qemu_io(
            f"nbd://127.0.0.1:{port}/{att.export_name}", "write -P 0x22 0 4k", "read -P 0x22 0 4k"
        )
        # Still bound: another address is refused.
        c = RawClient(port, source="127.0.0.2")
        c.greet()
        assert c.option(OPT_GO, go_data(att.export_name))[-1][0] == REP_ERR_UNKNOWN
        c.close()


def test_peer_addresses_are_normalised() -> None:
    assert normalize_peer("::ffff:127.0.0.1") == "127.0.0.1"
    assert normalize_peer("127.0.0.1") == "127.0.0.1"
    assert normalize_peer("0:0:0:0:0:0:0:1") == "::1"
    assert normalize_peer("fe80::1%eth0") == "fe80::1"
    assert normalize_peer("?") == "?"
    export = Export("x", backend=None, allowed_peers=frozenset({"::ffff:10.0.0.5"}))  # type: ignore[arg-type]
    assert export.admits("10.0.0.5") and export.admits("::ffff:10.0.0.5")
    assert not export.admits("10.0.0.6")


# ---- connections per peer and memory before authentication ---------------------------------

PEER_CAP = 40
FLOOD_PEERS = 12


def test_handshake_flood_is_capped_per_peer_and_its_memory_is_returned(tmp_path: Path) -> None:
    """Idle connections in the handshake from 127.0.0.2 ... 127.0.0.13: each address gets at
    most --max-connections-per-peer across both workers; each costs a few KiB, not the 256 KiB
    receive buffer of an authenticated connection; their memory goes when they close; and
    clients from 127.0.0.1 are served all along."""
    node = start_storage_node(
        tmp_path / "node",
        ["name=disk,size=64M"],
        workers=2,
        extra_args=[
            "--handshake-timeout",
            "600",
            "--max-connections-per-peer",
            str(PEER_CAP),
        ],
    )
    flood: list[socket.socket] = []
    try:
        pids = workers(node)
        assert len(pids) == 2
        nbdsh_round_trip(node.uri("disk"), 0, 64 * KiB)  # warm: buffers of a served client
        before = rss_kib(pids)
        refused = 0
        for i in range(FLOOD_PEERS):
            source = f"127.0.0.{i + 2}"
            for _ in range(PEER_CAP + 5):
                sock = handshake_to(node.port, source)
                if sock is None:
                    refused += 1
                else:
                    flood.append(sock)
        during = rss_kib(pids)
        print(
            f"workers' RSS: {before} KiB before, {during} KiB with {len(flood)} connections "
            f"in the handshake ({refused} refused by the per-peer cap)"
        )
        # 480 connections at 256 KiB each would be 120 MiB; at most 32 KiB each is allowed.
        assert during - before < len(flood) * 32, f"{(during - before) // len(flood)} KiB each"
        assert len(flood) == FLOOD_PEERS * PEER_CAP
        assert refused == FLOOD_PEERS * 5
        # Served during the flood, from an address that is not at its cap.
        nbdsh_round_trip(node.uri("disk"), MiB, 256 * KiB)
        qemu_io(node.uri("disk"), "write -P 0x33 2M 1M", "read -P 0x33 2M 1M")

        # A connection that goes makes room for another from the same address.
        flood.pop(0).close()  # one of 127.0.0.2
        again = poll(
            lambda: handshake_to(node.port, "127.0.0.2"),
            lambda s: s is not None,
            30,
            "a connection from 127.0.0.2 after one closed",
            step=0.1,
        )
        assert again is not None
        flood.append(again)
        for sock in flood:
            sock.close()
        flood.clear()
        after = poll(
            lambda: rss_kib(pids),
            lambda rss: rss - before < 16 * 1024,
            60,
            "the workers' RSS back near its level before the flood",
            step=0.2,
        )
        print(f"workers' RSS after the connections closed: {after} KiB")
        qemu_io(node.uri("disk"), "read -P 0x33 2M 1M")
    finally:
        for sock in flood:
            sock.close()
        node.stop()


# ---- payload deadline and the buffer budget --------------------------------------------------

BUDGET = 128 * MiB  # one worker: its share is the whole budget


def stalled_write(port: int, source: str, length: int = 32 * MiB) -> tuple[socket.socket, bool]:
    """A WRITE of `length` bytes whose payload stops 1 MiB short of the end. True when the
    node took all the bytes sent (it had buffer room for the payload)."""
    c = RawClient(port, source=source)
    c.connect("disk")
    sock = c.sock
    header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, WRITE, 7, 0, length)
    sock.settimeout(5)
    try:
        sock.sendall(header + b"\xab" * (length - MiB))
        return sock, True
    except TimeoutError:  # the node stopped reading this connection: backpressure
        return sock, False


def test_half_sent_writes_are_bounded_by_the_budget_and_dropped_at_the_deadline(
    tmp_path: Path,
) -> None:
    node = start_storage_node(
        tmp_path / "node",
        ["name=disk,size=64M"],
        workers=1,
        extra_args=["--buffer-budget", str(BUDGET), "--payload-timeout", "5"],
    )
    stalled: list[socket.socket] = []
    try:
        pids = workers(node)
        qemu_io(node.uri("disk"), "write -P 0x44 0 1M")
        before = rss_kib(pids)
        taken = 0
        for i in range(12):
            sock, complete = stalled_write(node.port, f"127.0.0.{i + 2}")
            stalled.append(sock)
            taken += complete
        during = rss_kib(pids)
        print(
            f"worker RSS {before} KiB, {during} KiB with 12 half-sent 32 MiB WRITEs; {taken} taken"
        )
        # Without a budget all 12 payloads (384 MiB) would be buffered. (How many sends
        # complete says little: loopback socket buffers take much of a payload themselves.)
        assert during - before < (BUDGET + 64 * MiB) // KiB
        # Small I/O of other clients goes on meanwhile (a real client, libnbd).
        nbdsh_round_trip(node.uri("disk"), 4 * MiB, 64 * KiB)
        # Every stalled connection is dropped at its deadline, the ones waiting for the budget
        # too once they got room and stalled in turn; their memory goes with them.
        for sock in stalled:
            assert closed_by_server(sock, timeout=120)
        # A large WRITE now fits again.
        qemu_io(node.uri("disk"), "write -P 0x55 32M 32M", "read -P 0x55 32M 32M")
        print(f"worker RSS after the stalled connections were dropped: {rss_kib(pids)} KiB")
        assert "request not received within 5s" in node.log_text()
    finally:
        for sock in stalled:
            sock.close()
        node.stop()


def test_unread_replies_are_bounded_by_the_budget(tmp_path: Path) -> None:
    """12 connections that ask for 32 MiB READs and never read the replies: the node stops
    taking their requests once its budget is full, small I/O of others is still served, and
    a large READ is served as soon as those connections go."""
    node = start_storage_node(
        tmp_path / "node",
        ["name=disk,size=64M"],
        workers=1,
        extra_args=["--buffer-budget", str(BUDGET)],
    )
    readers: list[RawClient] = []
    try:
        pids = workers(node)
        qemu_io(node.uri("disk"), "write -P 0x66 0 32M")
        before = rss_kib(pids)
        for i in range(12):
            c = RawClient(node.port, source=f"127.0.0.{i + 2}").connect("disk")
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
            for cookie in range(4):
                c.send(READ, cookie, 0, 32 * MiB)
            readers.append(c)
        # Each connection has sent 128 MiB worth of READs: wait until the node has taken
        # what it is going to take (its memory stops growing), then measure.
        last = [0]

        def settled(rss: int) -> bool:
            done = rss == last[0]
            last[0] = rss
            return done

        during = poll(lambda: rss_kib(pids), settled, 60, "the worker's RSS settling", step=1.0)
        print(f"worker RSS {before} KiB, {during} KiB with 12 connections not reading 4 x 32 MiB")
        # Without the budget each connection queues up to 64 MiB of replies.
        assert during - before < (BUDGET + 96 * MiB) // KiB
        nbdsh_round_trip(node.uri("disk"), 40 * MiB, 64 * KiB)
        for c in readers:
            c.close()
        readers.clear()
        qemu_io(node.uri("disk"), "read -P 0x66 0 32M")
    finally:
        for c in readers:
            c.close()
        node.stop()
