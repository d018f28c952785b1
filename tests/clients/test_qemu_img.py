"""qemu-img against the server: `info`, `convert` in and out of an export, `compare`.

Owns: checking that QEMU's image tool sees each export as a raw disk of the right size and
moves exact bytes through it, with and without parallel out-of-order writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clients.targets import MiB, NbdTarget, patterned_image, run, sha256


@pytest.mark.parametrize(
    ("export", "size"),
    [
        pytest.param("disk", 64 * MiB, id="disk-64M"),
        pytest.param("ro", 16 * MiB, id="readonly-16M"),
        pytest.param("small", 1 * MiB, id="small-1M"),
    ],
)
def test_info_reports_raw_and_size(target: NbdTarget, export: str, size: int) -> None:
    info = json.loads(run(["qemu-img", "info", "--output=json", target.uri(export)]).stdout)
    assert info["format"] == "raw"
    assert info["virtual-size"] == size


CONVERT_EXTENTS = [
    (0, 4096),
    (1 * MiB + 512, 300 * 1024),
    (17 * MiB, 2 * MiB),
    (64 * MiB - 8192, 8192),
]


@pytest.mark.parametrize(
    "convert_opts",
    [
        pytest.param([], id="sequential"),
        pytest.param(["-W", "-m", "8"], id="out-of-order-8-coroutines"),
    ],
)
def test_convert_in_and_out(target: NbdTarget, tmp_path: Path, convert_opts: list[str]) -> None:
    src = patterned_image(tmp_path / "src.img", 64 * MiB, CONVERT_EXTENTS, seed=1)
    out = tmp_path / "out.img"
    uri = target.uri("disk")
    # -n: the export exists already; qemu-img must not try to create it.
    run(["qemu-img", "convert", *convert_opts, "-n", "-f", "raw", "-O", "raw", str(src), uri])
    run(["qemu-img", "convert", *convert_opts, "-f", "raw", "-O", "raw", uri, str(out)])
    assert out.stat().st_size == 64 * MiB
    assert sha256(out) == sha256(src)


@pytest.mark.parametrize(
    "direction",
    [
        pytest.param("file-vs-export", id="file-vs-export"),
        pytest.param("export-vs-file", id="export-vs-file"),
    ],
)
def test_compare_identical_then_mismatch(target: NbdTarget, tmp_path: Path, direction: str) -> None:
    src = patterned_image(tmp_path / "src.img", 64 * MiB, CONVERT_EXTENTS, seed=2)
    uri = target.uri("disk")
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])

    def compare() -> tuple[int, str]:
        pair = [str(src), uri] if direction == "file-vs-export" else [uri, str(src)]
        p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", *pair], check=False)
        return p.returncode, p.stdout.strip()

    assert compare() == (0, "Images are identical.")

    # Change one byte inside a hole of the source; qemu-img reports the 512-byte sector.
    changed = 40 * MiB + 512 + 7
    run(["qemu-io", "-f", "raw", uri, "-c", f"write -P 0x01 {changed} 1"])
    assert compare() == (1, f"Content mismatch at offset {changed // 512 * 512}!")
