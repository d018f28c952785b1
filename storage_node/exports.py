"""The export registry: which names a storage node serves, and to whom.

Owns the mapping from an NBD export name to an open backend, and answers the handshake's
questions (storage_node.nbd.handshake.ExportDirectory): look a name up for a given client
address, list what that client may see. Exports can be added and removed while the server
runs; removing one tells every subscriber (the NBD server drops live connections to it).

Access: an export may carry a set of allowed client addresses and be hidden from NBD_OPT_LIST.
Attachments (a later management API) register such exports under a name that embeds an
unguessable credential, so knowing a volume's name alone never reaches its data.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .backend import Backend
from .nbd.constants import MAX_PAYLOAD, PREFERRED_BLOCK, Rep, TransmissionFlag
from .nbd.handshake import Refusal
from .qos import VolumeQos

# Image files take any byte range, so the minimum block is 1, as for nbdkit's file plugin.
BLOCK_SIZES = (1, PREFERRED_BLOCK, MAX_PAYLOAD)

_WRITABLE_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.CAN_MULTI_CONN
    | TransmissionFlag.SEND_CACHE
)


@dataclass(eq=False)
class Export:
    name: str
    backend: Backend
    description: str = ""
    allowed_peers: frozenset[str] | None = None  # None: any address
    listed: bool = True
    volume_id: str = ""  # the volume behind it, when it is an attachment of one
    tenant: str = ""
    qos: VolumeQos | None = None  # shared by all exports of the volume in this process

    def __post_init__(self) -> None:
        if self.allowed_peers is not None:
            self.allowed_peers = frozenset(normalize_peer(p) for p in self.allowed_peers)

    @property
    def display_name(self) -> str:
        """The name for logs: an attachment's name holds a credential, so show the volume."""
        return f"{self.volume_id} (attachment)" if self.volume_id else self.name

    @property
    def size(self) -> int:
        return self.backend.size

    @property
    def readonly(self) -> bool:
        return self.backend.readonly

    @property
    def transmission_flags(self) -> int:
        if self.readonly:
            # Writes are refused; FLUSH, FUA and CACHE stay harmless to advertise.
            return int(
                TransmissionFlag.HAS_FLAGS
                | TransmissionFlag.READ_ONLY
                | TransmissionFlag.SEND_FLUSH
                | TransmissionFlag.SEND_FUA
                | TransmissionFlag.CAN_MULTI_CONN
                | TransmissionFlag.SEND_CACHE
            )
        return int(_WRITABLE_FLAGS)

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        return BLOCK_SIZES

    def admits(self, peer: str) -> bool:
        return self.allowed_peers is None or normalize_peer(peer) in self.allowed_peers


def normalize_peer(address: str) -> str:
    """One spelling per client address: an IPv4 client of a dual-stack (`::`) listener is
    seen as ::ffff:a.b.c.d and must match an attachment bound to a.b.c.d; IPv6 addresses
    take their compressed form. Anything that is not an IP address is returned as is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def redact(name: str) -> str:
    """An export name fit for logs and replies: attachment names are VOLUME.CREDENTIAL, and
    everything after the first dot is the credential (or could be, in a name a client made
    up), so only the part before it is shown."""
    volume, sep, _ = name.partition(".")
    return f"{volume}.<credential>" if sep else name


class ExportRegistry:
    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}
        self._on_removed: list[Callable[[Export], None]] = []

    def __len__(self) -> int:
        return len(self._exports)

    def __iter__(self) -> Iterator[Export]:
        return iter(list(self._exports.values()))

    def get(self, name: str) -> Export | None:
        return self._exports.get(name)

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"export {export.name!r} already exists")
        self._exports[export.name] = export

    def remove(self, name: str) -> Export | None:
        export = self._exports.pop(name, None)
        if export is not None:
            for callback in list(self._on_removed):
                callback(export)
        return export

    def subscribe_removed(self, callback: Callable[[Export], None]) -> None:
        self._on_removed.append(callback)

    # -- ExportDirectory ---------------------------------------------------------------------

    def lookup(self, name: str, peer: str) -> Export | Refusal:
        export = self._exports.get(name)
        # One answer for "no such export" and "not for you": names must not leak.
        if export is None or not export.admits(peer):
            return Refusal(Rep.ERR_UNKNOWN, f"no export named {redact(name)!r} for {peer}")
        return export

    def listing(self, peer: str) -> Sequence[tuple[str, str]]:
        return [
            (e.name, e.description) for e in self._exports.values() if e.listed and e.admits(peer)
        ]
