"""Run the end-to-end scenario (docs/e2e.md) and watch it: each step and its time, then a table.

    python scripts/e2e.py [--workdir DIR] [--keep]

Everything runs on this machine, on 127.0.0.1: two storage nodes, the CSI controller, a
Kubernetes API stand-in, Prometheus and qemu-system-x86_64 guests (TCG). Needs no root, but
the Debian packages of scripts/install-deps.sh. Exit status 0 when every step held, 1 when one
failed (the work directory with every log is kept then), 2 when the machine lacks a
prerequisite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.scenario import Scenario, missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where logs and images go (default: a new temp dir, removed on success)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nbd-csi-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"work directory: {workdir}", flush=True)
    scenario = Scenario(workdir, say=lambda text: print(text, flush=True))
    try:
        report = scenario.run()
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            traceback.print_exc()
        print(f"\nFAILED: {exc}\nlogs kept in {workdir}", file=sys.stderr)
        return 1
    print()
    print(report.table())
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
