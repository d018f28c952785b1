"""Labels are bounded and List replies always fit a gRPC message, through a real node's API.

Issue 12: 3 MB of labels on one volume made ListVolumes fail for every caller ("Received
message larger than max"). Labels now have Kubernetes-like bounds (docs/storage-node-api.md),
refused with INVALID_ARGUMENT, and ListVolumes/ListSnapshots cut their pages by bytes as well
as by count, so even volumes at the label bounds list in full, page by page, with the default
4 MiB client limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from storage_node.v1 import storage_node_pb2 as pb
from tests.support.api import Api, ApiNode, api_node

MiB = 1 << 20
GRPC_DEFAULT_MAX = 4 * MiB
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiNode]:
    with api_node(tmp_path_factory.mktemp("bounds") / "data", workers=0) as n:
        yield n


def create(api: Api, name: str, labels: dict[str, str], tenant: str = "bounds") -> pb.Volume:
    return api.CreateVolume(
        pb.CreateVolumeRequest(name=name, tenant=tenant, size_bytes=MiB, labels=labels)
    )


def expect_invalid(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == Code.INVALID_ARGUMENT, info.value.details()
    details = info.value.details() or ""
    assert len(details) < 1000  # the message never echoes the whole input
    return details


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        pytest.param({"big": "x" * (3 * MiB)}, "at most 1024", id="3MB-value"),
        pytest.param({"v": "x" * 1025}, "at most 1024", id="value-1025"),
        pytest.param({"k" * 318: "v"}, "1 to 317", id="key-318"),
        pytest.param({"k" * (3 * MiB): "v"}, "1 to 317", id="3MB-key"),
        pytest.param({"": "v"}, "1 to 317", id="empty-key"),
        pytest.param({"a b": "v"}, "without spaces", id="key-with-space"),
        pytest.param({"k": "line\nbreak"}, "printable", id="control-in-value"),
        pytest.param({f"k{i}": "v" for i in range(65)}, "at most 64 labels", id="65-labels"),
        pytest.param({f"k{i}": "v" * 1000 for i in range(17)}, "16384 bytes", id="17KiB"),
    ],
)
def test_labels_out_of_bounds_are_invalid(
    node: ApiNode, labels: dict[str, str], message: str
) -> None:
    name = f"bad-labels-{len(labels)}-{len(next(iter(labels)))}"
    assert message in expect_invalid(lambda: create(node.api, name, labels))
    listed = node.api.ListVolumes(pb.ListVolumesRequest(name=name))
    assert not listed.volumes  # nothing was kept


def test_labels_at_the_bounds_are_kept(node: ApiNode) -> None:
    at_bounds = {f"{i:02d}" + "k" * 253: "v" * 1 for i in range(64)}  # 64 keys of 255
    assert sum(len(k) + len(v) for k, v in at_bounds.items()) <= 16384
    vol = create(node.api, "labels-at-bounds", at_bounds)
    assert dict(vol.labels) == at_bounds
    longest = {"k" * 317: "v" * 1024}
    assert dict(create(node.api, "labels-longest", longest).labels) == longest


def test_list_volumes_pages_by_bytes_so_every_page_fits(node: ApiNode) -> None:
    """300 volumes with 15 KiB of labels each are 4.5 MiB: more than one reply may hold.
    Every page fits the default limit; paging returns each volume exactly once."""
    api = node.api
    labels = {f"label-{i:02d}": "x" * 1000 for i in range(15)}
    made = {create(api, f"paged-{i:03d}", labels, tenant="paged").id for i in range(300)}
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        request = pb.ListVolumesRequest(tenant="paged", page_size=1000, page_token=token)
        reply = api.ListVolumes(request)
        assert reply.ByteSize() < GRPC_DEFAULT_MAX
        seen += [v.id for v in reply.volumes]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert pages >= 2
    assert sorted(seen) == sorted(made)
    # page_size still caps a page that bytes would allow.
    small = api.ListVolumes(pb.ListVolumesRequest(tenant="paged", page_size=7))
    assert len(small.volumes) == 7 and small.next_page_token == small.volumes[-1].id
