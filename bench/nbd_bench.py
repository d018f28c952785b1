"""NBD data-path benchmark: our storage node against qemu-nbd and nbdkit, driven by fio.

Owns: one image file on tmpfs, the server variants and their command lines, the fio job
matrix, per-run server CPU accounting from /proc, and the summary table ending in
`min_ratio=X.XX`. It is a script, not a test: it asserts nothing, it prints numbers.

What it does
  * Creates one image (1 GiB by default) in a temporary directory on /dev/shm and writes it
    completely, so every read hits allocated pages and no server can answer from a hole.
  * For every (repetition, row) it runs each server in turn (the order rotates every row so no
    server is always first): start the server on 127.0.0.1, run fio against it, stop it. Only one
    server exists at a time; the script only ever signals the pids it started.
  * fio uses its nbd engine (libnbd): one fio job per connection, `group_reporting` so the
    aggregate of the jobs is reported; with 2 connections each job covers its own half of the
    image (`size` and `offset_increment`).
  * Server CPU is the sum of utime+stime+cutime+cstime over the server process and all its
    descendants, sampled from /proc every 0.25 s; CPU per I/O is the CPU rate in the middle of
    the timed window divided by the I/O rate fio reports.
  * Each (server, row) runs `--repeat` times (default 3); the table shows medians.

Servers (names accepted by `--servers`)
  ours                 python -m storage_node --export name=bench,file=IMAGE (default workers)
  qemu-nbd             qemu-nbd's best configuration for a tmpfs image, see below
  nbdkit               nbdkit file plugin, -t 16 (default thread model: parallel)
  qemu-nbd-wb-threads, qemu-nbd-wb-uring, qemu-nbd-none-threads, qemu-nbd-none-native,
  qemu-nbd-none-uring, nbdkit-t4
                       fixed variants, for comparing configurations (`--list-servers`)

qemu-nbd configuration. `--cache=none` opens the image with O_DIRECT; tmpfs refuses O_DIRECT on
kernels before 6.6, and `--aio=native` requires `--cache=none`. The script probes O_DIRECT in its
tmpfs directory: if it works, `qemu-nbd` means `--cache=none --aio=native`, otherwise
`--cache=writeback --aio=io_uring`. Chosen from measurements with qemu-nbd 7.2 on a 6.18 kernel
(tmpfs with O_DIRECT, 2 vCPUs shared with other work; 4k QD32 and 1M QD8 rows, 1 connection,
3 repeats; numbers in bench/README.md): none/native needed the least server CPU per 4k I/O by far
(16-17 us against 27-46 us for writeback/threads, writeback/io_uring and none/io_uring) and had
the best or near-best 4k IOPS. On 1M sequential reads writeback/threads was about 1.3x faster
than none/native; nbdkit matched or beat both there, so the max over the peers that the ratio
uses hardly moves. Without O_DIRECT, writeback/io_uring beat writeback/threads on 4k QD32 in the
repeated run (within noise in a single one).

Rows: 4k randread/randwrite at QD1 and QD32, 1M sequential read/write at QD8, each with 1 and 2
connections. 4k rows report IOPS, 1M rows MB/s (10^6 bytes). Latencies are fio's completion
latency (clat), mean and 99th percentile, in microseconds.

The ratio column is subject / max(peers) of the throughput column, where the subject is `ours`
(or the first server listed, when `ours` is not among `--servers`) and the peers are all other
servers listed. The last line is `min_ratio=X.XX`, the lowest ratio over all rows (`nan` when no
ratio could be computed).

Usage
  python bench/nbd_bench.py                                # full matrix, ~12 minutes
  python bench/nbd_bench.py --quick --rows qd32            # smoke run
  python bench/nbd_bench.py --servers qemu-nbd,nbdkit --rows '^4k-randread' --json out.json
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.servers import (  # noqa: E402  (needs the repo on sys.path first)
    ServerHandle,
    start_nbdkit_file,
    start_qemu_nbd,
    start_storage_node,
)

EXPORT = "bench"
TMPFS = Path("/dev/shm")
CPU_SAMPLE_INTERVAL = 0.25
# Margins around the timed window for CPU accounting: fio needs a moment to start and connect
# after launch, and some time to disconnect and write its report after the timed window.
CPU_WINDOW_HEAD = 0.3
CPU_WINDOW_TAIL = 0.2


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Row:
    name: str
    rw: str  # fio rw=
    bs: str
    iodepth: int
    conns: int

    @property
    def unit(self) -> str:
        return "IOPS" if self.bs == "4k" else "MB/s"


def all_rows() -> list[Row]:
    rows = []
    for rw, bs, depth in [
        ("randread", "4k", 1),
        ("randread", "4k", 32),
        ("randwrite", "4k", 1),
        ("randwrite", "4k", 32),
        ("read", "1M", 8),
        ("write", "1M", 8),
    ]:
        for conns in (1, 2):
            kind = rw if rw.startswith("rand") else f"seq{rw}"
            rows.append(Row(f"{bs.lower()}-{kind}-qd{depth}-c{conns}", rw, bs, depth, conns))
    return rows


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass(frozen=True)
class ServerKind:
    name: str
    describe: str
    start: Callable[[Path, Path], ServerHandle]  # (image, scratch dir) -> running handle


def _qemu(cache: str, aio: str) -> Callable[[Path, Path], ServerHandle]:
    def start(image: Path, scratch: Path) -> ServerHandle:
        return start_qemu_nbd(image, EXPORT, extra_args=[f"--cache={cache}", f"--aio={aio}"])

    return start


def _nbdkit(threads: int) -> Callable[[Path, Path], ServerHandle]:
    def start(image: Path, scratch: Path) -> ServerHandle:
        return start_nbdkit_file(image, threads=threads)

    return start


def _ours(image: Path, scratch: Path) -> ServerHandle:
    return start_storage_node(scratch / "storage-node", exports=[f"name={EXPORT},file={image}"])


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


def server_kinds(o_direct: bool) -> dict[str, ServerKind]:
    best_cache, best_aio = ("none", "native") if o_direct else ("writeback", "io_uring")
    kinds = [
        ServerKind("ours", "python -m storage_node (default workers)", _ours),
        ServerKind(
            "qemu-nbd",
            f"qemu-nbd --cache={best_cache} --aio={best_aio}",
            _qemu(best_cache, best_aio),
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


def fio_argv(
    row: Row, uri: str, image_size: int, runtime: float, ramp: float, output: Path
) -> list[str]:
    span = image_size // row.conns
    return [
        "fio",
        "--output-format=json",
        f"--output={output}",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={row.rw}",
        f"--bs={row.bs}",
        f"--iodepth={row.iodepth}",
        f"--numjobs={row.conns}",
        "--group_reporting",
        f"--size={span}",
        f"--offset_increment={span}",
        "--time_based",
        f"--runtime={runtime:g}",
        f"--ramp_time={ramp:g}",
    ]


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
    result.fio = {k: job[k] for k in ("read", "write", "job_runtime", "usr_cpu", "sys_cpu")}


def run_fio(argv: list[str], timeout: float) -> tuple[int, str]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # timeout or interrupted: stop our fio, by its pid
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode(errors="replace").strip()


def measure(
    kind: ServerKind,
    row: Row,
    rep: int,
    image: Path,
    image_size: int,
    scratch: Path,
    args: argparse.Namespace,
) -> Result:
    result = Result(server=kind.name, row=row.name, rep=rep)
    report_path = scratch / "fio.json"
    report_path.unlink(missing_ok=True)
    try:
        handle = kind.start(image, scratch)
    except Exception as exc:  # a server that does not start is a result, not a crash
        result.error = f"start failed: {exc}{_newest_log_tail(scratch)}"
        return result
    try:
        argv = fio_argv(
            row, handle.uri(EXPORT), image_size, args.runtime, args.ramp_time, report_path
        )
        with CpuSampler(handle.proc.pid) as cpu:
            t_launch = time.monotonic()
            rc, err = run_fio(argv, timeout=args.runtime + args.ramp_time + 60)
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
        handle.stop()
        if not result.ok and handle.log_text():
            result.error += f" | server log: {handle.log_text()[-300:]!r}"
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
    """Write every byte (non-zero data) so the whole image is allocated."""
    chunk = os.urandom(1 << 20)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        offset = 0
        while offset < size:
            offset += os.pwrite(fd, chunk[: min(len(chunk), size - offset)], offset)
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


def render(
    table: dict[str, dict[str, Cell]],
    rows: list[Row],
    servers: list[str],
    subject: str,
    peers: list[str],
) -> tuple[str, float]:
    col = 32  # tput, mean, p99, cpu/io: widths 8, 7, 7, 6, each after one space
    lines = []
    head1 = f"{'row':<20} {'unit':<4} |" + "|".join(f" {s:<{col - 1}}" for s in servers)
    head2 = f"{'':<20} {'':<4} |" + "|".join(
        f" {'tput':>8} {'mean':>7} {'p99':>7} {'cpu/io':>6}" for _ in servers
    )
    if peers:
        head1 += "| ratio"
        head2 += "|"
    lines += [head1, head2, "-" * len(head1)]
    ratios = []
    for row in rows:
        cells = table[row.name]
        line = f"{row.name:<20} {row.unit:<4} |" + "|".join(
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
    lines.append("")
    lines.append(
        "tput: IOPS or MB/s (median); mean, p99: completion latency in us; "
        "cpu/io: server CPU us per I/O"
    )
    if peers:
        lines.append(f"ratio = {subject} / max({', '.join(peers)}) of tput")
    return "\n".join(lines), (min(ratios) if ratios else math.nan)


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None, kinds: dict[str, ServerKind]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument(
        "--servers",
        default="ours,qemu-nbd,nbdkit",
        help="comma-separated server names (default: ours,qemu-nbd,nbdkit)",
    )
    p.add_argument("--rows", default="", help="regex matched (re.search) against row names")
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
    p.add_argument("--quick", action="store_true", help="smoke run: --runtime 2 --repeat 1")
    p.add_argument("--list-servers", action="store_true", help="list server names and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.runtime, args.repeat = 2.0, 1
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.server_list if s not in kinds]
    if unknown:
        p.error(f"unknown server(s) {unknown}; known: {', '.join(kinds)}")
    if len(set(args.server_list)) != len(args.server_list) or not args.server_list:
        p.error("--servers needs distinct names")
    if args.repeat < 1 or args.runtime <= 0 or args.ramp_time < 0:
        p.error("--repeat >= 1, --runtime > 0, --ramp-time >= 0")
    return args


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop servers


@contextlib.contextmanager
def tmpfs_dir() -> Iterator[Path]:
    base = TMPFS if TMPFS.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="nbd-bench-", dir=base) as d:
        yield Path(d)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    kinds = server_kinds(o_direct_works(TMPFS) if TMPFS.is_dir() else False)
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
    subject = "ours" if "ours" in servers else servers[0]
    peers = [s for s in servers if s != subject]

    info = versions()
    print("measured with:")
    for k, v in info.items():
        print(f"  {k:<9} {v}")
    for s in servers:
        print(f"  server    {s}: {kinds[s].describe}")
    runs = len(rows) * len(servers) * args.repeat
    est = runs * (args.runtime + args.ramp_time + 0.7)
    print(
        f"image {args.size >> 20} MiB on tmpfs; {len(rows)} rows x {len(servers)} servers x "
        f"{args.repeat} repeats = {runs} runs, about {est / 60:.1f} min",
        flush=True,
    )

    results: list[Result] = []
    with tmpfs_dir() as scratch:
        image = scratch / "bench.img"
        st = os.statvfs(scratch)
        if st.f_bavail * st.f_frsize < args.size + (64 << 20):
            print(
                f"not enough space in {scratch.parent} for a {args.size} byte image",
                file=sys.stderr,
            )
            return 2
        fill_image(image, args.size)
        for rep in range(args.repeat):
            for i, row in enumerate(rows):
                shift = (rep + i) % len(servers)
                for name in servers[shift:] + servers[:shift]:
                    res = measure(kinds[name], row, rep, image, args.size, scratch, args)
                    results.append(res)
                    status = (
                        f"{res.throughput:.0f} {row.unit}, {res.cpu_us_per_io:.1f} us cpu/io"
                        if res.ok
                        else f"FAILED: {res.error}"
                    )
                    print(
                        f"  [{rep + 1}/{args.repeat}] {row.name:<20} {name:<10} {status}",
                        file=sys.stderr,
                        flush=True,
                    )

    table = summarize(results, rows, servers)
    text, min_ratio = render(table, rows, servers, subject, peers)
    if args.json:
        args.json.write_text(
            json.dumps(
                _json_safe(
                    {
                        "versions": info,
                        "servers": {s: kinds[s].describe for s in servers},
                        "settings": {
                            "runtime": args.runtime,
                            "ramp_time": args.ramp_time,
                            "repeat": args.repeat,
                            "size": args.size,
                        },
                        "summary": {
                            row: {s: asdict(c) for s, c in cells.items()}
                            for row, cells in table.items()
                        },
                        "min_ratio": None if math.isnan(min_ratio) else min_ratio,
                        "runs": [asdict(r) for r in results],
                    }
                ),
                indent=1,
                default=str,
            )
        )
    sys.stderr.flush()
    print()
    print(text)
    print(f"min_ratio={min_ratio:.2f}", flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
