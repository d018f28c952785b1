"""The boundary between the Node service and whatever turns an NBD export into a block device.

Owns the `Attacher` interface, what it is given (`Target`: where the export is, from the
publish_context of docs/csi-driver.md) and what it hands back (`Device`), and the events it
reports (`AttachEvents`: link lost, link back). The production implementation is the kernel's
NBD client driven over netlink (`csi/nbd_kernel.py`); tests on a machine without kernel NBD use
nbdfuse and a loop device (tests/csi/loop_attacher.py), with real bytes from a storage node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .config import parse_port

CTX_HOST = "nbd.csi.dev/host"
CTX_PORT = "nbd.csi.dev/port"
CTX_EXPORT = "nbd.csi.dev/export"
CTX_READONLY = "nbd.csi.dev/readonly"


class AttachError(Exception):
    """Attaching, reconnecting or detaching failed; the message holds no credential."""


@dataclass(frozen=True)
class Target:
    """An attachment made by ControllerPublishVolume. `export` carries the credential: it is
    left out of repr() so it cannot reach a log line by accident."""

    host: str
    port: int
    export: str = field(repr=False)
    readonly: bool = False

    @classmethod
    def from_context(cls, context: Mapping[str, str]) -> Target:
        """Parse a publish_context; ValueError names the key that is missing or wrong."""
        missing = [k for k in (CTX_HOST, CTX_PORT, CTX_EXPORT) if not context.get(k)]
        if missing:
            raise ValueError(f"publish_context lacks {', '.join(missing)}")
        try:
            port = parse_port(context[CTX_PORT])
        except ValueError as exc:
            raise ValueError(f"publish_context {CTX_PORT}: {exc}") from None
        readonly = context.get(CTX_READONLY, "false").lower()
        if readonly not in ("true", "false"):
            raise ValueError(f"publish_context {CTX_READONLY} {readonly!r} is not true/false")
        return cls(context[CTX_HOST], port, context[CTX_EXPORT], readonly == "true")

    def context(self) -> dict[str, str]:
        return {
            CTX_HOST: self.host,
            CTX_PORT: str(self.port),
            CTX_EXPORT: self.export,
            CTX_READONLY: "true" if self.readonly else "false",
        }

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Device:
    """A block device holding one volume. `index` is the nbd (or loop) device number."""

    path: str
    index: int

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Health:
    ok: bool
    message: str = ""


class AttachEvents(Protocol):
    """What an attacher reports as it happens (the Node service turns it into metrics)."""

    def link_lost(self, volume_id: str) -> None: ...
    def link_back(self, volume_id: str, blackout_seconds: float) -> None: ...


class Attacher(Protocol):
    async def attach(self, volume_id: str, target: Target, index: int | None = None) -> Device:
        """Connect and return a usable device. `index`: ask for that device number (to give
        a volume back the device its users still hold open), else any free one."""
        ...

    async def find(self, volume_id: str) -> Device | None:
        """The device attached for this volume (marked with its id), or None."""
        ...

    async def adopt(self, volume_id: str, device: Device, target: Target) -> None:
        """Take over a device attached by an earlier run: watch it and repair dead links."""
        ...

    async def detach(self, volume_id: str, device: Device) -> None:
        """Disconnect; returns once the device is free for reuse. Already detached is fine."""
        ...

    async def refresh_size(self, volume_id: str, device: Device, target: Target) -> int:
        """Ask the storage node for the export's size now and give it to the device."""
        ...

    def health(self, volume_id: str) -> Health: ...

    def watching(self, volume_id: str) -> bool:
        """This run attached or adopted the volume's device (and repairs its links)."""
        ...

    async def ours(self) -> dict[str, Device]:
        """Every attached device marked as this driver's, by volume id (orphan clean-up)."""
        ...

    async def close(self) -> None:
        """Stop watching; devices stay attached (the kernel owns them)."""
        ...
