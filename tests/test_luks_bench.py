"""bench/luks_bench.py's arguments, without booting a guest (the script itself is run by hand:
bench/README.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "luks_bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("luks_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["luks_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_rows_default_to_all_and_unknown_ones_are_refused(bench: ModuleType) -> None:
    assert bench.parse_args([]).rows == list(bench.ROWS)
    assert bench.parse_args(["--rows", "randread4k"]).rows == ["randread4k"]
    for bad in (["--rows", "seqread"], ["--size", "8"], ["--runtime", "0"]):
        with pytest.raises(SystemExit) as info:
            bench.parse_args(bad)
        assert info.value.code == 2
