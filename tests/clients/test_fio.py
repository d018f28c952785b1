"""fio's nbd engine against the server: random writes at depth, then crc32c verification.

Owns: data integrity under load from a second, independent client implementation: two jobs,
each on its own connection and its own region (offset_increment), 32 requests in flight,
every block written then read back and checked by fio's crc32c verify headers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.clients.targets import MiB, NbdTarget, run

REGION = 16 * MiB  # each job's region; the export is 64M


def job_file(path: Path, uri: str, *, sizes: str, rw: str) -> Path:
    path.write_text(
        f"""[global]
ioengine=nbd
uri={uri}
rw={rw}
{sizes}
iodepth=32
numjobs=2
size={REGION // 2}
offset_increment={REGION}
verify=crc32c
do_verify=1
verify_fatal=0
randrepeat=1
# No verify state files left in the working directory.
verify_state_save=0
[region]
"""
    )
    return path


def fio(job: Path, out: Path, *args: str, check: bool = True) -> tuple[int, dict[str, Any], str]:
    p = run(["fio", "--output-format=json", f"--output={out}", *args, str(job)], check=False)
    text = out.read_text()
    # The nbd engine and verify failures print lines of their own into fio's JSON output file.
    start = re.search(r'\{\s*"fio version"', text)
    assert start, f"no JSON report from fio\n{text[:4000]}"
    report: dict[str, Any] = json.loads(text[start.start() :])
    if check:
        assert p.returncode == 0, (
            f"fio exited {p.returncode}\n{p.stdout}\n{p.stderr}\n{text[:4000]}"
        )
    return p.returncode, report, p.stdout + p.stderr + text


@pytest.mark.parametrize(
    ("sizes", "rw"),
    [
        pytest.param("bs=4k", "randwrite", id="4k-randwrite"),
        pytest.param("bs=64k", "randwrite", id="64k-randwrite"),
        pytest.param("bsrange=4k-128k", "randwrite", id="mixed-sizes-randwrite"),
        pytest.param("bs=4k", "write", id="4k-sequential"),
    ],
)
def test_write_then_verify(target: NbdTarget, tmp_path: Path, sizes: str, rw: str) -> None:
    job = job_file(tmp_path / "job.fio", target.uri("disk"), sizes=sizes, rw=rw)
    _, report, output = fio(job, tmp_path / "out.json")
    assert "verify:" not in output
    jobs = report["jobs"]
    assert len(jobs) == 2
    for j in jobs:
        assert j["error"] == 0
        assert j["write"]["io_bytes"] == REGION // 2
        # The verify pass read back everything written.
        assert j["read"]["io_bytes"] == REGION // 2


def test_verify_catches_wrong_data(target: NbdTarget, tmp_path: Path) -> None:
    """Negative control: verifying a region nobody wrote fails, so a pass above means something."""
    job = job_file(tmp_path / "job.fio", target.uri("disk"), sizes="bs=4k", rw="randwrite")
    rc, _, output = fio(job, tmp_path / "out.json", "--verify_only", check=False)
    assert rc != 0
    assert "bad magic header" in output
