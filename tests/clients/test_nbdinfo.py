"""nbdinfo against the server: export list, flags, block size constraints, allocation map.

Owns: what a client learns in the handshake (NBD_OPT_LIST, NBD_OPT_INFO/GO with
NBD_INFO_BLOCK_SIZE, transmission flags) and through NBD_CMD_BLOCK_STATUS with the
base:allocation context, as reported by libnbd's nbdinfo.
"""

from __future__ import annotations

import pytest

from tests.clients.targets import (
    DATA,
    HOLE_ZERO,
    RO_SEED_LEN,
    KiB,
    MiB,
    NbdTarget,
    merged_map,
    nbdinfo_json,
    run,
)


@pytest.mark.peer_differs("qemu-nbd serves one export per process, so lists only that one")
def test_list_shows_every_export(target: NbdTarget) -> None:
    listing = nbdinfo_json("--list", target.server_uri())
    exports = {e["export-name"]: e for e in listing["exports"]}
    # Command-line exports are listed; a volume's attachment (its name holds the credential)
    # never is.
    assert sorted(exports) == sorted(target.listed)
    for name, spec in target.listed.items():
        assert exports[name]["export-size"] == spec.size, name
        assert exports[name]["is_read_only"] is spec.readonly, name
        assert exports[name]["uri"] == target.uri(name)
        # NBD_REP_SERVER carries the description; nbdinfo leaves the key out when it is empty.
        assert exports[name].get("description", "") == spec.description, name
    text = run(["nbdinfo", "--list", target.server_uri()]).stdout
    for name in target.listed:
        assert f'export="{name}":' in text
    for name in set(target.exports) - set(target.listed):
        assert target.export_name(name) not in text


WRITABLE_FLAGS = {
    "is_read_only": False,
    "can_flush": True,
    "can_fua": True,
    "can_multi_conn": True,
    "can_trim": True,
    "can_zero": True,
    "can_cache": True,
}


@pytest.mark.parametrize(
    ("export", "expected"),
    [
        pytest.param("disk", {"export-size": 64 * MiB, **WRITABLE_FLAGS}, id="disk"),
        pytest.param("small", {"export-size": 1 * MiB, **WRITABLE_FLAGS}, id="small"),
        pytest.param(
            "ro",
            {"export-size": 16 * MiB, "is_read_only": True},
            id="readonly",
        ),
    ],
)
def test_json_flags(target: NbdTarget, export: str, expected: dict[str, object]) -> None:
    info = nbdinfo_json(target.uri(export))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (e,) = info["exports"]
    assert e["export-name"] == target.export_name(export)
    assert {k: e.get(k) for k in expected} == expected
    assert "base:allocation" in e["contexts"]


@pytest.mark.parametrize("export", ["disk", "ro", "small"])
def test_block_size_constraints(target: NbdTarget, export: str) -> None:
    """NBD_INFO_BLOCK_SIZE values obey the "Size constraints" section of the spec."""
    (e,) = nbdinfo_json(target.uri(export))["exports"]
    minimum = e["block_size_minimum"]
    preferred = e["block_size_preferred"]
    maximum = e["block_size_maximum"]
    size = e["export-size"]

    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    assert power_of_two(minimum) and minimum <= 64 * KiB
    assert power_of_two(preferred) and preferred >= max(minimum, 512)
    assert maximum >= preferred
    assert maximum >= min(size, 1 * MiB)  # SHOULD be at least 2^20 if the export is that large
    assert size % minimum == 0


@pytest.mark.parametrize(
    ("export", "is_flag", "expected_exit"),
    [
        pytest.param("disk", "read-only", 2, id="disk-not-read-only"),
        pytest.param("ro", "read-only", 0, id="ro-is-read-only"),
        pytest.param("disk", "multi-conn", 0, id="disk-can-multi-conn"),
        pytest.param("disk", "trim", 0, id="disk-can-trim"),
        pytest.param("disk", "fua", 0, id="disk-can-fua"),
    ],
)
def test_is_can_exit_status(
    target: NbdTarget, export: str, is_flag: str, expected_exit: int
) -> None:
    opt = "--is" if is_flag == "read-only" else "--can"
    assert (
        run(["nbdinfo", opt, is_flag, target.uri(export)], check=False).returncode == expected_exit
    )


def test_map_fresh_export_is_one_hole(target: NbdTarget) -> None:
    assert merged_map(target.uri("disk")) == [(0, 64 * MiB, HOLE_ZERO)]


def test_map_readonly_seed(target: NbdTarget) -> None:
    assert merged_map(target.uri("ro")) == [
        (0, RO_SEED_LEN, DATA),
        (RO_SEED_LEN, 16 * MiB - RO_SEED_LEN, HOLE_ZERO),
    ]


def test_map_after_writes_and_trims(target: NbdTarget) -> None:
    uri = target.uri("disk")
    commands = [
        f"write -P 0xaa 0 {1 * MiB}",
        f"discard {256 * KiB} {256 * KiB}",
        f"write -P 0xbb {2 * MiB} {64 * KiB}",
        f"write -P 0xcc {63 * MiB} {1 * MiB}",
        f"discard {63 * MiB} {1 * MiB}",
        "flush",
    ]
    argv = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        argv += ["-c", c]
    run(argv)
    assert merged_map(uri) == [
        (0, 256 * KiB, DATA),
        (256 * KiB, 256 * KiB, HOLE_ZERO),
        (512 * KiB, 512 * KiB, DATA),
        (1 * MiB, 1 * MiB, HOLE_ZERO),
        (2 * MiB, 64 * KiB, DATA),
        (2 * MiB + 64 * KiB, 62 * MiB - 64 * KiB, HOLE_ZERO),
    ]
