"""The NBD server the client tests talk to, and the one way they start a client process.

Owns: the standard exports every client test finds (`STANDARD_EXPORTS`), starting them on our
storage node (the default) or on qemu-nbd (`NBD_CLIENT_TESTS_SERVER=qemu-nbd`, one qemu-nbd per
export since it serves one export per process), and `run()`, which starts a client bounded in
time and keeps its output for the failure message. Also the small helpers several client tests
share: nbdinfo's JSON and merged allocation map, patterned sparse files, their data extents.

On our storage node the exports come in two kinds (`ACCESS_KINDS`): `export`, command-line
exports (`--export`), and `volume`, the product path: each export is a volume made through the
management API, with QoS limits set far above any test's load (so the limiter runs on every
request), published for 127.0.0.1, and reached under its attachment's export name, which holds
the credential. The client sees the same sizes, flags and bytes either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage_node.v1 import storage_node_pb2 as spb
from tests.support.api import ApiNode, start_api_node
from tests.support.servers import ServerHandle, start_qemu_nbd, start_storage_node

KiB = 1024
MiB = 1024 * KiB

SERVER_ENV = "NBD_CLIENT_TESTS_SERVER"
OURS = "ours"
QEMU_NBD = "qemu-nbd"
SERVER_KINDS = (OURS, QEMU_NBD)

# How the exports are reached on our storage node (module docstring).
EXPORT = "export"
VOLUME = "volume"
ACCESS_KINDS = (EXPORT, VOLUME)
# The volume kind's attachments: the node the clients stand for, at their address.
CLIENT_NODE = "client-tests"
CLIENT_ADDRESS = "127.0.0.1"
# Far above what any client test asks for, so QoS admits every request without waiting.
GENEROUS_QOS = spb.Qos(iops=10_000_000, bytes_per_second=64 * 1024 * MiB)

# Debian's libnbd Python binding lives with Debian's interpreter, not with the one running pytest.
DEBIAN_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class ExportSpec:
    """One export: its name, size, and bytes written at offset 0 before the server starts."""

    name: str
    size: int
    readonly: bool = False
    seed: bytes = b""
    description: str = ""  # no commas: the --export option is comma-separated


# The read-only export starts with this many bytes of RO_SEED_BYTE; the rest is a hole.
RO_SEED_BYTE = 0x5A
RO_SEED_LEN = 1 * MiB

STANDARD_EXPORTS: tuple[ExportSpec, ...] = (
    ExportSpec("disk", 64 * MiB, description="scratch disk for client tests"),
    ExportSpec(
        "ro",
        16 * MiB,
        readonly=True,
        seed=bytes([RO_SEED_BYTE]) * RO_SEED_LEN,
        description="read-only seeded image",
    ),
    ExportSpec("small", 1 * MiB),
)


def server_kind() -> str:
    kind = os.environ.get(SERVER_ENV, OURS) or OURS
    if kind not in SERVER_KINDS:
        raise ValueError(f"{SERVER_ENV}={kind!r}: expected one of {', '.join(SERVER_KINDS)}")
    return kind


def access_kinds() -> tuple[str, ...]:
    """How the exports can be reached on the server under test: volumes exist only on ours."""
    return ACCESS_KINDS if server_kind() == OURS else (EXPORT,)


def size_arg(size: int) -> str:
    """Render a size the way the storage node's --export option takes it (K/M/G binary)."""
    for suffix, unit in (("G", 1024 * MiB), ("M", MiB), ("K", KiB)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def make_image(path: Path, spec: ExportSpec) -> Path:
    """A sparse raw image of spec.size holding spec.seed at offset 0, unless it exists already.

    Like the storage node's own images, an existing file is kept, so a restarted server
    serves what the crashed one left.
    """
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(spec.seed)
        f.truncate(spec.size)
    return path


@dataclass
class NbdTarget:
    """Running server(s) serving a set of exports on 127.0.0.1."""

    kind: str
    exports: dict[str, ExportSpec]
    handles: dict[str, ServerHandle]
    images: dict[str, Path]
    access: str = EXPORT
    # The name on the wire, when it is not the export's own (a volume's attachment).
    wire_names: dict[str, str] = field(default_factory=dict)
    api_node: ApiNode | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def export_name(self, name: str) -> str:
        """What a client sends in NBD_OPT_GO/EXPORT_NAME to reach the export `name`."""
        return self.wire_names.get(name, name)

    def uri(self, name: str) -> str:
        return self.handles[name].uri(self.export_name(name))

    @property
    def listed(self) -> dict[str, ExportSpec]:
        """The exports NBD_OPT_LIST shows: every command-line export, never an attachment."""
        return {} if self.access == VOLUME else self.exports

    def server_uri(self) -> str:
        """URI with an empty export name, for listing and the option phase."""
        return self.handles[next(iter(self.exports))].uri("")

    def host_port(self, name: str) -> tuple[str, int]:
        h = self.handles[name]
        return h.host, h.port

    def image(self, name: str) -> Path:
        return self.images[name]

    def servers(self) -> list[ServerHandle]:
        unique: dict[int, ServerHandle] = {}
        for h in self.handles.values():
            unique.setdefault(id(h), h)
        return list(unique.values())

    def logs(self) -> str:
        return "\n".join(
            f"--- {' '.join(h.argv[:3])} ... ---\n{h.log_text()}" for h in self.servers()
        )

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            if self.api_node is not None:
                self.api_node.stop()
                return
            for h in self.servers():
                h.stop()


def start_target(
    kind: str,
    workdir: Path,
    exports: Sequence[ExportSpec] = STANDARD_EXPORTS,
    *,
    port: int | None = None,
    access: str = EXPORT,
) -> NbdTarget:
    """Start `exports` on the server `kind` with all state under `workdir`.

    With access=VOLUME (our storage node only) the exports are volumes behind attachments;
    started again on the same workdir, the same volumes and attachments are served.
    """
    if access == VOLUME:
        if kind != OURS:
            raise ValueError(f"volumes exist only on our storage node, not on {kind}")
        return start_volume_target(workdir, exports, port=port)
    specs = {e.name: e for e in exports}
    images: dict[str, Path] = {}
    handles: dict[str, ServerHandle] = {}
    if kind == OURS:
        data_dir = workdir / "data"
        args = []
        for e in exports:
            if e.seed:
                images[e.name] = make_image(workdir / "seed" / f"{e.name}.img", e)
                arg = f"name={e.name},file={images[e.name]}"
            else:
                images[e.name] = data_dir / "images" / f"{e.name}.img"
                arg = f"name={e.name},size={size_arg(e.size)}"
            arg += ",readonly" if e.readonly else ""
            arg += f",description={e.description}" if e.description else ""
            args.append(arg)
        handle = start_storage_node(data_dir, args, port=port)
        handles = dict.fromkeys(specs, handle)
    elif kind == QEMU_NBD:
        try:
            for i, e in enumerate(exports):
                images[e.name] = make_image(workdir / "qemu" / f"{e.name}.img", e)
                handles[e.name] = start_qemu_nbd(
                    images[e.name],
                    e.name,
                    port=port if i == 0 else None,
                    readonly=e.readonly,
                    # Without --discard=unmap qemu-nbd ignores TRIM; ours punches holes.
                    extra_args=[
                        "--discard=unmap",
                        *(["-D", e.description] if e.description else []),
                    ],
                )
        except BaseException:
            for h in handles.values():
                h.stop()
            raise
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    return NbdTarget(kind=kind, exports=specs, handles=handles, images=images)


def start_volume_target(
    workdir: Path, exports: Sequence[ExportSpec], *, port: int | None = None
) -> NbdTarget:
    """`exports` as volumes on a storage node with its API (see start_target)."""
    data_dir = workdir / "data"
    node = start_api_node(
        data_dir, workers=None, exports=(), extra_args=["--no-default-export"], nbd_port=port
    )
    try:
        wire_names: dict[str, str] = {}
        images: dict[str, Path] = {}
        for e in exports:
            volume = _volume(node, e)
            attachment = node.api.publish(
                volume.id, CLIENT_NODE, CLIENT_ADDRESS, readonly=e.readonly
            )
            wire_names[e.name] = attachment.export_name
            images[e.name] = data_dir / "volumes" / f"{volume.id}.img"
    except BaseException:
        node.stop()
        raise
    assert node.handle is not None
    return NbdTarget(
        kind=OURS,
        exports={e.name: e for e in exports},
        handles=dict.fromkeys(wire_names, node.handle),
        images=images,
        access=VOLUME,
        wire_names=wire_names,
        api_node=node,
    )


def _volume(node: ApiNode, spec: ExportSpec) -> spb.Volume:
    """The volume named spec.name: found again after a restart, else made, limited, seeded."""
    found = node.api.ListVolumes(spb.ListVolumesRequest(name=spec.name)).volumes
    if found:
        return found[0]
    volume = node.api.wait_volume(node.api.create_volume(spec.name, spec.size, "client-tests").id)
    node.api.SetVolumeQos(spb.SetVolumeQosRequest(volume_id=volume.id, qos=GENEROUS_QOS))
    if spec.seed:
        # Written through NBD by a writer node of its own, as a provisioner would fill it.
        writer = node.api.publish(volume.id, "seed-writer", CLIENT_ADDRESS)
        seed = node.data_dir.parent / "seed" / f"{spec.name}.seed"
        seed.parent.mkdir(parents=True, exist_ok=True)
        seed.write_bytes(spec.seed)
        run(["nbdcopy", "--synchronous", str(seed), writer.uri])
        node.api.unpublish(volume.id, "seed-writer")
    return volume


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client to completion (killed after `timeout`); on failure show its output."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(describe(proc))
    return proc


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"$ {shlex.join(proc.args)}\nexit status {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def debian_python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment in which `python3` is Debian's, so nbdsh finds the `nbd` module."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(Path(DEBIAN_PYTHON).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data extents of a local file, found with SEEK_DATA/SEEK_HOLE."""
    ranges: list[tuple[int, int]] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, stop - start))
            pos = stop
    return ranges


HOLE_ZERO = 3  # base:allocation NBD_STATE_HOLE | NBD_STATE_ZERO, as nbdinfo --map types it
DATA = 0


def nbdinfo_json(*args: str) -> Any:
    return json.loads(run(["nbdinfo", "--json", *args]).stdout)


def merged_map(uri: str) -> list[tuple[int, int, int]]:
    """nbdinfo --map as (offset, length, type), adjacent extents of one type merged.

    A server may split its answer anywhere; merging makes the comparison exact but fair.
    """
    merged: list[tuple[int, int, int]] = []
    for x in nbdinfo_json("--map", uri):
        off, length, typ = x["offset"], x["length"], x["type"]
        if merged and merged[-1][2] == typ and merged[-1][0] + merged[-1][1] == off:
            prev = merged.pop()
            merged.append((prev[0], prev[1] + length, typ))
        else:
            merged.append((off, length, typ))
    return merged


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def patterned_image(path: Path, size: int, extents: list[tuple[int, int]], seed: int) -> Path:
    """A sparse file of `size` with pseudo-random bytes in each (offset, length) extent."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in extents:
            f.seek(off)
            f.write(rng.randbytes(length))
    return path
