"""NodeStage's dial against storage nodes that misbehave, and reconnects after a revocation.

Owns the regression tests of issue 12's "NodeStage has no overall deadline": a peer that drips
its greeting a byte at a time, or never ends its option replies, is cut off by one deadline for
the whole dial; a dial nobody waits for any more is cancelled and frees its thread; abandoned
dials never hold up a healthy volume's attach; and after the attachment is revoked the
reconnect loop backs off instead of redialling every 2 s.

The misbehaving peers are small socket servers here (they are the behaviour under test). The
healthy volume is on a real storage node. The kernel's NBD netlink family cannot run on this
host, so `KernelAttacher` gets a stand-in at exactly that boundary (`FakeNetlink`: it answers
NBD_CMD_CONNECT by writing the sysfs files the kernel would); every dial is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi import netlink as nl
from csi.attach import Target
from csi.nbd_dial import Cancel, DialError, dial, dial_many
from csi.nbd_kernel import Backoff, KernelAttacher, KernelOptions, Sysfs
from storage_node.nbd.constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, Info, Rep
from tests.support.api import ApiNode

WAIT = 60.0  # bound on every wait for an event; never an assertion


class Peer:
    """A TCP server on loopback that misbehaves in one way: `drip` sends the greeting a byte
    at a time (one per `stop.wait(0.2)`), `endless` sends NBD_REP_INFO replies without end."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.accepted = 0
        self.closed = 0
        self.changed = threading.Condition(self.lock)
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.changed:
                self.accepted += 1
                self.changed.notify_all()
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        greeting = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0b11)
        try:
            with conn:
                if self.how == "drip":
                    for byte in greeting:
                        if self.stop.wait(0.2):
                            return
                        conn.sendall(bytes([byte]))
                    conn.recv(1)  # the client never gets here
                else:
                    conn.sendall(greeting)
                    conn.recv(65536)  # client flags and NBD_OPT_GO
                    name = b"x" * 64
                    info = struct.pack(">H", Info.NAME) + name
                    reply = struct.pack(">QIII", OPTION_REPLY_MAGIC, 7, Rep.INFO, len(info)) + info
                    while not self.stop.is_set():
                        conn.sendall(reply * 64)
        except OSError:
            pass
        finally:
            with self.changed:
                self.closed += 1
                self.changed.notify_all()

    def wait_for(self, what: str, count: int) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: getattr(self, what) >= count, WAIT)
        assert ok, f"the peer saw {getattr(self, what)} connections {what}, expected {count}"

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for t in self.threads:
            t.join(WAIT)


@pytest.fixture
def drip() -> Iterator[Peer]:
    peer = Peer("drip")
    yield peer
    peer.close()


@pytest.fixture
def endless() -> Iterator[Peer]:
    peer = Peer("endless")
    yield peer
    peer.close()


def test_a_dripping_greeting_is_cut_off_by_the_deadline(drip: Peer) -> None:
    with pytest.raises(DialError, match="did not finish in time"):
        dial("127.0.0.1", drip.port, "export", timeout=1.0)
    drip.wait_for("closed", 1)


def test_endless_option_replies_are_cut_off(endless: Peer) -> None:
    with pytest.raises(DialError) as error:
        dial("127.0.0.1", endless.port, "export", timeout=WAIT)
    assert "without ending the handshake" in str(error.value)
    endless.wait_for("closed", 1)


def test_a_cancelled_dial_ends_at_once(drip: Peer) -> None:
    cancel = Cancel()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            dial_many("127.0.0.1", drip.port, "export", 4, timeout=WAIT, cancel=cancel)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    drip.wait_for("accepted", 1)
    cancel.cancel()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], DialError)
    assert str(outcome[0]) == "cancelled"
    drip.wait_for("closed", 1)


# -- the attacher ----------------------------------------------------------------------------


class FakeNetlink:
    """The kernel's side of NBD_CMD_CONNECT/RECONFIGURE, as sysfs shows it (this host has no
    nbd module). Records what it was given."""

    def __init__(self, sysfs: Path) -> None:
        self.sysfs = sysfs
        self.connected: list[nl.ConnectParams] = []
        self.reconfigured: list[int] = []
        self._events = socket.socketpair()

    def link_events(self) -> socket.socket:
        self._events[0].setblocking(False)
        return self._events[0]

    def connect(self, params: nl.ConnectParams) -> int:
        index = len(self.connected)
        self.connected.append(params)
        device = self.sysfs / f"nbd{index}"
        device.mkdir(parents=True)
        (device / "size").write_text(str(params.size // 512))
        (device / "pid").write_text("1")
        (device / "backend").write_text(params.backend or "")
        return index

    def reconfigure(self, index: int, backend: str, fds: Any, size: int | None = None) -> None:
        self.reconfigured.append(index)

    def close(self) -> None:
        for s in self._events:
            s.close()


class Events:
    def link_lost(self, volume_id: str) -> None:
        pass

    def link_back(self, volume_id: str, blackout_seconds: float) -> None:
        pass


def attacher(tmp_path: Path, dial_timeout: float) -> tuple[KernelAttacher, FakeNetlink]:
    fake = FakeNetlink(tmp_path / "sys")
    options = KernelOptions(connections=2, dial_timeout=dial_timeout)
    kernel = KernelAttacher(
        options,
        Events(),
        netlink=fake,  # type: ignore[arg-type]
        sysfs=Sysfs(tmp_path / "sys"),
        dev=tmp_path,
    )
    return kernel, fake


def healthy(storage_node: ApiNode, name: str) -> Target:
    api = storage_node.api
    volume = api.wait_volume(api.create_volume(name, 4 << 20).id)
    att = api.publish(volume.id, "worker-1", "127.0.0.1")
    return Target(att.nbd_host, att.nbd_port, att.export_name)


def test_abandoned_dials_never_hold_up_a_healthy_attach(
    tmp_path: Path, drip: Peer, storage_node: ApiNode
) -> None:
    """Issue 12: five NodeStage calls to a dripping peer, abandoned by their callers (kubelet's
    deadline), then a healthy volume: it attaches, and the five dials were cancelled."""
    target = healthy(storage_node, "after-abandoned")

    async def scenario() -> int:
        kernel, fake = attacher(tmp_path, dial_timeout=WAIT)
        try:
            stuck = Target("127.0.0.1", drip.port, "export")
            tasks = [asyncio.create_task(kernel.attach(f"stuck-{i}", stuck)) for i in range(5)]
            await asyncio.to_thread(drip.wait_for, "accepted", 5)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            device = await asyncio.wait_for(kernel.attach("healthy", target), WAIT)
            assert [p.backend for p in fake.connected] == ["nbd.csi.dev/healthy"]
            return device.index
        finally:
            await kernel.close()

    assert asyncio.run(scenario()) == 0
    drip.wait_for("closed", 5)


def test_one_deadline_for_the_whole_attach(tmp_path: Path, drip: Peer) -> None:
    async def scenario() -> None:
        kernel, fake = attacher(tmp_path, dial_timeout=1.0)
        try:
            with pytest.raises(DialError, match="did not finish in time"):
                await kernel.attach("slow", Target("127.0.0.1", drip.port, "export"))
            assert fake.connected == []
        finally:
            await kernel.close()

    asyncio.run(scenario())


def test_backoff_policy() -> None:
    fast = Backoff()
    assert [fast.next(refused=False) for _ in range(8)] == [
        0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0
    ]  # fmt: skip
    slow = Backoff()
    assert [slow.next(refused=True) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    slow.reset()
    assert slow.next(refused=False) == 0.05


def test_reconnect_after_revocation_backs_off(
    tmp_path: Path, storage_node: ApiNode, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12: the attachment is revoked while the device is staged, then a link dies. The
    storage node refuses the export: the reconnect loop waits 1 s, then 2 s, ... (not a
    redial every 2 s for the whole dead-connection timeout)."""
    api = storage_node.api
    volume = api.wait_volume(api.create_volume("revoked", 4 << 20).id)
    att = api.publish(volume.id, "worker-1", "127.0.0.1")
    target = Target(att.nbd_host, att.nbd_port, att.export_name)
    caplog.set_level(logging.WARNING, logger="csi.nbd_kernel")

    def tries() -> list[str]:
        return [r.getMessage() for r in caplog.records if "reconnect failed" in r.getMessage()]

    async def scenario() -> list[str]:
        kernel, _ = attacher(tmp_path, dial_timeout=WAIT)
        try:
            device = await kernel.attach("revoked", target)
            api.unpublish(volume.id, "worker-1")
            kernel._link_dead(device.index)  # what NBD_CMD_LINK_DEAD from the kernel does
            for _ in range(int(WAIT * 10)):
                if len(tries()) >= 2:
                    break
                await asyncio.sleep(0.1)
            health = kernel.health("revoked")
            assert not health.ok and "refused" in health.message
            return tries()
        finally:
            await kernel.close()

    messages = asyncio.run(scenario())
    assert "next try in 1.00s" in messages[0] and "next try in 2.00s" in messages[1], messages
    assert att.export_name not in " ".join(messages)


def test_no_credential_in_the_logs_or_errors_of_either_side(
    tmp_path: Path, storage_node: ApiNode, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12: after accepted, refused and revoked handshakes, neither the plugin's log (every
    csi.* logger at DEBUG), nor its errors and health messages, nor the storage node's log hold
    the credential part of an export name (docs/security.md)."""
    api = storage_node.api
    volume = api.wait_volume(api.create_volume("no-secret-in-logs", 4 << 20).id)
    att = api.publish(volume.id, "worker-1", "127.0.0.1")
    credential = att.export_name.rpartition(".")[2]
    assert len(credential) >= 16, att.export_name
    wrong = Target(att.nbd_host, att.nbd_port, att.export_name[:-4] + "AAAA")
    caplog.set_level(logging.DEBUG, logger="csi")
    texts: list[str] = []

    async def scenario() -> None:
        kernel, _ = attacher(tmp_path, dial_timeout=WAIT)
        try:
            with pytest.raises(Exception) as refused:  # any error: its text is checked below
                await kernel.attach("refused", wrong)
            texts.append(str(refused.value))
            device = await kernel.attach(
                "accepted", Target(att.nbd_host, att.nbd_port, att.export_name)
            )
            api.unpublish(volume.id, "worker-1")  # revoked while staged
            kernel._link_dead(device.index)
            for _ in range(int(WAIT * 10)):
                if not kernel.health("accepted").ok and any(
                    "reconnect failed" in r.getMessage() for r in caplog.records
                ):
                    break
                await asyncio.sleep(0.1)
            texts.append(kernel.health("accepted").message)
        finally:
            await kernel.close()

    asyncio.run(scenario())
    texts += [r.getMessage() for r in caplog.records]
    assert any("reconnect failed" in t for t in texts), texts  # the revoked path was taken
    plugin_side = "\n".join(texts)
    assert credential not in plugin_side
    assert wrong.export.rpartition(".")[2] not in plugin_side
    assert credential not in storage_node.log_text()
