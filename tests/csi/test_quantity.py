"""TenantQuota quantities (csi.quota.parse_quantity): what a cluster admin may write, and a clear
ValueError (the quota then refuses with the object's name) for anything else."""

from __future__ import annotations

import pytest

from csi.quota import MAX_QUANTITY, parse_quantity

GOOD = [
    ("plain", "4096", 4096),
    ("int", 7, 7),
    ("binary suffix", "100Gi", 100 * 2**30),
    ("decimal suffix", "1.5G", 1_500_000_000),
    ("rounded up", "1.0001k", 1001),
    ("largest", str(MAX_QUANTITY), MAX_QUANTITY),
]

BAD = [
    ("negative int", -1, "negative"),
    ("bool", True, "not a quantity"),
    ("garbage", "lots", "not a quantity"),
    ("non-ASCII digits", "\u0661\u0662", "not a quantity"),
    ("3 MB of digits", "9" * 3_000_000, "not a quantity"),
    ("past int64", str(MAX_QUANTITY + 1), "larger than"),
    ("past int64 by suffix", "9000000Ei", "larger than"),
    ("huge int", 10**30, "larger than"),
]


@pytest.mark.parametrize(("value", "want"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_quantities_parse(value: object, want: int) -> None:
    assert parse_quantity(value, "spec.capacity") == want


@pytest.mark.parametrize(("value", "says"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_quantities_say_what_is_wrong(value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says) as err:
        parse_quantity(value, "spec.capacity")
    assert str(err.value).startswith("spec.capacity: ")
    assert len(str(err.value)) < 200  # the value is cut, not repeated in full
