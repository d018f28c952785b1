"""The end-to-end proof on the KubeVirt path: tests/e2e/kernel_scenario.py as one test.

Two qemu-system guests (TCG, Debian's kernel NBD) are Kubernetes nodes A and B, each running
the real node plugin; the host runs two storage nodes and the CSI controller and makes
kubelet's and the sidecars' calls in their order: attach to A, write, live migration to B with
A fenced, a graceful restart and a crash of the storage node while B writes, and every
acknowledged record read back in the guest and on the host. Each step raises with what went
wrong; the step log with its timings (for people, never asserted) goes to stdout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.kernel_scenario import KernelScenario, missing

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_kubevirt_kernel_path(tmp_path: Path) -> None:
    reason = missing()
    if reason is not None:
        pytest.skip(f"the kernel-path scenario needs {reason}")
    report = KernelScenario(tmp_path).run()
    print(report.table())
    assert report.facts["fence"].startswith("leftover device write: error")
    assert report.facts["records"].endswith("the write after the fence is not")
