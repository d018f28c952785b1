"""What one client, or many, may cost a storage node: secrets, error texts, addresses.

Real storage node processes on loopback, real clients (qemu-io) for the legitimate traffic,
raw sockets for the misbehaving kind.
"""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage_node.exports import Export, normalize_peer
from tests.nbd.wire import go_data, option
from tests.support.api import ApiNode, api_node
from tests.support.rawnbd import RawClient
from tests.support.servers import free_port, start_storage_node

KiB, MiB = 1 << 10, 1 << 20
READ, WRITE, FLUSH = 0, 1, 3
ENOSPC = 28
OPT_EXPORT_NAME, OPT_GO = 1, 7
REP_ERR_UNKNOWN = (1 << 31) + 6
REQUEST_MAGIC = 0x25609513


# ---- helpers -----------------------------------------------------------------------------


def qemu_io(uri: str, *commands: str) -> str:
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    result = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"qemu-io {commands}: {result.stdout}{result.stderr}"
    assert "failed" not in result.stdout, result.stdout
    return result.stdout


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
