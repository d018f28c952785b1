"""Suite-wide test policy.

With NBD_CSI_NO_SKIP=1 (set by scripts/test.sh, so by CI) a skipped test is a failure: every
skip in this suite means a missing prerequisite (qemu, the kernel, root for a mount, the spec
files), and the test command installs all of them, so a skip there would hide a gap.
"""

from __future__ import annotations

import os
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("NBD_CSI_NO_SKIP") == "1"
        and report.skipped
        and not hasattr(report, "wasxfail")
    ):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, but NBD_CSI_NO_SKIP=1 forbids skips: {reason}"
