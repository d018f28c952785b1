"""Run the end-to-end scenarios (docs/e2e.md) and watch them: each step and its time, then a table.

    python scripts/e2e.py [--path qemu|kernel|both] [--workdir DIR] [--keep]

Everything runs on this machine, on loopback: two storage nodes, the CSI controller, a
Kubernetes API stand-in and qemu-system-x86_64 guests (TCG). `--path qemu` (the default, the
fastest) boots and migrates a real guest whose disk QEMU's own NBD client opens from
publish_context, with Prometheus watching the quota; `--path kernel` takes the KubeVirt path:
two guests are two Kubernetes nodes running the node plugin with the kernel's NBD, driven
through NodeStage/NodePublish, live migration with fencing, and a storage node restart and
crash under a workload; `--path both` runs one after the other. Needs no root, but the Debian
packages of scripts/install-deps.sh. Exit status 0 when every step held, 1 when one failed
(the work directory with every log is kept then), 2 when the machine lacks a prerequisite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e import kernel_scenario, scenario
from tests.e2e.scenario import Report


class Runner(Protocol):
    def run(self) -> Report: ...


PATHS: dict[str, tuple[Callable[[], str | None], Callable[..., Runner]]] = {
    "qemu": (scenario.missing, scenario.Scenario),
    "kernel": (kernel_scenario.missing, kernel_scenario.KernelScenario),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--path",
        choices=("qemu", "kernel", "both"),
        default="qemu",
        help="qemu: QEMU's NBD client opens the volume; kernel: node plugins in guests "
        "attach it with the kernel's NBD (the KubeVirt path); both (default: qemu)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where logs and images go (default: a new temp dir, removed on success)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    paths = ["qemu", "kernel"] if args.path == "both" else [args.path]
    for path in paths:
        reason = PATHS[path][0]()
        if reason is not None:
            print(f"cannot run the {path} path: {reason}", file=sys.stderr)
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nbd-csi-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {workdir}", flush=True)
    reports: list[tuple[str, Report]] = []
    for path in paths:
        print(f"\n### the {path} path", flush=True)
        run = PATHS[path][1](workdir / path, say=lambda text: print(text, flush=True))
        try:
            report = run.run()
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                traceback.print_exc()
            print(f"\nFAILED ({path} path): {exc}\nlogs kept in {workdir}", file=sys.stderr)
            return 1
        reports.append((path, report))
    for path, report in reports:
        print(f"\n### the {path} path")
        print(report.table())
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
