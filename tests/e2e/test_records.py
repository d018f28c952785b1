"""The kernel-path workload (tests/e2e/records.py) on a plain file, without a guest: records
are what the checker expects, the writer stops on its stop file and acknowledges only what it
read back, and a changed byte is found."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e import records

MiB = 1024 * 1024


def test_records_differ_by_number_and_volume() -> None:
    a, b = records.record("vol-1", 7), records.record("vol-1", 8)
    assert len(a) == len(b) == records.RECORD
    assert a != b != records.record("vol-2", 7)
    assert records.record("vol-1", 7) == a
    assert records.check("vol-1", 7, a + b) == []
    assert records.check("vol-1", 7, b + a) == [7, 8]


def test_writer_runs_until_its_stop_file_and_verify_finds_a_changed_byte(tmp_path: Path) -> None:
    device = tmp_path / "disk.img"
    with open(device, "wb") as f:
        f.truncate(4 * MiB)
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("this filesystem has no O_DIRECT")
    stop = tmp_path / "stop"
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        if text == f"{records.PREFIX} ACK 29":
            stop.touch()  # the test says stop once the 20th record of this run is in

    summary = records.write_loop(str(device), "vol-x", 10, stop, say)
    assert summary["first"] == 10 and summary["last"] == 29 and summary["acked"] == 20
    assert summary["errors"] == summary["mismatches"] == 0
    assert lines == [f"{records.PREFIX} ACK {n}" for n in range(10, 30)]
    assert records.verify_device(str(device), "vol-x", 10, 29) == []
    with open(device, "r+b") as g:
        g.seek(17 * records.RECORD + 100)
        g.write(b"X")
    assert records.verify_device(str(device), "vol-x", 10, 29) == [17]
    # Records 0..9 were never written: zeros are not records.
    assert records.verify_device(str(device), "vol-x", 0, 9) == list(range(10))


def test_the_device_tail_is_kept_for_the_fence_probe() -> None:
    size = 256 * MiB
    assert records.capacity(size) * records.RECORD <= size - records.RESERVED
    assert records.probe_offset(size) >= records.capacity(size) * records.RECORD
