"""nbdcopy against the server: sparse copies into an export and back out.

Owns: checking that a local file with holes goes into the export and comes back byte for byte,
over one connection and over nbdcopy's default multi-conn, and that holes stay holes on both
sides: in the image file the server keeps, as base:allocation reports it, and in the copy out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clients.targets import (
    DATA,
    KiB,
    MiB,
    NbdTarget,
    allocated_bytes,
    data_ranges,
    merged_map,
    patterned_image,
    run,
    sha256,
)

SIZE = 64 * MiB
# Filesystems keep extent metadata in a few blocks of their own; allow that much, no more.
ALLOCATION_SLACK = 64 * KiB

LAYOUTS = {
    "scattered": [
        (0, 64 * KiB),
        (5 * MiB + 4 * KiB, 1 * MiB),
        (40 * MiB, 3 * MiB),
        (SIZE - 4 * KiB, 4 * KiB),
    ],
    "all-holes": [],
    "dense-16M": [(0, 16 * MiB)],
}


@pytest.mark.parametrize(
    "copy_opts",
    [pytest.param([], id="multi-conn"), pytest.param(["--connections=1"], id="one-connection")],
)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sparse_copy_round_trip(
    target: NbdTarget, tmp_path: Path, layout: str, copy_opts: list[str]
) -> None:
    extents = LAYOUTS[layout]
    src = patterned_image(tmp_path / "src.img", SIZE, extents, seed=len(layout))
    assert data_ranges(src) == extents  # the source really is sparse
    data_bytes = sum(length for _, length in extents)
    uri = target.uri("disk")

    run(["nbdcopy", *copy_opts, str(src), uri])

    image = target.image("disk")
    assert data_bytes <= allocated_bytes(image) <= data_bytes + ALLOCATION_SLACK
    assert [(off, length) for off, length, typ in merged_map(uri) if typ == DATA] == extents

    out = tmp_path / "out.img"
    run(["nbdcopy", *copy_opts, uri, str(out)])
    assert out.stat().st_size == SIZE
    assert sha256(out) == sha256(src)
    assert allocated_bytes(out) <= data_bytes + ALLOCATION_SLACK
