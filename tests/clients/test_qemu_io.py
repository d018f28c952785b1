"""qemu-io against the server: patterned writes and reads, discard, write-zeroes, flush, FUA, aio.

Owns: QEMU's block layer as an NBD client, opened both as `-f raw nbd://...` and through
`--image-opts`. Every read names the exact byte it expects (`read -P`); qemu-io reports a
mismatch as "Pattern verification failed", which `qemu_io()` turns into a test failure.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.clients.targets import KiB, MiB, NbdTarget, run

Opener = Callable[[NbdTarget, str], list[str]]


def open_uri(target: NbdTarget, export: str) -> list[str]:
    return ["-f", "raw", target.uri(export)]


def open_image_opts(target: NbdTarget, export: str) -> list[str]:
    host, port = target.host_port(export)
    opts = f"driver=raw,file.driver=nbd,file.host={host},file.port={port},"
    opts += f"file.export={target.export_name(export)}"
    return ["--image-opts", opts]


OPENERS = [pytest.param(open_uri, id="uri"), pytest.param(open_image_opts, id="image-opts")]


def qemu_io(open_args: list[str], commands: list[str], *, readonly: bool = False) -> str:
    """Run the commands in one qemu-io process; fail on any failed command or pattern."""
    argv = ["qemu-io", *(["-r"] if readonly else []), *open_args]
    for c in commands:
        argv += ["-c", c]
    p = run(argv, check=False)
    failed = [ln for ln in (p.stdout + p.stderr).splitlines() if "failed" in ln.lower()]
    assert p.returncode == 0 and not failed, f"qemu-io: {failed}\n{p.stdout}\n{p.stderr}"
    return p.stdout


# Each case is a list of qemu-io command batches; each batch runs in its own process, i.e. on
# a new NBD connection, so a later batch checks what an earlier one left on the server.
CASES: list[tuple[str, list[list[str]]]] = [
    (
        "write-then-read-pattern",
        [
            [f"write -P 0xab {1 * MiB} {64 * KiB}"],
            [
                f"read -P 0xab {1 * MiB} {64 * KiB}",
                f"read -P 0 {1 * MiB - 4 * KiB} {4 * KiB}",
                f"read -P 0 {1 * MiB + 64 * KiB} {4 * KiB}",
            ],
        ],
    ),
    (
        "unaligned-bytes",
        [
            ["write -P 0x11 1000 3000", "write -P 0x22 4000 1"],
            [
                "read -P 0 0 1000",
                "read -P 0x11 1000 3000",
                "read -P 0x22 4000 1",
                "read -P 0 4001 95",
            ],
        ],
    ),
    (
        "discard-reads-zeros",
        [
            [f"write -P 0xab 0 {1 * MiB}", f"discard {256 * KiB} {512 * KiB}"],
            [
                f"read -P 0xab 0 {256 * KiB}",
                f"read -P 0 {256 * KiB} {512 * KiB}",
                f"read -P 0xab {768 * KiB} {256 * KiB}",
            ],
        ],
    ),
    (
        "write-zeroes",
        [
            [f"write -P 0xcd {2 * MiB} {256 * KiB}", f"write -z {2 * MiB} {128 * KiB}"],
            [f"read -P 0 {2 * MiB} {128 * KiB}", f"read -P 0xcd {2 * MiB + 128 * KiB} {128 * KiB}"],
        ],
    ),
    (
        "write-zeroes-unmap",
        [
            [f"write -P 0xcd {3 * MiB} {256 * KiB}", f"write -z -u {3 * MiB} {256 * KiB}"],
            [f"read -P 0 {3 * MiB} {256 * KiB}"],
        ],
    ),
    (
        "write-fua",
        [
            [f"write -f -P 0x77 {5 * MiB} {64 * KiB}", f"write -f -z {5 * MiB} {4 * KiB}"],
            [f"read -P 0 {5 * MiB} {4 * KiB}", f"read -P 0x77 {5 * MiB + 4 * KiB} {60 * KiB}"],
        ],
    ),
    (
        "flush",
        [
            [
                f"write -P 0x5c {6 * MiB} {128 * KiB}",
                "flush",
                f"read -P 0x5c {6 * MiB} {128 * KiB}",
            ],
            ["flush", f"read -P 0x5c {6 * MiB} {128 * KiB}"],
        ],
    ),
    (
        "aio-batch-in-flight",
        [
            [f"aio_write -P 0x{i + 1:02x} {i * MiB} {64 * KiB}" for i in range(8)]
            + [f"aio_write -f -P 0x{i + 1:02x} {i * MiB + 64 * KiB} {4 * KiB}" for i in range(8)]
            + ["aio_flush"]
            + [f"aio_read -P 0x{i + 1:02x} {i * MiB} {68 * KiB}" for i in range(8)]
            + ["aio_flush"],
            [f"read -P 0x{i + 1:02x} {i * MiB} {68 * KiB}" for i in range(8)],
        ],
    ),
    (
        "last-block-of-export",
        [
            [f"write -P 0xee {64 * MiB - 4 * KiB} {4 * KiB}"],
            [
                f"read -P 0xee {64 * MiB - 4 * KiB} {4 * KiB}",
                f"read -P 0 {64 * MiB - 8 * KiB} {4 * KiB}",
            ],
        ],
    ),
]


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize(("batches"), [pytest.param(b, id=name) for name, b in CASES])
def test_qemu_io(target: NbdTarget, opener: Opener, batches: list[list[str]]) -> None:
    for batch in batches:
        qemu_io(opener(target, "disk"), batch)


def test_readonly_export_reads_seed(target: NbdTarget) -> None:
    qemu_io(
        open_uri(target, "ro"),
        [f"read -P 0x5a 0 {1 * MiB}", f"read -P 0 {1 * MiB} {15 * MiB}"],
        readonly=True,
    )


def test_pattern_mismatch_is_detected(target: NbdTarget) -> None:
    """Negative control: the harness does notice a wrong byte, even from an aio read."""
    for cmd in ("read -P 0x99 0 4096", "aio_read -P 0x99 0 4096"):
        with pytest.raises(AssertionError, match="Pattern verification failed"):
            qemu_io(open_uri(target, "disk"), [cmd, "aio_flush"])
