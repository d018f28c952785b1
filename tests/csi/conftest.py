"""Fixtures shared by the CSI plugin tests: one real storage node per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.api import ApiNode, start_api_node


@pytest.fixture(scope="module")
def storage_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiNode]:
    """Our storage node with its management API (no NBD worker processes, to save CPU)."""
    node = start_api_node(tmp_path_factory.mktemp("storage"), workers=0, node_id="storage-a")
    try:
        yield node
    finally:
        node.stop()
