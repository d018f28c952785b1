"""bench/nbd_bench.py's plan and bookkeeping, without running a benchmark.

Owns: the row matrix (FLUSH rows included), which server the ratio measures against which,
redaction of attachment credentials, `--dry-run` and `--location` handling. Nothing here
starts a server or measures time.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "nbd_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nbd_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nbd_bench"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_rows_include_flush_rows(bench: ModuleType) -> None:
    rows = {r.name: r for r in bench.all_rows()}
    assert len(rows) == 16
    for name in (
        "4k-randwrite-qd1-c1-fsync32",
        "4k-randwrite-qd32-c1-fsync32",
        "4k-randwrite-qd32-c2-fsync32",
    ):
        assert rows[name].fsync == 32 and rows[name].rw == "randwrite"
    job = bench.fio_job(rows["4k-randwrite-qd32-c1-fsync32"], "nbd://h:1/x", 1 << 30, 5, 1)
    assert "fsync=32\n" in job and "uri=nbd://h:1/x\n" in job
    assert "fsync" not in bench.fio_job(rows["4k-randwrite-qd32-c1"], "nbd://h:1/x", 1 << 30, 5, 1)


def test_ratio_is_ours_qos_against_the_peers(bench: ModuleType) -> None:
    pick = bench.subject_and_peers
    assert pick(["ours", "ours-qos", "qemu-nbd", "nbdkit", "ours-raw"]) == (
        "ours-qos",
        ["qemu-nbd", "nbdkit"],
    )
    assert pick(["ours-raw", "ours"]) == ("ours", ["ours-raw"])  # only ours: each other
    assert pick(["qemu-nbd", "nbdkit"]) == ("qemu-nbd", ["nbdkit"])
    assert pick(["nbdkit"]) == ("nbdkit", [])


def test_min_ratio_over_rows_with_a_peer(bench: ModuleType) -> None:
    rows = [r for r in bench.all_rows() if r.name.startswith("4k-randread-qd32")]
    cell = bench.Cell
    table = {
        rows[0].name: {"ours-qos": cell(80, 1, 1, 1, 1), "nbdkit": cell(100, 1, 1, 1, 1)},
        rows[1].name: {"ours-qos": cell(math.nan, 1, 1, 1, 0), "nbdkit": cell(50, 1, 1, 1, 1)},
    }
    text, ratios = bench.render(table, rows, ["ours-qos", "nbdkit"], "ours-qos", ["nbdkit"])
    assert ratios == [0.8, 0.0]  # a row the subject failed counts as 0
    assert rows[0].name in text


def test_export_credential_is_redacted(bench: ModuleType) -> None:
    export = "vol-0123456789abcdef.s3cr3t-TOKEN_value"
    uri = f"nbd://127.0.0.1:10809/{export}"
    assert bench.redact_export(export) == "vol-0123456789abcdef.<redacted>"
    text = bench.redact(f"connect to {uri} failed; export {export}", uri)
    assert "s3cr3t" not in text and text.count("vol-0123456789abcdef.<redacted>") == 2
    assert bench.redact("nbd://h:1/bench", "nbd://h:1/bench") == "nbd://h:1/bench"


def test_dry_run_prints_the_plan(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench.main(["--dry-run", "--quick", "--runtime", "1", "--rows", "qd32-c1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 locations x 3 rows x 4 servers x 1 repeats = 24 runs" in out
    assert "ratio: ours-qos / max(qemu-nbd, nbdkit)" in out
    assert "4k-randwrite-qd32-c1-fsync32" in out and "runtime=1" in out


@pytest.mark.parametrize(
    "argv",
    [["--location", "ssd"], ["--location", "tmpfs,tmpfs"], ["--servers", "ours,nope"]],
)
def test_bad_arguments_are_refused(bench: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--dry-run", *argv])
    assert exc.value.code == 2
