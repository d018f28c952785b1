"""NBD data-path benchmark: our storage node against qemu-nbd and nbdkit, driven by fio.

Owns: the image locations (tmpfs, and an XFS filesystem on a loop device made for the run),
one image file per location, the storage node's benchmark volumes (created, QoS-limited and
filled through the management API and NBD), the server variants and their command lines, the
fio job matrix, per-run server CPU accounting from /proc, and the summary tables ending in
`min_ratio=X.XX`. It is a script, not a test: it asserts nothing, it prints numbers.

What it does
  * For each location (`--location`, default `tmpfs,disk`): makes a directory on the medium,
    creates one image (1 GiB by default) there and writes it completely, so every read hits
    allocated blocks and no server can answer from a hole.
      tmpfs  a temporary directory in /dev/shm.
      disk   an XFS filesystem made by the script: a sparse file in /var/tmp
             (`--xfs-backing-dir`), mkfs.xfs, a loop device with direct I/O on (so the loop
             device adds no page cache of its own between XFS and the real disk), mounted on a
             temporary directory, unmounted and detached at the end. Needs root. `--disk-dir DIR`
             uses a directory on an existing disk filesystem instead.
  * Our product path (`ours`, `ours-qos`): a storage node with its management API and metrics
    on (`--metrics-listen` on a free port) and its data directory on the same medium. Once per
    location the script creates a volume of the image's size for each of them (CreateVolume),
    for `ours-qos` in a tenant of its own with volume and tenant QoS limits far above the load
    (SetVolumeQos, SetTenantLimits: 10M IOPS, 100 GB/s), publishes it to node address
    127.0.0.1 (Publish) and fills it from the image through NBD with libnbd; it then checks that
    the node's Prometheus metrics counted the fill. Every run then starts the node on that data
    directory, publishes again (idempotent: the same attachment) and points fio at the
    attachment's export name. The export name carries the attachment's credential: it goes to
    fio in a 0600 job file and to the filler on stdin, never on a command line, and is printed
    only redacted (`vol-ID.<redacted>`).
  * For every (location, repetition, row) it runs each server in turn (the order rotates every
    row so no server is always first): start the server on 127.0.0.1, run fio against it, stop
    it. Only one server exists at a time; the script only ever signals the pids it started.
  * fio uses its nbd engine (libnbd): one fio job per connection, `group_reporting` so the
    aggregate of the jobs is reported; with 2 connections each job covers its own half of the
    image (`size` and `offset_increment`).
  * Server CPU is the sum of utime+stime+cutime+cstime over the server process and all its
    descendants, sampled from /proc every 0.25 s; CPU per I/O is the CPU rate in the middle of
    the timed window divided by the I/O rate fio reports. Kernel work done outside the server's
    threads (the loop device's workers, XFS log writes) is not counted, for any server.
  * Each (server, row) runs `--repeat` times (default 3); the tables show medians.

Servers (names accepted by `--servers`)
  ours                 a volume created through the management API, reached through its
                       attachment; metrics on, no QoS limit (default workers)
  ours-qos             the same with volume and tenant QoS limits far above the load
  ours-qos-nozd        as ours-qos, its volume created with zero detection off
                       (zero_detection_disabled): what the zero check costs
  ours-raw             python -m storage_node --export name=bench,file=IMAGE: no volume, no
                       attachment, no metrics wrapper, no QoS; for reference only
  qemu-nbd             qemu-nbd's best configuration for the medium, see below
  nbdkit               nbdkit file plugin, -t 16 (default thread model: parallel, default cache)
  qemu-nbd-wb-threads, qemu-nbd-wb-uring, qemu-nbd-none-threads, qemu-nbd-none-native,
  qemu-nbd-none-uring, nbdkit-t4
                       fixed variants, for comparing configurations (`--list-servers`)

qemu-nbd configuration. `--cache=none` opens the image with O_DIRECT; tmpfs refuses O_DIRECT on
kernels before 6.6, and `--aio=native` requires `--cache=none`. The script probes O_DIRECT in
each location's directory: if it works, `qemu-nbd` means `--cache=none --aio=native`, otherwise
`--cache=writeback --aio=io_uring`. Chosen for tmpfs from measurements with qemu-nbd 7.2 on a
6.18 kernel (tmpfs with O_DIRECT, 2 vCPUs shared with other work; 4k QD32 and 1M QD8 rows,
1 connection, 3 repeats; numbers in bench/README.md): none/native needed the least server CPU
per 4k I/O by far (16-17 us against 27-46 us for writeback/threads, writeback/io_uring and
none/io_uring) and had the best or near-best 4k IOPS. On 1M sequential reads writeback/threads
was about 1.3x faster than none/native; nbdkit matched or beat both there, so the max over the
peers that the ratio uses hardly moves. Without O_DIRECT, writeback/io_uring beat
writeback/threads on 4k QD32 in the repeated run (within noise in a single one). On XFS
O_DIRECT always works, so the disk location uses none/native too (qemu's documented choice for
a raw image on a local filesystem); bench/README.md says how to re-check it with the variants.

Rows: 4k randread/randwrite at QD1 and QD32, 4k randwrite with a FLUSH after every 32 writes
(fio `fsync=32`, rows ending in `-fsync32`) at QD1 and QD32, 1M sequential read/write at QD8,
each with 1 and 2 connections. 4k rows report IOPS (of the reads or writes; the FLUSHes are not
counted), 1M rows MB/s (10^6 bytes). Latencies are fio's completion latency (clat) of the reads
or writes, mean and 99th percentile, in microseconds.

The ratio column is subject / max(peers) of the throughput column. The subject is the first of
`ours-qos`, `ours`, `ours-raw` among `--servers` (or the first server listed, when none is),
and the peers are the listed servers that are not ours (qemu-nbd, nbdkit and their variants);
with only our servers listed, the other ones. One table per location; the last line is
`min_ratio=X.XX`, the lowest ratio over all rows of all locations (`nan` when no ratio could be
computed).

Usage
  python bench/nbd_bench.py                                # full matrix, both locations
  python bench/nbd_bench.py --quick --rows qd32 --location tmpfs     # smoke run
  python bench/nbd_bench.py --servers qemu-nbd,nbdkit --rows '^4k-randread' --json out.json
  python bench/nbd_bench.py --dry-run                      # the plan, nothing started
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from storage_node.v1 import storage_node_pb2 as pb  # noqa: E402  (needs the repo on sys.path)
from tests.support.api import ApiNode, poll, start_api_node  # noqa: E402
from tests.support.servers import (  # noqa: E402
    ServerHandle,
    free_port,
    start_nbdkit_file,
    start_qemu_nbd,
    start_storage_node,
)

EXPORT = "bench"
TMPFS = Path("/dev/shm")
XFS_BACKING_DIR = Path("/var/tmp")
LOCATIONS = ("tmpfs", "disk")
CPU_SAMPLE_INTERVAL = 0.25
# Margins around the timed window for CPU accounting: fio needs a moment to start and connect
# after launch, and some time to disconnect and write its report after the timed window.
CPU_WINDOW_HEAD = 0.3
CPU_WINDOW_TAIL = 0.2

# Our servers: the first one present is the ratio's subject.
OURS = ("ours-qos", "ours", "ours-raw", "ours-qos-nozd")
# Servers backed by a volume of the management API, and the tenant each volume belongs to.
VOLUME_TENANT = {"ours": "bench", "ours-qos": "bench-qos", "ours-qos-nozd": "bench-qos-nozd"}
# Servers with QoS limits, and those whose volume has zero detection off.
WITH_QOS = ("ours-qos", "ours-qos-nozd")
NO_ZERO_DETECTION = ("ours-qos-nozd",)
QOS_IOPS = 10_000_000
QOS_BYTES_PER_SECOND = 100 * 10**9
NODE_ID = "bench-node"
CLIENT_NODE = "bench-client"  # the node the volumes are published to
CLIENT_ADDRESS = "127.0.0.1"  # fio's address as the NBD server sees it
# libnbd's Python binding (Debian python3-libnbd) lives with the system interpreter.
SYSTEM_PYTHON = "/usr/bin/python3"
FILL_CHUNK = 4 << 20


class BenchError(Exception):
    """A location or its volumes could not be set up; the message says why."""


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    name: str
    rw: str  # fio rw=
    bs: str
    iodepth: int
    conns: int
    fsync: int = 0  # fio fsync=: a FLUSH after every N writes (0: none)

    @property
    def unit(self) -> str:
        return "IOPS" if self.bs == "4k" else "MB/s"


def all_rows() -> list[Row]:
    rows = []
    for rw, bs, depth, fsync in [
        ("randread", "4k", 1, 0),
        ("randread", "4k", 32, 0),
        ("randwrite", "4k", 1, 0),
        ("randwrite", "4k", 32, 0),
        ("randwrite", "4k", 1, 32),
        ("randwrite", "4k", 32, 32),
        ("read", "1M", 8, 0),
        ("write", "1M", 8, 0),
    ]:
        for conns in (1, 2):
            kind = rw if rw.startswith("rand") else f"seq{rw}"
            name = f"{bs.lower()}-{kind}-qd{depth}-c{conns}" + (f"-fsync{fsync}" if fsync else "")
            rows.append(Row(name, rw, bs, depth, conns, fsync))
    return rows


# ---------------------------------------------------------------------------------------------
# Locations


@dataclass(frozen=True)
class Location:
    name: str  # tmpfs | disk
    directory: Path  # a fresh directory on the medium, removed at the end
    medium: str  # for people: filesystem, device
    o_direct: bool


def o_direct_works(directory: Path) -> bool:
    """tmpfs accepts O_DIRECT only on Linux 6.6 and later."""
    probe = directory / f".nbd-bench-o-direct-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


def filesystem_of(path: Path) -> str:
    """'FSTYPE on SOURCE at MOUNTPOINT' of the filesystem holding `path` (findmnt)."""
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE,TARGET", "--target", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    fields = out.stdout.split()
    if len(fields) < 3:
        return "unknown filesystem"
    fstype, source, target = fields[:3]
    return f"{fstype} at {target}" if source == fstype else f"{fstype} on {source} at {target}"


def _run(argv: Sequence[str], what: str) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{what}: {exc}") from exc
    if out.returncode != 0:
        raise BenchError(f"{what}: {argv[0]} exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


@contextlib.contextmanager
def tmpfs_location() -> Iterator[Location]:
    base = TMPFS if TMPFS.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="nbd-bench-", dir=base) as d:
        path = Path(d)
        yield Location("tmpfs", path, filesystem_of(path), o_direct_works(path))


@contextlib.contextmanager
def disk_location(args: argparse.Namespace, need: int) -> Iterator[Location]:
    """An XFS filesystem of `need` bytes on a loop device, or a directory in --disk-dir."""
    if args.disk_dir is not None:
        with tempfile.TemporaryDirectory(prefix="nbd-bench-", dir=args.disk_dir) as d:
            path = Path(d)
            yield Location("disk", path, filesystem_of(path), o_direct_works(path))
        return
    if os.geteuid() != 0:
        raise BenchError(
            "the disk location makes an XFS filesystem on a loop device, which needs root; "
            "run as root or give --disk-dir DIR (a directory on a disk filesystem)"
        )
    with tempfile.TemporaryDirectory(prefix="nbd-bench-xfs-", dir=args.xfs_backing_dir) as d:
        backing, mnt = Path(d) / "xfs.img", Path(d) / "mnt"
        mnt.mkdir(mode=0o700)
        with open(backing, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as f:
            f.truncate(xfs_size(need))  # sparse: blocks are taken as XFS writes them
        _run(["mkfs.xfs", "-q", str(backing)], "mkfs.xfs")
        device = _run(["losetup", "--find", "--show", "--direct-io=on", str(backing)], "losetup")
        try:
            dio = Path(f"/sys/block/{Path(device).name}/loop/dio")
            direct = dio.read_text().strip() == "1" if dio.exists() else False
            _run(["mount", device, str(mnt)], "mount")
            try:
                mnt.chmod(0o700)
                medium = (
                    f"xfs on {device} (loop, direct I/O {'on' if direct else 'off'}), "
                    f"backing file on {filesystem_of(backing)}"
                )
                yield Location("disk", mnt, medium, o_direct_works(mnt))
            finally:
                try:
                    _run(["umount", str(mnt)], "umount")
                except BenchError as exc:  # something still holds it: detach when released
                    print(f"{exc}; unmounting lazily", file=sys.stderr)
                    _run(["umount", "--lazy", str(mnt)], "umount --lazy")
        finally:
            # Still attached only if the mount failed; after a lazy umount, autoclear detaches.
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


def xfs_size(need: int) -> int:
    """The loop device's size for `need` free bytes: XFS keeps some for its log and metadata."""
    return need + need // 8 + (256 << 20)


def location_space(location: str, size: int, servers: Sequence[str]) -> int:
    """Bytes a location needs: the image, one volume per volume server, room for metadata."""
    volumes = sum(1 for s in servers if s in VOLUME_TENANT)
    return size * (1 + volumes) + (512 << 20 if location == "disk" else 64 << 20)


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Site:
    """One location while it is measured: its image and our volumes on it."""

    location: Location
    image: Path
    size: int
    volumes: dict[str, str] = field(default_factory=dict)  # server -> volume id
    exports: dict[str, str] = field(default_factory=dict)  # server -> export name, redacted
    volume_error: str = ""  # why the volumes could not be prepared

    @property
    def scratch(self) -> Path:
        return self.location.directory

    @property
    def node_dir(self) -> Path:
        return self.location.directory / "node"


@dataclass
class Running:
    handle: ServerHandle  # its process tree is what the CPU columns count
    uri: str  # may carry an attachment credential: never printed
    stop: Callable[[], object]


@dataclass(frozen=True)
class ServerKind:
    name: str
    describe: str
    start: Callable[[Site], Running]


def redact_export(export: str) -> str:
    """An attachment's export name is VOLUME_ID.SECRET: keep the volume id only."""
    head, dot, _ = export.partition(".")
    return f"{head}.<redacted>" if dot else export


def redact(text: str, uri: str) -> str:
    """`text` without the export name (the credential) of `uri`."""
    export = uri.rsplit("/", 1)[-1]
    return text.replace(export, redact_export(export)) if "." in export else text


def qemu_best(o_direct: bool) -> tuple[str, str]:
    return ("none", "native") if o_direct else ("writeback", "io_uring")


def _qemu(cache: str, aio: str) -> Callable[[Site], Running]:
    def start(site: Site) -> Running:
        handle = start_qemu_nbd(site.image, EXPORT, extra_args=[f"--cache={cache}", f"--aio={aio}"])
        return Running(handle, handle.uri(EXPORT), handle.stop)

    return start


def _qemu_best(site: Site) -> Running:
    return _qemu(*qemu_best(site.location.o_direct))(site)


def _nbdkit(threads: int) -> Callable[[Site], Running]:
    def start(site: Site) -> Running:
        handle = start_nbdkit_file(site.image, threads=threads)
        return Running(handle, handle.uri(EXPORT), handle.stop)

    return start


def _ours_raw(site: Site) -> Running:
    handle = start_storage_node(
        site.scratch / "storage-node-raw", exports=[f"name={EXPORT},file={site.image}"]
    )
    return Running(handle, handle.uri(EXPORT), handle.stop)


def start_node(site: Site) -> tuple[ApiNode, int]:
    """Our storage node on the site's data directory, API and metrics on free ports."""
    metrics_port = free_port()
    node = start_api_node(
        site.node_dir,
        workers=None,  # the node's default, as deployed
        exports=(),
        node_id=NODE_ID,
        extra_args=["--no-default-export", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
    )
    return node, metrics_port


def _ours_volume(server: str) -> Callable[[Site], Running]:
    def start(site: Site) -> Running:
        if server not in site.volumes:
            raise RuntimeError(f"no volume: {site.volume_error or 'not prepared'}")
        node, _ = start_node(site)
        try:
            attachment = node.api.publish(site.volumes[server], CLIENT_NODE, CLIENT_ADDRESS)
        except BaseException:
            node.stop()
            raise
        assert node.handle is not None
        return Running(node.handle, attachment.uri, node.stop)

    return start


def server_kinds() -> dict[str, ServerKind]:
    qos = f"volume and tenant QoS {QOS_IOPS / 1e6:g}M IOPS, {QOS_BYTES_PER_SECOND / 1e9:g} GB/s"
    kinds = [
        ServerKind(
            "ours",
            "storage node, API volume via its attachment, metrics on, no QoS (default workers)",
            _ours_volume("ours"),
        ),
        ServerKind("ours-qos", f"as ours, with {qos}", _ours_volume("ours-qos")),
        ServerKind(
            "ours-qos-nozd",
            "as ours-qos, the volume with zero detection off",
            _ours_volume("ours-qos-nozd"),
        ),
        ServerKind(
            "ours-raw",
            f"python -m storage_node --export name={EXPORT},file=IMAGE (reference only)",
            _ours_raw,
        ),
        ServerKind(
            "qemu-nbd",
            "qemu-nbd --cache=none --aio=native where O_DIRECT works, "
            "else --cache=writeback --aio=io_uring",
            _qemu_best,
        ),
        ServerKind("nbdkit", "nbdkit -t 16 file", _nbdkit(16)),
        ServerKind("nbdkit-t4", "nbdkit -t 4 file", _nbdkit(4)),
    ]
    for cache, aio in [
        ("writeback", "threads"),
        ("writeback", "io_uring"),
        ("none", "threads"),
        ("none", "native"),
        ("none", "io_uring"),
    ]:
        short = {"writeback": "wb"}.get(cache, cache) + "-" + aio.replace("io_", "")
        kinds.append(
            ServerKind(
                f"qemu-nbd-{short}", f"qemu-nbd --cache={cache} --aio={aio}", _qemu(cache, aio)
            )
        )
    return {k.name: k for k in kinds}


def describe_at(kind: ServerKind, location: Location) -> str:
    """What the server means at this location (qemu-nbd's choice depends on the medium)."""
    if kind.name == "qemu-nbd":
        cache, aio = qemu_best(location.o_direct)
        return f"qemu-nbd --cache={cache} --aio={aio}"
    return kind.describe


# ---------------------------------------------------------------------------------------------
# Our volumes: created, limited, published and filled through the product's own interfaces

FILL_SCRIPT = """
import sys
import nbd
uri = sys.stdin.readline().strip()
path, size, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
if h.get_size() != size:
    sys.exit(f"the export has {h.get_size()} bytes, the image {size}")
with open(path, "rb") as f:
    offset = 0
    while offset < size:
        data = f.read(min(chunk, size - offset))
        h.pwrite(data, offset)
        offset += len(data)
h.flush()
h.shutdown()
"""


def fill_through_nbd(image: Path, uri: str, size: int) -> None:
    """Copy the image into the export with libnbd; the URI goes on stdin, not the command line."""
    try:
        out = subprocess.run(
            [SYSTEM_PYTHON, "-c", FILL_SCRIPT, str(image), str(size), str(FILL_CHUNK)],
            input=uri + "\n",
            capture_output=True,
            text=True,
            timeout=max(120.0, size / 20e6),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"filling the volume: {exc}") from exc
    if out.returncode != 0:
        hint = " (needs python3-libnbd)" if "No module named 'nbd'" in out.stderr else ""
        raise BenchError(f"filling the volume failed{hint}: {redact(out.stderr, uri)[-300:]}")


def metric_value(text: str, name: str, labels: dict[str, str]) -> float | None:
    """The sample of `name` whose labels include `labels`, from Prometheus text format."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def prepare_volumes(site: Site, servers: Sequence[str]) -> None:
    """Create, limit, publish and fill one volume per volume server; check the metrics."""
    wanted = [s for s in servers if s in VOLUME_TENANT]
    if not wanted:
        return
    node, metrics_port = start_node(site)
    try:
        api = node.api
        for server in wanted:
            tenant = VOLUME_TENANT[server]
            qos = pb.Qos(iops=QOS_IOPS, bytes_per_second=QOS_BYTES_PER_SECOND)
            if server in WITH_QOS:
                api.SetTenantLimits(
                    pb.SetTenantLimitsRequest(name=tenant, limits=pb.TenantLimits(qos=qos))
                )
            created = api.CreateVolume(
                pb.CreateVolumeRequest(
                    name=f"bench-{server}",
                    tenant=tenant,
                    size_bytes=site.size,
                    zero_detection_disabled=server in NO_ZERO_DETECTION,
                )
            )
            volume = api.wait_volume(created.id)
            if volume.state != pb.VOLUME_STATE_READY:
                raise BenchError(f"volume for {server} is not ready: {volume.error}")
            if server in WITH_QOS:
                volume = api.SetVolumeQos(pb.SetVolumeQosRequest(volume_id=volume.id, qos=qos))
                if volume.qos.iops != QOS_IOPS:
                    raise BenchError(f"SetVolumeQos did not take: {volume.qos}")
            attachment = api.publish(volume.id, CLIENT_NODE, CLIENT_ADDRESS)
            fill_through_nbd(site.image, attachment.uri, site.size)
            site.volumes[server] = volume.id
            site.exports[server] = redact_export(attachment.export_name)
        # The Stats wrapper must have counted every byte of the fills (proof metrics are on).
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        def written() -> list[float | None]:
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
            return [
                metric_value(
                    text, "nbdcsi_volume_bytes_total", {"volume": site.volumes[s], "op": "write"}
                )
                for s in wanted
            ]

        poll(written, lambda v: all(x is not None and x >= site.size for x in v), 30, "metrics")
    except BenchError:
        raise
    except Exception as exc:  # gRPC, HTTP, timeouts: all mean "no volumes to measure"
        raise BenchError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        node.stop()


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in clock ticks) for every visible process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rindex(b")") + 2 :].split()
        ppid = int(fields[1])
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        table[int(entry.name)] = (ppid, ticks)
    return table


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and all its descendants, including reaped children's times."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples a process tree's CPU time on a thread until stopped."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), tree_cpu_seconds(self.root)))
            if self._stop.wait(CPU_SAMPLE_INTERVAL):
                return

    def rate(self, lo: float, hi: float) -> float | None:
        """Average CPU use (cores) between the first sample >= lo and the last <= hi."""
        inside = [s for s in self.samples if lo <= s[0] <= hi]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.5:
            return None
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0)


# ---------------------------------------------------------------------------------------------
# fio


@dataclass
class Result:
    location: str
    server: str
    row: str
    rep: int
    ok: bool = False
    error: str = ""
    throughput: float = math.nan  # IOPS for 4k rows, MB/s for 1M rows
    iops: float = math.nan
    mb_s: float = math.nan
    clat_mean_us: float = math.nan
    clat_p99_us: float = math.nan
    server_cpu_cores: float = math.nan
    cpu_us_per_io: float = math.nan
    fio: dict[str, Any] = field(default_factory=dict)


def fio_job(
    row: Row, uri: str, image_size: int, runtime: float, ramp: float, zero_buffers: bool = False
) -> str:
    """A fio job file: the URI may carry a credential, so it goes in a file, not in argv."""
    span = image_size // row.conns
    options = [
        "ioengine=nbd",
        f"uri={uri}",
        f"rw={row.rw}",
        f"bs={row.bs}",
        f"iodepth={row.iodepth}",
        f"numjobs={row.conns}",
        "group_reporting=1",
        f"size={span}",
        f"offset_increment={span}",
        "time_based=1",
        f"runtime={runtime:g}",
        f"ramp_time={ramp:g}",
    ]
    if row.fsync:
        options.append(f"fsync={row.fsync}")
    if zero_buffers:
        options.append("zero_buffers=1")
    return "[bench]\n" + "".join(f"{o}\n" for o in options)


def fio_argv(job_file: Path, output: Path) -> list[str]:
    return ["fio", "--output-format=json", f"--output={output}", str(job_file)]


def parse_fio(report: dict[str, Any], row: Row, result: Result) -> None:
    job = report["jobs"][0]  # group_reporting: one aggregate entry
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    side = job["write" if "write" in row.rw else "read"]
    if side["total_ios"] <= 0:
        raise RuntimeError("fio completed no I/O")
    result.iops = float(side["iops"])
    result.mb_s = float(side["bw_bytes"]) / 1e6
    result.throughput = result.iops if row.unit == "IOPS" else result.mb_s
    result.clat_mean_us = float(side["clat_ns"]["mean"]) / 1e3
    result.clat_p99_us = float(side["clat_ns"]["percentile"]["99.000000"]) / 1e3
    keys = ("read", "write", "sync", "job_runtime", "usr_cpu", "sys_cpu")
    result.fio = {k: job[k] for k in keys if k in job}


def run_fio(argv: list[str], timeout: float) -> tuple[int, str]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timeout or interrupted: stop our fio, by its pid
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode(errors="replace").strip()


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    with open(path, "w", opener=lambda p, f: os.open(p, f | os.O_EXCL, 0o600)) as out:
        out.write(text)


def measure(kind: ServerKind, row: Row, rep: int, site: Site, args: argparse.Namespace) -> Result:
    result = Result(location=site.location.name, server=kind.name, row=row.name, rep=rep)
    report_path, job_path = site.scratch / "fio.json", site.scratch / "fio.job"
    report_path.unlink(missing_ok=True)
    try:
        running = kind.start(site)
    except Exception as exc:  # a server that does not start is a result, not a crash
        result.error = f"start failed: {exc}{_newest_log_tail(site.scratch)}"
        return result
    handle = running.handle
    try:
        job = fio_job(row, running.uri, site.size, args.runtime, args.ramp_time, args.zero_buffers)
        _write_private(job_path, job)
        with CpuSampler(handle.proc.pid) as cpu:
            t_launch = time.monotonic()
            rc, err = run_fio(
                fio_argv(job_path, report_path), timeout=args.runtime + args.ramp_time + 60
            )
            t_end = time.monotonic()
        if handle.proc.poll() is not None:
            result.error = f"server exited with {handle.proc.returncode} during the run"
            return result
        if rc != 0:
            result.error = f"fio exited {rc}: {err[-300:]}"
            return result
        parse_fio(json.loads(report_path.read_text()), row, result)
        rate = cpu.rate(t_launch + args.ramp_time + CPU_WINDOW_HEAD, t_end - CPU_WINDOW_TAIL)
        if rate is not None:
            result.server_cpu_cores = rate
            result.cpu_us_per_io = rate / result.iops * 1e6
        result.ok = True
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        job_path.unlink(missing_ok=True)
        running.stop()
        if not result.ok and handle.log_text():
            result.error += f" | server log: {handle.log_text()[-300:]!r}"
        result.error = redact(result.error, running.uri)
    return result


def _newest_log_tail(scratch: Path) -> str:
    logs = sorted(scratch.rglob("*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return ""
    return f" | {logs[-1].name}: {logs[-1].read_text(errors='replace')[-300:]!r}"


# ---------------------------------------------------------------------------------------------
# Image, versions


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 256M)")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))


def fill_image(path: Path, size: int) -> None:
    """Write every byte (non-zero data) so the whole image is allocated, and make it durable
    (on a disk, so that write-back of the fill does not run into the first measurements)."""
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        offset = 0
        while offset < size:
            offset += os.pwrite(fd, chunk[: min(len(chunk), size - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def versions() -> dict[str, str]:
    try:
        uv = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = "not installed"
    return {
        "qemu-nbd": _first_line(["qemu-nbd", "--version"]),
        "nbdkit": _first_line(["nbdkit", "--version"]),
        "fio": _first_line(["fio", "--version"]),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uvloop": uv,
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
    }


# ---------------------------------------------------------------------------------------------
# Summary


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def median(values: Sequence[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return statistics.median(good) if good else math.nan


@dataclass
class Cell:
    throughput: float
    clat_mean_us: float
    clat_p99_us: float
    cpu_us_per_io: float
    runs: int


def summarize(
    results: list[Result], rows: list[Row], servers: list[str]
) -> dict[str, dict[str, Cell]]:
    """Medians per (row, server) of one location's results."""
    table: dict[str, dict[str, Cell]] = {}
    for row in rows:
        for server in servers:
            ok = [r for r in results if r.row == row.name and r.server == server and r.ok]
            table.setdefault(row.name, {})[server] = Cell(
                throughput=median([r.throughput for r in ok]),
                clat_mean_us=median([r.clat_mean_us for r in ok]),
                clat_p99_us=median([r.clat_p99_us for r in ok]),
                cpu_us_per_io=median([r.cpu_us_per_io for r in ok]),
                runs=len(ok),
            )
    return table


def subject_and_peers(servers: Sequence[str]) -> tuple[str, list[str]]:
    """The ratio's subject (ours-qos first) and what it is compared against (not ours)."""
    subject = next((s for s in OURS if s in servers), servers[0])
    others = [s for s in servers if s != subject]
    if subject in OURS:
        peers = [s for s in others if s not in OURS]
        return subject, peers or others
    return subject, others


def ratio_of(cells: dict[str, Cell], subject: str, peers: list[str]) -> float:
    peer_best = max(
        (cells[p].throughput for p in peers if not math.isnan(cells[p].throughput)),
        default=math.nan,
    )
    mine = cells[subject].throughput
    if math.isnan(peer_best) or peer_best <= 0:
        return math.nan
    if cells[subject].runs == 0:
        return 0.0  # the subject failed every run of a row the peers completed
    return mine / peer_best


def _fmt(value: float, spec: str, width: int) -> str:
    """Right-aligned in `width` (plus one space of separation); `-` for no value."""
    if math.isnan(value):
        text = "-"
    elif spec == "auto":  # one decimal for small values, none once they get wide
        text = format(value, ".1f" if value < 100 else ".0f")
    else:
        text = format(value, spec)
    return f" {text:>{width}}"


ROW_WIDTH = max(len(r.name) for r in all_rows())


def render(
    table: dict[str, dict[str, Cell]],
    rows: list[Row],
    servers: list[str],
    subject: str,
    peers: list[str],
) -> tuple[str, list[float]]:
    """One location's table, and the ratios of its rows (those that have one)."""
    col = 32  # tput, mean, p99, cpu/io: widths 8, 7, 7, 6, each after one space
    lines = []
    head1 = f"{'row':<{ROW_WIDTH}} {'unit':<4} |" + "|".join(f" {s:<{col - 1}}" for s in servers)
    head2 = f"{'':<{ROW_WIDTH}} {'':<4} |" + "|".join(
        f" {'tput':>8} {'mean':>7} {'p99':>7} {'cpu/io':>6}" for _ in servers
    )
    if peers:
        head1 += "| ratio"
        head2 += "|"
    lines += [head1, head2, "-" * len(head1)]
    ratios = []
    for row in rows:
        cells = table[row.name]
        line = f"{row.name:<{ROW_WIDTH}} {row.unit:<4} |" + "|".join(
            _fmt(c.throughput, ".0f", 8)
            + _fmt(c.clat_mean_us, "auto", 7)
            + _fmt(c.clat_p99_us, "auto", 7)
            + _fmt(c.cpu_us_per_io, "auto", 6)
            for c in (cells[s] for s in servers)
        )
        if peers:
            r = ratio_of(cells, subject, peers)
            if not math.isnan(r):
                ratios.append(r)
            line += "|" + _fmt(r, ".2f", 5)
        lines.append(line)
    return "\n".join(lines), ratios


def legend(subject: str, peers: list[str]) -> str:
    lines = [
        "tput: IOPS or MB/s (median); mean, p99: completion latency in us; "
        "cpu/io: server CPU us per I/O"
    ]
    if peers:
        lines.append(f"ratio = {subject} / max({', '.join(peers)}) of tput")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None, kinds: dict[str, ServerKind]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument(
        "--servers",
        default="ours,ours-qos,qemu-nbd,nbdkit",
        help="comma-separated server names (default: ours,ours-qos,qemu-nbd,nbdkit)",
    )
    p.add_argument("--rows", default="", help="regex matched (re.search) against row names")
    p.add_argument(
        "--location",
        default=",".join(LOCATIONS),
        help="comma-separated image locations: tmpfs, disk (default: tmpfs,disk)",
    )
    p.add_argument(
        "--disk-dir",
        type=Path,
        help="for the disk location, use a directory on this disk filesystem instead of "
        "making an XFS loop device",
    )
    p.add_argument(
        "--xfs-backing-dir",
        type=Path,
        default=XFS_BACKING_DIR,
        help=f"where the XFS loop device's sparse backing file goes (default: {XFS_BACKING_DIR})",
    )
    p.add_argument("--runtime", type=float, default=5.0, help="fio timed seconds per run")
    p.add_argument(
        "--ramp-time",
        "--ramp_time",
        dest="ramp_time",
        type=float,
        default=1.0,
        help="fio warm-up seconds per run, not counted",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per (server, row); median shown")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"), help="image size")
    p.add_argument("--json", type=Path, help="write raw per-run results and summary here")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: --runtime 2 --repeat 1 (unless given)"
    )
    p.add_argument(
        "--zero-buffers",
        action="store_true",
        help="fio writes zeroes (zero_buffers=1), which zero detection turns into holes; "
        "default: fio's random data",
    )
    p.add_argument("--list-servers", action="store_true", help="list server names and exit")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (servers, rows, fio jobs) and exit"
    )
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    if args.quick:
        given = {a.split("=", 1)[0] for a in raw}
        if "--runtime" not in given:
            args.runtime = 2.0
        if "--repeat" not in given:
            args.repeat = 1
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.server_list if s not in kinds]
    if unknown:
        p.error(f"unknown server(s) {unknown}; known: {', '.join(kinds)}")
    if len(set(args.server_list)) != len(args.server_list) or not args.server_list:
        p.error("--servers needs distinct names")
    args.locations = [s.strip() for s in args.location.split(",") if s.strip()]
    bad = [s for s in args.locations if s not in LOCATIONS]
    if bad or not args.locations or len(set(args.locations)) != len(args.locations):
        p.error(f"--location takes distinct names among {', '.join(LOCATIONS)}, got {bad or []}")
    if args.disk_dir is not None and not args.disk_dir.is_dir():
        p.error(f"--disk-dir {args.disk_dir} is not a directory")
    if args.repeat < 1 or args.runtime <= 0 or args.ramp_time < 0:
        p.error("--repeat >= 1, --runtime > 0, --ramp-time >= 0")
    if args.size <= 0 or args.size % (2 << 20):
        p.error("--size must be a positive multiple of 2 MiB (volumes and 1M rows on halves)")
    return args


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop servers


@contextlib.contextmanager
def open_location(name: str, args: argparse.Namespace, need: int) -> Iterator[Location]:
    if name == "tmpfs":
        with tmpfs_location() as location:
            yield location
        return
    if args.disk_dir is None:
        st = os.statvfs(args.xfs_backing_dir)
        if st.f_bavail * st.f_frsize < xfs_size(need):
            raise BenchError(
                f"not enough space in {args.xfs_backing_dir} for {xfs_size(need)} bytes"
            )
    with disk_location(args, need) as location:
        yield location


def run_location(
    location: Location,
    rows: list[Row],
    servers: list[str],
    kinds: dict[str, ServerKind],
    args: argparse.Namespace,
) -> list[Result]:
    need = location_space(location.name, args.size, servers)
    st = os.statvfs(location.directory)
    if st.f_bavail * st.f_frsize < need:
        raise BenchError(f"not enough space on {location.medium} for {need} bytes")
    site = Site(location, location.directory / "bench.img", args.size)
    fill_image(site.image, args.size)
    try:
        prepare_volumes(site, servers)
    except BenchError as exc:
        site.volume_error = str(exc)
        print(f"  volumes: FAILED: {exc}", file=sys.stderr, flush=True)
    else:
        for server, vid in site.volumes.items():
            print(
                f"  volume for {server}: {vid}, filled, published as export {site.exports[server]}",
                flush=True,
            )
    results: list[Result] = []
    for rep in range(args.repeat):
        for i, row in enumerate(rows):
            shift = (rep + i) % len(servers)
            for name in servers[shift:] + servers[:shift]:
                res = measure(kinds[name], row, rep, site, args)
                results.append(res)
                status = (
                    f"{res.throughput:.0f} {row.unit}, {res.cpu_us_per_io:.1f} us cpu/io"
                    if res.ok
                    else f"FAILED: {res.error}"
                )
                print(
                    f"  [{location.name} {rep + 1}/{args.repeat}] {row.name:<{ROW_WIDTH}} "
                    f"{name:<10} {status}",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    kinds = server_kinds()
    args = parse_args(argv, kinds)
    if args.list_servers:
        for kind in kinds.values():
            print(f"{kind.name:<22} {kind.describe}")
        return 0
    rows = [r for r in all_rows() if re.search(args.rows, r.name)]
    if not rows:
        print(f"no row matches {args.rows!r}", file=sys.stderr)
        return 2
    servers: list[str] = args.server_list
    subject, peers = subject_and_peers(servers)
    locations: list[str] = args.locations

    info = {} if args.dry_run else versions()
    print("measured with:" if info else "plan (dry run):")
    for k, v in info.items():
        print(f"  {k:<9} {v}")
    for s in servers:
        print(f"  server    {s}: {kinds[s].describe}")
    runs = len(locations) * len(rows) * len(servers) * args.repeat
    est = runs * (args.runtime + args.ramp_time + 1.0)
    print(
        f"image {args.size >> 20} MiB per location ({', '.join(locations)}); "
        f"{len(locations)} locations x {len(rows)} rows x {len(servers)} servers x "
        f"{args.repeat} repeats = {runs} runs, about {est / 60:.1f} min",
        flush=True,
    )
    if peers:
        print(f"ratio: {subject} / max({', '.join(peers)})")
    if args.dry_run:
        for row in rows:
            job = fio_job(
                row, "nbd://127.0.0.1:PORT/EXPORT", args.size, args.runtime, 0, args.zero_buffers
            )
            options = [o for o in job.splitlines()[1:] if not o.startswith(("uri=", "ramp"))]
            print(f"  row {row.name:<{ROW_WIDTH}} {' '.join(options)}")
        return 0
    if "disk" in locations and args.disk_dir is None and os.geteuid() != 0:
        print(
            "the disk location makes an XFS loop device and needs root; "
            "run as root, give --disk-dir DIR, or --location tmpfs",
            file=sys.stderr,
        )
        return 2

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    results: list[Result] = []
    measured: dict[str, Location] = {}
    failed: dict[str, str] = {}
    for name in locations:
        need = location_space(name, args.size, servers)
        try:
            with open_location(name, args, need) as location:
                cache, aio = qemu_best(location.o_direct)
                print(
                    f"location {name}: {location.medium}; O_DIRECT "
                    f"{'works' if location.o_direct else 'refused'}, so qemu-nbd means "
                    f"--cache={cache} --aio={aio}",
                    flush=True,
                )
                results += run_location(location, rows, servers, kinds, args)
                measured[name] = location
        except BenchError as exc:
            failed[name] = str(exc)
            print(f"location {name}: FAILED: {exc}", file=sys.stderr, flush=True)

    tables: dict[str, dict[str, dict[str, Cell]]] = {}
    all_ratios: list[float] = []
    sys.stderr.flush()
    for name, location in measured.items():
        table = summarize([r for r in results if r.location == name], rows, servers)
        tables[name] = table
        text, ratios = render(table, rows, servers, subject, peers)
        all_ratios += ratios
        print()
        print(f"== {name}: {location.medium}")
        print(text)
    min_ratio = min(all_ratios) if all_ratios else math.nan
    print()
    print(legend(subject, peers))
    for name, why in failed.items():
        print(f"location {name} not measured: {why}")
    if args.json:
        args.json.write_text(
            json.dumps(
                _json_safe(
                    {
                        "versions": info,
                        "servers": {s: kinds[s].describe for s in servers},
                        "ratio": {"subject": subject, "peers": peers},
                        "settings": {
                            "runtime": args.runtime,
                            "ramp_time": args.ramp_time,
                            "repeat": args.repeat,
                            "size": args.size,
                        },
                        "locations": {
                            name: {
                                "medium": loc.medium,
                                "o_direct": loc.o_direct,
                                "servers": {s: describe_at(kinds[s], loc) for s in servers},
                                "summary": {
                                    row: {s: asdict(c) for s, c in cells.items()}
                                    for row, cells in tables[name].items()
                                },
                            }
                            for name, loc in measured.items()
                        },
                        "failed_locations": failed,
                        "min_ratio": None if math.isnan(min_ratio) else min_ratio,
                        "runs": [asdict(r) for r in results],
                    }
                ),
                indent=1,
                default=str,
            )
        )
    print(f"min_ratio={min_ratio:.2f}", flush=True)
    return 0 if all(r.ok for r in results) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
