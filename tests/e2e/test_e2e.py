"""The end-to-end proof as one test: the scenario of tests/e2e/scenario.py (docs/e2e.md).

Two storage nodes, the CSI controller driven through its gRPC API in the sidecars' order, a
TenantQuota in the Kubernetes API stand-in, Prometheus, and qemu-system guests (TCG) booted from
the CSI volumes: golden image and clone, live migration with fencing of the source node,
snapshot and restore checked inside a second guest, online expansion, the quota refusal seen
in Prometheus, and storage node restarts under guest I/O. Each step raises with what went
wrong; the step log (with timings, for people, never asserted) goes to stdout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.scenario import QUOTA_BYTES, TENANT, Scenario, missing

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_kubevirt_user_story(tmp_path: Path) -> None:
    reason = missing()
    if reason is not None:
        pytest.skip(f"the end-to-end scenario needs {reason}")
    report = Scenario(tmp_path).run()
    print(report.table())
    assert report.facts["snapshot point"].startswith("record ")
    assert TENANT in report.facts["quota refusal"]
    assert report.facts["prometheus"].endswith(f"= {QUOTA_BYTES}")
