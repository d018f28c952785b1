"""Fixtures for the client interoperability tests.

Owns: `target`, a fresh server with the standard exports for each test (our storage node, or
qemu-nbd when NBD_CLIENT_TESTS_SERVER=qemu-nbd); on our storage node every test runs twice,
against command-line exports (`[export]`) and against volumes reached through attachments
(`[volume]`, tests/clients/targets.py), and the `peer_differs` marker: a case that
pins down our behaviour where qemu-nbd is known to behave otherwise is expected to fail (strictly)
when the tests run against qemu-nbd, and must pass against ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients.targets import OURS, NbdTarget, access_kinds, server_kind, start_target


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "peer_differs(reason): our expected behaviour, which qemu-nbd does not share; "
        "xfail (strict) when NBD_CLIENT_TESTS_SERVER names a peer",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kind = server_kind()
    if kind == OURS:
        return
    for item in items:
        for mark in item.iter_markers("peer_differs"):
            reason = mark.args[0] if mark.args else "differs from ours"
            item.add_marker(pytest.mark.xfail(reason=f"{kind}: {reason}", strict=True))


@pytest.fixture(params=access_kinds())
def target(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NbdTarget]:
    t = start_target(server_kind(), tmp_path / "server", access=request.param)
    try:
        yield t
    finally:
        t.stop()
        # Shown by pytest only when the test failed.
        print(t.logs()[-8000:])
