"""Attach NBD exports as /dev/nbdX through the kernel's NBD netlink interface.

Owns the production `Attacher` (csi/attach.py): the handshake with the storage node
(csi/nbd_dial.py), then NBD_CMD_CONNECT with the connected sockets, leaving the kernel to pick a
free device (shared/reference/nbd-netlink.md); NBD_CMD_DISCONNECT and the wait until the device
is free again; NBD_CMD_RECONFIGURE to replace dead connections and to give the device a new
size. The netlink socket itself is `NbdNetlink`; the bytes are built by csi/netlink.py.

Devices are marked with a backend identifier, `nbd.csi.dev/<volume id>`, that the kernel shows
in /sys/block/nbdX/backend: that is how a restarted plugin finds its devices again.

Link supervision: the kernel multicasts NBD_CMD_LINK_DEAD when a connection dies. Requests then
wait (up to the dead-connection timeout) for NBD_CMD_RECONFIGURE to bring new sockets; requests
that were in flight on the dead connection are sent again after the request timeout. A task per
broken device dials the storage node until it answers and reconfigures the same /dev/nbdX, so the
VM above never sees an I/O error as long as this happens within the dead-connection timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import netlink as nl
from .attach import AttachError, AttachEvents, Device, Health, Target
from .nbd_client import ExportInfo
from .nbd_dial import Cancel, DialError, dial_many, query

log = logging.getLogger("csi.nbd_kernel")
T = TypeVar("T")

BACKEND_PREFIX = "nbd.csi.dev/"
_RECV = 65536


class NetlinkError(AttachError):
    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what}: {os.strerror(code)} (errno {code})")
        self.errno = code


class NbdNetlink:
    """Blocking requests to the kernel's "nbd" generic netlink family (one at a time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = int(time.time()) & 0xFFFF
        self._sock: socket.socket | None = None
        self._family: nl.Family | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_GENERIC)
            sock.bind((0, 0))
            sock.settimeout(30)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _exchange(self, build: Callable[[int], bytes], what: str) -> list[nl.Message]:
        """Send one request and collect the replies up to its ACK; errors raise."""
        sock = self._socket()
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        sock.send(build(seq))
        replies: list[nl.Message] = []
        while True:
            for message in nl.parse_messages(sock.recv(_RECV)):
                if message.seq != seq:
                    continue  # an answer to an earlier request that timed out
                if message.type == nl.NLMSG_ERROR:
                    if message.error:
                        raise NetlinkError(what, -message.error)
                    return replies
                replies.append(message)

    def family(self) -> nl.Family:
        with self._lock:
            return self._family_locked()

    def _family_locked(self) -> nl.Family:
        if self._family is None:
            try:
                replies = self._exchange(
                    lambda seq: nl.get_family_request(nl.NBD_FAMILY, seq), "resolve nbd family"
                )
            except NetlinkError as exc:
                if exc.errno == errno.ENOENT:
                    raise AttachError(
                        "the kernel has no NBD netlink family: load the nbd module"
                    ) from None
                raise
            if not replies:
                raise AttachError("nlctrl answered without the nbd family")
            self._family = nl.parse_family(replies[0])
        return self._family

    def request(self, build: Callable[[int, int], bytes], what: str) -> list[nl.Message]:
        with self._lock:
            family = self._family_locked().id
            return self._exchange(lambda seq: build(family, seq), what)

    def connect(self, params: nl.ConnectParams) -> int:
        replies = self.request(lambda f, s: nl.connect_request(f, params, s), "NBD_CMD_CONNECT")
        for message in replies:
            if message.cmd == nl.NbdCmd.CONNECT:
                return nl.parse_index(message)
        raise AttachError("NBD_CMD_CONNECT succeeded without telling the device index")

    def reconfigure(
        self, index: int, backend: str, fds: Sequence[int] = (), size: int | None = None
    ) -> None:
        self.request(
            lambda f, s: nl.reconfigure_request(f, index, s, fds=fds, size=size, backend=backend),
            f"NBD_CMD_RECONFIGURE nbd{index}",
        )

    def disconnect(self, index: int) -> None:
        self.request(
            lambda f, s: nl.disconnect_request(f, index, s), f"NBD_CMD_DISCONNECT nbd{index}"
        )

    def status(self, index: int | None = None) -> dict[int, bool]:
        replies = self.request(lambda f, s: nl.status_request(f, s, index), "NBD_CMD_STATUS")
        devices: dict[int, bool] = {}
        for message in replies:
            devices.update(nl.parse_status(message))
        return devices

    def link_events(self) -> socket.socket:
        """A non-blocking socket subscribed to the nbd multicast group (NBD_CMD_LINK_DEAD)."""
        group = self.family().groups.get(nl.NBD_MCAST_GROUP)
        if group is None:
            raise AttachError("the nbd family has no multicast group")
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_GENERIC)
        sock.bind((0, 0))
        sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_ADD_MEMBERSHIP, group)
        sock.setblocking(False)
        return sock


@dataclass(frozen=True)
class KernelOptions:
    connections: int = 4  # at most; 1 unless the server says CAN_MULTI_CONN
    io_timeout: int = 10  # seconds before an unanswered request counts its connection dead
    dead_conn_timeout: int = 120  # seconds requests wait for a reconnect
    dial_timeout: float = 10.0
    settle_timeout: float = 30.0  # how long to wait for a device to appear or be released


@dataclass
class Backoff:
    """The waits between reconnect attempts of one device. A storage node that does not
    answer (restarting) is tried again soon: 50 ms doubling to 2 s, since every second counts
    against the VM's I/O. One that answers and refuses the export (the attachment was revoked
    while the device was staged) will not change its mind soon: 1 s doubling to 60 s."""

    first: float = 0.05
    cap: float = 2.0
    refused_first: float = 1.0
    refused_cap: float = 60.0
    delay: float = 0.0

    def next(self, *, refused: bool) -> float:
        if refused:
            self.delay = min(max(self.delay * 2, self.refused_first), self.refused_cap)
        else:
            self.delay = min(max(self.delay * 2, self.first), self.cap)
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


@dataclass
class _Watched:
    volume_id: str
    device: Device
    target: Target
    connections: int
    lost_at: float | None = None
    again: bool = False
    task: asyncio.Task[None] | None = None
    last_error: str = ""


@dataclass
class Sysfs:
    """The files under /sys/block this attacher reads (a root other than / for tests)."""

    root: Path = Path("/sys/block")

    def nbd_names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.name.startswith("nbd"))
        except FileNotFoundError:
            return []

    def read(self, name: str, item: str) -> str | None:
        try:
            return (self.root / name / item).read_text().strip()
        except OSError:
            return None

    def configured(self, name: str) -> bool:
        """The kernel shows `pid` for as long as the device has a configuration."""
        return (self.root / name / "pid").exists()

    def size(self, name: str) -> int:
        sectors = self.read(name, "size")
        return int(sectors) * 512 if sectors and sectors.isdigit() else 0


class KernelAttacher:
    """The Attacher of production: kernel NBD over netlink, with reconnects."""

    def __init__(
        self,
        options: KernelOptions,
        events: AttachEvents,
        *,
        netlink: NbdNetlink | None = None,
        sysfs: Sysfs | None = None,
        dev: Path = Path("/dev"),
    ) -> None:
        self.options = options
        self.events = events
        self.netlink = netlink or NbdNetlink()
        self.sysfs = sysfs or Sysfs()
        self.dev = dev
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nbd-netlink")
        # Dials have threads of their own: a storage node that stalls a handshake must not
        # hold up netlink requests (or other volumes' dials past the pool's size).
        self._dials = ThreadPoolExecutor(max_workers=16, thread_name_prefix="nbd-dial")
        self._cancels: set[Cancel] = set()
        self._watched: dict[str, _Watched] = {}
        self._events_sock: socket.socket | None = None
        self._closed = False

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _dial(
        self, target: Target, connections: int
    ) -> tuple[list[socket.socket], ExportInfo]:
        """Connect and handshake within one deadline (`dial_timeout`); if the caller goes
        away (its RPC was cancelled), the dial is cancelled too and its thread freed."""
        return await self._dialling(dial_many, target.host, target.port, target.export, connections)

    async def _query(self, target: Target) -> ExportInfo:
        return await self._dialling(query, target.host, target.port, target.export)

    async def _dialling(self, fn: Callable[..., T], *args: object) -> T:
        cancel = Cancel()
        self._cancels.add(cancel)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._dials, lambda: fn(*args, timeout=self.options.dial_timeout, cancel=cancel)
            )
        except asyncio.CancelledError:
            cancel.cancel()
            raise
        finally:
            self._cancels.discard(cancel)

    async def start(self) -> None:
        """Resolve the family and listen for dead links; fails when the kernel has no nbd.
        Attaching calls it again while it has not succeeded (the module may come later)."""
        if self._events_sock is not None:
            return
        sock = await self._run(self.netlink.link_events)
        self._events_sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_events)

    async def close(self) -> None:
        self._closed = True
        if self._events_sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._events_sock.fileno())
            self._events_sock.close()
            self._events_sock = None
        tasks = [w.task for w in self._watched.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watched.clear()
        for cancel in list(self._cancels):
            cancel.cancel()
        self._dials.shutdown(wait=True, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.netlink.close()

    # -- attach / detach -----------------------------------------------------------------

    async def attach(self, volume_id: str, target: Target, index: int | None = None) -> Device:
        await self.start()
        o = self.options
        socks, info = await self._dial(target, o.connections)
        try:
            params = nl.ConnectParams(
                fds=[s.fileno() for s in socks],
                size=info.size,
                block_size=info.kernel_block_size(),
                server_flags=int(info.flags),
                timeout=o.io_timeout,
                dead_conn_timeout=o.dead_conn_timeout,
                backend=BACKEND_PREFIX + volume_id,
                index=index,
            )
            index = await self._run(self.netlink.connect, params)
        finally:
            # The kernel holds its own reference to each socket now.
            for s in socks:
                s.close()
        device = Device(str(self.dev / f"nbd{index}"), index)
        log.info(
            "%s: attached %s (%d bytes, %d connection(s), block %d, %s) from %s",
            volume_id,
            device.path,
            info.size,
            len(socks),
            params.block_size,
            "read-only" if info.read_only else "read-write",
            target.address,
        )
        expected = info.size - info.size % params.block_size
        await self._settle(
            device, lambda: self.sysfs.size(device.name) == expected, "to show its size"
        )
        self._watch(volume_id, device, target, len(socks))
        return device

    async def _settle(self, device: Device, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.options.settle_timeout
        delay = 0.005
        while not await self._run(ready):
            if time.monotonic() > deadline:
                raise AttachError(f"{device.path} did not settle {what} in time")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def find(self, volume_id: str) -> Device | None:
        return (await self.ours()).get(volume_id)

    async def ours(self) -> dict[str, Device]:
        def scan() -> dict[str, Device]:
            found: dict[str, Device] = {}
            for name in self.sysfs.nbd_names():
                backend = self.sysfs.read(name, "backend") or ""
                if backend.startswith(BACKEND_PREFIX) and self.sysfs.configured(name):
                    index = int(name.removeprefix("nbd"))
                    found[backend.removeprefix(BACKEND_PREFIX)] = Device(
                        str(self.dev / name), index
                    )
            return found

        return await self._run(scan)

    async def adopt(self, volume_id: str, device: Device, target: Target) -> None:
        await self.start()
        # How many connections the device has is shown nowhere (its hardware queues are capped
        # by the CPU count): offer as many as it may have; the kernel ignores the extras.
        watched = self._watch(volume_id, device, target, self.options.connections)
        # A link may have died while no plugin was listening: offer fresh sockets once. The
        # kernel puts them in place of dead connections only (RECONFIGURE ignores the rest).
        self._repair(watched, lost=False)

    async def detach(self, volume_id: str, device: Device) -> None:
        watched = self._watched.pop(volume_id, None)
        if watched is not None and watched.task is not None:
            watched.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watched.task
        if not await self._run(self.sysfs.configured, device.name):
            return
        backend = await self._run(self.sysfs.read, device.name, "backend")
        if backend is not None and backend != BACKEND_PREFIX + volume_id:
            raise AttachError(f"{device.path} belongs to another backend now; not detaching it")
        try:
            await self._run(self.netlink.disconnect, device.index)
        except NetlinkError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        await self._settle(
            device, lambda: not self.sysfs.configured(device.name), "free after disconnect"
        )
        log.info("%s: detached %s", volume_id, device.path)

    async def refresh_size(self, volume_id: str, device: Device, target: Target) -> int:
        info = await self._query(target)
        if info.size != await self._run(self.sysfs.size, device.name):
            await self._run(
                self.netlink.reconfigure, device.index, BACKEND_PREFIX + volume_id, (), info.size
            )
            await self._settle(
                device, lambda: self.sysfs.size(device.name) >= info.size - 4095, "to the new size"
            )
            log.info("%s: %s is now %d bytes", volume_id, device.path, info.size)
        return await self._run(self.sysfs.size, device.name)

    def watching(self, volume_id: str) -> bool:
        return volume_id in self._watched

    def health(self, volume_id: str) -> Health:
        watched = self._watched.get(volume_id)
        if watched is None:
            return Health(False, "the device is not attached")
        if not self.sysfs.configured(watched.device.name):
            return Health(False, f"{watched.device.path} lost its NBD configuration")
        if watched.lost_at is not None:
            since = time.monotonic() - watched.lost_at
            detail = f": {watched.last_error}" if watched.last_error else ""
            return Health(
                False,
                f"connection to {watched.target.address} lost {since:.0f}s ago, "
                f"reconnecting{detail}",
            )
        return Health(True, "")

    # -- link supervision ----------------------------------------------------------------

    def _watch(self, volume_id: str, device: Device, target: Target, connections: int) -> _Watched:
        watched = _Watched(volume_id, device, target, connections)
        self._watched[volume_id] = watched
        return watched

    def _on_events(self) -> None:
        assert self._events_sock is not None
        while True:
            try:
                data = self._events_sock.recv(_RECV)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Notifications were lost: offer every device fresh sockets.
                    log.warning("netlink notifications overran; checking every device")
                    for watched in self._watched.values():
                        self._repair(watched, lost=False)
                    continue
                log.error("netlink notification socket failed: %s", exc)
                return
            try:
                messages = nl.parse_messages(data)
            except nl.NetlinkProtocolError as exc:
                log.warning("unreadable netlink notification: %s", exc)
                continue
            for message in messages:
                if message.cmd == nl.NbdCmd.LINK_DEAD:
                    self._link_dead(nl.parse_index(message))

    def _link_dead(self, index: int) -> None:
        for watched in self._watched.values():
            if watched.device.index == index:
                log.warning(
                    "%s: a connection of %s to %s died",
                    watched.volume_id,
                    watched.device.path,
                    watched.target.address,
                )
                self._repair(watched, lost=True)
                return
        log.info("nbd%d: a connection died (not a device of ours)", index)

    def _repair(self, watched: _Watched, *, lost: bool) -> None:
        if lost and watched.lost_at is None:
            watched.lost_at = time.monotonic()
            self.events.link_lost(watched.volume_id)
        if watched.task is not None and not watched.task.done():
            watched.again = True
            return
        watched.task = asyncio.get_running_loop().create_task(
            self._reconnect(watched), name=f"reconnect {watched.volume_id}"
        )

    async def _reconnect(self, watched: _Watched) -> None:
        """Dial until the storage node answers, then RECONFIGURE the same device."""
        backoff = Backoff()
        while not self._closed:
            watched.again = False
            try:
                socks, _ = await self._dial(watched.target, watched.connections)
                try:
                    await self._run(
                        self.netlink.reconfigure,
                        watched.device.index,
                        BACKEND_PREFIX + watched.volume_id,
                        [s.fileno() for s in socks],
                    )
                finally:
                    for s in socks:
                        s.close()
            except (DialError, AttachError, OSError) as exc:
                watched.last_error = str(exc)
                if watched.lost_at is None:
                    log.info("%s: refreshing connections: %s", watched.volume_id, exc)
                    return  # nothing was known to be broken; the next LINK_DEAD will tell
                refused = isinstance(exc, DialError) and exc.refused
                delay = backoff.next(refused=refused)
                log.warning(
                    "%s: reconnect failed (next try in %.2fs): %s", watched.volume_id, delay, exc
                )
                await asyncio.sleep(delay)
                continue
            watched.last_error = ""
            if watched.lost_at is not None:
                blackout = time.monotonic() - watched.lost_at
                watched.lost_at = None
                log.warning(
                    "%s: %s reconnected to %s after %.2fs",
                    watched.volume_id,
                    watched.device.path,
                    watched.target.address,
                    blackout,
                )
                self.events.link_back(watched.volume_id, blackout)
            if not watched.again:
                return
            backoff.reset()
