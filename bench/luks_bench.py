"""What encryption costs: fio on an encrypted volume's published device beside a plain one's,
both staged by the real node plugin in one qemu-system guest (Debian's kernel, dm-crypt) against
our storage node on the host.

    python bench/luks_bench.py                       # every row, 5 s each, 256 MiB volumes
    python bench/luks_bench.py --runtime 2 --rows seqread,randread4k --json luks.json

It is a script, not a test: it prints a table and, per row, the ratio encrypted / plain. The
guest runs under TCG (no KVM here): its CPU is emulated, AES-NI included or not, so absolute
numbers mean nothing and the ratio is an upper bound on the cost on real hardware, where AES-NI
encrypts at GB/s per core (docs/csi-node.md, "Encrypted volumes"). Needs what the VM tests
need (qemu-system-x86, Debian's kernel, cryptsetup-bin, fio) and root. Run it on a quiet
machine: the numbers are only as quiet as the machine is.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import secrets
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.api import start_api_node  # noqa: E402
from tests.vm.guest import (  # noqa: E402
    GuestImage,
    build_hostroot_initramfs,
    find_kernel,
    missing_prerequisites,
)
from tests.vm.plugin_host import attachment, guest_python  # noqa: E402

MiB = 1024 * 1024
# name: (fio rw, block size, queue depth)
ROWS = {
    "seqwrite1m": ("write", "1m", 4),
    "seqread1m": ("read", "1m", 4),
    "randwrite4k": ("randwrite", "4k", 16),
    "randread4k": ("randread", "4k", 16),
}
RESULT = re.compile(r"^BENCH (\S+) (\S+) (\d+) (\d+)\s*$", re.MULTILINE)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=int, default=5, help="seconds per fio run (default 5)")
    p.add_argument("--size", type=int, default=256, help="volume size in MiB (default 256)")
    p.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)} (default all)"
    )
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--timeout", type=float, default=900, help="the guest's limit in seconds")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {', '.join(unknown)} (known: {', '.join(ROWS)})")
    if args.size < 16 or args.runtime < 1:
        p.error("--size is at least 16 (MiB) and --runtime at least 1")
    args.rows = rows
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    reason = missing_prerequisites()
    if reason is not None:
        print(f"luks_bench: cannot boot a guest: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="luks-bench-") as tmp:
        work = Path(tmp)
        kernel = find_kernel()
        image = GuestImage(kernel, build_hostroot_initramfs(work / "initramfs", kernel))
        storage = start_api_node(work / "storage", workers=None, node_id="storage-vm")
        try:
            size = args.size * MiB
            spec = {
                "plain": attachment(storage, "bench-plain", size),
                "encrypted": attachment(storage, "bench-encrypted", size),
                "key": base64.b64encode(secrets.token_bytes(32)).decode(),
                "rows": {name: ROWS[name] for name in args.rows},
                "runtime": args.runtime,
            }
            script = guest_python("bench/luks_bench_guest.py", spec)
            result = image.run(
                script,
                work / "guest",
                nbd_port=storage.nbd_port,
                memory_mb=1024,
                timeout=args.timeout,
                host_root=True,
            )
        finally:
            storage.stop()
    if result.exit_code != 0:
        print(result.explain(60), file=sys.stderr)
        return 1
    found: dict[str, dict[str, tuple[int, int]]] = {}
    for row, device, bw, iops in RESULT.findall(result.output):
        found.setdefault(row, {})[device] = (int(bw), int(iops))
    print(f"{'row':<12} {'plain MB/s':>11} {'encrypted MB/s':>15} {'IOPS plain':>11} "
          f"{'IOPS enc.':>10} {'ratio':>6}")  # fmt: skip
    ratios = {}
    for row in args.rows:
        (pbw, piops), (ebw, eiops) = found[row]["plain"], found[row]["encrypted"]
        ratios[row] = ebw / pbw if pbw else 0.0
        print(
            f"{row:<12} {pbw / 1e6:>11.1f} {ebw / 1e6:>15.1f} {piops:>11} {eiops:>10} "
            f"{ratios[row]:>6.2f}"
        )
    print(f"min_ratio={min(ratios.values()):.2f} (encrypted / plain, TCG guest: relative only)")
    if args.json:
        args.json.write_text(json.dumps({"rows": found, "ratios": ratios}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
